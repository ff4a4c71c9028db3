"""Fréchet distance between feature sets: FID and class-wise FID (CSFID).

FID (Heusel et al., 2017) is the Fréchet distance between Gaussians fitted to Inception pool3 features;
InstDiffEdit reports CSFID for ImageNet editing, the mean over classes of the FID between edited and real
images of each class. The feature extractor is any callable, normally
:class:`instdiff.metrics.inception.InceptionFeatures`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from instdiff.errors import ImageInputError
from instdiff.metrics.inputs import ImageInput, to_tensor

log = logging.getLogger(__name__)


def _as_features(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    """Features as a float64 (N, D) array with N ≥ 2; ImageInputError otherwise."""
    array = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ImageInputError(f"features must be 2-D (N, D), got shape {array.shape}")
    if array.shape[0] < 2:
        raise ImageInputError(f"need at least 2 samples for a covariance, got {array.shape[0]}")
    return array


def feature_statistics(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``ddof=1``) of a feature set.

    Args:
        feats: (N, D) features, N ≥ 2, tensor or array.

    Returns:
        The (D,) mean and the (D, D) covariance, float64 arrays.

    Raises:
        ImageInputError: ``feats`` is not 2-D or has fewer than 2 rows.
    """
    array = _as_features(feats)
    return array.mean(axis=0), np.cov(array, rowvar=False, ddof=1)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr( (Σ1 Σ2)^{1/2} )`` for symmetric PSD matrices, computed symmetrically.

    ``Σ1 Σ2`` is similar to the PSD matrix ``Σ1^{1/2} Σ2 Σ1^{1/2}``; the trace of its
    square root is the sum of square roots of that matrix's eigenvalues.  Using
    ``eigh`` keeps everything real and copes with singular covariances (tiny negative
    round-off eigenvalues are clipped to 0), where a general ``sqrtm`` would return
    complex noise.
    """
    evals, evecs = linalg.eigh(sigma1)
    root1 = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2.0
    return float(np.sqrt(np.clip(linalg.eigvalsh(middle), 0.0, None)).sum())


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 0.0
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d² = ||mu1 − mu2||² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})``.  The matrix square root is
    evaluated via symmetric eigendecompositions (see :func:`_trace_sqrt_product`), so
    singular covariances need no regulariser; ``eps > 0`` adds ``eps·I`` to both
    covariances for callers who want the pytorch-fid-style offset anyway.

    Args:
        mu1: (D,) mean of the first Gaussian.
        sigma1: (D, D) covariance of the first Gaussian.
        mu2: (D,) mean of the second Gaussian.
        sigma2: (D, D) covariance of the second Gaussian.
        eps: Optional diagonal offset added to both covariances.

    Returns:
        The (squared) Fréchet distance, clipped at 0 against round-off.

    Raises:
        ImageInputError: The two Gaussians' statistics differ in shape.
    """
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ImageInputError(
            f"statistics have mismatched shapes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if eps > 0:
        offset = eps * np.eye(sigma1.shape[0])
        sigma1, sigma2 = sigma1 + offset, sigma2 + offset
    diff = mu1 - mu2
    trace_term = np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return max(float(diff @ diff + trace_term), 0.0)


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray, eps: float = 0.0) -> float:
    """Fréchet distance between two feature sets ``(N_a, D)`` and ``(N_b, D)``.

    Covariances use ``ddof=1``.  When both sets have fewer samples than dimensions the
    covariances are rank-deficient; the distance is then computed exactly in sample
    space: with ``A = (X_a − μ_a)/√(N_a−1)`` and ``B`` likewise, ``tr(Σ_a) = ||A||_F²`` and
    ``tr((Σ_a Σ_b)^{1/2})`` equals the nuclear norm of ``A Bᵀ``.

    Note:
        FID estimated from fewer than ~2048 samples (the Inception feature dimension)
        is strongly biased upward and depends on N (Chong & Forsyth, 2020); only compare
        numbers computed with the same sample counts.

    Args:
        feats_a: First feature set (at least 2 rows).
        feats_b: Second feature set (at least 2 rows).
        eps: Optional diagonal offset (forces the covariance-matrix route).

    Returns:
        The Fréchet distance (FID when the features are Inception pool3).

    Raises:
        ImageInputError: A set is not 2-D or has fewer than 2 rows, or the feature dimensions differ.
    """
    a = _as_features(feats_a)
    b = _as_features(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ImageInputError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    dim = a.shape[1]
    if min(a.shape[0], b.shape[0]) < dim:
        log.debug("Fréchet distance from %d/%d samples in %d dims is biased", len(a), len(b), dim)
    if eps == 0.0 and max(a.shape[0], b.shape[0]) < dim:
        mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
        centered_a = (a - mu_a) / math.sqrt(a.shape[0] - 1)
        centered_b = (b - mu_b) / math.sqrt(b.shape[0] - 1)
        cross = linalg.svdvals(centered_a @ centered_b.T).sum()
        diff = mu_a - mu_b
        value = diff @ diff + (centered_a**2).sum() + (centered_b**2).sum() - 2.0 * cross
        return max(float(value), 0.0)
    mu_a, sigma_a = feature_statistics(a)
    mu_b, sigma_b = feature_statistics(b)
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps=eps)


