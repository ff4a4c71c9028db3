"""img2dataset output (LAION and other URL lists, downloaded) as input rows: every key accounted for.

img2dataset writes, per shard ``NNNNN``:

* ``--output_format webdataset``: ``NNNNN.tar`` holding ``KEY.jpg`` (or ``.png``/``.webp``), ``KEY.txt`` (the
  caption) and ``KEY.json`` (url, caption, status, size, ...) for each downloaded image, and beside it
  ``NNNNN.parquet`` with one row per *attempted* key (``key, url, caption, status, error_message, ...``);
  ``NNNNN_stats.json`` and ``_stats.json`` hold counts.
* ``--output_format parquet``: ``NNNNN.parquet`` with the same metadata columns plus the image bytes in a
  ``jpg`` (``png``, ``webp``) column.

Each key becomes one row: a downloaded image is a row to edit, with the caption as ``source_prompt``
(``source_template`` changes that) and ``target_prompt`` from a rule (``target_template``, e.g.
``"{caption}, in winter"``) or a joined prompt file (``targets``); a key whose download failed is kept as a
row with ``error = "download failed: <error_message>"``, which the batch job writes as an error row, so the
job's output accounts for every key the download attempted.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.datasets.files import Location
from pipelines.datasets.images import image_size
from pipelines.datasets.records import check_template, fill_template, meta_value, pick_prompt, read_joined_prompts
from pipelines.datasets.rows import BadRowPolicy, DatasetError, Problems, Row, problem_text, rows_to_table
from pipelines.schema import summarize_problems
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's --encode_format values
SUCCESS = "success"
DEFAULT_SOURCE_TEMPLATE = "{caption}"


def _key_and_ext(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the member's path up to the first dot of its file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def _shard_members(fs: Any, path: str) -> Iterator[tuple[str, str, bytes]]:
    """``(key, extension, bytes)`` of every file in a tar shard, streamed (the shard is never loaded whole).

    Raises:
        tarfile.TarError, OSError, EOFError: the shard is not a tar, or ends early (truncated); the members
            read before that were yielded.
    """
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            key, ext = _key_and_ext(member.name)
            yield key, ext, f.read()


def _metadata(fs: Any, path: str) -> list[dict[str, Any]]:
    """The rows of a metadata (or parquet-format) shard."""
    with storage.reading(f"img2dataset shard {storage.display(fs, path)}"):
        return pq.read_table(path, filesystem=fs).to_pylist()


def read_img2dataset(
    root: str,
    target_template: str | None = None,
    targets: str | None = None,
    source_template: str = DEFAULT_SOURCE_TEMPLATE,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str = "img2dataset",
    id_prefix: str = "",
    limit: int | None = None,
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read an img2dataset output folder (webdataset or parquet format) into the input schema.

    Args:
        root: the output folder, local or ``s3://``.
        target_template: a rule for ``target_prompt`` over the key's fields (``caption``, ``url``, ``key``, the
            ``.json`` fields, ...).
        targets: a prompt file joined by key (:func:`~pipelines.datasets.records.read_joined_prompts`); its
            prompts win over the rule.
        source_template: the rule for ``source_prompt`` (default: the caption).
        on_bad_row: ``"error"`` or ``"skip"`` for keys that cannot be read (an undecodable image, a key the
            metadata lists as downloaded but no shard holds, a truncated shard, a missing prompt).
        dataset: the ``dataset`` column.
        id_prefix: prepended to every key to make the id.
        limit: keep the first N rows (downloaded keys and failed downloads, in shard order; bad keys are not
            rows and do not count); shards after the N-th row are not read. ``None``: every key.
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The table in :data:`pipelines.schema.INPUT_SCHEMA`, one row per key; failed downloads have ``image``
        null and ``error`` set. ``meta`` holds the key's metadata (url, caption, status, sizes, shard, ...).
        The counts (keys read, downloaded, failed downloads, bad keys with their first reasons) are logged
        before the bad-row policy applies.

    Raises:
        DatasetError: ``root`` is not an img2dataset folder (no ``.tar`` shards and no Parquet shard with an
            image column), neither a target rule nor a prompt file, a bad template, duplicate keys, or bad rows
            under policy ``error``.
        StorageError: a metadata shard that is not Parquet, or the store cannot be reached.
    """
    loc = Location(root, storage_cfg)
    shown = loc.shown(loc.path)
    if not storage.is_dir(loc.fs, loc.path):
        raise DatasetError(f"{shown} is not a folder; img2dataset writes a folder of shards")
    if not target_template and not targets:
        raise DatasetError(
            "img2dataset rows need target prompts: give a rule (--target-template '{caption}, in winter') "
            "or a prompt file joined by key (--targets FILE with key and target_prompt)"
        )
    for what, tpl in (("--source-template", source_template), ("--target-template", target_template)):
        if tpl:
            check_template(tpl, what)
    joined = read_joined_prompts(targets, storage_cfg) if targets else None
    tars = storage.list_files(loc.fs, loc.path, ".tar")
    problems = Problems(f"img2dataset {shown}", BadRowPolicy(on_bad_row))
    shards = _tar_records(loc.fs, tars, problems) if tars else _parquet_records(loc.fs, loc.path, shown)
    rows: list[Row] = []
    keys = 0
    for shard_records in shards:
        for shard, rec, image in shard_records:
            if limit is not None and len(rows) >= limit:
                break
            keys += 1
            row = _row(shard, rec, image, source_template, target_template, joined, id_prefix, problems)
            if row is not None:
                rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    failed = sum(1 for r in rows if r.error)
    bad = [f"{w}: {r}" for w, r in problems.items]
    log.info(
        "%s: %d keys read%s: %d downloaded, %d failed downloads, %s",
        shown,
        keys,
        f" (stopped at --limit {limit})" if limit is not None and len(rows) >= limit else "",
        len(rows) - failed,
        failed,
        summarize_problems(bad, noun="bad key or shard") if bad else "no bad keys",
    )
    return rows_to_table(rows, dataset, problems.finish())


