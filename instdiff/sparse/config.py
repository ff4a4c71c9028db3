"""Typed configuration of the FISEdit sparse engine and session (frozen dataclasses, defaults held once).

FISEdit (Yu et al., AAAI 2024) §"Sparse Computation": only high-resolution layers run sparsely, the block size
of each sparse convolution is chosen per layer from the mask (Adaptive Pixel-wise Sparse Convolution), and the
statistics of normalisation layers come from the cached run (Approximate Normalization). :class:`SparseConfig`
holds the engine's knobs, :class:`FISEditConfig` a session's (steps, guidance, the difference mask, the cache).
Both check every field's type against its annotation (:func:`~instdiff.config.check_fields`) before their ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from instdiff.config import MAX_GUIDANCE, check_fields
from instdiff.errors import ConfigError


class SparseMode(StrEnum):
    """How an installed engine runs the steps it is told are sparse.

    ``dense``: every layer runs its original dense code (the baseline on the same code path).
    ``sparse``: layers with a sparse plan compute only their active region.
    ``profile``: like ``sparse``, and every step (dense or sparse) is timed per layer type, with device
    synchronisation around each timed op (slower; for the benchmark's breakdown only).
    """

    DENSE = "dense"
    SPARSE = "sparse"
    PROFILE = "profile"


@dataclass(frozen=True)
class SparseConfig:
    """Knobs of :func:`instdiff.sparse.apply_sparse`.

    Attributes:
        mode: dense / sparse / profile (:class:`SparseMode`).
        block_sizes: candidate block sizes of the APSC heuristic (1 = pixel-wise gather); sizes that do not
            divide a feature map are skipped for it.
        dense_fraction: a layer whose active fraction at its resolution is above this runs dense.
        min_resolution_ratio: layers whose feature map is smaller than this fraction of the latent's side stay
            dense and are not cached (0.5: for SD at 64×64 latents, the 64 and 32 maps are sparse, 16 and 8
            dense).
        gather_cost: cost of moving one element (gather / scatter), in multiply-accumulates; ``None`` picks a
            device default (32 on the CPU, 256 on CUDA: the ratio of arithmetic to memory throughput).
        block_overhead: fixed cost of one gathered block, in multiply-accumulates.
        force_block: use this block size for every sparse convolution instead of the heuristic (the constant
            block-gather strategy of SBNet, FISEdit Table 1 "w/o APSC"); it also disables the cost model's
            dense option (the ``dense_fraction`` / ``min_resolution_ratio`` rules still apply). Sizes that do
            not divide a map fall back to 1.
        sparse_conv: ablation switch for ResNet blocks and convolutions.
        sparse_attention: ablation switch for transformer blocks.

    Raises:
        ConfigError: a value of the wrong type (each field is checked against its annotation by
            :func:`~instdiff.config.check_fields`; ``mode`` by value) or outside the ranges above.
    """

    mode: SparseMode = SparseMode.SPARSE
    block_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    dense_fraction: float = 0.5
    min_resolution_ratio: float = 0.5
    gather_cost: float | None = None
    block_overhead: float = 0.0
    force_block: int | None = None
    sparse_conv: bool = True
    sparse_attention: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.block_sizes or any(b < 1 for b in self.block_sizes):
            raise ConfigError(f"block_sizes must be positive integers, got {self.block_sizes!r}")
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ConfigError(f"dense_fraction must lie in [0, 1], got {self.dense_fraction}")
        if not 0.0 <= self.min_resolution_ratio <= 1.0:
            raise ConfigError(f"min_resolution_ratio must lie in [0, 1], got {self.min_resolution_ratio}")
        if self.force_block is not None and self.force_block < 1:
            raise ConfigError(f"force_block must be a positive block size, got {self.force_block}")
        if self.gather_cost is not None and not 0 <= self.gather_cost < math.inf:
            raise ConfigError(f"gather_cost must be >= 0, got {self.gather_cost}")
        if not 0 <= self.block_overhead < math.inf:
            raise ConfigError(f"block_overhead must be a finite number >= 0, got {self.block_overhead}")

    def gather_cost_for(self, device_type: str) -> float:
        """The element-move cost the block-size heuristic uses on a device of this type.

        Args:
            device_type: ``torch.device.type``, e.g. ``"cuda"`` or ``"cpu"``.

        Returns:
            Multiply-accumulates per moved element.
        """
        if self.gather_cost is not None:
            return float(self.gather_cost)
        return 256.0 if device_type == "cuda" else 32.0


@dataclass(frozen=True)
class FISEditConfig:
    """Settings of a FISEdit session (Yu et al., AAAI 2024).

    Attributes:
        num_steps: DDIM steps (generation and edits share them).
        guidance_scale: classifier-free guidance scale; ≤ 1 runs the conditional branch alone.
        mask_steps: k, the dense steps of an edit that find the difference mask (paper: the difference is clear
            by steps 5–10 of 50).
        mask_from: the first step whose latent difference enters the map.
        threshold: ``None`` for Otsu, else a fixed fraction in (0, 1] of the map's maximum.
        open_radius: opening radius, in latent pixels.
        margin: dilation margin, in latent pixels.
        min_difference: an edit whose latents never differ by more than this (Σ over channels) from the cached
            run is "no change" and returns the cached image.
        dense_steps_with_mask: dense steps before going sparse when the caller gives the mask (0: all sparse).
        composite: paste the edited region into the cached image, so that pixels outside it are the cached ones
            exactly.
        composite_margin: dilation of the upsampled latent mask for the paste, in image pixels (``None``: the
            VAE factor).
        cross_attention_control: keep the cached cross-attention maps of unchanged words during the mask steps.
        cache_budget_bytes: accelerator memory for the cache; the rest goes to (pinned) host memory.
        image_size: generated side in pixels (``None``: the model's native size).
        sparse: the sparse engine's settings.

    Raises:
        ConfigError: a value of the wrong type (each field is checked against its annotation by
            :func:`~instdiff.config.check_fields`), out of range, or steps and step ranges that do not fit
            together. (That ``image_size`` is a multiple of the VAE factor is checked where the model is known:
            :class:`FISEditSession`.)
    """

    num_steps: int = 50
    guidance_scale: float = 7.5
    mask_steps: int = 10
    mask_from: int = 5
    threshold: float | None = None
    open_radius: int = 1
    margin: int = 1
    min_difference: float = 1e-4
    dense_steps_with_mask: int = 0
    composite: bool = True
    composite_margin: int | None = None
    cross_attention_control: bool = False
    cache_budget_bytes: int | None = None
    image_size: int | None = None
    sparse: SparseConfig = field(default_factory=SparseConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if not (math.isfinite(self.guidance_scale) and 0.0 <= self.guidance_scale <= MAX_GUIDANCE):
            raise ConfigError(f"guidance_scale: accepted 0 to {MAX_GUIDANCE:g}; got {self.guidance_scale}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be null (Otsu) or a fraction in (0, 1], got {self.threshold}")
        for name in ("open_radius", "margin", "composite_margin", "cache_budget_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.min_difference < math.inf:
            raise ConfigError(f"min_difference must be a finite number >= 0, got {self.min_difference}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be null (the model's size) or >= 1 pixel, got {self.image_size}")
        if not 1 <= self.mask_steps <= self.num_steps:
            raise ConfigError(f"mask_steps must lie in [1, num_steps={self.num_steps}], got {self.mask_steps}")
        if not 1 <= self.mask_from <= self.mask_steps:
            raise ConfigError(f"mask_from must lie in [1, mask_steps={self.mask_steps}], got {self.mask_from}")
        if not 0 <= self.dense_steps_with_mask < self.num_steps:
            raise ConfigError(f"dense_steps_with_mask must lie in [0, num_steps), got {self.dense_steps_with_mask}")
