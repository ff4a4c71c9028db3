"""Editors under one contract: ``edit(bundle, images, source_prompts, target_prompts, cfg) -> EditResult``.

* ``instdiffedit`` — InstDiffEdit (Zou et al. 2024): instant masks from cross-attention during the
  denoising the edit runs anyway, blended denoising (Eq. 4/5), final inpainting inside the last mask.
* ``sdedit`` — SDEdit (Meng et al. 2022): img2img at noise strength r; the mask is the whole image.
* ``diffedit`` — DiffEdit (Couairon et al. 2023): noise-difference mask thresholded per image, DDIM
  inversion with the source prompt, masked decoding with the target prompt.

Images are (B, 3, H, W) float tensors in [-1, 1]; masks come back at image resolution as bool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from instdiff.attention import AttentionSelection, AttentionStore, capture_attention, default_downsample
from instdiff.config import EditConfig, Inpaint, Method, PromptMode
from instdiff.errors import EditInputError
from instdiff.masks import diffedit_mask, instdiffedit_mask, resize_mask, steps_for_strength
from instdiff.models import ModelBundle
from instdiff.types import EditResult

log = logging.getLogger(__name__)


EditorFn = Callable[[ModelBundle, torch.Tensor, Sequence[str], Sequence[str], EditConfig, Sequence[int]], EditResult]
EDITORS: dict[Method, EditorFn] = {}


def register(method: Method) -> Callable[[EditorFn], EditorFn]:
    """Register an editor function for ``method`` (FISEdit registers itself from ``instdiff.sparse``)."""

    def deco(fn: EditorFn) -> EditorFn:
        EDITORS[Method(method)] = fn
        return fn

    return deco


# ---- validation -------------------------------------------------------------------------------
def check_images(bundle: ModelBundle, images: torch.Tensor) -> None:
    """Raise :class:`EditInputError` unless ``images`` is (B, 3, H, W) with H, W multiples of the UNet's step."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EditInputError(f"images must be a (B, 3, H, W) tensor in [-1, 1]; got {shape}")
    m = size_multiple(bundle)
    h, w = images.shape[-2:]
    if h % m or w % m:
        raise EditInputError(
            f"image size {w}x{h} is not a multiple of {m} (VAE factor × UNet downsampling); "
            "resize or pad first (instdiff.imageio.prepare_image does either)"
        )
    if images.min() < -1.001 or images.max() > 1.001:
        raise EditInputError("image values must be in [-1, 1] (use instdiff.imageio.to_model_tensor)")


def size_multiple(bundle: ModelBundle) -> int:
    """Image sides must be multiples of this: VAE factor × 2^(UNet down blocks − 1)."""
    return bundle.vae_scale_factor * 2 ** (len(bundle.unet.config.block_out_channels) - 1)


