"""The shared denoising loop pieces every editor and the FISEdit session are built from.

One helper per job, so that two loops that must agree agree by construction: the stage clock, the UNet-call
counter, per-seed noise (:func:`make_noise`, :func:`initial_latents`), classifier-free guidance
(:func:`guided_eps`, Ho & Salimans 2022), prompt embeddings, DDIM timesteps at a noise strength
(:func:`schedule`, SDEdit's τ = r·T), the forward process q(x_t | x_0) (:func:`noised`), conversion of any
prediction type to ε (:func:`to_epsilon`), decoding with paste-back (:func:`finish`), inpainting inside a mask
(:func:`inpaint`) and DDIM inversion (:func:`ddim_invert`, Song et al. 2021, η = 0).

This module sits below :mod:`instdiff.editing` and :mod:`instdiff.sparse` (both import it, it imports
neither), so the editors' package can import the sparse engine without a cycle. Latents are (B, C, h, w) in
the bundle's dtype on its device; images (B, 3, H, W) float in [-1, 1].
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Inpaint
from instdiff.errors import EditInputError
from instdiff.masks import resize_mask, steps_for_strength

log = logging.getLogger(__name__)

UNetCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(unet, x, t, emb) -> output``: one UNet evaluation (a :class:`UNetCounter` or :func:`unet_output`)."""


