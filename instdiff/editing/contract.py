"""The editor contract: ``edit(bundle, images, source_prompts, target_prompts, cfg, seeds) -> EditResult``.

Every method is called the same way and returns the same result type (one sampler signature, as in
k-diffusion), so the CLI, the batch job and the benchmarks never special-case a method. Editors register
themselves in :data:`EDITORS` with :func:`register`; :func:`edit` checks the inputs once for all of them.
Also here: :func:`generate` (text-to-image, for prompt-pair datasets and FISEdit's sources) and
:func:`expected_unet_calls` (the closed-form cost of a config). The prompt and seed checks are
:mod:`instdiff.inputs` (shared with the FISEdit session; :mod:`instdiff.editing` re-exports
:func:`~instdiff.inputs.check_prompts`).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Inpaint, Method
from instdiff.errors import EditInputError
from instdiff.inputs import check_prompts, check_seeds
from instdiff.masks import steps_for_strength
from instdiff.sampling import UNetCounter, embeddings, guided_eps, initial_latents, schedule
from instdiff.types import EditResult

log = logging.getLogger(__name__)

EditorFn = Callable[[ModelBundle, torch.Tensor, Sequence[str], Sequence[str], EditConfig, Sequence[int]], EditResult]
"""``(bundle, images, source_prompts, target_prompts, cfg, seeds) -> EditResult``, inputs already checked."""

EDITORS: dict[Method, EditorFn] = {}
"""The registered editors by method (filled by the editor modules of :mod:`instdiff.editing`)."""


def register(method: Method) -> Callable[[EditorFn], EditorFn]:
    """Decorator: register an editor function for ``method`` in :data:`EDITORS`.

    Args:
        method: the method the function implements.

    Returns:
        A decorator that registers its function and returns it unchanged.
    """

    def deco(fn: EditorFn) -> EditorFn:
        EDITORS[Method(method)] = fn
        return fn

    return deco


# ---- input checks -----------------------------------------------------------------------------------------
def size_multiple(bundle: ModelBundle) -> int:
    """Image sides must be multiples of this: VAE factor × 2^(UNet down blocks − 1), in pixels."""
    return bundle.vae_scale_factor * 2 ** (len(bundle.unet.config.block_out_channels) - 1)


def check_images(bundle: ModelBundle, images: torch.Tensor) -> None:
    """Refuse images an editor cannot take.

    Args:
        bundle: the model (its size multiple).
        images: should be (B, 3, H, W) float in [-1, 1] with B >= 1 and H, W multiples of :func:`size_multiple`.

    Raises:
        EditInputError: another type or shape, an empty batch, sides not multiples of the step, values outside
            [-1, 1] or not finite (NaN, infinity).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EditInputError(f"images must be a (B, 3, H, W) tensor in [-1, 1]; got {shape}")
    if images.shape[0] == 0:
        raise EditInputError("images is an empty batch (B = 0); give at least one (3, H, W) image")
    m = size_multiple(bundle)
    h, w = images.shape[-2:]
    if h % m or w % m:
        raise EditInputError(
            f"image size {w}x{h} is not a multiple of {m} (VAE factor × UNet downsampling); "
            "resize or pad first (instdiff.imageio.fit_to_multiple does either)"
        )
    if not bool(torch.isfinite(images).all()):
        raise EditInputError("image values must be finite numbers in [-1, 1]; got NaN or infinity")
    if images.min() < -1.001 or images.max() > 1.001:
        raise EditInputError("image values must be in [-1, 1] (use instdiff.imageio.to_model_tensor)")


