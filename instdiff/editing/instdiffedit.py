"""InstDiffEdit (Zou et al. 2024): instant masks from cross-attention during the denoising the edit runs anyway.

Paper §3.2–3.3: from τ = r·T, every step reads the cross-attention maps of the target prompt (averaged over
heads, the 16×16-class layers and n parallel noises), turns them into a mask (Eq. 6–9,
:func:`instdiff.masks.instdiffedit_mask`) and blends the denoised latents with q(x_t | x_0) outside it (Eq.
4/5); the final step inpaints the input inside the last mask. The official code's variants (running mean of
the maps, edit-word prompts, BPE-piece merging, blending at the current step) are options of
:class:`~instdiff.config.EditConfig`; ``MaskConfig.official()`` runs the official code's whole mask recipe
(:mod:`instdiff.masks_official`) and inpaints with the conditioning phrase as it does.

Cheaper by design (options, the embedded model's defaults): the n parallel noises run only while the mask is
still changing (``mask_steps`` / ``mask_stable``), on the conditional rows alone if ``mask_guidance`` is off
(the maps come from those rows), all n in one batched UNet call; the final inpainting then starts from the
input noised to ``inpaint_strength`` (= r: SDEdit's start) instead of pure noise. The token maps can come
from the words that differ between the prompts (``mask.tokens: edit_span``, :func:`edit_span`), and Eq. 6's
reference can be the measured attention sink (``mask.reference: sink``).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence

import torch

from instdiff.attention import AttentionSelection, AttentionStore, capture_attention, default_downsample
from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Inpaint, MaskPreset, MaskPrompt, Method, PromptMode, TokenChoice
from instdiff.editing.contract import register
from instdiff.masks import instdiffedit_mask, iou
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


# words a word diff between prompts ignores: they name no region (articles, joiners, punctuation)
FUNCTION_WORDS = frozenset({"a", "an", "the", "and", "or", "of", "on", "in", "with", "at", ",", ".", ";"})


def prompt_words(bundle: ModelBundle, prompt: str) -> list[tuple[str, list[int]]]:
    """The words of ``prompt`` as the tokenizer splits it, each with its token positions.

    Pieces are grouped into words as :meth:`~instdiff.bundle.ModelBundle.word_ids` does (a piece ending in
    ``</w>`` ends a word); positions count the start token as 0, so they index the 77 attention maps.

    Args:
        bundle: the tokenizer.
        prompt: one prompt.

    Returns:
        ``[(word, [positions])]`` in prompt order (truncated prompts: the words that fit).
    """
    ids = bundle.tokenize([prompt])[0].tolist()
    n = min(bundle.token_count(prompt), len(ids))
    pieces = bundle.tokenizer.convert_ids_to_tokens(ids[1 : n - 1])
    words: list[tuple[str, list[int]]] = []
    current, pos = "", []
    for i, piece in enumerate(pieces, start=1):
        current += piece.removesuffix("</w>")
        pos.append(i)
        if piece.endswith("</w>"):
            words.append((current.lower(), pos))
            current, pos = "", []
    if pos:
        words.append((current.lower(), pos))
    return words


def edit_span(bundle: ModelBundle, sources: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    """The target tokens that a word diff against the source marks as new (``mask.tokens: edit_span``).

    A longest-matching-blocks diff (:class:`difflib.SequenceMatcher`) of the two word lists; the target's
    words in replaced or inserted runs, except :data:`FUNCTION_WORDS`, are the span. This is the edit phrase
    the official code conditions on, located inside the full target prompt.

    Args:
        bundle: the tokenizer.
        sources: B source prompts.
        targets: B target prompts.

    Returns:
        (B, 77) bool on the CPU; a row is all False when the prompts do not differ in a content word.
    """
    out = torch.zeros(len(targets), bundle.tokenizer.model_max_length, dtype=torch.bool)
    for b, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
        sw = [w for w, _ in prompt_words(bundle, src)] if src else []
        tw = prompt_words(bundle, tgt)
        ops = difflib.SequenceMatcher(None, sw, [w for w, _ in tw], autojunk=False).get_opcodes()
        for tag, _, _, j1, j2 in ops:
            if tag in ("replace", "insert"):
                for word, pos in tw[j1:j2]:
                    if word not in FUNCTION_WORDS:
                        out[b, pos] = True
    return out


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
        source_prompts: B source prompts (read in ``edit_words`` prompt mode and by ``mask.tokens: edit_span``).
        target_prompts: B target prompts.
        cfg: ``steps``, ``strength``, ``guidance``, ``n_noises``, ``mask``, ``attention_downsample``,
            ``attention_layers``, ``prompt_mode``, ``mask_steps``, ``mask_stable``, ``mask_guidance``,
            ``inpaint*``, ``paste_back``.
        seeds: one seed per image.

    Returns:
        The edit; extras hold ``position`` (B, T) (Eq. 8's P of the first step), ``mask_area_per_step``,
        ``mask_steps`` (steps the n noises ran) and ``attention_downsample``.
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
    # 2. condition on the target prompt (or its edit words; or, for the mask phase, the source prompt), CFG
    #    against the empty prompt
    prompts = list(target_prompts)
    if cfg.prompt_mode is PromptMode.EDIT_WORDS:
        prompts = [edit_words(s, t) for s, t in zip(source_prompts, target_prompts, strict=True)]
    other = list(source_prompts)
    if cfg.mask_prompt is MaskPrompt.SOURCE:  # rows without a source prompt fall back to the target
        prompts, other = (
            [s if s.strip() else t for s, t in zip(source_prompts, target_prompts, strict=True)],
            list(target_prompts),
        )
    cond, uncond = embeddings(bundle, prompts, n)
    limit = bundle.tokenizer.model_max_length
    n_tokens = torch.tensor([min(bundle.token_count(p), limit) for p in prompts], device=bundle.device)
    official = cfg.mask.preset is MaskPreset.OFFICIAL  # the official code's recipe (instdiff.masks_official)
    words = None  # (B, 77) word units: the official recipe's, or the BPE words merge_bpe merges and counts once
    if official:
        words = official_word_ids(bundle.tokenizer, prompts, limit)
    elif cfg.mask.merge_bpe:
        words = bundle.word_ids(prompts).to(bundle.device)
    span = None
    if cfg.mask.tokens is TokenChoice.EDIT_SPAN and cfg.prompt_mode is PromptMode.FULL:
        span = edit_span(bundle, other, prompts).to(bundle.device)
    sched, timesteps = schedule(bundle, cfg.steps, cfg.strength)
    factor = cfg.attention_downsample or bundle.defaults.get("attention_downsample") or default_downsample(bundle.unet)
    guided = cfg.mask_guidance
    store = AttentionStore(cond_rows=slice(b * n, 2 * b * n) if guided else slice(0, b * n))
    selection = AttentionSelection(downsample=factor, paths=cfg.attention_layers)
    last_mask_step = len(timesteps) if cfg.mask_steps is None else min(cfg.mask_steps, len(timesteps))
    # 3. denoise from τ = r·T; while the mask phase lasts: n noises, instant mask from the recorded maps,
    #    blend (Eq. 5); then either stop (the final inpainting does the edit) or go on with the first noise
    x = noised(sched, x0n, noise, timesteps[0])
    position, running, mask, prev = None, None, None, None
    mask_history: list[float] = []
    done = 0
    with clock.stage("denoise"), capture_attention(bundle.unet, store, selection, latent_hw):
        for i, t in enumerate(timesteps):
            store.step = i
            if guided:
                eps = guided_eps(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance)
            else:
                eps = guided_eps(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, None, 1.0)
            maps = store.mean(i)  # (B·n, T, ha, wa)
            maps = maps.view(b, n, *maps.shape[1:]).mean(dim=1)  # (B, T, ha, wa)
            store.maps.pop(i)
            running = maps if running is None else running + maps
            use = running / (i + 1) if cfg.mask.uses_running_mean else maps
            mask, _, position = instdiffedit_mask(use, n_tokens, latent_hw, cfg.mask, position, words, span)
            mask_history.append(mask.float().mean().item())
            done = i + 1
            x_prev = sched.step(eps, t, x).prev_sample
            t_blend = blend_timestep(timesteps, i, cfg.mask.blends_at_current_step)
            m = mask.repeat_interleave(n, dim=0).to(x.dtype)
            x = m * x_prev + (1 - m) * noised(sched, x0n, noise, t_blend)
            stable = (
                cfg.mask_stable is not None and prev is not None and bool((iou(mask, prev) >= cfg.mask_stable).all())
            )
            prev = mask
            if done >= last_mask_step or stable:
                break
    assert mask is not None
    if done < len(timesteps) and cfg.inpaint is Inpaint.NONE:
        # the mask is final: the first noise's blended denoising goes on alone (no attention recorded)
        x, noise1, x0_1 = x[::n], noise[::n], x0n[::n]
        cond1, uncond1 = cond[::n], uncond[::n]
        m = mask.to(x.dtype)
        with clock.stage("denoise"):
            for i in range(done, len(timesteps)):
                t = timesteps[i]
                eps = guided_eps(counter, bundle.unet, sched.scale_model_input(x, t), t, cond1, uncond1, cfg.guidance)
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
                x = m * sched.step(eps, t, x).prev_sample + (1 - m) * noised(sched, x0_1, noise1, t_prev)
        n = 1
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
    extras = {
        "position": position.cpu(),
        "mask_area_per_step": mask_history,
        "mask_steps": done,
        "attention_downsample": factor,
    }
    return EditResult(out, mask_px, clock.done(), counter.per_image, extras)
