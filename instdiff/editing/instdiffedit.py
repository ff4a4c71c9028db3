"""InstDiffEdit (Zou et al. 2024): instant masks from cross-attention during the denoising the edit runs anyway.

Paper §3.2–3.3: from τ = r·T, every step reads the cross-attention maps of the target prompt (averaged over
heads, the 16×16-class layers and n parallel noises), turns them into a mask (Eq. 6–9,
:func:`instdiff.masks.instdiffedit_mask`) and blends the denoised latents with q(x_t | x_0) outside it (Eq.
4/5); the final step inpaints the input inside the last mask. The official code's variants (running mean of
the maps, edit-word prompts, BPE-piece merging, blending at the current step) are options of
:class:`~instdiff.config.EditConfig`; ``MaskConfig.official()`` runs the official code's whole mask recipe
(:mod:`instdiff.masks_official`) and inpaints with the conditioning phrase as it does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from instdiff.attention import AttentionSelection, AttentionStore, capture_attention, default_downsample
from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Inpaint, MaskPreset, Method, PromptMode
from instdiff.editing.contract import register
from instdiff.masks import instdiffedit_mask, merge_word_pieces
from instdiff.masks_official import official_word_ids
from instdiff.sampling import (
    Clock,
    UNetCounter,
    blend_timestep,
    embeddings,
    finish,
    guided_eps,
    inpaint,
    make_noise,
    noised,
    schedule,
)
from instdiff.types import EditResult

log = logging.getLogger(__name__)


def edit_words(source: str, target: str) -> str:
    """The edit phrase: words of ``target`` that are not in ``source`` (case-insensitive).

    The official InstDiffEdit code conditions on this phrase (``prompt_mode="edit_words"``).

    Args:
        source: the source prompt.
        target: the target prompt.

    Returns:
        The new words in target order, space-separated; the whole target if there are none.
    """
    src = set(source.lower().split())
    words = [w for w in target.split() if w.lower() not in src]
    return " ".join(words) if words else target


@register(Method.INSTDIFFEDIT)
def instdiffedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """InstDiffEdit, batched over images; the n parallel noises of an image share one mask.

    Args:
        bundle: the models.
        images: (B, 3, H, W) in [-1, 1] on the bundle's device and dtype.
        source_prompts: B source prompts (read in ``edit_words`` prompt mode).
        target_prompts: B target prompts.
        cfg: ``steps``, ``strength``, ``guidance``, ``n_noises``, ``mask``, ``attention_downsample``,
            ``prompt_mode``, ``inpaint*``, ``paste_back``.
        seeds: one seed per image.

    Returns:
        The edit; extras hold ``position`` (B, T) (Eq. 8's P of the first step), ``mask_area_per_step`` and
        ``attention_downsample``.
    """
    clock = Clock(bundle.device)
    b, n = images.shape[0], cfg.n_noises
    counter = UNetCounter(b)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    # 1. encode the images and draw n noises per image
    with clock.stage("encode"):
        x0 = bundle.encode_images(images)  # (B, C, h, w)
    latent_hw = tuple(x0.shape[-2:])
    noise = make_noise(seeds, n, tuple(x0.shape[1:]), gens).to(bundle.device, bundle.dtype)  # (B·n, C, h, w)
    x0n = x0.repeat_interleave(n, dim=0)
    # 2. condition on the target prompt (or its edit words), CFG against the empty prompt
    prompts = list(target_prompts)
    if cfg.prompt_mode is PromptMode.EDIT_WORDS:
        prompts = [edit_words(s, t) for s, t in zip(source_prompts, target_prompts, strict=True)]
    cond, uncond = embeddings(bundle, prompts, n)
    limit = bundle.tokenizer.model_max_length
    n_tokens = torch.tensor([min(bundle.token_count(p), limit) for p in prompts], device=bundle.device)
    word_ids = bundle.word_ids(prompts).to(bundle.device) if cfg.mask.merge_bpe else None  # (B, 77)
    official = cfg.mask.preset is MaskPreset.OFFICIAL  # the official code's recipe (instdiff.masks_official)
    words = official_word_ids(bundle.tokenizer, prompts, limit) if official else None  # (B, 77)
    sched, timesteps = schedule(bundle, cfg.steps, cfg.strength)
    factor = cfg.attention_downsample or bundle.defaults.get("attention_downsample") or default_downsample(bundle.unet)
    store = AttentionStore(cond_rows=slice(b * n, 2 * b * n))
    selection = AttentionSelection(downsample=factor)
    # 3. denoise from τ = r·T; every step: instant mask from the recorded maps, then blend (Eq. 5)
    x = noised(sched, x0n, noise, timesteps[0])
    position, running, mask = None, None, None
    mask_history = []
    with clock.stage("denoise"), capture_attention(bundle.unet, store, selection, latent_hw):
        for i, t in enumerate(timesteps):
            store.step = i
            eps = guided_eps(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance)
            maps = store.mean(i)  # (B·n, T, ha, wa)
            maps = maps.view(b, n, *maps.shape[1:]).mean(dim=1)  # (B, T, ha, wa)
            store.maps.pop(i)
            running = maps if running is None else running + maps
            use = running / (i + 1) if cfg.mask.uses_running_mean else maps
            if word_ids is not None:  # one map per word: its BPE pieces share their mean map
                use = merge_word_pieces(use, word_ids)
            mask, _, position = instdiffedit_mask(use, n_tokens, latent_hw, cfg.mask, position, words)
            mask_history.append(mask.float().mean().item())
            x_prev = sched.step(eps, t, x).prev_sample
            t_blend = blend_timestep(timesteps, i, cfg.mask.blends_at_current_step)
            m = mask.repeat_interleave(n, dim=0).to(x.dtype)
            x = m * x_prev + (1 - m) * noised(sched, x0n, noise, t_blend)
    assert mask is not None
    # 4. final: inpaint the input inside the last mask with the target prompt
    with clock.stage("inpaint"):
        if cfg.inpaint is Inpaint.NONE:
            latents = x.view(b, n, *x.shape[1:])[:, 0]
        else:
            latents = inpaint(
                bundle,
                images.to(bundle.device, bundle.dtype),
                x0,
                mask,
                prompts if official else target_prompts,  # the official code inpaints with its phrase
                cfg,
                gens,
                counter,
            )
    out, mask_px = finish(bundle, images, latents, mask, cfg.paste_back, clock)
    extras = {"position": position.cpu(), "mask_area_per_step": mask_history, "attention_downsample": factor}
    return EditResult(out, mask_px, clock.done(), counter.per_image, extras)
