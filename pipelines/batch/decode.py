"""Stage 1 of the job (stateless Ray tasks): drop ids already done, validate each row, decode its image and mask.

A bad row is never dropped: it leaves this stage with ``status="error"`` and the reason. The stage takes plain
values (:class:`DecodeOptions`) and imports :mod:`instdiff.imageio` only inside the functions, so its workers
never load the editors (diffusers).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from instdiff.config import Method
from pipelines import schema as S
from pipelines.batch.rows import DECODED_SCHEMA, RowError, error_text, join_notes, pack_mask, resolve_ids
from pipelines.config import AlphaPolicy, BatchConfig

# methods that accept prompt-only rows (no input image): generate, then edit
GENERATING_METHODS = tuple(m.value for m in Method if m.generates_source)


@dataclass(frozen=True)
class DecodeOptions:
    """What the decode stage checks; plain values, so its workers never import the editors.

    Attributes:
        method: the editing method's name (``Method`` value).
        needs_source: rows with an empty ``source_prompt`` are errors (``Method.needs_source_prompt``).
        max_pixels: larger images are error rows.
        min_side: images with a shorter side (px) are error rows.
        alpha: ``AlphaPolicy`` value: composite transparency onto white, or refuse it.
    """

    method: str
    needs_source: bool
    max_pixels: int
    min_side: int
    alpha: str = AlphaPolicy.CONVERT.value

    @classmethod
    def from_config(cls, cfg: BatchConfig) -> DecodeOptions:
        """The options of a job config (its ``method`` and ``image`` sections)."""
        return cls(
            method=cfg.method.method.value,
            needs_source=cfg.method.needs_source_prompt,
            max_pixels=cfg.image.max_pixels,
            min_side=cfg.image.min_side,
            alpha=cfg.image.alpha.value,
        )


def _has_alpha(data: bytes) -> bool:
    """Whether encoded image bytes carry transparency (reads the header only; False when undecodable)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    except Exception:  # noqa: BLE001 - undecodable bytes are reported by decode_image with a better message
        return False


def decode_row(row: dict[str, Any], opts: DecodeOptions) -> dict[str, Any]:
    """Validate one input row and decode its image and mask; problems become ``status="error"``.

    Images and masks are read as a viewer shows them (:func:`instdiff.imageio.decode_image` and
    :func:`~instdiff.imageio.decode_mask`): upright after EXIF orientation, the first frame of an animated
    file, with notes saying so; ``width``/``height`` are the upright size. A mask is read by the one rule,
    non-zero = edit; a mask with no edit pixel makes the row an error (never a silent IoU of 0).

    Args:
        row: one input row (:data:`pipelines.schema.INPUT_SCHEMA` columns; optional ones may be absent).
        opts: what to check.

    Returns:
        One row of :data:`~pipelines.batch.rows.DECODED_SCHEMA`: the image as (H, W, 3) uint8 bytes, the
        ground-truth mask as packed bits, ``generate=True`` for a prompt-only row of a generating method.
    """
    from instdiff import imageio

    out: dict[str, Any] = {
        S.ID: row[S.ID],
        S.DATASET: row.get(S.DATASET),
        S.META: row.get(S.META),
        S.SOURCE_PROMPT: row.get(S.SOURCE_PROMPT),
        S.TARGET_PROMPT: row.get(S.TARGET_PROMPT),
        S.STATUS: S.STATUS_OK,
        S.ERROR: None,
        S.NOTES: None,
        S.RGB: None,
        S.WIDTH: None,
        S.HEIGHT: None,
        S.GT_BITS: None,
        S.GENERATE: False,
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
                raise RowError(
                    "image is missing (null); only generating methods "
                    f"({', '.join(GENERATING_METHODS)}) accept prompt-only rows"
                )
            if mask is not None:
                raise RowError("a ground-truth mask needs an input image; this row has none")
            out[S.GENERATE] = True
            notes.append("source generated from source_prompt")
        else:
            if opts.alpha == AlphaPolicy.ERROR.value and _has_alpha(data):
                raise RowError(
                    "image has transparency; image.alpha=error refuses it "
                    "(image.alpha=convert composites it onto white)"
                )
            array, conversions = imageio.decode_image(data, max_pixels=opts.max_pixels)
            notes.extend(conversions)
            h, w = array.shape[:2]
            if min(h, w) < opts.min_side:
                raise RowError(f"image is {w}x{h}; both sides must be at least {opts.min_side} px (image.min_side)")
            if mask is not None:  # non-zero = edit; a mask with no edit pixel is this row's error
                mask_notes: list[str] = []
                gt = imageio.decode_mask(mask, size=(w, h), max_pixels=opts.max_pixels, notes=mask_notes)
                notes.extend(f"mask: {n}" for n in mask_notes)
                out[S.GT_BITS] = pack_mask(gt)
            out.update({S.RGB: array.tobytes(), S.WIDTH: w, S.HEIGHT: h})
    except Exception as exc:  # noqa: BLE001 - any problem with one row is that row's error, never the batch's
        out.update(
            {
                S.STATUS: S.STATUS_ERROR,
                S.ERROR: error_text(exc),
                S.RGB: None,
                S.GT_BITS: None,
                S.WIDTH: None,
                S.HEIGHT: None,
            }
        )
    out[S.NOTES] = join_notes(notes)
    return out


def decode_batch(batch: pa.Table, *, opts: DecodeOptions, skip_ids: Any = None) -> pa.Table:
    """Stage 1 (stateless): drop the ids in ``skip_ids``, then decode and validate every row (:func:`decode_row`).

    Rows are never dropped for being bad.

    Args:
        batch: input rows (:data:`pipelines.schema.INPUT_SCHEMA` columns; others are ignored).
        opts: what to check.
        skip_ids: ids not to edit: a ``pa.Array``, a Ray object ref to one, or ``None``.

    Returns:
        The remaining rows in :data:`~pipelines.batch.rows.DECODED_SCHEMA`.
    """
    skip = resolve_ids(skip_ids)
    if skip is not None and len(skip) and batch.num_rows:
        batch = batch.filter(pc.invert(pc.is_in(batch[S.ID], value_set=skip)))
    wanted = [
        c
        for c in (S.ID, S.IMAGE, S.SOURCE_PROMPT, S.TARGET_PROMPT, S.MASK, S.DATASET, S.META)
        if c in batch.column_names
    ]
    rows = [decode_row(r, opts) for r in batch.select(wanted).to_pylist()]
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
