"""InstDiffEdit's mask exactly as the official code computes it (``MaskConfig(preset="official")``).

The paper's Eq. 6–9 (:mod:`instdiff.masks`) work on the averaged float maps. The official code
(xiaotianqing/InstDiffEdit, ``model/InstDiffEdit.py`` with ``model/util.py``) reaches them through 8-bit images,
and these steps change which tokens Eq. 8 keeps and which pixels Eq. 9 sets. Written from a reading of that
code, step by step:

1. **Word units** (:func:`official_word_ids`): the prompt split at spaces; the BPE pieces of one
   space-separated word share one unit whose float map is the mean of theirs (a "word" there includes glued
   punctuation). Units: 0 = start token, 1..n = words, n + 1 = end token. Each word counts once below.
2. **8-bit image per unit** (:func:`quantize`): ``uint8(255 · A / max A)``, truncated toward zero.
3. **Bicubic resize** to the latent grid with PIL's ``Image.resize`` default (bicubic, a = −0.5, the window
   clipped at the border, 8-bit rounding): :func:`pil_resize`.
4. The start unit's image is inverted (255 − v); every image is then min-max normalised to 8 bits, truncated
   again (:func:`unit_images`).
5. **Eq. 6** on these images: the word whose image has the largest cosine with the inverted start image
   (float64, the first one on ties); **Eq. 7**: cosines of every word with it (its own is 1);
   **Eq. 8** with inclusive thresholds: +1 if S ≥ γ1, −1 if S ≤ γ2 (:func:`position_from_scores`).
6. **Refinement**: min-max(mean of the +1 images / 255) − min-max(mean of the −1 images / 255), clamped at 0
   (only the first term when no unit is −1); a one-word prompt uses its image / 255 with no P.
7. OpenCV's ``GaussianBlur(ksize=5×5, sigma=0)`` twice, i.e. the binomial kernel [1, 4, 6, 4, 1]/16 in each
   direction with the ``BORDER_REFLECT_101`` border (:func:`binomial_blur`); min-max; **Eq. 9**: ``> φ``.

The position vector P returned here is indexed by unit (start, words, end), not by token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from instdiff.config import MaskConfig

log = logging.getLogger(__name__)

BINOMIAL5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
"""OpenCV's fixed 5-tap Gaussian for ``sigma <= 0`` (its small-kernel table), exact in binary floating point."""


# ---- word units ---------------------------------------------------------------------------------------------
def official_word_ids(tokenizer: Any, prompts: Sequence[str], length: int | None = None) -> torch.Tensor:
    """Which unit each token position belongs to: the start token, one unit per space-separated word, the end.

    The official code merges the BPE pieces of each ``prompt.split(' ')`` word. The CLIP tokenizer's
    pre-tokeniser never crosses whitespace, so a word's pieces are those of the word tokenised alone.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``).
        prompts: B prompts.
        length: sequence length T (default ``tokenizer.model_max_length``); pieces past T − 1 are cut.

    Returns:
        (B, T) long on the CPU: 0 at the start token, word k's pieces hold k (1-based), the end token holds
        n_words + 1 and padding positions count on from there (as :meth:`ModelBundle.word_ids`).
    """
    t = int(length or tokenizer.model_max_length)
    rows = []
    for prompt in prompts:
        ids, word = [0], 1
        for chunk in prompt.split(" "):
            k = len(tokenizer(chunk, add_special_tokens=False).input_ids)
            if k == 0:
                continue
            ids.extend([word] * k)
            word += 1
        ids = ids[: t - 1]
        last = ids[-1] + 1
        ids.extend(range(last, last + t - len(ids)))
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)


def unit_maps(maps: torch.Tensor, word_ids: torch.Tensor, n_units: int) -> torch.Tensor:
    """Float map of each unit: the mean of its tokens' maps (a one-token unit keeps its map bit for bit).

    Args:
        maps: (T, h, w) float token maps of one image.
        word_ids: (T,) long unit of each token (:func:`official_word_ids`).
        n_units: K = n_words + 2.

    Returns:
        (K, h, w) float32.
    """
    out = []
    for u in range(n_units):
        pieces = maps[word_ids == u].float()  # (k, h, w)
        out.append(pieces[0] if pieces.shape[0] == 1 else pieces.mean(dim=0))
    return torch.stack(out)