Record = tuple[str, dict[str, Any], bytes | None]  # (shard, fields, image)


def _tar_records(fs: Any, tars: list[str], problems: Problems) -> Iterator[list[Record]]:
    """Per ``.tar`` shard (webdataset format), its keys; a shard is read when the previous ones were used."""
    for tar_path in tars:
        yield _webdataset_shard(fs, tar_path, problems)


def _parquet_records(fs: Any, path: str, shown: str) -> Iterator[list[Record]]:
    """Per Parquet shard with an image column (parquet format), its keys.

    Raises:
        DatasetError: no Parquet shard with an image column (checked on the first shard that has rows).
    """
    found = False
    for p in storage.list_files(fs, path, ".parquet"):
        recs = _metadata(fs, p)
        if not recs or not any(e in recs[0] for e in IMAGE_EXTENSIONS):
            continue
        found = True
        shard = posixpath.basename(p)
        out = []
        for rec in recs:
            ext = next((e for e in IMAGE_EXTENSIONS if rec.get(e) is not None), None)
            image = rec.pop(ext) if ext else None
            for e in IMAGE_EXTENSIONS:
                rec.pop(e, None)
            out.append((shard, rec, image))
        yield out
    if not found:
        raise DatasetError(
            f"{shown} is not img2dataset output: expected NNNNN.tar shards (--output_format webdataset) or "
            f"NNNNN.parquet shards with a {'/'.join(IMAGE_EXTENSIONS)} column (--output_format parquet)"
        )


def _webdataset_shard(fs: Any, tar_path: str, problems: Problems) -> list[Record]:
    """The keys of one tar shard joined with its metadata Parquet (when present), in the metadata's order."""
    shard = posixpath.basename(tar_path)
    files: dict[str, dict[str, bytes]] = {}
    try:
        for key, ext, data in _shard_members(fs, tar_path):
            files.setdefault(key, {})[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.add(shard, f"not a readable tar shard, or truncated ({problem_text(exc)}); {len(files)} keys read")
    meta_path = tar_path[: -len(".tar")] + ".parquet"
    listed = _metadata(fs, meta_path) if storage.exists(fs, meta_path) else []
    out = []
    seen = set()
    for rec in listed:
        key = str(rec.get("key"))
        seen.add(key)
        out.append((shard, {**rec, **_json_fields(files.get(key, {}))}, _image(files.get(key, {}))))
        if rec.get("status", SUCCESS) == SUCCESS and key not in files:
            out[-1][1]["_missing"] = f"listed as downloaded in {posixpath.basename(meta_path)} but not in {shard}"
    for key, parts in files.items():
        if key not in seen:
            fields = {"key": key.rsplit("/", 1)[-1], **_json_fields(parts)}
            out.append((shard, fields, _image(parts)))
    return out


def _json_fields(parts: dict[str, bytes]) -> dict[str, Any]:
    """The ``KEY.json`` fields and the ``KEY.txt`` caption of one key (unreadable ones are left out)."""
    fields: dict[str, Any] = {}
    if "json" in parts:
        try:
            obj = json.loads(parts["json"].decode("utf-8"))
            if isinstance(obj, dict):
                fields.update(obj)
        except (UnicodeDecodeError, ValueError):
            fields["_bad_json"] = True
    if "txt" in parts:
        fields["caption"] = parts["txt"].decode("utf-8", errors="replace").strip()
    return fields


def _image(parts: dict[str, bytes]) -> bytes | None:
    return next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)


def _row(
    shard: str,
    rec: dict[str, Any],
    image: bytes | None,
    source_template: str,
    target_template: str | None,
    joined: dict[str, dict[str, str]] | None,
    id_prefix: str,
    problems: Problems,
) -> Row | None:
    """One key as a row (``error`` set for a failed download), or ``None`` after recording a bad row."""
    key = str(rec.get("key") or "")
    where = f"{shard} key {key!r}"
    if not key:
        problems.add(shard, "a record without a key")
        return None
    meta = {k: meta_value(v) for k, v in rec.items() if not k.startswith("_")}
    meta.update(format="img2dataset", shard=shard, notes=[])
    status = rec.get("status", SUCCESS if image is not None else None)
    if status != SUCCESS:
        reason = rec.get("error_message") or status or "no image"
        src = _try(source_template, rec) or ""
        tgt = (joined or {}).get(key, {}).get("target_prompt") or _try(target_template, rec) or ""
        return Row(f"{id_prefix}{key}", src, tgt, None, None, meta, error=f"download failed: {reason}")
    try:
        if "_missing" in rec:
            raise DatasetError(rec["_missing"])
        if image is None:
            raise DatasetError("no image for this key")
        image_size(image)
        source = pick_prompt(rec, "source_prompt", None, source_template, joined, key)
        target = pick_prompt(rec, "target_prompt", None, target_template, joined, key)
    except Exception as exc:  # noqa: BLE001 - any problem with one key is that key's bad row
        problems.add(where, problem_text(exc))
        return None
    return Row(f"{id_prefix}{key}", source, target, image, None, meta)


def _try(template: str | None, rec: dict[str, Any]) -> str | None:
    """A template filled from ``rec``, or ``None`` when a field is missing (prompts of rows never edited)."""
    if not template:
        return None
    try:
        return fill_template(template, rec)
    except DatasetError:
        return None