# ---- the contract -----------------------------------------------------------------------------------------
def edit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig = EditConfig(),
    seeds: Sequence[int] | None = None,
) -> EditResult:
    """Edit a batch of images with ``cfg.method``.

    Args:
        bundle: the models.
        images: (B, 3, H, W) float in [-1, 1] (see :func:`check_images`).
        source_prompts: B prompts describing the inputs (read only by the methods that need them).
        target_prompts: B prompts describing the wanted outputs.
        cfg: the method and its options.
        seeds: one integer seed per image (as ``torch.Generator.manual_seed`` takes); ``None`` uses ``cfg.seed``
            for all.

    Returns:
        The edited images (B, 3, H, W) in [-1, 1], masks (B, 1, H, W) bool, timings in seconds, UNet
        evaluations per image and method-specific extras.

    Raises:
        EditInputError: bad images, prompt or seed counts that do not match the images, prompts that are not
            strings or are empty, seeds that are not integers or out of range, an unregistered method.
    """
    check_images(bundle, images)
    b = images.shape[0]
    if len(source_prompts) != b or len(target_prompts) != b:
        raise EditInputError(
            f"got {b} images, {len(source_prompts)} source and {len(target_prompts)} target prompts; one each per image"
        )
    check_prompts(bundle, target_prompts, "target")
    method = cfg.method
    if cfg.needs_source_prompt:
        check_prompts(bundle, source_prompts, "source")
    seeds = check_seeds(seeds if seeds is not None else [cfg.seed] * b, b, "images")
    read = list(target_prompts) + (list(source_prompts) if cfg.needs_source_prompt else [])
    unknown = bundle.unknown_words(read)
    if unknown:
        log.warning(
            "words the model's tokenizer splits into letters (unknown to %s): %s", bundle.name, ", ".join(unknown)
        )
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
    """Text-to-image with DDIM and classifier-free guidance at the model's native size.

    Starts from :func:`instdiff.sampling.initial_latents`, as FISEdit's session does, so a seed gives the same
    x_T here and there (FISEdit edits its own generations of the source prompts).

    Args:
        bundle: the models.
        prompts: B prompts.
        steps: DDIM steps, >= 1.
        guidance: classifier-free guidance scale, a finite number.
        seeds: one integer seed per prompt; ``None`` uses 0, 1, …

    Returns:
        (B, 3, H, W) float32 images in [-1, 1] on the CPU.

    Raises:
        EditInputError: no prompts, a prompt that is not a string or is empty, steps < 1, a guidance that is not
            a finite number, seeds that are not one integer per prompt in range.
    """
    check_prompts(bundle, prompts, "generation")
    if len(prompts) == 0:
        raise EditInputError("no prompts given; generate needs at least one")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise EditInputError(f"steps must be an integer >= 1; got {steps!r}")
    if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise EditInputError(f"guidance must be a finite number; got {guidance!r}")
    seeds = check_seeds(seeds if seeds is not None else range(len(prompts)), len(prompts), "prompts")
    side = bundle.unet.config.sample_size
    counter = UNetCounter(len(prompts))
    sched, ts = schedule(bundle, steps, 1.0)
    x = initial_latents(bundle, sched, seeds, (bundle.latent_channels, side, side))
    cond, uncond = embeddings(bundle, prompts, 1)
    for t in ts:
        eps = guided_eps(counter, bundle.unet, sched.scale_model_input(x, t), t, cond, uncond, guidance)
        x = sched.step(eps, t, x).prev_sample
    return bundle.decode_latents(x).cpu()


def expected_unet_calls(cfg: EditConfig) -> float:
    """UNet evaluations per image implied by ``cfg`` (used by tests and reports).

    Args:
        cfg: an InstDiffEdit, SDEdit or DiffEdit config (the count does not depend on whether InstDiffEdit's
            final step uses the inpainting UNet or latent blending).

    Returns:
        Evaluations (batch rows) per image: 2 per guided step, 1 per conditional-only step. With
        ``mask_stable`` set, InstDiffEdit's count is an upper bound (the phase may end early).

    Raises:
        ValueError: FISEdit, whose count depends on the mask it finds.
    """
    k = steps_for_strength(cfg.steps, cfg.strength)
    method = cfg.method
    if method is Method.SDEDIT:
        return 2.0 * k
    if method is Method.DIFFEDIT:
        return 2.0 * cfg.diffedit_noises + k + 2.0 * k
    if method is Method.INSTDIFFEDIT:
        # the n-noise mask phase (an upper bound when mask_stable may end it early), then either the first
        # noise alone (inpaint none) or the final inpainting
        phase = k if cfg.mask_steps is None else min(cfg.mask_steps, k)
        calls = (2.0 if cfg.mask_guidance else 1.0) * cfg.n_noises * phase
        if cfg.inpaint is Inpaint.NONE:
            calls += 2.0 * (k - phase)
        else:
            r = cfg.inpaint_strength if cfg.inpaint_strength is not None else cfg.strength
            steps = k if cfg.inpaint_steps_match else cfg.inpaint_steps or cfg.steps
            calls += 2.0 * steps_for_strength(steps, r)
        return calls
    raise ValueError(f"no closed form for {method.value}")