def check_prompts(bundle: ModelBundle, prompts: Sequence[str], what: str) -> None:
    """Empty prompts are refused; prompts over CLIP's 77 tokens are truncated with a warning."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise EditInputError(f"{what} prompt #{i} is empty; a non-empty text is required")
        n = bundle.token_count(p)
        limit = bundle.tokenizer.model_max_length
        if n > limit:
            log.warning("%s prompt #%d has %d tokens; CLIP reads %d, the rest is truncated", what, i, n, limit)


def edit_words(source: str, target: str) -> str:
    """Words of ``target`` that are not in ``source`` (the edit phrase); the whole target if none."""
    src = set(source.lower().split())
    words = [w for w in target.split() if w.lower() not in src]
    return " ".join(words) if words else target


# ---- shared machinery -------------------------------------------------------------------------
class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):  # type: ignore[no-untyped-def]
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def done(self) -> dict[str, float]:
        self._sync()
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Counter:
    """Counts UNet evaluations (batch rows) per image."""

    def __init__(self, n_images: int) -> None:
        self.rows = 0
        self.n_images = n_images

    def __call__(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return unet(x, t, encoder_hidden_states=emb).sample

    @property
    def per_image(self) -> float:
        return self.rows / self.n_images


def make_noise(
    seeds: Sequence[int], n: int, shape: tuple[int, ...], generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """(B·n, *shape) standard normal noise; image i's n draws come from its own CPU generator, so a row's
    noise depends only on its seed, never on its batch-mates or the device."""
    gens = generators or [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return torch.cat([torch.randn((n, *shape), generator=g) for g in gens])


def to_epsilon(
    bundle: ModelBundle, scheduler: Any, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Noise estimate from a model output of any prediction type (epsilon, v_prediction, sample)."""
    kind = bundle.prediction_type
    if kind == "epsilon":
        return output
    a = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x
    if kind == "sample":
        return (x - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction type {kind!r}")


def _guided(
    counter: _Counter,
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free guidance with one UNet call on [uncond; cond]; ``extra`` channels are appended."""
    inp = torch.cat([x, x])
    if extra is not None:
        inp = torch.cat([inp, torch.cat([extra, extra])], dim=1)
    out = counter(unet, inp, t, torch.cat([uncond, cond]))
    out_u, out_c = out.chunk(2)
    return out_u + guidance * (out_c - out_u)


def _embeddings(bundle: ModelBundle, prompts: Sequence[str], repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    cond = bundle.encode_prompt(list(prompts)).repeat_interleave(repeat, dim=0)
    uncond = bundle.encode_prompt([""]).expand(cond.shape[0], -1, -1)
    return cond, uncond


def _timesteps(bundle: ModelBundle, steps: int, strength: float) -> tuple[Any, torch.Tensor]:
    sched = bundle.fresh_scheduler()
    sched.set_timesteps(steps, device=bundle.device)
    k = steps_for_strength(steps, strength)
    return sched, sched.timesteps[-k:]


def _noised(sched: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """q(x_t | x_0) with fixed noise; ``t=None`` is the clean latent (after the last step)."""
    if t is None:
        return x0
    return sched.add_noise(x0, noise, t.reshape(1).to(x0.device))


def _pixel_mask(bundle: ModelBundle, mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return resize_mask(mask.bool(), hw)


def _finish(
    bundle: ModelBundle,
    images: torch.Tensor,
    latents: torch.Tensor,
    mask_lat: torch.Tensor,
    cfg: EditConfig,
    clock: _Clock,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and, with ``paste_back``, keep the input's pixels outside the mask."""
    with clock.stage("decode"):
        out = bundle.decode_latents(latents)
    mask_px = _pixel_mask(bundle, mask_lat, tuple(images.shape[-2:]))
    if cfg.paste_back:
        m = mask_px.to(out.dtype)
        out = m * out + (1 - m) * images.to(out.device, out.dtype)
    return out.float().cpu(), mask_px.cpu()


def inpaint(
    bundle: ModelBundle,
    images: torch.Tensor,
    x0: torch.Tensor,
    mask_lat: torch.Tensor,
    prompts: Sequence[str],
    cfg: EditConfig,
    gens: list[torch.Generator],
    counter: _Counter,
) -> torch.Tensor:
    """Regenerate the masked region of ``x0`` with ``prompts``; returns latents (B, C, h, w).

    With the bundle's inpainting UNet (9 input channels: latents, mask, masked-image latents) this is SD's
    inpainting; otherwise latent blending: after every step the unmasked region is reset to q(x_t | x_0).
    """
    mode = Inpaint(cfg.inpaint)
    use_unet = bundle.inpaint_unet is not None and mode in (Inpaint.AUTO, Inpaint.UNET)
    if mode is Inpaint.UNET and bundle.inpaint_unet is None:
        raise EditInputError("inpaint='unet' needs a bundle with an inpainting UNet (--inpaint-model)")
    steps = cfg.inpaint_steps or cfg.steps
    sched, timesteps = _timesteps(bundle, steps, cfg.inpaint_strength)
    noise = make_noise([], 1, tuple(x0.shape[1:]), gens).to(bundle.device, bundle.dtype)
    cond, uncond = _embeddings(bundle, prompts, 1)
    m = mask_lat.to(bundle.dtype)
    if cfg.inpaint_strength >= 1.0:
        x = noise * sched.init_noise_sigma
    else:
        x = _noised(sched, x0, noise, timesteps[0])
    extra = None
    if use_unet:
        mask_px = _pixel_mask(bundle, mask_lat, tuple(images.shape[-2:])).to(images.device)
        masked = images * (~mask_px).to(images.dtype)
        extra = torch.cat([m, bundle.encode_images(masked)], dim=1)
    unet = bundle.inpaint_unet if use_unet else bundle.unet
    for i, t in enumerate(timesteps):
        eps = _guided(counter, unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance, extra)
        x = sched.step(eps, t, x).prev_sample
        if not use_unet:
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x = m * x + (1 - m) * _noised(sched, x0, noise, t_prev)
    return x


# ---- InstDiffEdit -----------------------------------------------------------------------------
@register(Method.INSTDIFFEDIT)
def instdiffedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """InstDiffEdit, batched over images; n parallel noises per image share one mask."""
    clock = _Clock(bundle.device)
    b, n = images.shape[0], cfg.n_noises
    counter = _Counter(b)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    # 1. encode the images and draw n noises per image
    with clock.stage("encode"):
        x0 = bundle.encode_images(images)  # (B, C, h, w)
    latent_hw = tuple(x0.shape[-2:])
    noise = make_noise(seeds, n, tuple(x0.shape[1:]), gens).to(bundle.device, bundle.dtype)  # (B·n, C, h, w)
    x0n = x0.repeat_interleave(n, dim=0)
    # 2. condition on the target prompt (or its edit words), CFG against the empty prompt
    prompts = list(target_prompts)
    if PromptMode(cfg.prompt_mode) is PromptMode.EDIT_WORDS:
        prompts = [edit_words(s, t) for s, t in zip(source_prompts, target_prompts, strict=True)]
    cond, uncond = _embeddings(bundle, prompts, n)
    limit = bundle.tokenizer.model_max_length
    n_tokens = torch.tensor([min(bundle.token_count(p), limit) for p in prompts], device=bundle.device)
    sched, timesteps = _timesteps(bundle, cfg.steps, cfg.strength)
    factor = cfg.attention_downsample or bundle.defaults.get("attention_downsample") or default_downsample(bundle.unet)
    store = AttentionStore(cond_rows=slice(b * n, 2 * b * n))
    selection = AttentionSelection(downsample=factor)
    # 3. denoise from τ = r·T; every step: instant mask from the recorded maps, then blend (Eq. 5)
    x = _noised(sched, x0n, noise, timesteps[0])
    position, running, mask = None, None, None
    mask_history = []
    with clock.stage("denoise"), capture_attention(bundle.unet, store, selection, latent_hw):
        for i, t in enumerate(timesteps):
            store.step = i
            eps = _guided(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance)
            maps = store.mean(i)  # (B·n, T, ha, wa)
            maps = maps.view(b, n, *maps.shape[1:]).mean(dim=1)  # (B, T, ha, wa)
            store.maps.pop(i)
            running = maps if running is None else running + maps
            use = running / (i + 1) if cfg.mask.running_mean else maps
            mask, _, position = instdiffedit_mask(use, n_tokens, latent_hw, cfg.mask, position)
            mask_history.append(mask.float().mean().item())
            x_prev = sched.step(eps, t, x).prev_sample
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
            m = mask.repeat_interleave(n, dim=0).to(x.dtype)
            x = m * x_prev + (1 - m) * _noised(sched, x0n, noise, t_prev)
    assert mask is not None
    # 4. final: inpaint the input inside the last mask with the target prompt
    with clock.stage("inpaint"):
        if Inpaint(cfg.inpaint) is Inpaint.NONE:
            latents = x.view(b, n, *x.shape[1:])[:, 0]
        else:
            latents = inpaint(
                bundle, images.to(bundle.device, bundle.dtype), x0, mask, target_prompts, cfg, gens, counter
            )
    out, mask_px = _finish(bundle, images, latents, mask, cfg, clock)
    extras = {"position": position.cpu(), "mask_area_per_step": mask_history, "attention_downsample": factor}
    return EditResult(out, mask_px, clock.done(), counter.per_image, extras)


# ---- SDEdit -----------------------------------------------------------------------------------
@register(Method.SDEDIT)
def sdedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """SDEdit: noise the input to strength r and denoise with the target prompt. Mask = whole image."""
    clock = _Clock(bundle.device)
    b = images.shape[0]
    counter = _Counter(b)
    with clock.stage("encode"):
        x0 = bundle.encode_images(images)
    noise = make_noise(seeds, 1, tuple(x0.shape[1:])).to(bundle.device, bundle.dtype)
    cond, uncond = _embeddings(bundle, target_prompts, 1)
    sched, timesteps = _timesteps(bundle, cfg.steps, cfg.strength)
    x = _noised(sched, x0, noise, timesteps[0])
    with clock.stage("denoise"):
        for t in timesteps:
            eps = _guided(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance)
            x = sched.step(eps, t, x).prev_sample
    mask = torch.ones(b, 1, *x0.shape[-2:], dtype=torch.bool, device=x0.device)
    out, mask_px = _finish(bundle, images, x, mask, cfg.with_(paste_back=False), clock)
    return EditResult(out, mask_px, clock.done(), counter.per_image)


# ---- DiffEdit ---------------------------------------------------------------------------------
@register(Method.DIFFEDIT)
def diffedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """DiffEdit: mask from |ε(x_t, target) − ε(x_t, source)| over noises, DDIM inversion, masked decoding."""
    clock = _Clock(bundle.device)
    b, nd = images.shape[0], cfg.diffedit_noises
    counter = _Counter(b)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with clock.stage("encode"):
        x0 = bundle.encode_images(images)
    sched, timesteps = _timesteps(bundle, cfg.steps, cfg.strength)
    src_emb = bundle.encode_prompt(list(source_prompts))
    tgt_emb = bundle.encode_prompt(list(target_prompts))
    # 1. mask: both prompts on the same noised latents, thresholded per image
    with clock.stage("mask"):
        mask_sched, mask_ts = _timesteps(bundle, cfg.steps, cfg.diffedit_mask_strength)
        t_m = mask_ts[0]
        noise = make_noise(seeds, nd, tuple(x0.shape[1:]), gens).to(bundle.device, bundle.dtype)
        xt = _noised(mask_sched, x0.repeat_interleave(nd, dim=0), noise, t_m)
        emb = torch.cat([src_emb.repeat_interleave(nd, 0), tgt_emb.repeat_interleave(nd, 0)])
        out = counter(bundle.unet, torch.cat([xt, xt]), t_m, emb)
        eps = to_epsilon(bundle, mask_sched, out, torch.cat([xt, xt]), t_m)
        eps_src, eps_tgt = eps.chunk(2)
        mask, _ = diffedit_mask(eps_src.float(), eps_tgt.float(), nd, cfg.diffedit_threshold)
    # 2. deterministic DDIM inversion of the input with the source prompt, keeping every latent
    with clock.stage("invert"):
        inverted = ddim_invert(bundle, sched, x0, src_emb, timesteps, counter)
    # 3. decode with the target prompt; outside the mask follow the inversion trajectory
    cond, uncond = _embeddings(bundle, target_prompts, 1)
    m = mask.to(bundle.dtype)
    x = inverted[0]
    with clock.stage("denoise"):
        for i, t in enumerate(timesteps):
            eps = _guided(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance)
            x = sched.step(eps, t, x).prev_sample
            x = m * x + (1 - m) * inverted[i + 1]
    out_img, mask_px = _finish(bundle, images, x, mask, cfg, clock)
    return EditResult(out_img, mask_px, clock.done(), counter.per_image)


def ddim_invert(
    bundle: ModelBundle, sched: Any, x0: torch.Tensor, emb: torch.Tensor, timesteps: torch.Tensor, counter: _Counter
) -> list[torch.Tensor]:
    """DDIM inversion (η = 0) of x0 up to ``timesteps[0]``; returns latents aligned with the denoising loop:
    ``out[i]`` is the latent at ``timesteps[i]`` and ``out[-1]`` is x0."""
    alphas = sched.alphas_cumprod.to(bundle.device)
    ascending = list(timesteps.flip(0))
    x = x0
    a_prev = torch.tensor(1.0, device=bundle.device)
    trail = [x0]
    for t in ascending:
        out = counter(bundle.unet, x, t, emb)
        eps = to_epsilon(bundle, sched, out, x, t)
        a_t = alphas[int(t)].to(x.dtype)
        x0_pred = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        x = a_t.sqrt() * x0_pred + (1 - a_t).sqrt() * eps
        a_prev = a_t
        trail.append(x)
    return trail[::-1]


# ---- FISEdit ----------------------------------------------------------------------------------
@register(Method.FISEDIT)
def fisedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """FISEdit for prompt pairs: generate each source prompt with its per-step cache, then re-generate sparsely
    with the target prompt (``instdiff.sparse``). FISEdit edits its own generations, so ``images`` only fix the
    output size; they should be ``generate(bundle, source_prompts, cfg.steps, cfg.guidance, seeds)``, which draws
    the same initial noise per seed as the session and so equals ``extras["source_images"]``.
    """
    from instdiff.sparse import FISEditConfig, fisedit_edit_pairs

    # the difference mask comes from steps 5-10 of 50 in the paper: keep those fractions at other step counts
    mask_steps = max(1, round(cfg.steps * 0.2))
    fcfg = FISEditConfig(
        num_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        image_size=int(images.shape[-1]),
        mask_steps=mask_steps,
        mask_from=max(1, min(mask_steps, round(cfg.steps * 0.1))),
    )
    return fisedit_edit_pairs(bundle, source_prompts, target_prompts, fcfg, list(seeds))


# ---- the contract -----------------------------------------------------------------------------
def edit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig = EditConfig(),
    seeds: Sequence[int] | None = None,
) -> EditResult:
    """Edit a batch of images with ``cfg.method``. ``seeds`` per image (default: ``cfg.seed`` for all)."""
    check_images(bundle, images)
    b = images.shape[0]
    if len(source_prompts) != b or len(target_prompts) != b:
        raise EditInputError(
            f"got {b} images, {len(source_prompts)} source and {len(target_prompts)} target prompts; one each per image"
        )
    check_prompts(bundle, target_prompts, "target")
    method = Method(cfg.method)
    if cfg.needs_source_prompt:
        check_prompts(bundle, source_prompts, "source")
    seeds = list(seeds) if seeds is not None else [cfg.seed] * b
    if len(seeds) != b:
        raise EditInputError(f"got {len(seeds)} seeds for {b} images")
    try:
        fn = EDITORS[method]
    except KeyError:
        raise EditInputError(
            f"unknown method {cfg.method!r}; accepted: {', '.join(m.value for m in EDITORS)}"
        ) from None
    with torch.inference_mode():
        return fn(bundle, images.to(bundle.device, bundle.dtype), source_prompts, target_prompts, cfg, seeds)


@torch.inference_mode()
def generate(
    bundle: ModelBundle,
    prompts: Sequence[str],
    steps: int = 50,
    guidance: float = 7.5,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Text-to-image with DDIM and CFG; images (B, 3, H, W) in [-1, 1] (used for prompt-pair datasets)."""
    check_prompts(bundle, prompts, "generation")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    side = bundle.unet.config.sample_size
    shape = (bundle.latent_channels, side, side)
    counter = _Counter(len(prompts))
    sched, timesteps = _timesteps(bundle, steps, 1.0)
    x = make_noise(seeds, 1, shape).to(bundle.device, bundle.dtype) * sched.init_noise_sigma
    cond, uncond = _embeddings(bundle, prompts, 1)
    for t in timesteps:
        eps = _guided(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, guidance)
        x = sched.step(eps, t, x).prev_sample
    return bundle.decode_latents(x).cpu()


def expected_unet_calls(cfg: EditConfig, inpaint_unet: bool = False) -> float:
    """UNet evaluations per image implied by ``cfg`` (used by tests and reports)."""
    k = steps_for_strength(cfg.steps, cfg.strength)
    method = Method(cfg.method)
    if method is Method.SDEDIT:
        return 2.0 * k
    if method is Method.DIFFEDIT:
        return 2.0 * cfg.diffedit_noises + k + 2.0 * k
    if method is Method.INSTDIFFEDIT:
        calls = 2.0 * cfg.n_noises * k
        if Inpaint(cfg.inpaint) is not Inpaint.NONE:
            calls += 2.0 * steps_for_strength(cfg.inpaint_steps or cfg.steps, cfg.inpaint_strength)
        return calls
    raise ValueError(f"no closed form for {method.value}")
