"""Rows between the job's stages: their Arrow schemas, the per-row seed and error text, and array packing.

The decode stage emits :data:`DECODED_SCHEMA`, the edit stage :data:`EDITED_SCHEMA`, the finalize stage
:data:`pipelines.schema.OUTPUT_SCHEMA`. Images travel as raw ``(H, W, 3)`` uint8 bytes and masks as
``np.packbits`` bytes, so no stage re-encodes what the next one decodes.

This module imports neither torch nor diffusers: the decode and finalize workers import it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from instdiff.errors import EditInputError, ImageInputError, InstdiffError
from pipelines import schema as S

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
    """The seed of one row: depends only on the job seed and the id (not on batch-mates, order or actor).

    Args:
        base: the job's ``seed``.
        row_id: the row's ``id``.

    Returns:
        ``(base + crc32(id)) mod 2**31``, written to the row's ``seed`` column.
    """
    return (int(base) + zlib.crc32(row_id.encode("utf-8"))) % 2**31


def error_text(exc: BaseException) -> str:
    """A row's error text: input errors speak for themselves, anything else is prefixed by its type.

    Args:
        exc: what went wrong with the row.

    Returns:
        ``str(exc)`` for :class:`RowError`, :class:`~instdiff.errors.ImageInputError` and
        :class:`~instdiff.errors.EditInputError`; ``"TypeName: message"`` for any other exception.
    """
    if isinstance(exc, RowError | ImageInputError | EditInputError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def join_notes(notes: Iterable[str]) -> str | None:
    """The ``notes`` cell: the non-empty notes joined by ``"; "``, or ``None`` when there are none."""
    notes = [n for n in notes if n]
    return "; ".join(notes) if notes else None


def pack_mask(mask: np.ndarray) -> bytes:
    """An (H, W) mask (any dtype, non-zero = inside) as ``np.packbits`` bytes."""
    return np.packbits(mask.astype(bool), axis=None).tobytes()


def unpack_mask(bits: bytes, height: int, width: int) -> np.ndarray:
    """The inverse of :func:`pack_mask`.

    Returns:
        (height, width) bool mask.
    """
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=height * width).reshape(height, width).astype(bool)


def rgb_array(data: bytes, height: int, width: int) -> np.ndarray:
    """Raw image bytes as a writable (height, width, 3) uint8 array (torch needs writable memory)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()


def resolve_ids(ids: Any) -> pa.Array | None:
    """A set of ids given as a ``pa.Array`` (or ``None``), or as a Ray object ref to one (fetched here)."""
    if ids is None or isinstance(ids, pa.Array | pa.ChunkedArray):
        return ids
    import ray

    return ray.get(ids)


def carried_columns(batch: pa.Table, known: pa.Schema) -> list[str]:
    """The columns of ``batch`` that the stage's own schema ``known`` lacks (carried by the job's ``carry``)."""
    return [c for c in batch.column_names if c not in known.names]


def with_carried(out: pa.Table, batch: pa.Table, known: pa.Schema) -> pa.Table:
    """``out`` (one row per row of ``batch``, in order) with ``batch``'s carried columns appended.

    Args:
        out: a stage's output rows.
        batch: the stage's input rows.
        known: the stage's input schema; other columns of ``batch`` are carried.

    Returns:
        ``out`` plus those columns, unchanged.
    """
    for name in carried_columns(batch, known):
        out = out.append_column(batch.schema.field(name), batch[name])
    return out
