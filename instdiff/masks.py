"""Mask math as pure tensor functions: InstDiffEdit (Eq. 6–9), DiffEdit, resizing, IoU.

FISEdit's latent-difference mask (Otsu, opening, dilation, per-resolution pooling) lives with its engine in
:mod:`instdiff.sparse.mask`.

Shapes: attention maps are (B, T, h, w) — one map per token — already averaged over heads, layers and
parallel noises. ``n_tokens`` (B,) counts the prompt's tokens including the start and end tokens, so
word tokens are ``1 .. n_tokens - 2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from instdiff.config import MaskConfig, Refinement


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each map of (B, ..., h, w) to [0, 1] over its last two dims."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between flattened maps: a (B, T, h, w), b (B, h, w) → (B, T)."""
    af = a.flatten(2)
    bf = b.flatten(1).unsqueeze(1)
    return F.cosine_similarity(af, bf.expand_as(af), dim=-1, eps=1e-8)


def word_token_mask(n_tokens: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T) bool: True at word tokens 1 .. n_tokens-2 (start token 0 and the end token excluded)."""
    idx = torch.arange(t, device=n_tokens.device).unsqueeze(0)
    return (idx >= 1) & (idx <= (n_tokens.unsqueeze(1) - 2))


def index_token(maps: torch.Tensor, n_tokens: torch.Tensor, invert_start: bool = False) -> torch.Tensor:
    """Eq. 6: per image, the word token whose map is most similar (cosine) to the start token's map.

    maps (B, T, h, w) → (B,) long. With ``invert_start`` the start map is replaced by 1 − minmax(start).
    """
    start = maps[:, 0]  # (B, h, w)
    if invert_start:
        start = 1.0 - minmax(start)
    sims = _cosine(maps, start)  # (B, T)
    valid = word_token_mask(n_tokens, maps.shape[1])
    sims = sims.masked_fill(~valid, float("-inf"))
    return sims.argmax(dim=1)


def similarity_vector(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Eq. 7: S_i = cos(A_i, A_index) for every token; maps (B, T, h, w), index (B,) → (B, T)."""
    ref = maps[torch.arange(maps.shape[0], device=maps.device), index]  # (B, h, w)
    return _cosine(maps, ref)


def position_vector(
    sims: torch.Tensor, n_tokens: torch.Tensor, gamma1: float = 0.9, gamma2: float = 0.6
) -> torch.Tensor:
    """Eq. 8: P_i = +1 if S_i > γ1, −1 if S_i < γ2, else 0; zero outside word tokens. (B, T) float."""
    p = torch.zeros_like(sims)
    p = torch.where(sims > gamma1, torch.ones_like(p), p)
    p = torch.where(sims < gamma2, -torch.ones_like(p), p)
    return p * word_token_mask(n_tokens, sims.shape[1]).to(p.dtype)


def refine(maps: torch.Tensor, position: torch.Tensor, mode: Refinement = Refinement.WEIGHTED) -> torch.Tensor:
    """Refined map A_ref (B, h, w) from token maps (B, T, h, w) and P (B, T).

    ``WEIGHTED`` (Eq. 9 input): Σ_i P_i A_i. ``OFFICIAL``: minmax(mean of +1 maps) − minmax(mean of −1
    maps), clamped at 0 (a side with no tokens contributes zeros).
    """
    if Refinement(mode) is Refinement.WEIGHTED:
        return torch.einsum("bt,bthw->bhw", position, maps)
    pos = (position > 0).to(maps.dtype)
    neg = (position < 0).to(maps.dtype)

    def side(w: torch.Tensor) -> torch.Tensor:
        n = w.sum(dim=1).clamp_min(1.0)[:, None, None]
        mean = torch.einsum("bt,bthw->bhw", w, maps) / n
        return minmax(mean) * (w.sum(dim=1) > 0).to(maps.dtype)[:, None, None]

    return (side(pos) - side(neg)).clamp_min(0.0)


