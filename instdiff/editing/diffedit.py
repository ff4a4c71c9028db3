"""DiffEdit (Couairon et al. 2023): noise-difference mask, DDIM inversion, masked decoding.

Paper §3: (1) the mask is where the noise estimates under the source and target prompts differ, averaged over
several noises and thresholded per image (:func:`instdiff.masks.diffedit_mask`); (2) the input is encoded
with deterministic DDIM inversion under the source prompt up to the strength r; (3) decoding with the target
prompt follows the inversion trajectory outside the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Method
from instdiff.editing.contract import register
from instdiff.masks import diffedit_mask
from instdiff.sampling import (
    Clock,
    UNetCounter,
    ddim_invert,
    embeddings,
    finish,
    guided_eps,
    make_noise,
    noised,
    schedule,
    to_epsilon,
)
from instdiff.types import EditResult

log = logging.getLogger(__name__)


@register(Method.DIFFEDIT)
def diffedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """DiffEdit: mask from |ε(x_t, target) − ε(x_t, source)| over noises, DDIM inversion, masked decoding.

    Args:
        bundle: the models.
        images: (B, 3, H, W) in [-1, 1] on the bundle's device and dtype.
        source_prompts: B source prompts (mask contrast and inversion).
        target_prompts: B target prompts.
        cfg: ``steps``, ``strength``, ``guidance``, ``diffedit_noises``, ``diffedit_mask_strength``,
            ``diffedit_threshold``, ``paste_back``.
        seeds: one seed per image.

    Returns:
        The edit with DiffEdit's masks.
    """
    clock = Clock(bundle.device)
    b, nd = images.shape[0], cfg.diffedit_noises
    counter = UNetCounter(b)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with clock.stage("encode"):
        x0 = bundle.encode_images(images)
    sched, timesteps = schedule(bundle, cfg.steps, cfg.strength)
    src_emb = bundle.encode_prompt(list(source_prompts))
    tgt_emb = bundle.encode_prompt(list(target_prompts))
    # 1. mask: both prompts on the same noised latents, thresholded per image
    with clock.stage("mask"):
        mask_sched, mask_ts = schedule(bundle, cfg.steps, cfg.diffedit_mask_strength)
        t_m = mask_ts[0]
        noise = make_noise(seeds, nd, tuple(x0.shape[1:]), gens).to(bundle.device, bundle.dtype)
        xt = noised(mask_sched, x0.repeat_interleave(nd, dim=0), noise, t_m)
        emb = torch.cat([src_emb.repeat_interleave(nd, 0), tgt_emb.repeat_interleave(nd, 0)])
        out = counter(bundle.unet, torch.cat([xt, xt]), t_m, emb)
        eps = to_epsilon(bundle, mask_sched, out, torch.cat([xt, xt]), t_m)
        eps_src, eps_tgt = eps.chunk(2)
        mask, _ = diffedit_mask(eps_src.float(), eps_tgt.float(), nd, cfg.diffedit_threshold)
    # 2. deterministic DDIM inversion of the input with the source prompt, keeping every latent
    with clock.stage("invert"):
        inverted = ddim_invert(bundle, sched, x0, src_emb, timesteps, counter)
    # 3. decode with the target prompt; outside the mask follow the inversion trajectory
    cond, uncond = embeddings(bundle, target_prompts, 1)
    m = mask.to(bundle.dtype)
    x = inverted[0]
    with clock.stage("denoise"):
        for i, t in enumerate(timesteps):
            eps = guided_eps(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance)
            x = sched.step(eps, t, x).prev_sample
            x = m * x + (1 - m) * inverted[i + 1]
    out_img, mask_px = finish(bundle, images, x, mask, cfg.paste_back, clock)
    return EditResult(out_img, mask_px, clock.done(), counter.per_image)