# ---- bookkeeping -----------------------------------------------------------------------------------------
class Clock:
    """Wall-clock seconds per named stage, with device synchronisation around each stage.

    Args:
        device: the device whose queued work a stage waits for (CUDA only).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """``with clock.stage("denoise"): ...`` adds the block's seconds to ``timings[name]``."""
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def done(self) -> dict[str, float]:
        """The stage timings plus ``total`` (seconds since the clock was made)."""
        self._sync()
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def unet_output(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """One UNet evaluation.

    Args:
        unet: a ``UNet2DConditionModel`` (or the sparse engine's wrapped one).
        x: (N, Cin, h, w) latents (with any extra input channels).
        t: the timestep (0-d or (N,)).
        emb: (N, 77, D) text conditioning.

    Returns:
        (N, C, h, w) model output (ε, v or x₀ by the scheduler's prediction type).
    """
    return unet(x, t, encoder_hidden_states=emb).sample


class UNetCounter:
    """Counts UNet evaluations (batch rows) while running them; a :data:`UNetCall`.

    Args:
        n_images: images the rows are spread over (for :attr:`per_image`).
    """

    def __init__(self, n_images: int) -> None:
        self.rows = 0
        self.n_images = n_images

    def __call__(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Run :func:`unet_output` and count ``x``'s rows."""
        self.rows += x.shape[0]
        return unet_output(unet, x, t, emb)

    @property
    def per_image(self) -> float:
        """UNet evaluations per image so far."""
        return self.rows / self.n_images


# ---- noise, conditioning, schedule -------------------------------------------------------------------
def make_noise(
    seeds: Sequence[int], n: int, shape: tuple[int, ...], generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Standard normal noise drawn per image from its own CPU generator.

    A row's noise depends only on its seed, never on its batch-mates or the device.

    Args:
        seeds: one seed per image (ignored when ``generators`` is given).
        n: draws per image (adjacent in the result).
        shape: shape of one draw, e.g. (C, h, w).
        generators: per-image generators to continue drawing from, instead of fresh ones from ``seeds``.

    Returns:
        (B·n, *shape) float32 on the CPU.
    """
    gens = generators or [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return torch.cat([torch.randn((n, *shape), generator=g) for g in gens])


def initial_latents(bundle: ModelBundle, sched: Any, seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The starting latents x_T of text-to-image sampling, one per seed.

    :func:`instdiff.editing.generate` and :meth:`instdiff.sparse.FISEditSession.generate` both start here, so a
    seed gives both the same x_T.

    Args:
        bundle: where the latents go (device, dtype).
        sched: the scheduler (its ``init_noise_sigma``).
        seeds: one seed per image.
        shape: (C, h, w) of one latent.

    Returns:
        (B, C, h, w) in the bundle's dtype on its device.
    """
    return make_noise(seeds, 1, shape).to(bundle.device, bundle.dtype) * sched.init_noise_sigma


def embeddings(bundle: ModelBundle, prompts: Sequence[str], repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional (empty prompt) text embeddings for classifier-free guidance.

    Args:
        bundle: the text encoder.
        prompts: B prompts.
        repeat: rows per prompt (adjacent), e.g. InstDiffEdit's parallel noises.

    Returns:
        ``(cond, uncond)``, each (B·repeat, 77, D).
    """
    cond = bundle.encode_prompt(list(prompts)).repeat_interleave(repeat, dim=0)
    uncond = bundle.encode_prompt([""]).expand(cond.shape[0], -1, -1)
    return cond, uncond


def make_scheduler(bundle: ModelBundle, steps: int) -> Any:
    """A fresh DDIM scheduler of the bundle's config set to ``steps`` steps on the bundle's device.

    Raises:
        EditInputError: ``steps`` puts a timestep past the scheduler's training steps (:func:`set_steps`).
    """
    return set_steps(bundle.fresh_scheduler(), steps, bundle.device)


def set_steps(sched: Any, steps: int, device: Any = None) -> Any:
    """Set a DDIM scheduler to ``steps`` steps, refusing a count its training schedule cannot hold.

    Args:
        sched: a fresh ``DDIMScheduler`` (e.g. built from a model folder's scheduler config alone).
        steps: the sampling steps.
        device: where the timesteps live (``None``: the CPU).

    Returns:
        ``sched``, with its timesteps set.

    Raises:
        EditInputError: ``steps`` puts a timestep past the scheduler's training steps (with diffusers'
            ``steps_offset`` = 1, as SD's scheduler has, 1000 steps of a 1000-step schedule reach t = 1000).
    """
    train = int(sched.config.num_train_timesteps)
    if steps > train:
        raise EditInputError(f"steps: at most {train} (the scheduler's training steps); got {steps}")
    sched.set_timesteps(steps, device=device)
    if int(sched.timesteps.max()) >= len(sched.alphas_cumprod):
        raise EditInputError(
            f"steps: {steps} puts a timestep at {int(sched.timesteps.max())}, past this scheduler's {train} "
            f"training steps; use fewer (at most {train - 1} here)"
        )
    return sched


def schedule(bundle: ModelBundle, steps: int, strength: float) -> tuple[Any, torch.Tensor]:
    """The scheduler and the last ⌊r·steps⌋ (at least one) of its timesteps (SDEdit: start from τ = r·T).

    Args:
        bundle: the scheduler config and device.
        steps: steps of the full schedule.
        strength: noise strength r in (0, 1].

    Returns:
        ``(scheduler, timesteps)``, timesteps (k,) long in denoising order.
    """
    sched = make_scheduler(bundle, steps)
    k = steps_for_strength(steps, strength)
    return sched, sched.timesteps[-k:]


def noised(sched: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """q(x_t | x_0) with fixed noise: √ᾱ_t·x0 + √(1−ᾱ_t)·noise (DDPM, Ho et al. 2020, Eq. 4).

    Args:
        sched: the scheduler (its ``add_noise``).
        x0: (N, C, h, w) clean latents.
        noise: (N, C, h, w) noise.
        t: the timestep; ``None`` is "after the last step" and returns ``x0``.

    Returns:
        (N, C, h, w) noised latents.
    """
    if t is None:
        return x0
    return sched.add_noise(x0, noise, t.reshape(1).to(x0.device))


def to_epsilon(
    bundle: ModelBundle, scheduler: Any, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Noise estimate from a model output of any prediction type (epsilon, v_prediction, sample).

    v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022), so ε = √ᾱ·v + √(1−ᾱ)·x_t; from x₀: ε = (x_t − √ᾱ·x₀)/√(1−ᾱ).

    Args:
        bundle: its scheduler's prediction type.
        scheduler: the scheduler (its ``alphas_cumprod``).
        output: (N, C, h, w) model output.
        x: (N, C, h, w) the latents the model saw.
        t: the timestep.

    Returns:
        (N, C, h, w) ε.

    Raises:
        ValueError: a prediction type none of the above.
    """
    kind = bundle.prediction_type
    if kind == "epsilon":
        return output
    a = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x
    if kind == "sample":
        return (x - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction type {kind!r}")


def guided_eps(
    call: UNetCall,
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + w·(out_c − out_u), one UNet call on [x; x].

    Args:
        call: runs (and may count) the UNet.
        unet: the UNet.
        x: (N, C, h, w) latents (already ``scale_model_input``-ed where the scheduler needs it).
        t: the timestep.
        cond: (N, 77, D) conditional embeddings.
        uncond: (N, 77, D) unconditional embeddings; ``None`` runs the conditional branch alone (no guidance).
        guidance: the guidance scale w.
        extra: (N, Ce, h, w) channels appended to the input (the inpainting UNet's mask and masked image).

    Returns:
        (N, C, h, w) guided model output.
    """
    if uncond is None:
        inp = x if extra is None else torch.cat([x, extra], dim=1)
        return call(unet, inp, t, cond)
    inp = torch.cat([x, x])
    if extra is not None:
        inp = torch.cat([inp, torch.cat([extra, extra])], dim=1)
    out = call(unet, inp, t, torch.cat([uncond, cond]))
    out_u, out_c = out.chunk(2)
    return out_u + guidance * (out_c - out_u)


# ---- masks and output ----------------------------------------------------------------------------------
def pixel_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A latent-grid mask at image resolution (:func:`instdiff.masks.resize_mask` on bool).

    Args:
        mask: (B, 1, h, w) bool or 0/1 float on the latent grid.
        hw: (H, W) of the images.

    Returns:
        (B, 1, H, W) bool.
    """
    return resize_mask(mask.bool(), hw)


def finish(
    bundle: ModelBundle,
    images: torch.Tensor,
    latents: torch.Tensor,
    mask_lat: torch.Tensor,
    paste_back: bool,
    clock: Clock,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the edited latents and, with ``paste_back``, keep the input's pixels outside the mask.

    Args:
        bundle: the VAE.
        images: (B, 3, H, W) in [-1, 1], the inputs.
        latents: (B, C, h, w) edited latents.
        mask_lat: (B, 1, h, w) bool edit mask on the latent grid.
        paste_back: composite the input back outside the mask, in pixel space.
        clock: times the ``decode`` stage.

    Returns:
        ``(images (B, 3, H, W) float32 in [-1, 1], masks (B, 1, H, W) bool)``, both on the CPU.
    """
    with clock.stage("decode"):
        out = bundle.decode_latents(latents)
    mask_px = pixel_mask(mask_lat, tuple(images.shape[-2:]))
    if paste_back:
        m = mask_px.to(out.dtype)
        out = m * out + (1 - m) * images.to(out.device, out.dtype)
    return out.float().cpu(), mask_px.cpu()


# ---- inpainting and inversion -------------------------------------------------------------------------------
def inpaint(
    bundle: ModelBundle,
    images: torch.Tensor,
    x0: torch.Tensor,
    mask_lat: torch.Tensor,
    prompts: Sequence[str],
    cfg: EditConfig,
    gens: list[torch.Generator],
    counter: UNetCall,
) -> torch.Tensor:
    """Regenerate the masked region of ``x0`` with ``prompts`` (InstDiffEdit §3.3's final step).

    With the bundle's inpainting UNet (9 input channels: latents, mask, masked-image latents) this is SD's
    inpainting; otherwise latent blending (Avrahami et al. 2023, Blended Latent Diffusion): after every step
    the unmasked region is reset to q(x_t | x_0).

    Args:
        bundle: the models.
        images: (B, 3, H, W) in [-1, 1], on the bundle's device and dtype.
        x0: (B, C, h, w) latents of ``images``.
        mask_lat: (B, 1, h, w) bool region to regenerate.
        prompts: B target prompts.
        cfg: ``inpaint``, ``inpaint_steps`` (or ``inpaint_steps_match``), ``inpaint_strength`` (``None``:
            ``strength``), ``steps``,
            ``guidance``.
        gens: per-image generators to draw the noise from (continuing the editor's draws).
        counter: runs and counts the UNet.

    Returns:
        (B, C, h, w) latents.

    Raises:
        EditInputError: ``inpaint='unet'`` without an inpainting UNet in the bundle.
    """
    mode = cfg.inpaint
    use_unet = bundle.inpaint_unet is not None and mode in (Inpaint.AUTO, Inpaint.UNET)
    if mode is Inpaint.UNET and bundle.inpaint_unet is None:
        raise EditInputError("inpaint='unet' needs a bundle with an inpainting UNet (--inpaint-model)")
    steps = cfg.inpaint_steps or cfg.steps
    if cfg.inpaint_steps_match:
        steps = steps_for_strength(cfg.steps, cfg.strength)
    strength = cfg.inpaint_strength if cfg.inpaint_strength is not None else cfg.strength
    sched, ts = schedule(bundle, steps, strength)
    noise = make_noise([], 1, tuple(x0.shape[1:]), gens).to(bundle.device, bundle.dtype)
    cond, uncond = embeddings(bundle, prompts, 1)
    m = mask_lat.to(bundle.dtype)
    if strength >= 1.0:
        x = noise * sched.init_noise_sigma
    else:
        x = noised(sched, x0, noise, ts[0])
    extra = None
    if use_unet:
        mask_px = pixel_mask(mask_lat, tuple(images.shape[-2:])).to(images.device)
        masked = images * (~mask_px).to(images.dtype)
        extra = torch.cat([m, bundle.encode_images(masked)], dim=1)
    unet = bundle.inpaint_unet if use_unet else bundle.unet
    for i, t in enumerate(ts):
        eps = guided_eps(counter, unet, sched.scale_model_input(x, t), t, cond, uncond, cfg.guidance, extra)
        x = sched.step(eps, t, x).prev_sample
        if not use_unet:
            t_prev = ts[i + 1] if i + 1 < len(ts) else None
            x = m * x + (1 - m) * noised(sched, x0, noise, t_prev)
    return x


def inversion_start_alpha(sched: Any) -> torch.Tensor:
    """ᾱ that DDIM inversion assigns to the clean latent: diffusers' ``DDIMInverseScheduler`` built from this
    scheduler's config (as its DiffEdit pipeline does) starts from ``alphas_cumprod[0]`` unless the config's
    ``set_alpha_to_one`` is true (SD's is false: ᾱ_0 ≈ 0.99915), then from 1.

    Args:
        sched: a DDIM-family scheduler (``alphas_cumprod``, ``config``).

    Returns:
        0-d float32 tensor on the CPU.
    """
    if bool(sched.config.get("set_alpha_to_one", True)):
        return torch.tensor(1.0)
    return sched.alphas_cumprod[0].float().cpu()


def blend_timestep(timesteps: torch.Tensor, i: int, current: bool) -> torch.Tensor | None:
    """The noise level the input is blended at after denoising step ``i`` (InstDiffEdit Eq. 5).

    The paper blends the new latent x_{t_prev} with q(x_{t_prev} | x_0); the official loop blends it with the
    input noised to the current step's t (one step noisier) — ``current=True``.

    Args:
        timesteps: (k,) the loop's timesteps in denoising order.
        i: the step just taken (from ``timesteps[i]``).
        current: the official code's choice.

    Returns:
        The timestep, or ``None`` for "after the last step" (the clean input, :func:`noised`).
    """
    if current:
        return timesteps[i]
    return timesteps[i + 1] if i + 1 < len(timesteps) else None


def ddim_invert(
    bundle: ModelBundle, sched: Any, x0: torch.Tensor, emb: torch.Tensor, timesteps: torch.Tensor, counter: UNetCall
) -> list[torch.Tensor]:
    """Deterministic DDIM inversion (η = 0; Song et al. 2021, Eq. 13 run forward) of x0 up to ``timesteps[0]``.

    Step for step as diffusers' ``DDIMInverseScheduler`` (the UNet at the step's target t, applied to the
    latent one level below; the clean latent at ᾱ of :func:`inversion_start_alpha`).

    Args:
        bundle: the UNet, device and prediction type.
        sched: the scheduler (its ``alphas_cumprod``).
        x0: (B, C, h, w) clean latents.
        emb: (B, 77, D) conditioning (DiffEdit: the source prompt, no guidance).
        timesteps: (k,) the denoising loop's timesteps, in denoising order.
        counter: runs and counts the UNet.

    Returns:
        k + 1 latents (B, C, h, w) aligned with the denoising loop: ``out[i]`` is the latent at
        ``timesteps[i]`` and ``out[-1]`` is x0.
    """
    alphas = sched.alphas_cumprod.to(bundle.device)
    ascending = list(timesteps.flip(0))
    x = x0
    a_prev = inversion_start_alpha(sched).to(bundle.device)
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