FeatureExtractor = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
"""A callable mapping a (B, 3, H, W) batch in [0, 1] to (B, D) features, e.g. ``InceptionFeatures``."""


def _extract_features(extractor: FeatureExtractor, images: ImageInput, batch_size: int) -> np.ndarray:
    """Run ``extractor`` over a batch tensor or a sequence of (possibly differently sized) images."""
    chunks: list[np.ndarray] = []

    def run(batch: torch.Tensor) -> None:
        out = extractor(batch)
        array = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        chunks.append(np.asarray(array, dtype=np.float64).reshape(batch.shape[0], -1))

    if isinstance(images, (torch.Tensor, np.ndarray)):
        batch = to_tensor(images)
        for start in range(0, batch.shape[0], batch_size):
            run(batch[start : start + batch_size])
    else:
        pending: list[torch.Tensor] = []
        for item in images:
            tensor = to_tensor(item)
            if pending and (tensor.shape[1:] != pending[0].shape[1:] or len(pending) >= batch_size):
                run(torch.cat(pending))
                pending = []
            pending.append(tensor)
        if pending:
            run(torch.cat(pending))
    if not chunks:
        raise ImageInputError("no images given")
    return np.concatenate(chunks, axis=0)


def fid(
    images_a: ImageInput,
    images_b: ImageInput,
    extractor: FeatureExtractor,
    batch_size: int = 32,
) -> float:
    """FID between two image sets using ``extractor`` (normally :class:`~instdiff.metrics.inception.InceptionFeatures`).

    Args:
        images_a: ``(N, 3, H, W)`` tensor in [0, 1], or a sequence of images.
        images_b: Second set, same conventions (sizes may differ from ``images_a``).
        extractor: Callable mapping a ``(B, 3, H, W)`` batch to ``(B, D)`` features.
        batch_size: Images per extractor call.

    Returns:
        The Fréchet distance (see :func:`frechet_distance` for the small-N caveat).

    Raises:
        ImageInputError: A set is empty, has fewer than 2 images or images of an unsupported form.
    """
    feats_a = _extract_features(extractor, images_a, batch_size)
    feats_b = _extract_features(extractor, images_b, batch_size)
    return frechet_distance(feats_a, feats_b)


@dataclass(frozen=True)
class CSFIDResult:
    """Outcome of :func:`csfid`.

    Attributes:
        value: Mean of the per-class FIDs over evaluated classes (NaN if none).
        per_class: FID for each evaluated class.
        counts: ``(n_edited, n_reference)`` for every class seen on either side.
        skipped: Classes left out because a side had fewer than 2 samples.
        feature_source: Description of the feature extractor's weights.
    """

    value: float
    per_class: dict[Hashable, float]
    counts: dict[Hashable, tuple[int, int]]
    skipped: tuple[Hashable, ...]
    feature_source: str = "unknown"


