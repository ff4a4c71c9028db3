"""Typed configuration of the FISEdit sparse engine (frozen dataclasses, defaults held once).

FISEdit (Yu et al., AAAI 2024) §"Sparse Computation": only high-resolution layers run sparsely, the block size
of each sparse convolution is chosen per layer from the mask (Adaptive Pixel-wise Sparse Convolution), and the
statistics of normalisation layers come from the cached run (Approximate Normalization).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

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
        ConfigError: a value outside the ranges above.
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
        if not self.block_sizes or any(int(b) < 1 for b in self.block_sizes):
            raise ConfigError(f"block_sizes must be positive integers, got {self.block_sizes!r}")
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ConfigError(f"dense_fraction must lie in [0, 1], got {self.dense_fraction}")
        if not 0.0 <= self.min_resolution_ratio <= 1.0:
            raise ConfigError(f"min_resolution_ratio must lie in [0, 1], got {self.min_resolution_ratio}")
        if self.force_block is not None and self.force_block < 1:
            raise ConfigError(f"force_block must be a positive block size, got {self.force_block}")
        if self.gather_cost is not None and self.gather_cost < 0:
            raise ConfigError(f"gather_cost must be >= 0, got {self.gather_cost}")
        object.__setattr__(self, "mode", SparseMode(self.mode))

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