# ---- 8-bit images ------------------------------------------------------------------------------------------
def quantize(maps: torch.Tensor) -> torch.Tensor:
    """``uint8(255 · A / max A)`` per map, truncated toward zero (numpy's ``astype(uint8)`` on A ≥ 0).

    Args:
        maps: (K, h, w) float32, non-negative (attention probabilities).

    Returns:
        (K, h, w) uint8; an all-zero map stays zero.
    """
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    scaled = 255 * maps / peak
    return torch.nan_to_num(scaled, nan=0.0).to(torch.uint8)


def pil_resize(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize 8-bit images with PIL's default filter (bicubic for mode ``L``), the official code's resize.

    Args:
        images: (K, h, w) uint8.
        hw: (H, W) target size.

    Returns:
        (K, H, W) uint8 on the CPU.
    """
    h, w = hw
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(im.cpu().numpy())).resize((w, h), Image.Resampling.BICUBIC))
        for im in images
    ]
    return torch.from_numpy(np.stack(out))


def minmax_u8(images: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to 8 bits as the official code does it: b = v / 255, ``uint8((b − min)/(max − min)·255)``.

    Float32 arithmetic, truncated toward zero; a constant image becomes zero.

    Args:
        images: (K, H, W) uint8.

    Returns:
        (K, H, W) uint8.
    """
    b = images.float() / 255
    lo = b.amin(dim=(-2, -1), keepdim=True)
    hi = b.amax(dim=(-2, -1), keepdim=True)
    out = (b - lo) / (hi - lo) * 255.0
    return torch.nan_to_num(out, nan=0.0).to(torch.uint8)


def unit_images(units: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Steps 2–4: quantise, resize to the latent grid, invert the start unit, min-max to 8 bits.

    Args:
        units: (K, h, w) float unit maps (:func:`unit_maps`); unit 0 is the start token.
        hw: (H, W) latent grid.

    Returns:
        (K, H, W) uint8 on the CPU.
    """
    images = pil_resize(quantize(units.float().cpu()), hw)
    images[0] = 255 - images[0]
    return minmax_u8(images)


# ---- Eq. 6–8 ------------------------------------------------------------------------------------------------
def cosines(images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine of each flattened image with ``ref`` in float64, rows normalised first (a zero row gives 0).

    Args:
        images: (K, H, W) uint8 or float.
        ref: (H, W).

    Returns:
        (K,) float64.
    """
    a = images.flatten(1).double()
    r = ref.flatten().double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    r = r / r.norm().clamp_min(torch.finfo(torch.float64).tiny)
    return a @ r


def position_from_scores(scores: torch.Tensor, gamma1: float = 0.9, gamma2: float = 0.6) -> torch.Tensor:
    """Eq. 8 with the official code's inclusive comparisons: +1 if S ≥ γ1, −1 if S ≤ γ2, else 0.

    Args:
        scores: (n,) similarities of the words to the index word.
        gamma1: the +1 threshold.
        gamma2: the −1 threshold.

    Returns:
        (n,) float32 in {−1, 0, +1}.
    """
    p = torch.zeros(scores.shape, dtype=torch.float32)
    p[scores >= gamma1] = 1.0
    p[(scores < gamma1) & (scores <= gamma2)] = -1.0
    return p


def position(images: torch.Tensor, gamma1: float = 0.9, gamma2: float = 0.6) -> torch.Tensor:
    """Eq. 6–8 on one image's unit images.

    Args:
        images: (K, H, W) uint8 from :func:`unit_images` (start, n ≥ 1 words, end).
        gamma1: the +1 threshold.
        gamma2: the −1 threshold.

    Returns:
        (K,) float32 P over units; the start and end units are 0 and the index word is +1.
    """
    words = images[1:-1]  # (n, H, W)
    index = int(torch.argmax(cosines(words, images[0])))  # Eq. 6, first maximum on ties
    scores = cosines(words, words[index])  # Eq. 7
    scores[index] = 1.0
    p = torch.zeros(images.shape[0], dtype=torch.float32)
    p[1:-1] = position_from_scores(scores, gamma1, gamma2)
    return p


# ---- refinement, blur, Eq. 9 -------------------------------------------------------------------------------
def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def _side_mean(images: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    total = None
    for im in images[select]:  # summed in unit order, as the official loop adds them
        v = im.float() / 255
        total = v if total is None else total + v
    assert total is not None
    return total / int(select.sum())


def refine(images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The official refinement: min-max(mean of +1 images) − min-max(mean of −1 images), clamped at 0.

    Every unit counts once, however many BPE pieces its word has.

    Args:
        images: (K, H, W) uint8 unit images.
        p: (K,) P over units with at least one +1.

    Returns:
        (H, W) float32; the first term alone when no unit is −1.
    """
    obj = _minmax(_side_mean(images, p > 0))
    if not bool((p < 0).any()):
        return obj
    back = _minmax(_side_mean(images, p < 0))
    return (obj - back).clamp_min(0.0)


def binomial_blur(x: torch.Tensor, iters: int = 2) -> torch.Tensor:
    """OpenCV ``GaussianBlur(x, (5, 5), 0)`` on float32 maps, ``iters`` times: [1, 4, 6, 4, 1]/16 per axis,
    border ``BORDER_REFLECT_101`` (``gfedcb|abcdefgh|gfedcba``, torch's ``reflect``).

    Args:
        x: (H, W) or (B, H, W) float maps, each side ≥ 3.
        iters: times the blur is applied (the official code: 2).

    Returns:
        The input's shape, float32.
    """
    y = x.float().reshape(-1, 1, *x.shape[-2:])
    k = torch.tensor(BINOMIAL5, dtype=torch.float32, device=y.device)
    for _ in range(iters):
        y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5))  # along rows
        y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1))  # along columns
    return y.reshape(x.shape)


def post_process(ref: torch.Tensor, phi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 7: blur twice, min-max (twice, as the official code does), Eq. 9 with ``> φ``.

    Args:
        ref: (H, W) float32 refined map.
        phi: the threshold φ.

    Returns:
        ``(mask (H, W) bool, soft (H, W) float32 in [0, 1])``.
    """
    soft = torch.nan_to_num(_minmax(binomial_blur(ref)), nan=0.0)
    again = torch.nan_to_num(_minmax(soft), nan=0.0)
    return again > phi, soft


# ---- one step --------------------------------------------------------------------------------------------------
def official_mask(
    maps: torch.Tensor,
    word_ids: torch.Tensor,
    n_tokens: torch.Tensor,
    latent_hw: tuple[int, int],
    cfg: MaskConfig,
    position_vector: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official code's mask for one step (steps 1–7 of the module docstring), image by image.

    Args:
        maps: (B, T, h, w) token maps at the attention resolution (averaged over heads, layers, noises and —
            the official store — the steps so far).
        word_ids: (B, T) long units from :func:`official_word_ids`.
        n_tokens: (B,) long tokens per prompt including start and end (the end token is ``n_tokens − 1``).
        latent_hw: (H, W) of the latent grid (the official code: 64×64).
        cfg: ``gamma1``, ``gamma2``, ``phi``.
        position_vector: P (B, T) over units from the first step; ``None`` computes it (Eq. 6–8).

    Returns:
        ``(mask (B, 1, H, W) bool, soft map (B, 1, H, W) float32, P (B, T) float32 over units, zero-padded)``
        on the device of ``maps``.
    """
    b, t = maps.shape[:2]
    hw = (int(latent_hw[0]), int(latent_hw[1]))
    masks, softs = [], []
    p_out = torch.zeros(b, t, dtype=torch.float32)
    for i in range(b):
        ids = word_ids[i].cpu()
        n_units = int(ids[int(n_tokens[i]) - 1]) + 1  # the end token's unit + 1
        images = unit_images(unit_maps(maps[i].cpu(), ids, n_units), hw)  # (K, H, W) uint8
        if n_units <= 2:  # no word: nothing to edit
            masks.append(torch.zeros(hw, dtype=torch.bool))
            softs.append(torch.zeros(hw))
            continue
        if position_vector is None:
            p = position(images, cfg.gamma1, cfg.gamma2) if n_units > 3 else torch.tensor([0.0, 1.0, 0.0])
        else:
            p = position_vector[i, :n_units].float().cpu()
        p_out[i, :n_units] = p
        ref = images[1].float() / 255 if n_units == 3 else refine(images, p)
        mask, soft = post_process(ref, cfg.phi)
        masks.append(mask)
        softs.append(soft)
    dev = maps.device
    return torch.stack(masks)[:, None].to(dev), torch.stack(softs)[:, None].to(dev), p_out.to(dev)
