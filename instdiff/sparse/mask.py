"""Difference masks: where does a prompt edit change the image? Pure tensor functions.

FISEdit §"Fine-Grained Mask Generation" / "Target Area Capture": run the first denoising steps with the edited
prompt, compare the latents with the cached ones (the difference is clear around steps 5–10 of 50), and
threshold the accumulated difference. Here: |Δlatent| summed over channels, normalised per step by its maximum,
summed over the chosen steps, thresholded (Otsu by default, or a fixed fraction of the maximum), cleaned with a
small morphological opening and grown by a safety margin. Masks are then max-pooled to every UNet resolution,
so that any active latent pixel activates the feature-map pixel (and hence the block) that covers it
(:func:`pool_any`; :func:`instdiff.masks.resize_mask` is the area / nearest resize of the editors' masks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from instdiff.errors import ConfigError, EditInputError

log = logging.getLogger(__name__)


def latent_difference(edited: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Per-pixel change of the latents: Σ_c |edited − cached|.

    Args:
        edited: (N, C, H, W) latents of the edited run.
        cached: (N, C, H, W) latents of the cached run at the same step.

    Returns:
        (N, H, W) float32.
    """
    return (edited.float() - cached.float()).abs().sum(dim=1)


def normalize_per_sample(d: torch.Tensor) -> torch.Tensor:
    """Divide each map of (N, H, W) by its maximum (maps that are all zero stay zero); returns (N, H, W)."""
    peak = d.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return d / peak[:, None, None]


def accumulate_differences(diffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_steps normalise(Δ_step), each step's map divided by its maximum.

    Args:
        diffs: per-step difference maps, each (N, H, W).

    Returns:
        (N, H, W) float32.

    Raises:
        ValueError: no maps (the session always runs at least one detection step).
    """
    if not diffs:
        raise ValueError("no difference maps to accumulate: the mask needs at least one detection step")
    return torch.stack([normalize_per_sample(d.float()) for d in diffs]).sum(0)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each map: the level maximising the between-class variance (Otsu 1979).

    The histogram spans [min, max] of each map; the threshold is the upper edge of the last bin of the lower class.

    Args:
        values: (N, H, W) maps.
        bins: histogram bins.

    Returns:
        (N,) float32 thresholds, in the maps' units.
    """
    n = values.shape[0]
    flat = values.reshape(n, -1).float()
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).clamp_min(torch.finfo(torch.float32).eps)
    idx = ((flat - lo[:, None]) / span[:, None] * bins).long().clamp(0, bins - 1)  # (N, P)
    hist = torch.zeros(n, bins, device=values.device).scatter_add_(1, idx, torch.ones_like(flat))
    p = hist / hist.sum(dim=1, keepdim=True)
    centers = (torch.arange(bins, device=values.device, dtype=torch.float32) + 0.5) / bins
    w0 = p.cumsum(1)  # weight of the lower class with threshold after bin i
    m0 = (p * centers).cumsum(1)
    mt = m0[:, -1:]
    between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between[:, -1] = -1.0  # an empty upper class is not a split
    best = between.argmax(dim=1)  # (N,)
    return lo + (best.float() + 1.0) / bins * span


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of (N, H, W) bool with a (2r+1)² square; outside the image counts as set."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return ~(F.max_pool2d((~mask)[:, None].float(), k, stride=1, padding=radius).squeeze(1) > 0)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (N, H, W) bool with a (2r+1)² square."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return F.max_pool2d(mask[:, None].float(), k, stride=1, padding=radius).squeeze(1) > 0


def opening(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Erosion then dilation: removes specks smaller than the (2r+1)² square, keeps larger regions' shape."""
    return dilate(erode(mask, radius), radius)


def difference_mask(
    diffs: Sequence[torch.Tensor],
    threshold: float | None = None,
    open_radius: int = 1,
    margin: int = 1,
    min_peak: float = 1e-6,
) -> torch.Tensor:
    """FISEdit's difference mask from per-step latent differences (§"Fine-Grained Mask Generation").

    Samples whose raw differences never exceed ``min_peak`` (an unchanged prompt) get an empty mask; where the
    opening would remove every pixel, the thresholded pixels are kept.

    Args:
        diffs: per-step difference maps, each (N, H, W) (:func:`latent_difference`).
        threshold: ``None`` for Otsu on the accumulated map, else a fraction in (0, 1] of each map's maximum.
        open_radius: radius of the opening that removes isolated pixels, in latent pixels.
        margin: dilation radius after the opening, in latent pixels.
        min_peak: largest raw difference that still counts as "no change".

    Returns:
        (N, H, W) bool at latent resolution.

    Raises:
        ConfigError: a fixed threshold outside (0, 1].
    """
    acc = accumulate_differences(diffs)  # (N, H, W)
    peak = torch.stack([d.float().flatten(1).amax(1) for d in diffs]).amax(0)  # (N,)
    if threshold is None:
        level = otsu_threshold(acc)
    else:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"a fixed mask threshold is a fraction of the maximum in (0, 1], got {threshold}")
        level = acc.flatten(1).amax(1) * threshold
    mask = acc > level[:, None, None]
    opened = opening(mask, open_radius)
    # an opening that removes everything (a change made only of specks) keeps the thresholded pixels instead
    mask = torch.where(opened.flatten(1).any(1)[:, None, None], opened, mask)
    mask = dilate(mask, margin)
    return mask & (peak > min_peak)[:, None, None]


def pool_any(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A bool mask at another size where a cell is active if any pixel it covers is.

    Max-pooled when shrinking (so every feature-map pixel, and hence every block, that covers an active latent
    pixel is computed), nearest when growing. Halving steps use ceil mode, matching the UNet's stride-2
    downsamplers on odd sizes. Not :func:`instdiff.masks.resize_mask` (area-thresholded, for editor masks).

    Args:
        mask: (N, H, W) bool.
        size: (h, w) target size.

    Returns:
        (N, h, w) bool.
    """
    h, w = size
    if tuple(mask.shape[-2:]) == (h, w):
        return mask
    m = mask[:, None].float()
    while m.shape[-2] >= 2 * h and m.shape[-1] >= 2 * w and m.shape[-2] > h:
        m = F.max_pool2d(m, 2, ceil_mode=True)
    if tuple(m.shape[-2:]) != (h, w):
        if m.shape[-2] >= h and m.shape[-1] >= w:
            m = F.adaptive_max_pool2d(m, (h, w))
        else:
            m = F.interpolate(m, size=(h, w), mode="nearest")
    return m.squeeze(1) > 0


def mask_to_latent(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A user's mask on the latent grid (any pixel of a latent cell set sets the cell).

    Args:
        mask: (N, 1, H, W), (N, H, W) or (H, W); bool, or float where > 0.5 is set; any resolution.
        latent_size: (h, w) of the latents.

    Returns:
        (N, h, w) bool.

    Raises:
        EditInputError: a shape other than the above.
    """
    m = mask
    if m.dim() == 2:
        m = m[None]
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise EditInputError(f"a mask has one channel; got shape {tuple(mask.shape)}")
        m = m[:, 0]
    if m.dim() != 3:
        raise EditInputError(f"a mask is (H, W), (N, H, W) or (N, 1, H, W); got shape {tuple(mask.shape)}")
    m = m > 0.5 if m.is_floating_point() else m.bool()
    return pool_any(m, latent_size)
