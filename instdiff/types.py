"""Result types shared by every editor (a leaf module: it imports nothing of the project, and torch only for
type checking, so any layer can name these types without a cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class EditResult:
    """What every editor returns (``instdiff.editors.edit`` and ``FISEditSession.edit``).

    ``images``: (B, 3, H, W) float32 in [-1, 1] on the CPU, at the input's size.
    ``masks``: (B, 1, H, W) bool at image resolution: the region the editor changed (SDEdit: all of it).
    ``timings``: seconds per stage (``encode``, ``mask``, ``denoise``, ``inpaint``, ``decode``, …) plus ``total``.
    ``unet_calls``: UNet evaluations per image; one batch row is one evaluation, so classifier-free guidance
    counts 2 per step.
    ``extras``: method-specific details (InstDiffEdit: ``position`` (B, T), ``mask_area_per_step``; FISEdit:
    ``active_fraction``, ``macs``, ``rows`` …).
    """

    images: torch.Tensor
    masks: torch.Tensor
    timings: dict[str, float]
    unet_calls: float
    extras: dict[str, Any] = field(default_factory=dict)


__all__ = ["EditResult"]
