"""Stage 3 of the job (stateless Ray tasks): PNG-encode each edited row and score it; rows leave in the output schema.

The metrics need no extra model (:mod:`instdiff.metrics`: mask area, change inside the predicted mask, and
with a ground-truth mask IoU, C_m and C_non of InstDiffEdit Eq. II-III). :mod:`instdiff.imageio` and
:mod:`instdiff.metrics` are imported inside the functions, so these workers never load the editors.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S
from pipelines.batch.rows import EDITED_SCHEMA, error_text, resolve_ids, rgb_array, unpack_mask, with_carried

log = logging.getLogger(__name__)


def _nan_to_none(x: float) -> float | None:
    return None if x != x else float(x)


def finalize_row(row: dict[str, Any], run_id: str) -> dict[str, Any]:
    """One edited row → one output row: PNGs and metrics; an encoding/scoring failure is the row's error.

    Args:
        row: one row of :data:`~pipelines.batch.rows.EDITED_SCHEMA`.
        run_id: the run writing the row.

    Returns:
        One row of :data:`pipelines.schema.OUTPUT_SCHEMA`; metrics in [0, 1] (pixel changes in /255 units),
        ``None`` where undefined (no ground-truth mask, an empty region).
    """
    from instdiff import imageio, metrics

    out = {f.name: row.get(f.name) for f in S.OUTPUT_SCHEMA}
    out.update(
        {
            S.RUN_ID: run_id,
            S.EDITED: None,
            S.PRED_MASK: None,
            S.GENERATED_SOURCE: None,
            S.MASK_AREA: None,
            S.CHANGE_INSIDE_PRED: None,
            S.IOU: None,
            S.C_M: None,
            S.C_NON: None,
        }
    )
    if row[S.STATUS] != S.STATUS_OK:
        out.update({S.UNET_CALLS: None, S.LATENCY_S: None, S.BATCH_ROWS: None})
        return out
    try:
        h, w = row[S.HEIGHT], row[S.WIDTH]
        src, edited = rgb_array(row[S.RGB], h, w), rgb_array(row[S.EDITED_RGB], h, w)
        pred = unpack_mask(row[S.PRED_BITS], h, w)
        out[S.EDITED] = imageio.encode_png(edited)
        out[S.PRED_MASK] = imageio.encode_png(pred)
        if row[S.GENERATE]:
            out[S.GENERATED_SOURCE] = imageio.encode_png(src)
        out[S.MASK_AREA] = float(pred.mean())
        # the change inside the predicted mask (outside it, paste-back keeps the input but for the feather band)
        out[S.CHANGE_INSIDE_PRED] = _nan_to_none(float(metrics.change_in_mask(src, edited, pred)[0]))
        if row[S.GT_BITS] is not None:
            gt = unpack_mask(row[S.GT_BITS], h, w)
            out[S.IOU] = float(metrics.iou(pred, gt)[0])
            out[S.C_M] = _nan_to_none(float(metrics.change_in_mask(src, edited, gt)[0]))
            out[S.C_NON] = _nan_to_none(float(metrics.change_outside_mask(src, edited, gt)[0]))
    except Exception as exc:  # noqa: BLE001 - the row's error, not the batch's
        log.warning("row %s: could not encode or score the result: %s", row[S.ID], error_text(exc))
        out.update(
            {
                S.STATUS: S.STATUS_ERROR,
                S.ERROR: f"could not encode or score the result: {error_text(exc)}",
                S.EDITED: None,
                S.PRED_MASK: None,
                S.GENERATED_SOURCE: None,
            }
        )
    return out


def finalize_batch(batch: pa.Table, *, run_id: str, known_errors: Any = None) -> pa.Table:
    """Stage 3 (stateless): output rows in :data:`pipelines.schema.OUTPUT_SCHEMA`.

    Args:
        batch: rows of :data:`~pipelines.batch.rows.EDITED_SCHEMA`.
        run_id: the run writing the rows.
        known_errors: ids the output already holds as error rows (a ``pa.Array``, a Ray object ref to one, or
            ``None``); such an id that fails again is not written a second time (``retry_errors``).

    Returns:
        The output rows (:func:`finalize_row`), less repeated errors; columns of ``batch`` outside
        ``EDITED_SCHEMA`` (the job's ``carry``) follow their rows unchanged, after the output columns.
    """
    rows = [finalize_row(r, run_id) for r in batch.to_pylist()]
    out = with_carried(pa.Table.from_pylist(rows, schema=S.OUTPUT_SCHEMA), batch, EDITED_SCHEMA)
    known = resolve_ids(known_errors)
    if known is not None and len(known) and out.num_rows:
        again = pc.and_(pc.equal(out[S.STATUS], S.STATUS_ERROR), pc.is_in(out[S.ID], value_set=known))
        out = out.filter(pc.invert(again))
    return out
