"""Hugging Face Hub datasets stored as Parquet (``datasets``' ``to_parquet``, the Hub's Parquet files) as input rows.

``datasets`` stores an ``Image`` feature as ``struct<bytes: binary, path: string>`` and a ``ClassLabel`` as an
integer with the class names in the schema metadata. Known layouts are recognised by their columns
(:data:`HF_LAYOUTS`); any other is mapped with ``columns`` (input field → source column) and prompt rules.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import schema, storage
from pipelines.datasets.files import Location
from pipelines.datasets.images import image_size, mask_png
from pipelines.datasets.records import (
    check_template,
    class_label_names,
    image_cell,
    meta_value,
    pick_prompt,
    read_joined_prompts,
)
from pipelines.datasets.rows import BadRowPolicy, DatasetError, Problems, Row, problem_text, rows_to_table
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

MAPPED_FIELDS = ("id", "image", "mask", "source_prompt", "target_prompt", "dataset")
# known Hub layouts: the columns that identify them → input field → column
HF_LAYOUTS: dict[str, dict[str, str]] = {
    # timbrooks/instructpix2pix-clip-filtered and its copies: the edit instruction goes to meta["edit_phrase"]
    "instructpix2pix": {
        "image": "original_image",
        "source_prompt": "original_prompt",
        "target_prompt": "edited_prompt",
    },
    # the instdiff input schema itself, with a datasets Image column
    "instdiff": {"image": "image", "source_prompt": "source_prompt", "target_prompt": "target_prompt", "mask": "mask"},
    # image + caption sets (e.g. LAION subsets on the Hub): the caption is the source; the target needs a rule
    "captions": {"image": "image", "source_prompt": "caption"},
    # class-labelled image sets (ImageNet and the like): prompts need rules such as "a photo of {label}"
    "labels": {"image": "image"},
}
_IMAGE_COLUMN_TYPES = (schema.is_binary_type, schema.is_image_struct)


def _detect(columns: set[str]) -> tuple[str, dict[str, str]]:
    """The first layout of :data:`HF_LAYOUTS` whose columns (other than ``mask``) all exist, completed by columns
    named like the input fields."""
    for name, mapping in HF_LAYOUTS.items():
        if all(c in columns for f, c in mapping.items() if f != "mask"):
            found = {f: c for f, c in mapping.items() if c in columns}
            # fields the layout leaves open, taken from columns of the same name (target_prompt, mask, ...)
            found.update({f: f for f in MAPPED_FIELDS if f not in found and f in columns and f != "id"})
            return name, found
    return "", {}


def _check_prompt_column(shown: str, schemas: list[pa.Schema], field_name: str, column: str) -> None:
    """Refuse, before any row is read, a prompt column that holds no text in some file (every row would be bad).

    A ``ClassLabel`` column (integers with their class names in the schema metadata) is text: its rows give the
    class name.

    Raises:
        DatasetError: naming the column, its type, and the accepted ways to make the prompt.
    """
    for sch in schemas:
        if column not in sch.names or column in class_label_names(sch):
            continue
        dtype = sch.field(column).type
        if pa.types.is_dictionary(dtype):  # pandas categoricals, polars enums: text with a dictionary
            dtype = dtype.value_type
        if schema.is_string_type(dtype) or pa.types.is_null(dtype):
            continue
        flag = "--source-template" if field_name == "source_prompt" else "--target-template"
        raise DatasetError(
            f"{shown}: column {column!r} ({field_name}) holds {dtype} values, not text; a prompt column must hold "
            f"strings (or be a datasets ClassLabel, which gives its class names): map a text column with --columns "
            f"{field_name}=COLUMN, or build the prompt with a rule, e.g. {flag} 'a photo of {{{column}}}'"
        )


def _records(fs: Any, path: str, batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """The rows of one Parquet file as dicts, a few hundred at a time (a Hub shard may hold gigabytes)."""
    with storage.reading(f"Parquet file {storage.display(fs, path)}"):
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()


def read_hf(
    src: str,
    columns: Mapping[str, str] | None = None,
    source_template: str | None = None,
    target_template: str | None = None,
    targets: str | None = None,
    limit: int | None = None,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str | None = None,
    id_prefix: str = "",
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read Hub-style Parquet (a file or a folder of shards) into the input schema.

    Column mapping: ``columns`` maps input fields (:data:`MAPPED_FIELDS`) to source columns; fields it leaves
    out come from the first matching layout of :data:`HF_LAYOUTS` (InstructPix2Pix: ``original_image``,
    ``original_prompt`` → source, ``edited_prompt`` → target, ``edit_prompt`` → ``meta["edit_phrase"]``). Prompt
    rules (``source_template``/``target_template``, e.g. ``"a photo of {label}"``) and a joined prompt file
    (``targets``) take precedence over columns. A ``ClassLabel`` column gives its class name to templates and
    ``meta``. Image and mask cells may be bytes or ``datasets`` Image structs; a struct with only a ``path`` is
    read from that path, relative to the Parquet file's folder. ids: the ``id`` mapping, else an ``id`` or
    ``key`` column, else ``<file stem>-<row>``.

    Args:
        src: a Parquet file or folder, local or ``s3://``.
        columns: input field → source column.
        source_template: a rule for ``source_prompt`` over the record's fields.
        target_template: a rule for ``target_prompt``.
        targets: a prompt file joined by id (:func:`~pipelines.datasets.records.read_joined_prompts`).
        limit: keep the first N good rows (``None``: all).
        on_bad_row: ``"error"`` or ``"skip"`` (:class:`~pipelines.datasets.rows.BadRowPolicy`).
        dataset: the ``dataset`` column (``None``: the ``dataset`` mapping, else the source's stem).
        id_prefix: prepended to every id.
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The table in :data:`pipelines.schema.INPUT_SCHEMA`; ``meta`` holds every non-binary field.

    Raises:
        InputNotFoundError: no Parquet file at ``src``.
        StorageError: a file that is not Parquet (named), or the store cannot be reached.
        DatasetError: an unknown field in ``columns``, a mapped column in no file, no image column, a bad
            template, duplicate ids, or bad rows under policy ``error``.
    """
    from instdiff.errors import InputNotFoundError

    fs, path = storage.resolve(src, storage_cfg)
    shown = storage.display(fs, path)
    files = storage.list_files(fs, path)
    if not files:
        raise InputNotFoundError(f"no Parquet files at {shown}")
    unknown = sorted(set(columns or {}) - set(MAPPED_FIELDS))
    if unknown:
        raise DatasetError(
            f"unknown field(s) {', '.join(unknown)} in the column mapping; accepted: {', '.join(MAPPED_FIELDS)}"
        )
    for what, tpl in (("--source-template", source_template), ("--target-template", target_template)):
        if tpl:
            check_template(tpl, what)
    schemas = []
    for f in files:
        with storage.reading(f"Parquet file {storage.display(fs, f)}"):
            schemas.append(pq.read_schema(f, filesystem=fs))
    present = set().union(*(s.names for s in schemas))
    layout, mapping = _detect(present)
    mapping.update(columns or {})
    if "id" not in mapping:
        found = [c for c in ("id", "key") if c in present]
        if found:
            mapping["id"] = found[0]
    missing = sorted(f"{f}={c}" for f, c in mapping.items() if c not in present)
    if missing:
        raise DatasetError(f"{shown}: mapped column(s) {', '.join(missing)} in no file; columns: {sorted(present)}")
    if "image" not in mapping:
        images = sorted(c for s in schemas for c in s.names if any(ok(s.field(c).type) for ok in _IMAGE_COLUMN_TYPES))
        raise DatasetError(
            f"{shown}: no image column recognised (layouts: {', '.join(HF_LAYOUTS)}); map one with "
            f"--columns image=COLUMN (binary or datasets Image columns here: {images or 'none'})"
        )
    rules = {"source_prompt": source_template, "target_prompt": target_template}
    for field_name, rule in rules.items():
        if field_name in mapping and not rule and not targets:
            _check_prompt_column(shown, schemas, field_name, mapping[field_name])
    joined = read_joined_prompts(targets, storage_cfg) if targets else None
    name = dataset or PurePosixPath(path).stem
    problems = Problems(f"Parquet {shown}", BadRowPolicy(on_bad_row))
    rows: list[Row] = []
    log.info("%s: layout %s, columns %s", shown, layout or "(mapped)", mapping)
    for f, sch in zip(files, schemas, strict=True):
        loc = Location(storage.display(fs, posixpath.dirname(f)), storage_cfg)  # path-only images: beside the file
        labels = class_label_names(sch)
        stem = PurePosixPath(f).stem
        if limit is not None and len(rows) >= limit:
            break
        for n, rec in enumerate(_records(fs, f)):
            if limit is not None and len(rows) >= limit:
                break
            where = f"{posixpath.basename(f)} row {n}"
            for col, names in labels.items():
                value = rec.get(col)
                if isinstance(value, int) and 0 <= value < len(names):
                    rec[f"{col}_id"], rec[col] = value, names[value]
            rid_raw = rec.get(mapping.get("id", "")) if "id" in mapping else None
            rid = f"{id_prefix}{rid_raw}" if rid_raw not in (None, "") else f"{id_prefix}{stem}-{n:06d}"
            try:
                image = image_cell(rec.get(mapping["image"]), loc, mapping["image"])
                if image is None:
                    raise DatasetError(f"image column {mapping['image']!r} is null")
                size = image_size(image)
                mask = note = None
                if "mask" in mapping:
                    raw_mask = image_cell(rec.get(mapping["mask"]), loc, mapping["mask"])
                    if raw_mask is not None:
                        mask, note = mask_png(raw_mask, size)
                key = str(rid_raw) if rid_raw not in (None, "") else rid
                src_prompt = pick_prompt(
                    rec, "source_prompt", mapping.get("source_prompt"), source_template, joined, key
                )
                tgt_prompt = pick_prompt(
                    rec, "target_prompt", mapping.get("target_prompt"), target_template, joined, key
                )
            except Exception as exc:  # noqa: BLE001 - any problem with one record is that record's bad row
                problems.add(where, problem_text(exc))
                continue
            meta = {k: meta_value(v) for k, v in rec.items() if k not in (mapping["image"], mapping.get("mask"))}
            meta = {k: v for k, v in meta.items() if v is not None or rec[k] is None}  # byte cells left out
            meta.update(format="hf", layout=layout or "mapped", file=posixpath.basename(f), row=n)
            if layout == "instructpix2pix" and isinstance(rec.get("edit_prompt"), str):
                meta["edit_phrase"] = rec["edit_prompt"].strip()
            meta["notes"] = [note] if note else []
            row_ds = rec.get(mapping["dataset"]) if "dataset" in mapping else None
            meta["_dataset"] = str(row_ds) if row_ds not in (None, "") else name
            rows.append(Row(rid, src_prompt, tgt_prompt, image, mask, meta))
    datasets = [r.meta.pop("_dataset") for r in rows]
    table = rows_to_table(rows, name, problems.finish())
    if any(d != name for d in datasets):
        table = table.set_column(
            table.schema.get_field_index(schema.DATASET), schema.DATASET, pa.array(datasets, pa.string())
        )
    return table