def gaussian_kernel(size: int = 5, sigma: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel (size, size)."""
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, size: int = 5, sigma: float = 1.0, iters: int = 1) -> torch.Tensor:
    """Blur (B, h, w) or (B, 1, h, w) maps with reflect padding; returns the input's shape."""
    squeeze = x.ndim == 3
    y = x.unsqueeze(1) if squeeze else x
    k = gaussian_kernel(size, sigma, y.device).to(y.dtype)[None, None]
    pad = size // 2
    for _ in range(iters):
        mode = "reflect" if min(y.shape[-2:]) > pad else "replicate"
        y = F.conv2d(F.pad(y, (pad, pad, pad, pad), mode=mode), k)
    return y.squeeze(1) if squeeze else y


def binarize(x: torch.Tensor, phi: float = 0.2) -> torch.Tensor:
    """Eq. 9: 1 where x > φ (x already min-max normalised), as bool."""
    return x > phi


def merge_word_pieces(maps: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """Average the maps of BPE pieces that belong to one word.

    ``word_ids`` (B, T) long gives each token's word number (pieces of one word share it; the start token
    and padding keep their own). Returns maps of the same shape where every piece carries its word's mean
    map, so Eq. 6–8 treat a word as a unit without changing token indices.
    """
    b, t, h, w = maps.shape
    flat = maps.flatten(2)  # (B, T, hw)
    n_words = int(word_ids.max().item()) + 1
    sums = torch.zeros(b, n_words, h * w, dtype=maps.dtype, device=maps.device)
    counts = torch.zeros(b, n_words, 1, dtype=maps.dtype, device=maps.device)
    for i in range(b):
        sums[i].index_add_(0, word_ids[i], flat[i])
        counts[i].index_add_(0, word_ids[i], torch.ones(t, 1, dtype=maps.dtype, device=maps.device))
    means = sums / counts.clamp_min(1.0)
    return torch.gather(means, 1, word_ids.unsqueeze(-1).expand(b, t, h * w)).view(b, t, h, w)


def instdiffedit_mask(
    maps: torch.Tensor,
    n_tokens: torch.Tensor,
    latent_hw: tuple[int, int],
    cfg: MaskConfig = MaskConfig(),
    position: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InstDiffEdit's instant mask for one step (paper Eq. 6–9).

    maps (B, T, h, w) at the attention resolution; ``position`` is P from the first step (computed here
    when ``None``). Returns ``(mask (B, 1, H, W) bool on the latent grid, soft map (B, 1, H, W) in [0, 1],
    position (B, T))``.
    """
    if position is None:
        idx = index_token(maps, n_tokens, cfg.invert_start)
        position = position_vector(similarity_vector(maps, idx), n_tokens, cfg.gamma1, cfg.gamma2)
    ref = refine(maps, position, cfg.refinement).unsqueeze(1)  # (B, 1, h, w)
    grid = cfg.smooth_resolution
    target = (grid, grid) if grid is not None else latent_hw
    ref = F.interpolate(ref, size=target, mode="bilinear", align_corners=False)
    ref = gaussian_blur(ref, cfg.smooth_size, cfg.smooth_sigma, cfg.smooth_iters)
    if target != tuple(latent_hw):
        ref = F.interpolate(ref, size=latent_hw, mode="bilinear", align_corners=False)
    soft = minmax(ref)
    return binarize(soft, cfg.phi), soft, position


def diffedit_mask(
    eps_source: torch.Tensor,
    eps_target: torch.Tensor,
    n_noises: int,
    threshold: float = 0.5,
    blur_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffEdit's mask from noise estimates under the source and target prompts (Couairon et al. 2023).

    eps_* (B·n, C, H, W) with the n noises of one image adjacent. |ε_tgt − ε_src| is averaged over
    channels and noises, min-max normalised PER IMAGE (never over the batch, so an image's mask does not
    depend on its neighbours) and thresholded. Returns (mask (B, 1, H, W) bool, soft map).
    """
    diff = (eps_target - eps_source).abs().mean(dim=1, keepdim=True)  # (B·n, 1, H, W)
    diff = diff.view(-1, n_noises, *diff.shape[1:]).mean(dim=1)  # (B, 1, H, W)
    if blur_size > 1:
        diff = gaussian_blur(diff, blur_size, blur_size / 3)
    soft = minmax(diff)
    return soft > threshold, soft


def resize_mask(mask: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Resize a (B, 1, h, w) mask between grids.

    Bool input: nearest when enlarging by an integer factor (exact block replication), area averaging
    thresholded at ``threshold`` otherwise. Float input is resized bilinearly and returned as float.
    """
    if mask.dtype != torch.bool:
        return F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False)
    h, w = mask.shape[-2:]
    if size[0] % h == 0 and size[1] % w == 0:
        return F.interpolate(mask.float(), size=size, mode="nearest") > 0.5
    return F.interpolate(mask.float(), size=size, mode="area") >= threshold


def iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Intersection over union per image of two bool masks (B, ..., H, W) → (B,); 1.0 when both are empty."""
    p = pred.bool().flatten(1)
    g = gt.bool().flatten(1)
    inter = (p & g).sum(dim=1).float()
    union = (p | g).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mask_area(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels set per image, (B, ..., H, W) → (B,)."""
    return mask.bool().flatten(1).float().mean(dim=1)


def steps_for_strength(steps: int, strength: float) -> int:
    """Number of denoising steps actually run at noise strength r (τ = r·T)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, min(steps, int(math.ceil(steps * strength - 1e-9))))
