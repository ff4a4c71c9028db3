"""Scores of one bench run from its output folder: the job's per-row metrics averaged, plus model-based metrics.

Per-row metrics written by the batch job (time, UNet calls, IoU, C_m, C_non; InstDiffEdit Eq. I-III) are
averaged over the ok rows. Model-based metrics are computed here on the decoded pairs: LPIPS(input, edited)
(AlexNet, v0.1), FID of the edited images against all inputs and CSFID per class (Inception pool3 features,
:mod:`instdiff.metrics`), the shapes-world text score (:mod:`instdiff.scorer`) and CLIPScore. A metric model
that cannot be loaded becomes an ``n/a`` reason, never a failure.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import schema as S
from pipelines.bench.config import MetricSpec, RunSpec
from pipelines.report import read_output

log = logging.getLogger(__name__)

NO_CLIP = "n/a: no CLIP model given (metrics.clip_model)"


@dataclass
class Inputs:
    """The benchmark's input rows, decoded once for every run's metrics."""

    ids: list[str]
    images: dict[str, np.ndarray]  # id → (H, W, 3) uint8 (null-image rows absent)
    masks: dict[str, np.ndarray]  # id → (H, W) bool
    meta: dict[str, dict[str, Any]]
    datasets: dict[str, str | None]
    target_prompts: dict[str, str]

    @classmethod
    def from_table(cls, table: pa.Table) -> Inputs:
        """Decode an input table (``pipelines.schema`` input columns).

        Args:
            table: the benchmark's input rows; ``mask``, ``meta`` and ``dataset`` columns are optional.

        Returns:
            The decoded rows; a ``meta`` that is not valid JSON reads as ``{}``.
        """
        from instdiff.imageio import decode_image, decode_mask

        ids = table.column(S.ID).to_pylist()
        images, masks, meta, dsets, targets = {}, {}, {}, {}, {}
        cols = {
            c: table.column(c).to_pylist()
            for c in (S.IMAGE, S.MASK, S.META, S.DATASET, S.TARGET_PROMPT)
            if c in table.column_names
        }
        for i, rid in enumerate(ids):
            if cols[S.IMAGE][i] is not None:
                images[rid] = decode_image(cols[S.IMAGE][i])[0]
            if cols.get(S.MASK) and cols[S.MASK][i] is not None:
                masks[rid] = decode_mask(cols[S.MASK][i], allow_empty=True)  # the batch job made it an error row
            text = (cols.get(S.META) or [None] * len(ids))[i]
            try:
                meta[rid] = json.loads(text) if text else {}
            except json.JSONDecodeError:
                meta[rid] = {}
            dsets[rid] = (cols.get(S.DATASET) or [None] * len(ids))[i]
            targets[rid] = cols[S.TARGET_PROMPT][i]
        return cls(ids, images, masks, meta, dsets, targets)


class Scorers:
    """Metric models, loaded once and only when needed; a model that cannot be loaded becomes an n/a reason.

    ``reasons`` maps a metric (``lpips``, ``fid``, ``clip_score``) to why it is n/a; ``sources`` maps it to
    the weights it was computed with.
    """

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self._lpips: Any = None
        self._inception: Any = None
        self._clip: Any = None
        self.reasons: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self._ref_feats: dict[str, np.ndarray] = {}

    def lpips(self) -> Any:
        """The LPIPS (AlexNet) model, or ``None`` when its weights are unavailable."""
        if self._lpips is None and "lpips" not in self.reasons:
            try:
                from instdiff.metrics import LPIPS

                self._lpips = LPIPS("alex")
                self.sources["lpips"] = self._lpips.weights_source
            except Exception as exc:  # noqa: BLE001 - any failure to load weights is reported, not fatal
                self.reasons["lpips"] = f"n/a: LPIPS weights unavailable ({type(exc).__name__}: {exc})"
                log.warning("%s", self.reasons["lpips"])
        return self._lpips

    def inception(self) -> Any:
        """The Inception feature extractor for FID, or ``None`` when its weights are unavailable."""
        if self._inception is None and "fid" not in self.reasons:
            try:
                from instdiff.metrics import InceptionFeatures

                self._inception = InceptionFeatures()
                self.sources["fid"] = self._inception.weights_source
            except Exception as exc:  # noqa: BLE001
                self.reasons["fid"] = f"n/a: Inception weights unavailable ({type(exc).__name__}: {exc})"
                log.warning("%s", self.reasons["fid"])
        return self._inception

    def clip(self) -> Any:
        """The CLIP scorer of ``metrics.clip_model`` (local files only), or ``None`` without one."""
        if self.spec.clip_model is None:
            self.reasons["clip_score"] = NO_CLIP
            return None
        if self._clip is None and "clip_score" not in self.reasons:
            try:
                from instdiff.metrics import ClipScorer

                self._clip = ClipScorer(self.spec.clip_model, local_files_only=True)
                self.sources["clip_score"] = str(self.spec.clip_model)
            except Exception as exc:  # noqa: BLE001
                self.reasons["clip_score"] = f"n/a: cannot load CLIP model {self.spec.clip_model!r} ({exc})"
                log.warning("%s", self.reasons["clip_score"])
        return self._clip

    def features(self, images: Sequence[np.ndarray], cache_key: str | None = None) -> np.ndarray | None:
        """Inception pool3 features of ``images`` (grouped by size), cached under ``cache_key``.

        Args:
            images: (H, W, 3) uint8 arrays; sizes may differ.
            cache_key: a name to cache the result under (the reference set), or ``None``.

        Returns:
            (N, 2048) float64, or ``None`` when the Inception weights are unavailable.
        """
        if cache_key is not None and cache_key in self._ref_feats:
            return self._ref_feats[cache_key]
        net = self.inception()
        if net is None:
            return None
        out = np.zeros((len(images), 2048), dtype=np.float64)
        by_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(img.shape, []).append(i)
        for idx in by_shape.values():
            out[idx] = net(np.stack([images[i] for i in idx])).numpy()
        if cache_key is not None:
            self._ref_feats[cache_key] = out
        return out


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are neither ``None`` nor NaN (``None`` when there are none)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else None


def text_score_mode(spec: MetricSpec, inputs: Inputs) -> str:
    """Which text score applies: ``shapes`` (attribute scorer), ``clip``, or ``none``.

    ``auto`` picks ``shapes`` when every row is a shapes-world row (dataset ``shapes`` with
    ``meta.target_phrase``) and the rows have ground-truth masks, else ``clip`` when a CLIP model is given.
    """
    if spec.text_score != "auto":
        return spec.text_score
    shapes = all(inputs.datasets.get(i) == "shapes" and "target_phrase" in inputs.meta.get(i, {}) for i in inputs.ids)
    if shapes and inputs.masks:
        return "shapes"
    return "clip" if spec.clip_model else "none"


def shapes_text_score(edited: Mapping[str, np.ndarray], inputs: Inputs, ids: Sequence[str]) -> float | None:
    """Fraction of rows whose target phrase the shapes-world scorer finds inside the ground-truth edit region.

    Args:
        edited: id → (H, W, 3) uint8 edited image.
        inputs: the input rows (target phrase in ``meta``, region = ground-truth mask).
        ids: the rows to score; rows without a phrase, mask or edit are skipped.

    Returns:
        A fraction in [0, 1], or ``None`` when no row could be scored.
    """
    from instdiff import scorer

    hits = []
    for rid in ids:
        phrase = inputs.meta.get(rid, {}).get("target_phrase")
        region = inputs.masks.get(rid)
        if phrase is None or region is None or rid not in edited:
            continue
        try:
            hits.append(bool(scorer.phrase_present(edited[rid], phrase, region=region)))
        except (ValueError, scorer.PhraseError) as exc:
            log.debug("row %s: no text score (%s)", rid, exc)
    return float(np.mean(hits)) if hits else None


def read_run_rows(output: str) -> pa.Table | None:
    """One row per id of a run's output (:func:`pipelines.report.read_output`); ``None`` when it has none yet."""
    try:
        return read_output(output)
    except FileNotFoundError:
        return None


