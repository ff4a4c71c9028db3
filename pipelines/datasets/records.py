"""Records of table-shaped sources (Hub Parquet, img2dataset) turned into rows: prompt rules, joined prompt files,
image cells in any of the forms a table holds them.

A *record* is one source row as a ``dict`` (column → value). Its prompts come from a column, or from a *rule*:
a ``str.format`` template over the record's fields (``"{caption}, in winter"``), or from a *joined file* that
maps each id to its prompts (CSV, TSV, JSONL or Parquet with ``id`` or ``key`` and ``target_prompt``).
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from instdiff.errors import InputNotFoundError
from pipelines import storage
from pipelines.datasets.files import Location, read_file, read_text
from pipelines.datasets.rows import DatasetError
from pipelines.storage import StorageConfig

JOIN_KEYS = ("id", "key")  # the id column of a joined prompt file, in order of preference
JOIN_PROMPTS = ("source_prompt", "target_prompt")


def check_template(template: str, what: str) -> list[str]:
    """The field names a prompt template uses; refuses a malformed one before any record is read.

    Args:
        template: a ``str.format`` template (``"a photo of {label}"``).
        what: the flag that gave it, for the message.

    Returns:
        The names in ``{...}``.

    Raises:
        DatasetError: unbalanced braces, or a positional ``{}`` field.
    """
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise DatasetError(f"{what}: {template!r} is not a valid template ({exc}); fields are {{column}}") from None
    if any(not n or n.isdigit() for n in names):
        raise DatasetError(f"{what}: {template!r} has a positional field; name a column, e.g. {{caption}}")
    return names


def fill_template(template: str, record: Mapping[str, Any]) -> str:
    """A prompt from a template and a record.

    Args:
        template: checked by :func:`check_template`.
        record: the fields (a missing or null field is an error; others are formatted with ``str``).

    Returns:
        The prompt, stripped.

    Raises:
        DatasetError: a field the record lacks or holds as null, or an empty result.
    """
    fields = {}
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        value = record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DatasetError(f"field {name!r} of the prompt template {template!r} is missing or empty")
        fields[name] = value.strip() if isinstance(value, str) else value
    text = template.format(**fields).strip()
    if not text:
        raise DatasetError(f"the prompt template {template!r} gives an empty text")
    return text


def image_cell(value: Any, loc: Location | None, what: str) -> bytes | None:
    """The encoded bytes of an image (or mask) cell in any form a table holds it.

    Accepted: bytes; a Hugging Face ``datasets`` Image struct ``{"bytes": ..., "path": ...}`` (the bytes; a
    struct with only a path is read from that path, relative to ``loc``); null.

    Args:
        value: the cell.
        loc: the folder relative paths are read from (``None``: a path-only struct is refused).
        what: the column, for messages.

    Returns:
        The bytes, or ``None`` for a null cell.

    Raises:
        DatasetError: a value of another kind, or a path-only struct without ``loc``.
        InputNotFoundError: the path of a path-only struct does not exist.
    """
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, Mapping) and set(value) <= {"bytes", "path"}:
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        path = value.get("path")
        if not path:
            return None
        if loc is None:
            raise DatasetError(f"{what} holds only a path ({path!r}) and no folder to read it from")
        fs, p = loc.resolve(str(path))
        return read_file(fs, p)
    raise DatasetError(
        f"{what} holds a {type(value).__name__}; expected encoded image bytes or a datasets Image struct"
    )


def _joined_records(path: str, fs: Any, name: str) -> list[dict[str, Any]]:
    lower = name.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.reading(f"prompt file {storage.display(fs, path)}"):
            return pq.read_table(path, filesystem=fs).to_pylist()
    text = read_text(fs, path)
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"prompt file {name} line {n}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"prompt file {name} line {n}: expected a JSON object")
            out.append(obj)
        return out
    if lower.endswith((".csv", ".tsv")):
        try:
            return list(csv.DictReader(io.StringIO(text), delimiter="\t" if lower.endswith(".tsv") else ","))
        except csv.Error as exc:
            raise DatasetError(f"prompt file {name}: not a readable CSV/TSV ({exc})") from None
    raise DatasetError(f"prompt file {name}: unknown format; accepted: .csv, .tsv, .jsonl, .parquet")


def read_joined_prompts(path: str, storage_cfg: StorageConfig | None = None) -> dict[str, dict[str, str]]:
    """A prompt file joined to a dataset by id: ``id`` (or ``key``) → ``{target_prompt[, source_prompt]}``.

    Args:
        path: CSV, TSV, JSONL or Parquet, local or ``s3://``, with an ``id`` or ``key`` column and a
            ``target_prompt`` column (a ``source_prompt`` column, when present, replaces the dataset's own).

    Returns:
        id → the prompts given for it (empty cells left out).

    Raises:
        InputNotFoundError: the file does not exist.
        DatasetError: an unknown suffix, not UTF-8 text, no id/key or target_prompt column, a repeated id.
    """
    fs, p = storage.resolve(path, storage_cfg)
    shown = storage.display(fs, p)
    if not storage.exists(fs, p):
        raise InputNotFoundError(f"prompt file {shown} does not exist")
    records = _joined_records(p, fs, p.rsplit("/", 1)[-1])
    columns = set().union(*(r.keys() for r in records)) if records else set()
    key = next((k for k in JOIN_KEYS if k in columns), None)
    if key is None or "target_prompt" not in columns:
        raise DatasetError(
            f"prompt file {shown} needs an id (or key) column and a target_prompt column; it has {sorted(columns)}"
        )
    out: dict[str, dict[str, str]] = {}
    for r in records:
        rid = r.get(key)
        if rid in (None, ""):
            continue
        rid = str(rid)
        if rid in out:
            raise DatasetError(f"prompt file {shown}: id {rid!r} occurs more than once")
        out[rid] = {c: str(r[c]).strip() for c in JOIN_PROMPTS if r.get(c) not in (None, "")}
    return out


def class_label_names(schema: pa.Schema) -> dict[str, list[str]]:
    """Columns that ``datasets`` stored as ``ClassLabel`` and their class names (from the schema metadata).

    Source: ``datasets`` writes its features as JSON under the ``huggingface`` schema metadata key; a
    ``ClassLabel`` feature has ``"_type": "ClassLabel"`` and ``"names"``.

    Args:
        schema: a Parquet file's schema.

    Returns:
        column → names (index = the stored integer); empty when there is no such metadata.
    """
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {
        name: list(f["names"])
        for name, f in features.items()
        if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list)
    }


def pick_prompt(
    record: Mapping[str, Any],
    name: str,
    column: str | None = None,
    template: str | None = None,
    joined: Mapping[str, Mapping[str, str]] | None = None,
    rid: str | None = None,
) -> str:
    """One prompt of a record: from the joined file, else the template, else the column (in that order).

    Args:
        record: the source fields.
        name: ``"source_prompt"`` or ``"target_prompt"`` (the joined file's column, and for messages).
        column: the record's column holding the prompt.
        template: a rule over the record's fields (:func:`fill_template`).
        joined: id → prompts (:func:`read_joined_prompts`).
        rid: the record's id, to look up in ``joined``.

    Returns:
        The prompt (non-empty, stripped).

    Raises:
        DatasetError: no source gives a non-empty text (a bad row).
    """
    if joined is not None and rid is not None and joined.get(rid, {}).get(name):
        return joined[rid][name]
    if template:
        return fill_template(template, record)
    if column:
        value = record.get(column)
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise DatasetError(f"{name}: column {column!r} {_not_text(column, value, record)}")
    if joined is not None:
        raise DatasetError(f"{name}: id {rid!r} is not in the joined prompt file")
    raise DatasetError(f"no {name}: give a column, a template or a joined prompt file")


def _not_text(column: str, value: Any, record: Mapping[str, Any]) -> str:
    """Why a prompt column's cell is no prompt, and what is accepted (the end of a bad row's reason)."""
    if column not in record:
        return "is missing from this row"
    if value is None:
        return "is null in this row"
    if isinstance(value, str):
        return "is empty in this row"
    shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
    advice = (
        f"; for a class label use a rule, e.g. --source-template 'a photo of {{{column}}}'"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else ""
    )
    return f"holds {shown} ({type(value).__name__}), not text; a prompt column must hold strings{advice}"


def meta_value(value: Any) -> Any:
    """A record field as ``meta`` holds it: bytes (also inside structs) left out, they would bloat the JSON."""
    if isinstance(value, bytes | bytearray):
        return None
    if isinstance(value, Mapping) and "bytes" in value and set(value) <= {"bytes", "path"}:
        return value.get("path")  # an image struct: where it came from, if anything
    if isinstance(value, Mapping):
        return {k: meta_value(v) for k, v in value.items() if not isinstance(v, bytes | bytearray)}
    if isinstance(value, list):
        return [meta_value(v) for v in value]
    return value
