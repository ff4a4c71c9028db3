"""Bulk edits on Ray Data: Parquet (local or s3://) in, edited images + masks + metrics out.

Run it::

    instdiff batch --config configs/batch/demo.yaml [--input PATH] [--output PATH] [--set method.steps=20]
    python -m pipelines.batch --config configs/batch/demo.yaml          # the same thing

With ``RAY_ADDRESS`` set the job connects to that cluster, otherwise it starts a local one, so the same
command runs under Ray's job API::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.batch --config configs/batch/gpu-s3.yaml

The pipeline (one read, three map stages, one write; rows stream through, nothing is materialised)::

    read_parquet → decode_batch (tasks) → EditStage (actor pool, model loaded once per actor)
                 → finalize_batch (tasks: PNG encoding, metrics) → write_parquet (≤ max_rows_per_file)

Every row comes out: a row that cannot be edited is written with ``status = "error"`` and the reason, its
batch-mates are unaffected; when a whole editor call fails (e.g. out of memory) its rows are retried one by
one first.

Resume: re-running with the same output skips the ids already written with status ok and, by default,
those already written as errors too, so no id is ever written twice; earlier files are never deleted or
overwritten (each run writes new ``part-<run_id>-*.parquet`` files). With ``retry_errors: true`` the error
ids are edited again: one that fails again is not rewritten, one that now succeeds gets an ok row next to
its earlier error row (readers keep the ok row: ``pipelines.report.latest_rows``). A resumed run must use
the settings of the earlier runs (model, method and its parameters, seed, image handling); the job refuses
otherwise. Each run leaves ``_runs/<run_id>.json`` (its settings) and ``_runs/<run_id>.summary.json`` next
to the data; Parquet readers skip ``_``-prefixed paths.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from instdiff.config import Method
from instdiff.errors import InputNotFoundError, InstdiffError
from pipelines import schema as S
from pipelines import storage
from pipelines.config import (
    AlphaPolicy,
    BatchConfig,
    ConfigError,
    ImageConfig,
    ModelConfig,
    fingerprint,
    load_config,
    to_dict,
)

if TYPE_CHECKING:  # torch/diffusers are imported where used: decode/finalize workers never load diffusers
    from instdiff import imageio
    from instdiff.editing import EditConfig

log = logging.getLogger("instdiff.batch")

# methods that accept prompt-only rows (no input image): generate, then edit
GENERATING_METHODS = tuple(m.value for m in Method if m.generates_source)
RUNS_DIR = "_runs"

# columns between the stages (see pipelines.schema for the names)
DECODED_SCHEMA = pa.schema(
    [
        pa.field(S.ID, pa.string(), nullable=False),
        pa.field(S.DATASET, pa.string()),
        pa.field(S.META, pa.string()),
        pa.field(S.SOURCE_PROMPT, pa.string()),
        pa.field(S.TARGET_PROMPT, pa.string()),
        pa.field(S.STATUS, pa.string(), nullable=False),
        pa.field(S.ERROR, pa.string()),
        pa.field(S.NOTES, pa.string()),
        pa.field(S.RGB, pa.large_binary()),
        pa.field(S.WIDTH, pa.int32()),
        pa.field(S.HEIGHT, pa.int32()),
        pa.field(S.GT_BITS, pa.large_binary()),
        pa.field(S.GENERATE, pa.bool_()),
    ]
)
EDITED_SCHEMA = pa.schema(
    list(DECODED_SCHEMA)
    + [
        pa.field(S.EDITED_RGB, pa.large_binary()),
        pa.field(S.PRED_BITS, pa.large_binary()),
        pa.field(S.METHOD, pa.string()),
        pa.field(S.MODEL, pa.string()),
        pa.field(S.SEED, pa.int64()),
        pa.field(S.UNET_CALLS, pa.float64()),
        pa.field(S.LATENCY_S, pa.float64()),
        pa.field(S.BATCH_ROWS, pa.int32()),
    ]
)


class RowError(InstdiffError, ValueError):
    """Why one row cannot be edited; becomes the row's ``error``."""


def row_seed(base: int, row_id: str) -> int:
    """Seed of one row: depends only on the job seed and the id (not on batch-mates, order or actor)."""
    return (int(base) + zlib.crc32(row_id.encode("utf-8"))) % 2**31


