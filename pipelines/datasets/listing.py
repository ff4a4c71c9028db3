"""A generic CSV/TSV/JSONL listing of images, prompts and optional masks as instdiff input rows."""

from __future__ import annotations

import csv
import io
import json
import posixpath
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from pipelines import schema, storage
from pipelines.datasets.files import Location, parallel, read_file, read_text
from pipelines.datasets.images import image_size, mask_png
from pipelines.datasets.rows import BadRowPolicy, DatasetError, Problems, Row, problem_text, rows_to_table
from pipelines.storage import StorageConfig

LISTING_REQUIRED = ("image_path", "source_prompt", "target_prompt")
LISTING_OPTIONAL = ("mask_path", "id", "dataset")


def _listing_records(name: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) of a listing; a JSONL line that is not an object becomes ``{"__error__": reason}``."""
    lower = name.lower()
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                out.append((n, {"__error__": f"not JSON ({exc.msg})"}))
                continue
            out.append((n, obj if isinstance(obj, dict) else {"__error__": "expected a JSON object"}))
        return out
    if lower.endswith((".csv", ".tsv")):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if lower.endswith(".tsv") else ",")
        try:
            missing = [c for c in LISTING_REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(
                    f"{name}: header lacks column(s) {', '.join(missing)}; required: "
                    f"{', '.join(LISTING_REQUIRED)}; optional: {', '.join(LISTING_OPTIONAL)}"
                )
            return [(reader.line_num, dict(rec)) for rec in reader]
        except csv.Error as exc:  # NUL bytes, a field over the size limit, a bad quote: not a usable CSV
            raise DatasetError(f"{name}: not a readable CSV/TSV (line {reader.line_num}: {exc})") from None
    raise DatasetError(f"{name}: unknown listing format; accepted: .csv, .tsv, .jsonl (.ndjson)")


def read_listing(
    path: str,
    image_root: str | None = None,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str | None = None,
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read a CSV/TSV/JSONL listing of ``image_path, source_prompt, target_prompt[, mask_path]``.

    Paths in the listing may be relative (to ``image_root``), absolute, or URIs (``s3://``); the listing
    itself may be on S3. Optional columns: ``id`` (default ``<listing stem>-<row>``) and ``dataset``; every
    other column goes into ``meta``.

    Args:
        path: the listing (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``/``.json``), local or ``s3://``.
        image_root: the folder relative paths are resolved against (``None``: the listing's folder).
        on_bad_row: ``"error"`` or ``"skip"`` (:class:`~pipelines.datasets.rows.BadRowPolicy`).
        dataset: the ``dataset`` column of rows without their own (``None``: the listing's stem).
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The table in :data:`pipelines.schema.INPUT_SCHEMA`.

    Raises:
        InputNotFoundError: the listing does not exist.
        StorageError: the listing is a folder, or the store cannot be reached.
        DatasetError: not UTF-8 text, an unknown suffix, a CSV header without the required columns, duplicate
            ids, or bad rows under policy ``error``.
    """
    fs, list_path = storage.resolve(path, storage_cfg)
    shown = storage.display(fs, list_path)
    text = read_text(fs, list_path)
    if image_root is not None:
        base = image_root
    else:
        base = path.rsplit("/", 1)[0] if storage.is_remote(path) else posixpath.dirname(list_path)
    loc = Location(base, storage_cfg)
    stem = PurePosixPath(list_path).stem
    records = _listing_records(posixpath.basename(list_path), text)
    problems = Problems(f"listing {shown}", BadRowPolicy(on_bad_row))
    name = dataset or stem

    def load(item: tuple[int, dict[str, Any]]) -> tuple[Row, str] | tuple[str, str]:
        n, rec = item
        where = f"row {n}"
        if "__error__" in rec:
            return where, rec["__error__"]
        bad = [c for c in LISTING_REQUIRED if not isinstance(rec.get(c), str) or not rec[c].strip()]
        if bad:
            return where, f"missing or empty {', '.join(bad)}"
        try:
            img_fs, img_path = loc.resolve(rec["image_path"].strip())
            image = read_file(img_fs, img_path)
            size = image_size(image)
            mask = note = None
            mask_ref = rec.get("mask_path")
            if isinstance(mask_ref, str) and mask_ref.strip():
                m_fs, m_path = loc.resolve(mask_ref.strip())
                mask, note = mask_png(read_file(m_fs, m_path), size)
        except Exception as exc:  # noqa: BLE001 - any problem with one record's files is that record's bad row
            return where, problem_text(exc)
        rid = rec.get("id")
        rid = str(rid) if rid not in (None, "") else f"{stem}-{n:06d}"
        meta = {k: v for k, v in rec.items() if k not in ("id", "dataset")}
        meta.update(format="listing", line=n, notes=[note] if note else [])
        row_ds = rec.get("dataset") if isinstance(rec.get("dataset"), str) and rec.get("dataset") else name
        return Row(rid, rec["source_prompt"].strip(), rec["target_prompt"].strip(), image, mask, meta), row_ds

    rows, datasets = [], []
    for r in parallel(load, records):
        if isinstance(r[0], Row):
            rows.append(r[0])
            datasets.append(r[1])
        else:
            problems.add(*r)
    table = rows_to_table(rows, name, problems.finish())
    if datasets and any(d != name for d in datasets):
        table = table.set_column(
            table.schema.get_field_index(schema.DATASET), schema.DATASET, pa.array(datasets, pa.string())
        )
    return table
