"""Active blocks, halo windows, gather / scatter, and the block-size heuristic.

FISEdit §"Adaptive Pixel-Wise Sparse Convolution" (APSC): a tiled sparse convolution gathers the active blocks
of a feature map with their halo, convolves them densely and scatters the result back; which block size is best
depends on the mask (scattered masks waste work in large blocks, compact masks waste gather traffic in small
ones). :func:`choose_block_size` picks the size that minimises an estimated cost, from the mask alone, before
inference (the paper: "all the variables can be determined during the preprocessing stage").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvShape:
    """What the cost model needs of one convolution: channels, square kernel, stride, padding."""

    cin: int
    cout: int
    kernel: int
    stride: int = 1
    padding: int = 0

    def window(self, block: int) -> int:
        """Side of the input window that yields a ``block``×``block`` output: s·(b−1)+k."""
        return self.stride * (block - 1) + self.kernel


def active_blocks(mask: torch.Tensor, block: int) -> torch.Tensor:
    """Block-level activity (N, H/b, W/b) bool of a pixel mask (N, H, W): a block is active if any pixel is."""
    if block == 1:
        return mask
    return F.max_pool2d(mask[:, None].float(), block).squeeze(1) > 0


def divides(block: int, height: int, width: int) -> bool:
    """Whether ``block`` tiles a ``height``×``width`` map exactly."""
    return height % block == 0 and width % block == 0


def conv_cost(n_blocks: int, block: int, conv: ConvShape, gather_cost: float, block_overhead: float) -> float:
    """Estimated cost of one sparse convolution over ``n_blocks`` blocks, in multiply-accumulates.

    cost = n·b²·k²·Cin·Cout (arithmetic, including inactive pixels inside active blocks)
         + γ·n·(P²·Cin + b²·Cout)  (gathering windows of side P = s(b−1)+k with their halo, scattering outputs)
         + δ·n                    (fixed per-block overhead)
    """
    p = conv.window(block)
    macs = n_blocks * block * block * conv.kernel * conv.kernel * conv.cin * conv.cout
    moved = n_blocks * (p * p * conv.cin + block * block * conv.cout)
    return float(macs) + gather_cost * moved + block_overhead * n_blocks


def dense_conv_cost(rows: int, height: int, width: int, conv: ConvShape) -> float:
    """Arithmetic of the dense convolution producing an ``height``×``width`` map for ``rows`` batch rows."""
    return float(rows * height * width * conv.kernel * conv.kernel * conv.cin * conv.cout)


def choose_block_size(
    mask: torch.Tensor,
    convs: Sequence[ConvShape],
    candidates: Sequence[int],
    gather_cost: float,
    block_overhead: float = 0.0,
) -> tuple[int | None, dict[int, float]]:
    """APSC (FISEdit §"Adaptive Pixel-Wise Sparse Convolution"): the block size minimising the summed cost.

    Ties go to the larger block.

    Args:
        mask: (N, H, W) bool output mask.
        convs: the convolutions run on every tile.
        candidates: block sizes to consider (those that do not divide the map are skipped).
        gather_cost: multiply-accumulates per moved element (:func:`conv_cost`'s γ).
        block_overhead: multiply-accumulates per tile (δ).

    Returns:
        ``(block, costs)``: the best block size, or ``None`` when the dense convolution is estimated cheaper
        than every candidate; and the estimated cost of each candidate considered (block size → cost; key 0 is
        the dense cost).
    """
    rows, height, width = mask.shape
    costs: dict[int, float] = {0: sum(dense_conv_cost(rows, height, width, c) for c in convs)}
    for block in sorted(set(int(b) for b in candidates)):
        if block > max(height, width) or not divides(block, height, width):
            continue
        n = int(active_blocks(mask, block).sum())
        costs[block] = sum(conv_cost(n, block, c, gather_cost, block_overhead) for c in convs)
    best = min(costs, key=lambda b: (costs[b], -b))
    return (None if best == 0 else best), costs


@dataclass
class BlockSet:
    """The active ``block``×``block`` tiles of an output grid (H, W), shared by every row of the batch.

    ``by``, ``bx`` are (nb,) long tensors, row-major. Index tensors derived from it (window and centre positions)
    are built once and memoised. Tile tensors are laid out (N·nb, C, b, b): row-major over (batch row, tile).
    """

    block: int
    height: int
    width: int
    by: torch.Tensor
    bx: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block: int) -> BlockSet:
        """Tiles of ``mask`` (H, W) bool that contain at least one active pixel."""
        height, width = mask.shape
        if not divides(block, height, width):
            raise ValueError(f"block size {block} does not divide the {height}×{width} feature map")
        nz = active_blocks(mask[None], block)[0].nonzero()  # (nb, 2): by, bx
        return cls(block, height, width, nz[:, 0].contiguous(), nz[:, 1].contiguous())

    @property
    def count(self) -> int:
        """Number of tiles per batch row."""
        return int(self.by.numel())

    def centers(self) -> torch.Tensor:
        """Flat positions (nb·b·b,) of every pixel of every tile, ordered (tile, i, j)."""
        if "centers" not in self._memo:
            b = self.block
            r = torch.arange(b, device=self.by.device)
            ys = self.by[:, None] * b + r  # (nb, b)
            xs = self.bx[:, None] * b + r  # (nb, b)
            self._memo["centers"] = (ys[:, :, None] * self.width + xs[:, None, :]).reshape(-1)
        return self._memo["centers"]

    def windows(self, conv: ConvShape, in_height: int, in_width: int) -> Windows:
        """Input windows (side P = s(b−1)+k, top-left at s·b·tile − padding) for ``conv`` on this output grid."""
        key = ("win", conv.kernel, conv.stride, conv.padding, in_height, in_width)
        if key not in self._memo:
            b, p = self.block, conv.window(self.block)
            r = torch.arange(p, device=self.by.device)
            ys = conv.stride * b * self.by[:, None] - conv.padding + r  # (nb, P)
            xs = conv.stride * b * self.bx[:, None] - conv.padding + r  # (nb, P)
            vy = (ys >= 0) & (ys < in_height)
            vx = (xs >= 0) & (xs < in_width)
            pos = ys.clamp(0, in_height - 1)[:, :, None] * in_width + xs.clamp(0, in_width - 1)[:, None, :]
            valid = vy[:, :, None] & vx[:, None, :]  # (nb, P, P)
            mask = None if bool(valid.all()) else valid[:, None]
            self._memo[key] = Windows(p, pos.reshape(-1), mask)
        return self._memo[key]


@dataclass
class Windows:
    """Flat gather positions (nb·P·P,) of haloed windows of side ``size``; ``valid`` (nb, 1, P, P) or None."""

    size: int
    pos: torch.Tensor
    valid: torch.Tensor | None

    def valid_as(self, like: torch.Tensor) -> torch.Tensor | None:
        """``valid`` (nb, 1, P, P) in ``like``'s dtype, or ``None`` when every position is inside the map."""
        return None if self.valid is None else self.valid.to(like.dtype)


def gather_windows(x: torch.Tensor, win: Windows, zero_outside: bool = False) -> torch.Tensor:
    """Windows (N·nb, C, P, P) of ``x`` (N, C, H, W). Positions outside the map hold clamped values, or zeros
    with ``zero_outside`` (a convolution's zero padding of its input)."""
    n, c, h, w = x.shape
    p = win.size
    g = x.reshape(n, c, h * w).index_select(2, win.pos).view(n, c, -1, p, p)  # (N, C, nb, P, P)
    g = g.transpose(1, 2)  # (N, nb, C, P, P)
    if zero_outside and win.valid is not None:
        g = g * win.valid_as(g)
    return g.reshape(-1, c, p, p)


def tiles_to_flat(tiles: torch.Tensor, rows: int) -> torch.Tensor:
    """(N·nb, C, b, b) tiles → (N, C, nb·b·b) values in :meth:`BlockSet.centers` order."""
    _, c, b, _ = tiles.shape
    return tiles.view(rows, -1, c, b * b).transpose(1, 2).reshape(rows, c, -1)


def gather_flat(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Values (N, C, M) of ``x`` (N, C, H, W) at flat positions ``pos`` (M,)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w).index_select(2, pos)


@dataclass
class TokenSet:
    """Active tokens of an (H, W) map, shared by every row: flat positions ``pos`` (M,), ascending."""

    pos: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> TokenSet:
        """Active positions of ``mask`` (H, W) bool."""
        return cls(mask.reshape(-1).nonzero()[:, 0].contiguous())

    @property
    def count(self) -> int:
        """M, the number of active tokens."""
        return int(self.pos.numel())