def _reason(exc: BaseException) -> str:
    """A row's error text: input errors speak for themselves, anything else is prefixed by its type."""
    plain: list[type] = [RowError]
    for module, name in (("instdiff.imageio", "ImageInputError"), ("instdiff.editing", "EditInputError")):
        if module in sys.modules:  # only modules this worker already uses; never import the editors here
            plain.append(getattr(sys.modules[module], name))
    if isinstance(exc, tuple(plain)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _join_notes(notes: Iterable[str]) -> str | None:
    notes = [n for n in notes if n]
    return "; ".join(notes) if notes else None


def _pack(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(bool), axis=None).tobytes()


def _unpack(bits: bytes, height: int, width: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=height * width).reshape(height, width).astype(bool)


def _rgb(data: bytes, height: int, width: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()  # writable for torch


# ---- stage 1: decode and validate (stateless tasks) -----------------------------------------------------------
@dataclass(frozen=True)
class DecodeOptions:
    """What the decode stage checks; plain values, so its workers never import the editors."""

    method: str
    needs_source: bool
    max_pixels: int
    min_side: int
    alpha: str = AlphaPolicy.CONVERT.value

    @classmethod
    def from_config(cls, cfg: BatchConfig) -> DecodeOptions:
        return cls(method=cfg.method.method.value, needs_source=cfg.method.needs_source_prompt,
                   max_pixels=cfg.image.max_pixels, min_side=cfg.image.min_side, alpha=cfg.image.alpha.value)


def _has_alpha(data: bytes) -> bool:
    """Whether encoded image bytes carry transparency (reads the header only; False when undecodable)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    except Exception:  # noqa: BLE001 - undecodable bytes are reported by decode_image with a better message
        return False


def decode_row(row: dict[str, Any], opts: DecodeOptions) -> dict[str, Any]:
    """Validate one input row and decode its image and mask; problems become ``status="error"``."""
    from instdiff import imageio

    out: dict[str, Any] = {
        S.ID: row[S.ID], S.DATASET: row.get(S.DATASET), S.META: row.get(S.META),
        S.SOURCE_PROMPT: row.get(S.SOURCE_PROMPT), S.TARGET_PROMPT: row.get(S.TARGET_PROMPT),
        S.STATUS: S.STATUS_OK, S.ERROR: None, S.NOTES: None, S.RGB: None, S.WIDTH: None, S.HEIGHT: None,
        S.GT_BITS: None, S.GENERATE: False,
    }
    notes: list[str] = []
    try:
        if not (out[S.TARGET_PROMPT] or "").strip():
            raise RowError("target_prompt is empty; a non-empty text is required")
        if not (out[S.SOURCE_PROMPT] or "").strip():
            if opts.needs_source:
                raise RowError(f"source_prompt is empty; method {opts.method} needs a description of the input")
            notes.append(f"source_prompt is empty (not used by {opts.method})")
        data, mask = row.get(S.IMAGE), row.get(S.MASK)
        if data is None:
            if opts.method not in GENERATING_METHODS:
                raise RowError("image is missing (null); only generating methods "
                               f"({', '.join(GENERATING_METHODS)}) accept prompt-only rows")
            if mask is not None:
                raise RowError("a ground-truth mask needs an input image; this row has none")
            out[S.GENERATE] = True
            notes.append("source generated from source_prompt")
        else:
            if opts.alpha == AlphaPolicy.ERROR.value and _has_alpha(data):
                raise RowError("image has transparency; image.alpha=error refuses it (image.alpha=convert "
                               "composites it onto white)")
            array, conversions = imageio.decode_image(data, max_pixels=opts.max_pixels)
            notes.extend(conversions)
            h, w = array.shape[:2]
            if min(h, w) < opts.min_side:
                raise RowError(f"image is {w}x{h}; both sides must be at least {opts.min_side} px (image.min_side)")
            if mask is not None:
                out[S.GT_BITS] = _pack(imageio.decode_mask(mask, size=(w, h)))
            out.update({S.RGB: array.tobytes(), S.WIDTH: w, S.HEIGHT: h})
    except Exception as exc:  # noqa: BLE001 - any problem with one row is that row's error, never the batch's
        out.update({S.STATUS: S.STATUS_ERROR, S.ERROR: _reason(exc), S.RGB: None, S.GT_BITS: None,
                    S.WIDTH: None, S.HEIGHT: None})
    out[S.NOTES] = _join_notes(notes)
    return out


def _resolve_skip(skip_ids: Any) -> pa.Array | None:
    if skip_ids is None or isinstance(skip_ids, pa.Array | pa.ChunkedArray):
        return skip_ids
    import ray

    return ray.get(skip_ids)


def decode_batch(batch: pa.Table, *, opts: DecodeOptions, skip_ids: Any = None) -> pa.Table:
    """Stage 1 (stateless): drop ids in ``skip_ids`` (a ``pa.Array`` or a Ray object ref to one), then decode
    and validate every row (:func:`decode_row`). Rows are never dropped for being bad."""
    skip = _resolve_skip(skip_ids)
    if skip is not None and len(skip) and batch.num_rows:
        batch = batch.filter(pc.invert(pc.is_in(batch[S.ID], value_set=skip)))
    wanted = [c for c in (S.ID, S.IMAGE, S.SOURCE_PROMPT, S.TARGET_PROMPT, S.MASK, S.DATASET, S.META)
              if c in batch.column_names]
    rows = [decode_row(r, opts) for r in batch.select(wanted).to_pylist()]
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


# ---- stage 2: edit (one actor per model replica) --------------------------------------------------------------
@dataclass
class _Item:
    index: int  # row index in the batch
    row: dict[str, Any]
    seed: int
    prepared: imageio.Prepared | None  # None: generate the source


class EditStage:
    """Callable class for ``map_batches``: loads the model once, then edits batches of decoded rows.

    Rows of one model-ready size are edited in one ``instdiff.editing.edit`` call; if that call fails, its
    rows are retried one by one, and a row that still fails gets ``status="error"`` with the reason.
    """

    def __init__(self, model: ModelConfig, method: EditConfig, image: ImageConfig, threads: int | None = None) -> None:
        import torch

        from instdiff.editing import size_multiple
        from instdiff.models import load_bundle

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        t0 = time.perf_counter()
        self.bundle = load_bundle(model.spec, device=model.device, dtype=model.dtype,
                                  local_files_only=model.local_files_only, inpaint=model.inpaint)
        self.cfg = method
        self.image = image
        self.multiple = size_multiple(self.bundle)
        size = image.size
        self.size: int | None = self.bundle.resolution if size == "model" else size  # type: ignore[assignment]
        log.info("edit stage: model %s on %s (%s) loaded in %.1f s; images to %s px, multiple of %d",
                 self.bundle.name, self.bundle.device, str(self.bundle.dtype).replace("torch.", ""),
                 time.perf_counter() - t0, self.size or "their own size", self.multiple)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from instdiff.editing import Method

        rows = batch.to_pylist()
        for row in rows:
            row.update({S.EDITED_RGB: None, S.PRED_BITS: None, S.METHOD: Method(self.cfg.method).value,
                        S.MODEL: self.bundle.name, S.SEED: row_seed(self.cfg.seed, row[S.ID]),
                        S.UNET_CALLS: None, S.LATENCY_S: None, S.BATCH_ROWS: None})
        groups: dict[tuple, list[_Item]] = collections.defaultdict(list)
        for i, row in enumerate(rows):
            if row[S.STATUS] != S.STATUS_OK:
                continue
            try:
                item = self._prepare(i, row)
            except Exception as exc:  # noqa: BLE001 - the row's error, not the batch's
                self._fail(row, exc)
                continue
            key = ("generate",) if item.prepared is None else item.prepared.array.shape
            groups[key].append(item)
        with torch.inference_mode():
            for items in groups.values():
                self._run(items)
        return pa.Table.from_pylist(rows, schema=EDITED_SCHEMA)

    def _prepare(self, index: int, row: dict[str, Any]) -> _Item:
        from instdiff import imageio

        seed = int(row[S.SEED])
        if row[S.GENERATE]:
            return _Item(index, row, seed, None)
        array = _rgb(row[S.RGB], row[S.HEIGHT], row[S.WIDTH])
        prepared = imageio.fit_to_multiple(array, self.multiple, self.image.size_policy, self.size)
        if prepared.notes:
            row[S.NOTES] = _join_notes([row[S.NOTES] or "", *prepared.notes])
        return _Item(index, row, seed, prepared)

    @staticmethod
    def _fail(row: dict[str, Any], exc: BaseException) -> None:
        row.update({S.STATUS: S.STATUS_ERROR, S.ERROR: _reason(exc), S.EDITED_RGB: None, S.PRED_BITS: None})

    def _run(self, items: list[_Item]) -> None:
        """Edit ``items`` together; on failure retry them one by one, then mark the rows that still fail."""
        try:
            self._edit(items)
        except Exception as exc:  # noqa: BLE001 - contained per row below
            if len(items) == 1:
                log.warning("row %s failed: %s", items[0].row[S.ID], _reason(exc))
                self._fail(items[0].row, exc)
                return
            log.warning("editor call on %d rows failed (%s); retrying them one by one", len(items), _reason(exc))
            self._release_memory()
            for item in items:
                self._run([item])

    def _release_memory(self) -> None:
        import torch

        if self.bundle.device.type == "cuda":
            torch.cuda.empty_cache()

    def _edit(self, items: list[_Item]) -> None:
        from instdiff import imageio
        from instdiff.editing import edit, generate

        t0 = time.perf_counter()
        seeds = [it.seed for it in items]
        sources = [it.row[S.SOURCE_PROMPT] or "" for it in items]
        targets = [it.row[S.TARGET_PROMPT] for it in items]
        if items[0].prepared is None:
            images = generate(self.bundle, sources, steps=self.cfg.steps, guidance=self.cfg.guidance, seeds=seeds)
            generated = imageio.from_model_tensor(images)
        else:
            images = imageio.to_model_tensor([it.prepared.array for it in items])  # type: ignore[union-attr]
            generated = None
        result = edit(self.bundle, images, sources, targets, self.cfg, seeds=seeds)
        edited = imageio.from_model_tensor(result.images)  # (B, H, W, 3) uint8
        masks = result.masks[:, 0].cpu().numpy()  # (B, H, W) bool
        elapsed = time.perf_counter() - t0
        for j, it in enumerate(items):
            out, mask = edited[j], masks[j]
            if it.prepared is not None:
                out, mask = imageio.undo_fit(out, it.prepared), imageio.undo_fit(mask, it.prepared)
            else:
                it.row.update({S.RGB: generated[j].tobytes(), S.HEIGHT: out.shape[0], S.WIDTH: out.shape[1]})
            it.row.update({S.EDITED_RGB: np.ascontiguousarray(out).tobytes(), S.PRED_BITS: _pack(mask),
                           S.UNET_CALLS: float(result.unet_calls), S.LATENCY_S: elapsed, S.BATCH_ROWS: len(items)})


# ---- stage 3: encode and score (stateless tasks) --------------------------------------------------------------
def _nan_to_none(x: float) -> float | None:
    return None if x != x else float(x)


def finalize_row(row: dict[str, Any], run_id: str) -> dict[str, Any]:
    """One edited row → one output row: PNGs and metrics; an encoding/scoring failure is the row's error."""
    from instdiff import imageio, metrics

    out = {f.name: row.get(f.name) for f in S.OUTPUT_SCHEMA}
    out.update({S.RUN_ID: run_id, S.EDITED: None, S.PRED_MASK: None, S.GENERATED_SOURCE: None,
                S.MASK_AREA: None, S.CHANGE_OUTSIDE_PRED: None, S.IOU: None, S.C_M: None, S.C_NON: None})
    if row[S.STATUS] != S.STATUS_OK:
        out.update({S.UNET_CALLS: None, S.LATENCY_S: None, S.BATCH_ROWS: None})
        return out
    try:
        h, w = row[S.HEIGHT], row[S.WIDTH]
        src, edited = _rgb(row[S.RGB], h, w), _rgb(row[S.EDITED_RGB], h, w)
        pred = _unpack(row[S.PRED_BITS], h, w)
        out[S.EDITED] = imageio.encode_png(edited)
        out[S.PRED_MASK] = imageio.encode_png(pred)
        if row[S.GENERATE]:
            out[S.GENERATED_SOURCE] = imageio.encode_png(src)
        out[S.MASK_AREA] = float(pred.mean())
        out[S.CHANGE_OUTSIDE_PRED] = _nan_to_none(float(metrics.change_outside_mask(src, edited, pred)[0]))
        if row[S.GT_BITS] is not None:
            gt = _unpack(row[S.GT_BITS], h, w)
            out[S.IOU] = float(metrics.iou(pred, gt)[0])
            out[S.C_M] = _nan_to_none(float(metrics.change_in_mask(src, edited, gt)[0]))
            out[S.C_NON] = _nan_to_none(float(metrics.change_outside_mask(src, edited, gt)[0]))
    except Exception as exc:  # noqa: BLE001 - the row's error, not the batch's
        log.warning("row %s: could not encode or score the result: %s", row[S.ID], _reason(exc))
        out.update({S.STATUS: S.STATUS_ERROR, S.ERROR: f"could not encode or score the result: {_reason(exc)}",
                    S.EDITED: None, S.PRED_MASK: None, S.GENERATED_SOURCE: None})
    return out


def finalize_batch(batch: pa.Table, *, run_id: str, known_errors: Any = None) -> pa.Table:
    """Stage 3 (stateless): output rows in :data:`pipelines.schema.OUTPUT_SCHEMA`.

    ``known_errors`` (ids, or a Ray object ref to them): ids the output already holds as error rows; when
    such an id fails again it is not written a second time (``retry_errors``)."""
    rows = [finalize_row(r, run_id) for r in batch.to_pylist()]
    out = pa.Table.from_pylist(rows, schema=S.OUTPUT_SCHEMA)
    known = _resolve_skip(known_errors)
    if known is not None and len(known) and out.num_rows:
        again = pc.and_(pc.equal(out[S.STATUS], S.STATUS_ERROR), pc.is_in(out[S.ID], value_set=known))
        out = out.filter(pc.invert(again))
    return out


# ---- the same stages in one process (baseline for the benchmark; small jobs without Ray) ---------------------
def run_in_process(cfg: BatchConfig, table: pa.Table, stage: EditStage | None = None,
                   run_id: str = "in-process", threads: int | None = None) -> pa.Table:
    """Decode → edit → finalize ``table`` in this process, ``cfg.actors.batch_size`` rows at a time."""
    stage = stage or EditStage(cfg.model, cfg.method, cfg.image, threads=threads)
    opts = DecodeOptions.from_config(cfg)
    out = []
    bs = cfg.actors.batch_size
    for start in range(0, table.num_rows, bs):
        decoded = decode_batch(table.slice(start, bs), opts=opts)
        out.append(finalize_batch(stage(decoded), run_id=run_id))
    return pa.concat_tables(out) if out else S.OUTPUT_SCHEMA.empty_table()


# ---- driver ---------------------------------------------------------------------------------------------------
def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _run_filenames(run_id: str) -> Any:
    """A Ray FilenameProvider giving ``part-<run_id>-<write_uuid>-<task>-<i>.parquet`` (never reused)."""
    from ray.data.datasource import FilenameProvider

    class RunFilenames(FilenameProvider):
        def __init__(self) -> None:
            super().__init__(file_format="parquet")

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{run_id}-{write_uuid}-{task_index:06d}.parquet"

    return RunFilenames()


@dataclass
class PriorOutput:
    """What an output folder already holds."""

    ok_ids: set[str] = field(default_factory=set)
    error_ids: set[str] = field(default_factory=set)
    files: int = 0
    unreadable: list[str] = field(default_factory=list)
    fingerprints: dict[str, dict] = field(default_factory=dict)  # run_id → fingerprint, runs that wrote data


def scan_output(fs: Any, path: str) -> PriorOutput:
    """Read ids and statuses already written under ``path`` and the settings of earlier runs."""
    prior = PriorOutput()
    data_runs = set()
    for f in storage.list_files(fs, path):
        data_runs.add(_run_of(f))
        try:
            t = pq.read_table(f, columns=[S.ID, S.STATUS], filesystem=fs)
        except (pa.ArrowException, OSError) as exc:
            log.warning("output file %s is unreadable (%s); its rows will be redone. Move it out of the output "
                        "folder so that plain Parquet readers can read the folder.", f, exc)
            prior.unreadable.append(f)
            continue
        prior.files += 1
        ids, status = t[S.ID].to_pylist(), t[S.STATUS].to_pylist()
        for i, s in zip(ids, status, strict=True):
            (prior.ok_ids if s == S.STATUS_OK else prior.error_ids).add(i)
    prior.error_ids -= prior.ok_ids
    for f in storage.list_files(fs, storage.join(path, RUNS_DIR), suffix=".json"):
        if f.endswith(".summary.json"):
            continue
        try:
            manifest = json.loads(storage.read_bytes(fs, f))
            if manifest["run_id"] in data_runs:  # a run that failed before writing rows constrains nothing
                prior.fingerprints[manifest["run_id"]] = manifest["fingerprint"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot read run manifest %s (%s); ignoring it", f, exc)
    return prior


def _run_of(path: str) -> str | None:
    """The run id in a data file name ``part-<run_id>-...parquet`` (run ids are ``<timestamp>-<hex>``)."""
    name = path.rsplit("/", 1)[-1]
    if not name.startswith("part-"):
        return None
    parts = name[len("part-"):].split("-")
    return "-".join(parts[:2]) if len(parts) >= 3 else None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: earlier {a!r}, now {b!r}"]


def check_resumable(prior: PriorOutput, cfg: BatchConfig, output: str) -> None:
    """Refuse to mix rows made with different settings into one output."""
    now = json.loads(json.dumps(fingerprint(cfg)))
    for run_id, earlier in prior.fingerprints.items():
        diffs = _diff(earlier, now)
        if diffs:
            raise ConfigError(
                f"output {output} already holds rows of run {run_id} made with other settings ("
                + "; ".join(diffs[:5]) + "). Use another output, or the same settings to resume."
            )


@dataclass
class InputPlan:
    files: list[str]
    columns: list[str]
    rows: int
    ids: pa.Array


def plan_input(fs: Any, path: str, display: str) -> InputPlan:
    """List the input files, validate their schema and ids (non-null, unique)."""
    files = storage.list_files(fs, path)
    if not files:
        raise InputNotFoundError(f"no Parquet files at {display}")
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    S.validate_input_schema(dataset.schema, source=f"input {display}")
    try:
        ids = dataset.to_table(columns=[S.ID])[S.ID].combine_chunks()
    except (pa.ArrowException, OSError) as exc:
        raise S.SchemaError(f"cannot read the id column of input {display}: {exc}") from None
    nulls = ids.null_count
    if nulls:
        raise S.SchemaError(f"input {display}: {nulls} rows have a null id; every row needs a unique id")
    counts = pc.value_counts(ids)
    dupes = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dupes):
        shown = ", ".join(repr(x) for x in dupes.to_pylist()[:5])
        raise S.SchemaError(
            f"input {display}: {len(dupes)} ids occur more than once (e.g. {shown}); ids must be unique"
        )
    columns = [c for c in S.REQUIRED_INPUT + S.OPTIONAL_INPUT if c in dataset.schema.names]
    return InputPlan(files=files, columns=columns, rows=len(ids), ids=ids)


@dataclass
class JobSummary:
    """What a run did; printed as one JSON line at the end."""

    run_id: str
    output: str
    input_rows: int
    skipped_ok: int
    skipped_error: int
    written: int
    ok: int
    error: int
    seconds: float
    rows_per_s: float
    files: int
    top_errors: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def connect_ray(cfg: BatchConfig) -> bool:
    """Connect to ``RAY_ADDRESS`` when set, else start a local cluster; returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        # a local single-user cluster: opt out of token auth unless the user chose a mode
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        log.info("RAY_ADDRESS is not set; starting a local Ray cluster")
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 include_dashboard=False)
    return True


def check_resources(cfg: BatchConfig, local: bool) -> None:
    """Refuse (local cluster) or warn about (remote cluster, which may autoscale) a pool that cannot run.

    Ray Data's listing, read and write tasks need a whole free CPU next to the actor pool; when the actors
    reserve every CPU the job waits forever instead of failing.
    """
    import ray

    a = cfg.actors
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    problems = []
    reserved = a.pool_size * a.num_cpus
    if cpus - reserved < max(1.0, cfg.ray.task_cpus):
        problems.append(
            f"the cluster has {cpus:g} CPUs and actors.pool_size × actors.num_cpus = {a.pool_size} × {a.num_cpus:g} "
            f"reserves {reserved:g}, leaving {max(cpus - reserved, 0):g}; Ray Data's read/decode/write tasks need at "
            f"least {max(1.0, cfg.ray.task_cpus):g}. Lower actors.num_cpus (e.g. "
            f"{max((cpus - 1.0) / a.pool_size, 0.0):g}; torch still gets one thread) or actors.pool_size"
        )
    if a.num_gpus and a.pool_size * a.num_gpus > gpus:
        problems.append(
            f"actors.pool_size × actors.num_gpus = {a.pool_size} × {a.num_gpus:g} GPUs, but the cluster has {gpus:g}"
        )
    for problem in problems:
        if local:
            raise ConfigError(problem)
        log.warning("%s (continuing: the cluster may scale up)", problem)


def build_dataset(cfg: BatchConfig, plan: InputPlan, in_fs: Any, skip: pa.Array | None, run_id: str,
                  known_errors: pa.Array | None = None) -> Any:
    """The Ray Data pipeline up to (not including) the write. ``skip``: ids not to edit; ``known_errors``:
    ids already written as errors (not written again if they fail again)."""
    import ray

    skip_ref = ray.put(skip) if skip is not None and len(skip) else None
    errors_ref = ray.put(known_errors) if known_errors is not None and len(known_errors) else None
    a = cfg.actors
    task_cpus = cfg.ray.task_cpus
    ds = ray.data.read_parquet(plan.files, filesystem=in_fs, columns=plan.columns, num_cpus=task_cpus)
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", num_cpus=task_cpus,
                        fn_kwargs={"opts": DecodeOptions.from_config(cfg), "skip_ids": skip_ref})
    # blocks of batch_size rows, so that every actor of the pool gets work even from one big file
    ds = ds.repartition(target_num_rows_per_block=a.batch_size)
    ds = ds.map_batches(
        EditStage,
        batch_format="pyarrow",
        batch_size=a.batch_size,
        compute=ray.data.ActorPoolStrategy(size=a.pool_size),
        num_gpus=a.num_gpus,
        num_cpus=a.num_cpus,
        fn_constructor_kwargs={"model": cfg.model, "method": cfg.method, "image": cfg.image,
                               "threads": max(1, round(a.num_cpus)) if a.num_gpus == 0 else None},
    )
    return ds.map_batches(finalize_batch, batch_format="pyarrow", num_cpus=task_cpus,
                          fn_kwargs={"run_id": run_id, "known_errors": errors_ref})


def _write_json(fs: Any, path: str, data: dict) -> None:
    storage.write_bytes(fs, path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def run_job(cfg: BatchConfig, run_id: str | None = None) -> JobSummary:
    """Run one bulk-edit job (resuming into ``cfg.output``) and return its summary."""
    import ray
    from ray.data._internal.savemode import SaveMode

    run_id = run_id or new_run_id()
    in_fs, in_path = storage.resolve(cfg.input, cfg.storage)
    out_fs, out_path = storage.resolve(cfg.output, cfg.storage)
    out_display = storage.display(out_fs, out_path)
    # 1. the input: schema, ids
    plan = plan_input(in_fs, in_path, storage.display(in_fs, in_path))
    # 2. resume: what the output already holds, under which settings
    prior = scan_output(out_fs, out_path) if cfg.resume else PriorOutput()
    if cfg.resume:
        check_resumable(prior, cfg, out_display)
    elif prior.files:
        raise ConfigError(f"resume: false but output {out_display} already holds data; use an empty output")
    done = set(prior.ok_ids) | (set() if cfg.retry_errors else prior.error_ids)
    input_ids = set(plan.ids.to_pylist())
    skip_ok = len(input_ids & prior.ok_ids)
    skip_err = len(input_ids & prior.error_ids) if not cfg.retry_errors else 0
    todo = plan.rows - skip_ok - skip_err
    log.info("input %s: %d rows; output %s holds %d ok and %d error rows of them; %d to edit",
             cfg.input, plan.rows, out_display, skip_ok, len(input_ids & prior.error_ids), todo)
    _write_json(out_fs, storage.join(out_path, RUNS_DIR, f"{run_id}.json"),
                {"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "input": cfg.input,
                 "fingerprint": fingerprint(cfg), "config": to_dict(cfg)})
    t0 = time.perf_counter()
    if todo > 0:
        # 3. the pipeline: read → decode → edit (actors) → encode + metrics → write
        started = connect_ray(cfg)
        check_resources(cfg, local=started or not os.environ.get("RAY_ADDRESS"))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.ray.progress_bars
        previous_v2 = getattr(ctx, "use_datasource_v2", None)
        if previous_v2 is not None:
            ctx.use_datasource_v2 = cfg.ray.datasource_v2
        skip = pa.array(sorted(done & input_ids), type=pa.string()) if done else None
        retried = sorted(prior.error_ids & input_ids) if cfg.retry_errors else []
        try:
            ds = build_dataset(cfg, plan, in_fs, skip, run_id, pa.array(retried, type=pa.string()))
            ds.write_parquet(out_path, filesystem=out_fs, filename_provider=_run_filenames(run_id),
                             max_rows_per_file=cfg.write.max_rows_per_file, compression=cfg.write.compression,
                             mode=SaveMode.APPEND)
        finally:
            if previous_v2 is not None:
                ctx.use_datasource_v2 = previous_v2
    seconds = time.perf_counter() - t0
    # 4. summary, read back from this run's files
    summary = summarize_run(out_fs, out_path, run_id, plan.rows, skip_ok, skip_err, seconds)
    _write_json(out_fs, storage.join(out_path, RUNS_DIR, f"{run_id}.summary.json"), summary.to_dict())
    log.info("run %s: %d ok, %d error, %d skipped; %.2f rows/s over %.1f s; output: %s",
             run_id, summary.ok, summary.error, skip_ok + skip_err, summary.rows_per_s, seconds, out_display)
    return summary


def summarize_run(fs: Any, path: str, run_id: str, input_rows: int, skipped_ok: int, skipped_error: int,
                  seconds: float) -> JobSummary:
    prefix = f"part-{run_id}-"
    files = [f for f in storage.list_files(fs, path) if f.rsplit("/", 1)[-1].startswith(prefix)]
    if files:
        t = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=[S.STATUS, S.ERROR])
        status = t[S.STATUS].to_pylist()
        errors = collections.Counter(e for s, e in zip(status, t[S.ERROR].to_pylist(), strict=True)
                                     if s != S.STATUS_OK)
    else:
        status, errors = [], collections.Counter()
    ok = sum(1 for s in status if s == S.STATUS_OK)
    return JobSummary(
        run_id=run_id, output=storage.display(fs, path), input_rows=input_rows, skipped_ok=skipped_ok,
        skipped_error=skipped_error, written=len(status), ok=ok, error=len(status) - ok,
        seconds=round(seconds, 3), rows_per_s=round(len(status) / seconds, 3) if seconds > 0 and status else 0.0,
        files=len(files), top_errors=dict(errors.most_common(10)),
    )


# ---- command line ---------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.commands import add_model_args

    p = sub.add_parser(
        "batch", help="bulk-edit a Parquet dataset on Ray (local or s3://)",
        description="Edit every row of a Parquet dataset on Ray Data and write Parquet with the edited images, "
                    "masks and metrics. Connects to RAY_ADDRESS when set, else starts a local cluster. "
                    "Re-running with the same output resumes. Input schema:\n" + S.describe_input_schema(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  instdiff batch --config configs/batch/demo.yaml\n"
               "  instdiff batch --config configs/batch/tiny.yaml --output out/tiny-8 --set method.steps=8\n"
               "  python -m pipelines.batch --config configs/batch/demo.yaml   # the same as instdiff batch\n"
               "  ray job submit --address http://HEAD:8265 --working-dir . -- \\\n"
               "      python -m pipelines.batch --config configs/batch/gpu-s3.yaml\n"
               "prints one JSON line: run_id, output, input_rows, skipped_ok, skipped_error, written, ok, error,\n"
               "seconds, rows_per_s, files, top_errors",
    )
    p.add_argument("--config", default=None, help="YAML job config (configs/batch/*.yaml); flags override it")
    p.add_argument("--input", default=None, help="input Parquet file or folder, local or s3://bucket/prefix")
    p.add_argument("--output", default=None, help="output folder, local or s3://bucket/prefix")
    add_model_args(p)
    p.set_defaults(model=None, inpaint_model=None, device=None, dtype=None, local_files_only=None)
    p.add_argument("--method", default=None, help="instdiffedit, sdedit, diffedit or fisedit (method.name)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (method.steps)")
    p.add_argument("--strength", type=float, default=None, help="noise strength r (method.strength)")
    p.add_argument("--seed", type=int, default=None, help="base seed (seed)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per editor call (actors.batch_size)")
    p.add_argument("--actors", type=int, default=None, help="editing actors (actors.pool_size)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (actors.num_gpus)")
    p.add_argument("--max-rows-per-file", type=int, default=None, help="write.max_rows_per_file")
    p.add_argument("--retry-errors", action="store_true", default=None,
                   help="also re-run ids whose earlier row is an error (retry_errors)")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set method.mask.phi=0.3 (repeatable)")
    p.set_defaults(func=run)


_FLAG_KEYS = {
    "input": "input", "output": "output", "model": "model.spec", "inpaint_model": "model.inpaint",
    "device": "model.device", "dtype": "model.dtype", "local_files_only": "model.local_files_only",
    "method": "method.name", "steps": "method.steps", "strength": "method.strength", "seed": "seed",
    "batch_size": "actors.batch_size", "actors": "actors.pool_size", "num_gpus": "actors.num_gpus",
    "max_rows_per_file": "write.max_rows_per_file", "retry_errors": "retry_errors",
}


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    """The YAML file, then ``--set`` assignments, then the dedicated flags."""
    from pipelines.config import parse_assignment

    overrides: dict[str, Any] = dict(parse_assignment(a) for a in args.assignments)
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    if args.config is None and ("input" not in overrides or "output" not in overrides):
        raise ConfigError("give --config FILE, or both --input and --output")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    import ray

    running = ray.is_initialized()
    cfg = config_from_args(args)
    try:
        summary = run_job(cfg)
    finally:
        if not running and ray.is_initialized():
            ray.shutdown()
    print(json.dumps(summary.to_dict()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.batch ARGS`` is ``instdiff batch ARGS``."""
    from pipelines.commands import configure_logging, run_command

    parser = argparse.ArgumentParser(prog="python -m pipelines.batch")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", *(sys.argv[1:] if argv is None else argv)])
    configure_logging(args.verbose)
    return run_command("instdiff batch", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
