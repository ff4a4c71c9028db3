"""Edit locality: mask IoU and the pixel change inside and outside the edit mask.

InstDiffEdit (appendix, Eq. II–III) measures how well an edit stays in its region with C_m, the normalised
pixel change inside the ground-truth mask M, and C_non, the change outside it; IoU scores the predicted mask
against M.
"""

from __future__ import annotations

import math

import torch

from instdiff import masks
from instdiff.errors import ImageInputError
from instdiff.metrics.inputs import ImageInput, MaskInput, to_mask, to_tensor


def iou(pred_mask: MaskInput, gt_mask: MaskInput) -> torch.Tensor:
    """Intersection over union per sample, |A ∩ B| / |A ∪ B|: :func:`instdiff.masks.iou` on any mask input.

    Args:
        pred_mask: Predicted masks (any form :func:`~instdiff.metrics.inputs.to_mask` accepts).
        gt_mask: Ground-truth masks of the same batch and spatial size.

    Returns:
        (B,) float32; 1.0 where both masks are empty.

    Raises:
        ImageInputError: The masks differ in shape.
    """
    pred = to_mask(pred_mask)
    gt = to_mask(gt_mask, device=pred.device)
    if pred.shape != gt.shape:
        raise ImageInputError(f"mask shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    return masks.iou(pred, gt)


def _pixel_change(src: ImageInput, edited: ImageInput) -> torch.Tensor:
    """Per-pixel change p(i, j) in 0..255 units: mean |src - edited| over RGB, (B, H, W) float64."""
    a = to_tensor(src, dtype=torch.float64)
    b = to_tensor(edited, device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise ImageInputError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs().mean(dim=1) * 255.0


def _region_change(src: ImageInput, edited: ImageInput, gt_mask: MaskInput, inside: bool) -> torch.Tensor:
    """Σ p over the region (inside or outside the mask) / (255 · region area), (B,) float64; NaN if empty."""
    change = _pixel_change(src, edited)  # (B, H, W)
    mask = to_mask(gt_mask, device=change.device)
    if mask.shape != change.shape:
        raise ImageInputError(f"mask {tuple(mask.shape)} does not match image batch/size {tuple(change.shape)}")
    region = (mask if inside else ~mask).double()
    area = region.flatten(1).sum(1)
    total = (change * region).flatten(1).sum(1)
    value = total / (255.0 * area.clamp_min(1.0))
    return torch.where(area > 0, value, torch.full_like(value, math.nan))


def change_in_mask(src: ImageInput, edited: ImageInput, gt_mask: MaskInput) -> torch.Tensor:
    """C_m: normalised pixel change inside the edit mask (InstDiffEdit appendix, Eq. II).

    C_m = Σ_{(i,j) ∈ M} p(i,j) / (255 · Σ M), where p(i,j) ∈ [0, 255] is the change of pixel (i, j) between
    the input and the generated image. This implementation defines p(i,j) as the mean absolute difference
    over the three RGB channels, expressed in 0..255 units, so C_m ∈ [0, 1]. Given the editor's predicted
    mask instead of the ground truth it is the change inside the predicted region (the batch job's
    ``change_inside_pred``): near 0 when the edit left its own region as it was, which needs no ground truth.

    Args:
        src: Input images (any form :func:`~instdiff.metrics.inputs.to_tensor` accepts).
        edited: Generated images, same size as ``src``.
        gt_mask: The region M: the ground-truth edit region for C_m (or a predicted mask), same batch and
            spatial size.

    Returns:
        (B,) float64; NaN where the mask is empty.

    Raises:
        ImageInputError: The images differ in shape, or the mask does not match them.
    """
    return _region_change(src, edited, gt_mask, inside=True)


def change_outside_mask(src: ImageInput, edited: ImageInput, gt_mask: MaskInput) -> torch.Tensor:
    """C_non: normalised pixel change outside the edit mask (InstDiffEdit appendix, Eq. III).

    C_non = Σ_{(i,j) ∉ M} p(i,j) / (255 · Σ (1 − M)) with p as in :func:`change_in_mask`. Lower is better
    (background preserved).

    Args:
        src: Input images (any form :func:`~instdiff.metrics.inputs.to_tensor` accepts).
        edited: Generated images, same size as ``src``.
        gt_mask: Ground-truth edit region M, same batch and spatial size.

    Returns:
        (B,) float64; NaN where the mask covers the whole image.

    Raises:
        ImageInputError: The images differ in shape, or the mask does not match them.
    """
    return _region_change(src, edited, gt_mask, inside=False)


def cm_cnon_ratio(src: ImageInput, edited: ImageInput, gt_mask: MaskInput) -> torch.Tensor:
    """C_m / C_non per sample (higher means the change is better localised).

    Follows IEEE division: inf when only the inside changed, NaN when nothing changed or when either region
    is empty.

    Args:
        src: Input images (any form :func:`~instdiff.metrics.inputs.to_tensor` accepts).
        edited: Generated images, same size as ``src``.
        gt_mask: Ground-truth edit region M, same batch and spatial size.

    Returns:
        (B,) float64.

    Raises:
        ImageInputError: The images differ in shape, or the mask does not match them.
    """
    return change_in_mask(src, edited, gt_mask) / change_outside_mask(src, edited, gt_mask)
