"""InstructPix2Pix / LAION prompt pairs as instdiff input rows, and their source images generated on demand."""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines import schema, storage
from pipelines.datasets.files import read_text
from pipelines.datasets.rows import BadRowPolicy, Problems, Row, rows_to_table
from pipelines.storage import StorageConfig

if TYPE_CHECKING:
    from instdiff.models import ModelBundle

log = logging.getLogger(__name__)

PROMPT_PAIR_FIELDS = ("input", "edit", "output")


def read_prompt_pairs(
    jsonl_path: str,
    id_field: str = "id",
    limit: int | None = None,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str = "prompt-pairs",
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read InstructPix2Pix-style prompt pairs (JSONL: ``{"input": ..., "edit": ..., "output": ...}``).

    Each line becomes a text-to-image edit: ``source_prompt = input``, ``target_prompt = output``, ``image``
    null (generate it with :func:`generate_sources`, or run ``fisedit``, which generates it itself).
    ``meta`` is the whole original object plus the line number and ``edit_phrase`` (the ``edit`` text).

    Args:
        jsonl_path: the JSONL file, local or ``s3://``.
        id_field: the object field holding the row's id; absent or empty: ``<file stem>-<line>``.
        limit: keep the first N good rows (``None``: all).
        on_bad_row: ``"error"`` or ``"skip"`` (:class:`~pipelines.datasets.rows.BadRowPolicy`).
        dataset: the value of the ``dataset`` column.
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The table in :data:`pipelines.schema.INPUT_SCHEMA` (``image`` and ``mask`` null).

    Raises:
        InputNotFoundError: the file does not exist.
        StorageError: ``jsonl_path`` is a folder, or the store cannot be reached.
        DatasetError: not UTF-8 text, duplicate ids, or bad lines (not a JSON object, a missing or empty field)
            under policy ``error``.
    """
    fs, path = storage.resolve(jsonl_path, storage_cfg)
    text = read_text(fs, path)
    stem = PurePosixPath(path).stem
    problems = Problems(f"prompt pairs {storage.display(fs, path)}", BadRowPolicy(on_bad_row))
    rows: list[Row] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(f"line {n}", f"not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            problems.add(f"line {n}", f"expected a JSON object, got {type(obj).__name__}")
            continue
        bad = [k for k in PROMPT_PAIR_FIELDS if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if bad:
            problems.add(
                f"line {n}",
                f"missing or empty field(s) {', '.join(bad)}; each line needs "
                f"{', '.join(PROMPT_PAIR_FIELDS)} (strings)",
            )
            continue
        rid = obj.get(id_field)
        rid = str(rid) if rid not in (None, "") else f"{stem}-{n:06d}"
        meta = {"format": "prompt-pairs", "line": n, "edit_phrase": obj["edit"].strip(), **obj}
        rows.append(Row(rid, obj["input"].strip(), obj["output"].strip(), None, None, meta))
    return rows_to_table(rows, dataset, problems.finish())


def generate_sources(
    table: pa.Table,
    bundle: ModelBundle,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
) -> pa.Table:
    """Fill the null ``image`` cells by generating each row's ``source_prompt`` with ``bundle``.

    Text-to-image with :func:`instdiff.editing.generate` (DDIM, classifier-free guidance) at the model's
    resolution, seeded per row by the batch job's :func:`pipelines.batch.row_seed`, so a row's source is the
    same whatever else is in the table, and the same image the job's ``fisedit`` method generates for that row
    with the same seed, steps and guidance (up to batched float rounding). Rows with an image are left alone.

    Args:
        table: a table in :data:`pipelines.schema.INPUT_SCHEMA`.
        bundle: the model that generates the sources.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        seed: the base seed; row ``id`` gets ``row_seed(seed, id)``.
        batch_size: prompts generated together.

    Returns:
        A new table (same schema and schema metadata) whose generated images are PNG bytes;
        ``meta["generated"]`` records model, steps, guidance and the row's seed. ``table`` itself when no
        image is null.
    """
    from instdiff.editing import generate
    from instdiff.imageio import encode_png, from_model_tensor
    from pipelines.batch import row_seed

    images = table.column(schema.IMAGE).to_pylist()
    todo = [i for i, img in enumerate(images) if img is None]
    if not todo:
        return table
    ids = table.column(schema.ID).to_pylist()
    prompts = table.column(schema.SOURCE_PROMPT).to_pylist()
    metas = table.column(schema.META).to_pylist()
    log.info("generating %d source image(s) with %s (%d steps, guidance %.1f)", len(todo), bundle.name, steps, guidance)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        seeds = [row_seed(seed, ids[i]) for i in chunk]
        arrays = from_model_tensor(generate(bundle, [prompts[i] for i in chunk], steps, guidance, seeds))
        for i, s, arr in zip(chunk, seeds, arrays, strict=True):
            images[i] = encode_png(np.ascontiguousarray(arr))
            meta = json.loads(metas[i]) if metas[i] else {}
            meta["generated"] = {"model": bundle.name, "steps": steps, "guidance": guidance, "seed": s}
            metas[i] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    out = table.set_column(table.schema.get_field_index(schema.IMAGE), schema.IMAGE, pa.array(images, pa.binary()))
    out = out.set_column(out.schema.get_field_index(schema.META), schema.META, pa.array(metas, pa.string()))
    return out.replace_schema_metadata(table.schema.metadata)
