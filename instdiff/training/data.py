"""Training data of the shapes world: rendered scenes with per-pixel object labels, caption token ids, and the
random inpainting masks of the inpainting stage.

Scenes come from :mod:`instdiff.synthetic` in chunks of :data:`~instdiff.training.config.SCENES_PER_CHUNK`,
chunk c rendered from seed ``data_seed + c``, so a data set is fixed by ``(n, data_seed, size)``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from instdiff import synthetic
from instdiff.training.config import SCENES_PER_CHUNK


@dataclass
class ShapesData:
    """Rendered training scenes.

    Attributes:
        images: (N, H, W, 3) uint8 RGB.
        labels: (N, H, W) uint8; 0 = background, k = the k-th object's visible pixels.
        captions: N captions from :func:`instdiff.synthetic.caption_for`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    seed, n, size = args
    scenes = synthetic.make_scenes(n, seed=seed, size=size)
    images = np.stack([s.image for s in scenes])
    labels = np.zeros((n, size, size), dtype=np.uint8)
    for i, s in enumerate(scenes):
        for k, m in enumerate(s.masks):
            labels[i][m] = k + 1
    return images, labels, [s.caption for s in scenes]


def render_training_data(n: int, data_seed: int = 0, size: int = 64, workers: int = 0) -> ShapesData:
    """Render ``n`` scenes as chunks of 250: chunk c is ``make_scenes(250, seed=data_seed + c)``.

    Args:
        n: number of scenes.
        data_seed: seed of the first chunk.
        size: image side in pixels.
        workers: rendering processes (spawned; 0 = one per CPU core, at most 16; 1 = in this process).

    Returns:
        The scenes as CPU tensors.
    """
    chunks = [
        (data_seed + c, min(SCENES_PER_CHUNK, n - c * SCENES_PER_CHUNK), size) for c in range(-(-n // SCENES_PER_CHUNK))
    ]
    workers = workers or min(16, os.cpu_count() or 1)
    if workers > 1 and len(chunks) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(chunks))) as pool:
            parts = pool.map(_render_chunk, chunks)
    else:
        parts = [_render_chunk(c) for c in chunks]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    captions = [c for p in parts for c in p[2]]
    return ShapesData(images, labels, captions)


def random_inpaint_masks(
    labels: torch.Tensor, mix: Sequence[float], factor: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training masks at pixel resolution, aligned to the latent grid.

    Per sample one kind from :data:`~instdiff.training.config.MASK_KINDS` is drawn with weights ``mix``: one
    object's visible pixels, the same dilated by 2 px, a random box (15–70 % of each side), the background, or
    the whole image. The mask is then max-pooled to the latent grid and replicated back, exactly what the
    editors pass at inference (SD's inpainting model was trained on random masks the same way).

    Args:
        labels: (B, H, W) uint8 per-pixel labels (0 = background, k = object k).
        mix: ``len(MASK_KINDS)`` non-negative weights (normalised here).
        factor: the VAE's downsampling factor (pixels per latent cell on a side).
        generator: random generator on ``labels``' device.

    Returns:
        (B, 1, H, W) float32 in {0, 1}, constant on every ``factor`` × ``factor`` cell; 1 = inpaint.
    """
    b, h, w = labels.shape
    dev = labels.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=dev, generator=generator)

    n_obj = labels.flatten(1).amax(dim=1).clamp_min(1).float()  # (B,)
    k = (rand(b) * n_obj).floor().long() + 1
    obj = (labels == k.view(b, 1, 1)).float().unsqueeze(1)  # (B, 1, H, W)
    dilated = F.max_pool2d(obj, 5, stride=1, padding=2)
    bw = (0.15 + 0.55 * rand(b)) * w
    bh = (0.15 + 0.55 * rand(b)) * h
    x0 = rand(b) * (w - bw)
    y0 = rand(b) * (h - bh)
    xs = torch.arange(w, device=dev).view(1, 1, w) + 0.5
    ys = torch.arange(h, device=dev).view(1, h, 1) + 0.5
    box = (
        (
            (xs >= x0.view(b, 1, 1))
            & (xs < (x0 + bw).view(b, 1, 1))
            & (ys >= y0.view(b, 1, 1))
            & (ys < (y0 + bh).view(b, 1, 1))
        )
        .float()
        .unsqueeze(1)
    )
    background = (labels == 0).float().unsqueeze(1)
    full = torch.ones_like(obj)
    options = torch.stack([obj, dilated, box, background, full], dim=0)  # (5, B, 1, H, W)
    weights = torch.tensor(list(mix), dtype=torch.float32, device=dev)
    kind = torch.multinomial(weights / weights.sum(), b, replacement=True, generator=generator)
    mask = options[kind, torch.arange(b, device=dev)]
    lat = F.max_pool2d(mask, factor)
    return F.interpolate(lat, scale_factor=factor, mode="nearest")


__all__ = ["ShapesData", "random_inpaint_masks", "render_training_data"]
