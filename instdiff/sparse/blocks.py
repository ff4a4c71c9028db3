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
    """APSC: the block size minimising the summed cost of ``convs`` on the output mask (N, H, W), or ``None``.

    ``None`` means the dense convolution is estimated cheaper than every candidate. Returns the choice and the
    estimated cost of each candidate considered (block size → cost; key 0 is the dense cost).
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
    """The active ``block``×``block`` tiles of an output grid (H, W), over the rows of a batch.

    Tiles are listed row-major within each batch row; ``rows``, ``by``, ``bx`` are (nb,) long tensors.
    Index tensors derived from it (window and centre positions) are built once and memoised.
    """

    block: int
    height: int
    width: int
    rows: torch.Tensor
    by: torch.Tensor
    bx: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block: int) -> BlockSet:
        """Tiles of ``mask`` (N, H, W) bool that contain at least one active pixel."""
        _, height, width = mask.shape
        if not divides(block, height, width):
            raise ValueError(f"block size {block} does not divide the {height}×{width} feature map")
        nz = active_blocks(mask, block).nonzero()  # (nb, 3): row, by, bx
        return cls(block, height, width, nz[:, 0].contiguous(), nz[:, 1].contiguous(), nz[:, 2].contiguous())

    @property
    def count(self) -> int:
        return int(self.rows.numel())

    def centers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch row and flat position (nb·b·b,) of every pixel of every tile, ordered (tile, i, j)."""
        if "centers" not in self._memo:
            b = self.block
            r = torch.arange(b, device=self.rows.device)
            ys = self.by[:, None] * b + r  # (nb, b)
            xs = self.bx[:, None] * b + r  # (nb, b)
            pos = ys[:, :, None] * self.width + xs[:, None, :]  # (nb, b, b)
            rows = self.rows[:, None, None].expand_as(pos)
            self._memo["centers"] = (rows.reshape(-1), pos.reshape(-1))
        return self._memo["centers"]

    def windows(self, conv: ConvShape, in_height: int, in_width: int) -> Windows:
        """Input windows (side P = s(b−1)+k, top-left at s·b·tile − padding) for ``conv`` on this output grid."""
        key = ("win", conv.kernel, conv.stride, conv.padding, in_height, in_width)
        if key not in self._memo:
            b, p = self.block, conv.window(self.block)
            r = torch.arange(p, device=self.rows.device)
            ys = conv.stride * b * self.by[:, None] - conv.padding + r  # (nb, P)
            xs = conv.stride * b * self.bx[:, None] - conv.padding + r  # (nb, P)
            vy = (ys >= 0) & (ys < in_height)
            vx = (xs >= 0) & (xs < in_width)
            pos = ys.clamp(0, in_height - 1)[:, :, None] * in_width + xs.clamp(0, in_width - 1)[:, None, :]
            valid = vy[:, :, None] & vx[:, None, :]  # (nb, P, P)
            rows = self.rows[:, None, None].expand_as(pos)
            mask = None if bool(valid.all()) else valid[:, None]
            self._memo[key] = Windows(p, rows.reshape(-1), pos.reshape(-1), mask)
        return self._memo[key]


@dataclass
class Windows:
    """Flat gather indices of haloed windows: ``rows``/``pos`` (nb·P·P,); ``valid`` (nb, 1, P, P) or None."""

    size: int
    rows: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor | None

    def valid_as(self, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.valid is None else self.valid.to(like.dtype)


def gather_windows(x: torch.Tensor, win: Windows) -> torch.Tensor:
    """Windows (nb, C, P, P) of ``x`` (N, C, H, W); positions outside the map hold clamped values (see ``valid``).

    The result is a channels-last view (memory (nb, P, P, C)), which convolutions take without a copy.
    """
    n, c, h, w = x.shape
    g = x.reshape(n, c, h * w)[win.rows, :, win.pos]  # (nb·P·P, C)
    return g.view(-1, win.size, win.size, c).permute(0, 3, 1, 2)


def gather_pixels(x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Values (M, C) of ``x`` (N, C, H, W) at batch rows ``rows`` and flat positions ``pos`` (M,)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[rows, :, pos]


def blocks_to_pixels(vals: torch.Tensor) -> torch.Tensor:
    """(nb, C, b, b) tile outputs → (nb·b·b, C) rows in :meth:`BlockSet.centers` order."""
    return vals.permute(0, 2, 3, 1).reshape(-1, vals.shape[1])


def pixels_to_blocks(vals: torch.Tensor, block: int) -> torch.Tensor:
    """(nb·b·b, C) rows → (nb, C, b, b) tiles (a channels-last view)."""
    c = vals.shape[1]
    return vals.view(-1, block, block, c).permute(0, 3, 1, 2)


def put_pixels(target: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Write ``vals`` (M, C) into ``target`` (N, C, H, W) in place at (rows, pos); returns the old values (M, C)."""
    n, c, h, w = target.shape
    t3 = target.view(n, c, h * w)
    old = t3[rows, :, pos]
    t3[rows, :, pos] = vals.to(target.dtype)
    return old


@dataclass
class TokenSet:
    """Active tokens of an (H, W) map: batch ``rows`` and flat ``pos`` (M,), sorted by row then position.

    ``slots`` places each token in a padded (N, L, ·) layout for attention; ``uniform`` is True when every row
    has the same count L, in which case the padded layout is a plain view.
    """

    rows: torch.Tensor
    pos: torch.Tensor
    batch: int
    length: int
    slots: torch.Tensor
    uniform: bool

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> TokenSet:
        n = mask.shape[0]
        nz = mask.reshape(n, -1).nonzero()  # (M, 2)
        rows, pos = nz[:, 0].contiguous(), nz[:, 1].contiguous()
        counts = torch.bincount(rows, minlength=n)
        length = int(counts.max()) if rows.numel() else 0
        offsets = torch.cumsum(counts, 0) - counts
        slots = torch.arange(rows.numel(), device=rows.device) - offsets[rows]
        return cls(rows, pos, n, length, slots, bool((counts == length).all()))

    @property
    def count(self) -> int:
        return int(self.rows.numel())

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(M, D) → (N, L, D); padding slots are zeros."""
        if self.uniform:
            return t.view(self.batch, self.length, t.shape[-1])
        out = t.new_zeros(self.batch, self.length, t.shape[-1])
        out[self.rows, self.slots] = t
        return out

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(N, L, D) → (M, D)."""
        if self.uniform:
            return t.reshape(-1, t.shape[-1])
        return t[self.rows, self.slots]
