"""Mask math as pure tensor functions: InstDiffEdit (Eq. 6–9), DiffEdit, resizing, IoU.

FISEdit's latent-difference mask (Otsu, opening, dilation, per-resolution "any pixel" pooling
:func:`~instdiff.sparse.mask.pool_any`) lives with its engine in :mod:`instdiff.sparse.mask`.

Shapes: attention maps are (B, T, h, w) — one map per token — already averaged over heads, layers and
parallel noises. ``n_tokens`` (B,) counts the prompt's tokens including the start and end tokens, so
word tokens are ``1 .. n_tokens - 2``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from instdiff.config import MaskConfig, MaskPreset, Reference, Refinement
from instdiff.errors import ConfigError
from instdiff.masks_official import official_mask

log = logging.getLogger(__name__)


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each map over its last two dims.

    Args:
        x: (B, ..., h, w) float maps.
        eps: floor of the range, so constant maps become 0 instead of NaN.

    Returns:
        Same shape, each map in [0, 1].
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between flattened maps: a (B, T, h, w), b (B, h, w) → (B, T)."""
    af = a.flatten(2)
    bf = b.flatten(1).unsqueeze(1)
    return F.cosine_similarity(af, bf.expand_as(af), dim=-1, eps=1e-8)


def word_token_mask(n_tokens: torch.Tensor, t: int, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Which token positions hold words: 1 .. n_tokens − 2 (the start token 0 and the end token excluded).

    Args:
        n_tokens: (B,) long, tokens per prompt including start and end.
        t: sequence length T (77 for CLIP).
        counted: (B, T) bool, the tokens that count (:func:`first_pieces`: one per word when BPE pieces are
            merged); ``None``: every token.

    Returns:
        (B, T) bool.
    """
    idx = torch.arange(t, device=n_tokens.device).unsqueeze(0)
    valid = (idx >= 1) & (idx <= (n_tokens.unsqueeze(1) - 2))
    return valid if counted is None else valid & counted.to(valid.device)


def first_pieces(word_ids: torch.Tensor) -> torch.Tensor:
    """The first token of every word: where the word id changes along the sequence.

    With merged BPE pieces (:func:`merge_word_pieces`) a word's pieces carry one map; counting only its first
    piece makes the word count once in Eq. 6–9 (index token, position vector, refinement means), as one
    word map does in the official code.

    Args:
        word_ids: (B, T) long, each token's word number; the pieces of one word are adjacent and share it
            (:meth:`instdiff.bundle.ModelBundle.word_ids`).

    Returns:
        (B, T) bool; True at position 0 and wherever the id differs from the previous position's.
    """
    first = torch.ones_like(word_ids, dtype=torch.bool)
    first[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
    return first


def sink_token(maps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """The attention sink: per image, the non-word token (start, end or padding) holding the most attention mass.

    Eq. 6 compares word maps with the start token's map because on SD the start token is where attention that
    has nowhere better to go collects. Models differ in where that is; the sink is measured here (on SD it is
    the start token, so Eq. 6 is unchanged there).

    Args:
        maps: (B, T, h, w) token maps (attention probabilities).
        n_tokens: (B,) long, tokens per prompt including start and end.

    Returns:
        (B,) long token index.
    """
    mass = maps.flatten(2).sum(-1)  # (B, T)
    mass = mass.masked_fill(word_token_mask(n_tokens, maps.shape[1]), float("-inf"))
    return mass.argmax(dim=1)


def index_token(
    maps: torch.Tensor,
    n_tokens: torch.Tensor,
    invert_start: bool = False,
    reference: Reference = Reference.START,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstDiffEdit Eq. 6: per image, the word token whose map is most similar (cosine) to the start token's.

    Args:
        maps: (B, T, h, w) token maps.
        n_tokens: (B,) long, tokens per prompt including start and end.
        invert_start: replace the reference map by 1 − minmax(reference) (the official code's variant).
        reference: the start token (paper) or the attention sink (:func:`sink_token`).
        counted: (B, T) bool, the candidate tokens (:func:`first_pieces`); ``None``: every word token.

    Returns:
        (B,) long token index.
    """
    rows = torch.arange(maps.shape[0], device=maps.device)
    ref = torch.zeros_like(rows) if Reference(reference) is Reference.START else sink_token(maps, n_tokens)
    start = maps[rows, ref]  # (B, h, w)
    if invert_start:
        start = 1.0 - minmax(start)
    sims = _cosine(maps, start)  # (B, T)
    valid = word_token_mask(n_tokens, maps.shape[1], counted)
    sims = sims.masked_fill(~valid, float("-inf"))
    return sims.argmax(dim=1)


def similarity_vector(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """InstDiffEdit Eq. 7: S_i = cos(A_i, A_index) for every token.

    Args:
        maps: (B, T, h, w) token maps.
        index: (B,) long, the index token of Eq. 6.

    Returns:
        (B, T) cosine similarities.
    """
    ref = maps[torch.arange(maps.shape[0], device=maps.device), index]  # (B, h, w)
    return _cosine(maps, ref)


def position_vector(
    sims: torch.Tensor,
    n_tokens: torch.Tensor,
    gamma1: float = 0.9,
    gamma2: float = 0.6,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstDiffEdit Eq. 8: P_i = +1 if S_i > γ1, −1 if S_i < γ2, else 0; zero outside word tokens.

    Args:
        sims: (B, T) similarities of Eq. 7.
        n_tokens: (B,) long, tokens per prompt including start and end.
        gamma1: the +1 threshold.
        gamma2: the −1 threshold.
        counted: (B, T) bool, the tokens that count (:func:`first_pieces`); P is zero at the others.

    Returns:
        (B, T) float in {−1, 0, +1}.
    """
    p = torch.zeros_like(sims)
    p = torch.where(sims > gamma1, torch.ones_like(p), p)
    p = torch.where(sims < gamma2, -torch.ones_like(p), p)
    return p * word_token_mask(n_tokens, sims.shape[1], counted).to(p.dtype)


def positions(
    maps: torch.Tensor,
    n_tokens: torch.Tensor,
    cfg: MaskConfig = MaskConfig(),
    span: torch.Tensor | None = None,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """The position vector P: Eq. 6–8 (with ``cfg.reference``), or +1 on an edit span where one is given.

    Rows of ``span`` holding at least one word token get +1 on those tokens and 0 elsewhere (the
    ``edit_span`` token choice); the other rows (prompts that do not differ) get Eq. 6–8.

    Args:
        maps: (B, T, h, w) token maps.
        n_tokens: (B,) long, tokens per prompt including start and end.
        cfg: γ1, γ2, ``invert_start``, ``reference``.
        span: (B, T) bool, the target tokens a word diff against the source marks as new; ``None``: Eq. 6–8.
        counted: (B, T) bool, the tokens that count (:func:`first_pieces` with merged BPE pieces: one per
            word); ``None``: every word token.

    Returns:
        (B, T) float in {−1, 0, +1}; zero outside the counted word tokens.
    """
    idx = index_token(maps, n_tokens, cfg.invert_start, cfg.reference, counted)
    p = position_vector(similarity_vector(maps, idx), n_tokens, cfg.gamma1, cfg.gamma2, counted)
    if span is None:
        return p
    span = span.to(maps.device) & word_token_mask(n_tokens, maps.shape[1], counted)
    has = span.any(dim=1, keepdim=True)
    return torch.where(has, span.to(p.dtype), p)


def refine(maps: torch.Tensor, position: torch.Tensor, mode: Refinement = Refinement.WEIGHTED) -> torch.Tensor:
    """The refined map A_ref that Eq. 9 binarises.

    ``WEIGHTED`` (the paper): Σ_i P_i A_i. ``OFFICIAL`` (the official code): minmax(mean of +1 maps) −
    minmax(mean of −1 maps), clamped at 0 (a side with no tokens contributes zeros).

    Args:
        maps: (B, T, h, w) token maps.
        position: (B, T) the position vector P of Eq. 8.
        mode: which refinement.

    Returns:
        (B, h, w) float.
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
    """Normalised 2-D Gaussian kernel.

    Args:
        size: side in pixels (odd).
        sigma: standard deviation in pixels.
        device: where to build it.

    Returns:
        (size, size) float32 summing to one.
    """
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, size: int = 5, sigma: float = 1.0, iters: int = 1) -> torch.Tensor:
    """Gaussian blur with reflect padding (replicate on maps smaller than the kernel's radius).

    Args:
        x: (B, h, w) or (B, 1, h, w) float maps.
        size: kernel side in pixels (odd).
        sigma: standard deviation in pixels.
        iters: times the blur is applied.

    Returns:
        The input's shape.
    """
    squeeze = x.ndim == 3
    y = x.unsqueeze(1) if squeeze else x
    k = gaussian_kernel(size, sigma, y.device).to(y.dtype)[None, None]
    pad = size // 2
    for _ in range(iters):
        mode = "reflect" if min(y.shape[-2:]) > pad else "replicate"
        y = F.conv2d(F.pad(y, (pad, pad, pad, pad), mode=mode), k)
    return y.squeeze(1) if squeeze else y


def binarize(x: torch.Tensor, phi: float = 0.2) -> torch.Tensor:
    """InstDiffEdit Eq. 9: the mask is where the min-max normalised map exceeds φ.

    Args:
        x: float maps in [0, 1].
        phi: the threshold φ.

    Returns:
        Bool, the input's shape.
    """
    return x > phi


def merge_word_pieces(maps: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """Average the maps of the BPE pieces that belong to one word (the official code's word maps).

    Every piece then carries its word's mean map, so Eq. 6–8 treat a word as a unit without changing token
    indices; tokens with a word id of their own are unchanged.

    Args:
        maps: (B, T, h, w) token maps.
        word_ids: (B, T) long, each token's word number (pieces of one word share it; the start, end and
            padding tokens have their own), e.g. :meth:`instdiff.bundle.ModelBundle.word_ids`.

    Returns:
        (B, T, h, w), the input's dtype.
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
    words: torch.Tensor | None = None,
    span: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InstDiffEdit's instant mask for one step (paper Eq. 6–9).

    The refined map is upsampled bilinearly, smoothed (on ``cfg.smooth_resolution`` when set), min-max
    normalised and binarised at φ. With ``cfg.merge_bpe`` the BPE pieces of a word share one word map (their
    mean, :func:`merge_word_pieces`) and the word counts once (:func:`first_pieces`: only its first piece can
    be the index token or hold a non-zero P_i, so Eq. 9's sum and the refinement means weigh it as one
    token). With ``cfg.preset == "official"`` the official code's computation runs instead
    (:func:`instdiff.masks_official.official_mask`; P is then indexed by word unit).

    Args:
        maps: (B, T, h, w) token maps at the attention resolution.
        n_tokens: (B,) long, tokens per prompt including start and end.
        latent_hw: (H, W) of the latent grid.
        cfg: thresholds, refinement and smoothing.
        position: P (B, T) from the first step; ``None`` computes it here (:func:`positions`, Eq. 6–8).
        words: (B, T) long word units: the official preset's
            (:func:`instdiff.masks_official.official_word_ids`), or with ``cfg.merge_bpe`` the BPE words
            (:meth:`instdiff.bundle.ModelBundle.word_ids`); unread otherwise.
        span: (B, T) bool edit-span tokens for ``cfg.tokens == "edit_span"`` (see :func:`positions`).

    Returns:
        ``(mask (B, 1, H, W) bool on the latent grid, soft map (B, 1, H, W) in [0, 1], position (B, T))``.

    Raises:
        ConfigError: the official preset or ``merge_bpe`` without ``words``.
    """
    if cfg.preset is MaskPreset.OFFICIAL:
        if words is None:
            raise ConfigError("mask preset 'official' needs the prompts' word units (official_word_ids)")
        return official_mask(maps, words, n_tokens, latent_hw, cfg, position)
    counted = None
    if cfg.merge_bpe:
        if words is None:
            raise ConfigError("mask merge_bpe needs the prompts' word ids (ModelBundle.word_ids)")
        words = words.to(maps.device)
        maps = merge_word_pieces(maps, words)  # (B, T, h, w): a word's pieces share its mean map
        counted = first_pieces(words)  # (B, T): each word counts once
    if position is None:
        position = positions(maps, n_tokens, cfg, span, counted)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffEdit's mask from noise estimates under the source and target prompts (Couairon et al. 2023, §3.2).

    |ε_tgt − ε_src| is averaged over channels and noises, min-max normalised PER IMAGE (never over the batch,
    so an image's mask does not depend on its neighbours) and thresholded.

    Args:
        eps_source: (B·n, C, H, W) noise estimates under the source prompt, the n noises of an image adjacent.
        eps_target: (B·n, C, H, W) the same under the target prompt.
        n_noises: n.
        threshold: on the normalised difference, in [0, 1].

    Returns:
        ``(mask (B, 1, H, W) bool, soft map (B, 1, H, W) in [0, 1])``.
    """
    diff = (eps_target - eps_source).abs().mean(dim=1, keepdim=True)  # (B·n, 1, H, W)
    diff = diff.view(-1, n_noises, *diff.shape[1:]).mean(dim=1)  # (B, 1, H, W)
    soft = minmax(diff)
    return soft > threshold, soft


def resize_mask(mask: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Resize an editor mask between grids (latent ↔ image).

    Bool input: nearest when enlarging by an integer factor (exact block replication), area averaging
    thresholded at ``threshold`` otherwise. Float input is resized bilinearly and returned as float. (The
    sparse engine's "any pixel" pooling is :func:`instdiff.sparse.mask.pool_any`.)

    Args:
        mask: (B, 1, h, w) bool or float.
        size: (H, W) target size.
        threshold: area fraction that sets a cell when shrinking bool masks.

    Returns:
        (B, 1, H, W), bool for bool input, float32 otherwise.
    """
    if mask.dtype != torch.bool:
        return F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False)
    h, w = mask.shape[-2:]
    if size[0] % h == 0 and size[1] % w == 0:
        return F.interpolate(mask.float(), size=size, mode="nearest") > 0.5
    return F.interpolate(mask.float(), size=size, mode="area") >= threshold


def iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Intersection over union per image (the project's one IoU); 1.0 when both masks are empty.

    Args:
        pred: (B, ..., H, W) mask (bool or 0/1).
        gt: (B, ..., H, W) mask of the same shape.

    Returns:
        (B,) float32.
    """
    p = pred.bool().flatten(1)
    g = gt.bool().flatten(1)
    inter = (p & g).sum(dim=1).float()
    union = (p | g).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mask_area(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels set per image: (B, ..., H, W) → (B,) float32."""
    return mask.bool().flatten(1).float().mean(dim=1)


def steps_for_strength(steps: int, strength: float) -> int:
    """Number of denoising steps actually run at noise strength r (SDEdit's τ = r·T), diffusers' convention.

    ``int(steps · r)`` rounded down, as diffusers' img2img/inpaint pipelines (``get_timesteps``) and the
    official InstDiffEdit code (``init_latent``) do: 10 steps at r = 0.55 run 5 (from t = 401 on SD's
    schedule). Where that is 0 (diffusers refuses it), one step runs.

    Args:
        steps: steps of the full schedule.
        strength: noise strength r in (0, 1].

    Returns:
        The number of trailing timesteps to run, in [1, steps].

    Raises:
        ConfigError: strength outside (0, 1].
    """
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")
    return max(1, min(steps, int(steps * strength)))