def aggregate_run(run: RunSpec, output: str, inputs: Inputs, scorers: Scorers, mode: str) -> dict[str, Any]:
    """Table 1 numbers of one run from its output folder.

    Args:
        run: the run.
        output: its output folder.
        inputs: the benchmark's decoded input rows (rows of other ids in the output are ignored).
        scorers: the metric models.
        mode: the text score (:func:`text_score_mode`).

    Returns:
        ``label``, ``slug``, ``sweep``, ``params``, ``output``, row counts (``rows``, ``written``, ``ok``,
        ``error``), ``method``, ``model``, ``top_errors``; with ok rows also the means ``time_per_image_s`` (s),
        ``unet_calls``, ``mask_area``, ``iou``, ``c_m``, ``c_non`` (fractions), ``ratio``, and where
        computed ``lpips``, ``fid``, ``csfid``, ``text_score``, ``clip_score`` (``None``: no value).
    """
    from instdiff.imageio import decode_image

    res: dict[str, Any] = {
        "label": run.label,
        "slug": run.slug,
        "sweep": run.sweep,
        "params": run.params,
        "output": output,
    }
    table = read_run_rows(output)
    wanted = set(inputs.ids)
    rows = [r for r in (table.to_pylist() if table is not None else []) if r[S.ID] in wanted]
    ok = [r for r in rows if r[S.STATUS] == S.STATUS_OK]
    res.update(
        rows=len(inputs.ids),
        written=len(rows),
        ok=len(ok),
        error=len(rows) - len(ok),
        method=ok[0][S.METHOD] if ok else None,
        model=ok[0][S.MODEL] if ok else None,
    )
    errors: dict[str, int] = {}
    for r in rows:
        if r[S.STATUS] != S.STATUS_OK:
            errors[r[S.ERROR] or "?"] = errors.get(r[S.ERROR] or "?", 0) + 1
    res["top_errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    if not ok:
        return res
    res["time_per_image_s"] = _mean(
        [r[S.LATENCY_S] / max(1, r[S.BATCH_ROWS] or 1) for r in ok if r[S.LATENCY_S] is not None]
    )
    res["unet_calls"] = _mean([r[S.UNET_CALLS] for r in ok])
    res["mask_area"] = _mean([r[S.MASK_AREA] for r in ok])
    res["iou"] = _mean([r[S.IOU] for r in ok])
    res["c_m"] = _mean([r[S.C_M] for r in ok])
    res["c_non"] = _mean([r[S.C_NON] for r in ok])
    res["ratio"] = res["c_m"] / res["c_non"] if res["c_m"] is not None and res["c_non"] else None
    # decoded pairs for the model-based metrics
    edited = {r[S.ID]: decode_image(r[S.EDITED])[0] for r in ok}
    sources = {
        r[S.ID]: (decode_image(r[S.GENERATED_SOURCE])[0] if r[S.GENERATED_SOURCE] else inputs.images.get(r[S.ID]))
        for r in ok
    }
    ids = [r[S.ID] for r in ok if sources.get(r[S.ID]) is not None and sources[r[S.ID]].shape == edited[r[S.ID]].shape]
    clock = {"start": time.perf_counter()}
    if scorers.spec.lpips and ids and scorers.lpips() is not None:
        values = []
        for shape_ids in _group_by_shape(ids, edited):
            a = np.stack([sources[i] for i in shape_ids])
            b = np.stack([edited[i] for i in shape_ids])
            values.extend(scorers.lpips()(a, b).tolist())
        res["lpips"] = _mean(values)
    clock["lpips"] = time.perf_counter()
    if scorers.spec.fid and len(ids) >= 2:
        _fid_metrics(res, ids, edited, inputs, scorers)
    clock["fid"] = time.perf_counter()
    if mode == "shapes":
        res["text_score"] = shapes_text_score(edited, inputs, ids)
    clock["text"] = time.perf_counter()
    clip = scorers.clip() if mode == "clip" or scorers.spec.clip_model else None
    if clip is not None and ids:
        scores = clip.clip_score([edited[i] for i in ids], [inputs.target_prompts[i] for i in ids])
        res["clip_score"] = _mean(scores.tolist())
    clock["clip"] = time.perf_counter()
    log.info(
        "scored %s (%d rows): lpips %.1f s, fid %.1f s, text score %.1f s, clip %.1f s",
        run.label,
        len(ids),
        clock["lpips"] - clock["start"],
        clock["fid"] - clock["lpips"],
        clock["text"] - clock["fid"],
        clock["clip"] - clock["text"],
    )
    return res


def _group_by_shape(ids: Sequence[str], images: Mapping[str, np.ndarray]) -> list[list[str]]:
    """``ids`` grouped by the shape of their image (LPIPS stacks a batch of one size)."""
    groups: dict[tuple, list[str]] = {}
    for i in ids:
        groups.setdefault(images[i].shape, []).append(i)
    return list(groups.values())


def _fid_metrics(
    res: dict[str, Any],
    ids: Sequence[str],
    edited: Mapping[str, np.ndarray],
    inputs: Inputs,
    scorers: Scorers,
) -> None:
    """FID(edited, inputs) over the run's ok rows and CSFID (classes from meta), into ``res``."""
    from instdiff.metrics import csfid_from_features, frechet_distance

    ref_ids = [i for i in inputs.ids if i in inputs.images]
    ref = scorers.features([inputs.images[i] for i in ref_ids], cache_key="inputs")
    feats = scorers.features([edited[i] for i in ids])
    if ref is None or feats is None:
        return
    res["fid"] = frechet_distance(feats, ref)
    res["fid_n"] = [len(ids), len(ref_ids)]
    spec = scorers.spec
    classes = [inputs.meta.get(i, {}).get(spec.class_key) for i in ids]
    ref_classes = [inputs.meta.get(i, {}).get(spec.ref_class_key) for i in ref_ids]
    keep = [k for k, c in enumerate(classes) if c is not None]
    ref_keep = [k for k, c in enumerate(ref_classes) if c is not None]
    if not keep or not ref_keep:
        res["csfid_note"] = f"n/a: rows have no meta '{spec.class_key}'/'{spec.ref_class_key}' class labels"
        return
    result = csfid_from_features(
        feats[keep], [classes[k] for k in keep], ref[ref_keep], [ref_classes[k] for k in ref_keep]
    )
    res["csfid"] = None if math.isnan(result.value) else result.value
    res["csfid_classes"] = len(result.per_class)
    if not result.per_class:
        res["csfid_note"] = "n/a: no class has >= 2 edited and >= 2 input images"
