"""Reporting: per-metric mean, standard deviation and counts over samples, NaNs left out."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def summarize(values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and count of each metric, ignoring NaNs.

    Args:
        values: Metric name → per-sample values (floats, tensors or arrays).

    Returns:
        ``{name: {"mean", "std", "count", "nan_count"}}``; ``std`` is the population
        standard deviation (``ddof=0``); ``mean``/``std`` are NaN when no finite value
        remains.  ``±inf`` values are kept (and propagate into mean/std).
    """
    summary: dict[str, dict[str, float]] = {}
    for name, seq in values.items():
        if isinstance(seq, torch.Tensor):
            array = seq.detach().cpu().double().numpy().ravel()
        else:
            array = np.asarray([float(v) for v in seq], dtype=np.float64)
        nan = np.isnan(array)
        kept = array[~nan]
        summary[name] = {
            "mean": float(kept.mean()) if kept.size else math.nan,
            "std": float(kept.std()) if kept.size else math.nan,
            "count": int(kept.size),
            "nan_count": int(nan.sum()),
        }
    return summary