def csfid_from_features(
    feats: torch.Tensor | np.ndarray,
    classes: Sequence[Hashable],
    ref_feats: torch.Tensor | np.ndarray,
    ref_classes: Sequence[Hashable],
    feature_source: str = "unknown",
) -> CSFIDResult:
    """Class-wise FID from precomputed features (see :func:`csfid`).

    Args:
        feats: (N, D) features of the edited images.
        classes: Class label per row of ``feats``.
        ref_feats: (M, D) features of the reference images.
        ref_classes: Class label per row of ``ref_feats``.
        feature_source: Description of the feature extractor's weights, kept in the result.

    Returns:
        :class:`CSFIDResult`.

    Raises:
        ImageInputError: The number of labels differs from the number of feature rows, or the feature
            dimensions differ.
    """
    edited = np.asarray(feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else feats)
    ref = np.asarray(ref_feats.detach().cpu().numpy() if isinstance(ref_feats, torch.Tensor) else ref_feats)
    if len(classes) != edited.shape[0] or len(ref_classes) != ref.shape[0]:
        raise ImageInputError(
            f"one class label per feature row is required: {len(classes)} labels for {edited.shape[0]} edited rows, "
            f"{len(ref_classes)} labels for {ref.shape[0]} reference rows"
        )
    edited_rows: dict[Hashable, list[int]] = {}
    ref_rows: dict[Hashable, list[int]] = {}
    for row, label in enumerate(classes):
        edited_rows.setdefault(label, []).append(row)
    for row, label in enumerate(ref_classes):
        ref_rows.setdefault(label, []).append(row)
    per_class: dict[Hashable, float] = {}
    counts: dict[Hashable, tuple[int, int]] = {}
    skipped: list[Hashable] = []
    for label in dict.fromkeys([*edited_rows, *ref_rows]):
        rows_e, rows_r = edited_rows.get(label, []), ref_rows.get(label, [])
        counts[label] = (len(rows_e), len(rows_r))
        if len(rows_e) < 2 or len(rows_r) < 2:
            skipped.append(label)
            continue
        per_class[label] = frechet_distance(edited[rows_e], ref[rows_r])
    value = float(np.mean(list(per_class.values()))) if per_class else math.nan
    if skipped:
        log.info("CSFID: skipped %d class(es) with < 2 samples on a side", len(skipped))
    if not per_class:
        log.warning("CSFID: no class has >= 2 edited and >= 2 reference samples")
    return CSFIDResult(
        value=value,
        per_class=per_class,
        counts=counts,
        skipped=tuple(skipped),
        feature_source=feature_source,
    )


def csfid(
    images: ImageInput,
    classes: Sequence[Hashable],
    ref_images: ImageInput,
    ref_classes: Sequence[Hashable],
    extractor: FeatureExtractor,
    batch_size: int = 32,
) -> CSFIDResult:
    """Class-wise FID (CSFID) as used by InstDiffEdit for ImageNet editing.

    For every class ``c`` present on both sides, compute the FID between the edited
    images labelled ``c`` and the reference images labelled ``c``; CSFID is the mean over
    classes.  Classes with fewer than 2 samples on either side are skipped and listed in
    the result together with the per-class counts.  Per-class sample counts are small,
    so each term carries the small-N bias noted in :func:`frechet_distance`.

    Args:
        images: Edited images (tensor ``(N, 3, H, W)`` or sequence).
        classes: Class label per edited image (the *target* class of the edit).
        ref_images: Reference (real) images.
        ref_classes: Class label per reference image.
        extractor: Feature extractor, normally :class:`~instdiff.metrics.inception.InceptionFeatures`.
        batch_size: Images per extractor call.

    Returns:
        :class:`CSFIDResult`.

    Raises:
        ImageInputError: A set is empty or of an unsupported form, or the labels do not match the images.
    """
    feats = _extract_features(extractor, images, batch_size)
    ref_feats = _extract_features(extractor, ref_images, batch_size)
    source = str(getattr(extractor, "weights_source", type(extractor).__name__))
    return csfid_from_features(feats, classes, ref_feats, ref_classes, feature_source=source)
