"""SDEdit (Meng et al. 2022): img2img at noise strength r; the mask is the whole image.

Paper §3: perturb the input to x_τ ~ q(x_τ | x_0) with τ = r·T, then run the reverse process from τ with the
target prompt (here DDIM with classifier-free guidance).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Method
from instdiff.editing.contract import register
from instdiff.sampling import Clock, UNetCounter, embeddings, finish, guided_eps, make_noise, noised, schedule
from instdiff.types import EditResult

log = logging.getLogger(__name__)


@register(Method.SDEDIT)
def sdedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """SDEdit: noise the input to strength r and denoise with the target prompt.

    Args:
        bundle: the models.
        images: (B, 3, H, W) in [-1, 1] on the bundle's device and dtype.
        source_prompts: unused (SDEdit reads only the target prompt).
        target_prompts: B target prompts.
        cfg: ``steps``, ``strength``, ``guidance`` (``paste_back`` does not apply: the mask is everything, so
            brought back to a larger input's size the output is the upsampled edit everywhere,
            :mod:`instdiff.composite`).
        seeds: one seed per image.

    Returns:
        The edit; masks are all True.
    """
    clock = Clock(bundle.device)
    b = images.shape[0]
    counter = UNetCounter(b)
    with clock.stage("encode"):
        x0 = bundle.encode_images(images)
    noise = make_noise(seeds, 1, tuple(x0.shape[1:])).to(bundle.device, bundle.dtype)
    cond, uncond = embeddings(bundle, target_prompts, 1)
    sched, timesteps = schedule(bundle, cfg.steps, cfg.strength)
    x = noised(sched, x0, noise, timesteps[0])
    with clock.stage("denoise"):
        for t in timesteps:
            eps = guided_eps(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance)
            x = sched.step(eps, t, x).prev_sample
    mask = torch.ones(b, 1, *x0.shape[-2:], dtype=torch.bool, device=x0.device)
    out, mask_px = finish(bundle, images, x, mask, False, clock)
    return EditResult(out, mask_px, clock.done(), counter.per_image)
