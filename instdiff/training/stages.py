"""The three training stages of the shapes-world model and what they share.

* :func:`train_vae`: AutoencoderKL on L1 + L2 + a small KL term (cosine learning-rate decay);
* :func:`train_unet`: CLIP text encoder + UNet jointly on the DDPM ε loss (Ho et al. 2020, Eq. 14) with
  optional min-SNR-γ weighting (Hang et al. 2023), caption dropout for classifier-free guidance, an EMA of the
  weights, and optionally the token grounding loss of :mod:`instdiff.training.grounding`;
* :func:`train_inpaint`: the inpainting UNet on (noisy latents, mask, masked-image latents), as SD's
  inpainting model was trained;

with the pieces around them: :class:`Ema`, :class:`LossLog`, :func:`stage_timer`, the step budget, the
learning-rate warm-up, :func:`encode_dataset` and :func:`vae_psnr`. Every stage runs under bf16 autocast when
``amp`` is set, and returns the number of steps it did (fewer than planned when ``max_seconds`` ran out).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from instdiff.imageio import to_model_tensor
from instdiff.training.config import InpaintConfig, UNetConfig, VaeConfig
from instdiff.training.data import ShapesData, random_inpaint_masks
from instdiff.training.grounding import grounding_loss, install_grounding

log = logging.getLogger(__name__)


# ---- shared pieces ---------------------------------------------------------------------------------------------
class Ema:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up of the decay.

    Args:
        params: the parameters to average (a float32 shadow copy is kept).
        decay: the decay after warm-up, e.g. 0.999.
    """

    def __init__(self, params: Sequence[torch.Tensor], decay: float) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow towards the current parameters (call after every optimiser step)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the ``with`` block the parameters hold the averages; the current values come back after."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the parameters with the averages (in the parameters' dtype)."""
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))


@dataclass
class LossLog:
    """Losses per stage: lists of (step, loss) averaged over ``every`` steps.

    The running sums stay on the loss's device, so logging does not wait for the device between log lines.

    Attributes:
        every: steps averaged into one point (a line is also logged at INFO).
        stages: per stage name, the (step, mean loss) points so far.
    """

    every: int
    stages: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # per stage: running sum on the loss's device (no host sync between log lines) and its count
    _acc: dict[str, tuple[torch.Tensor | float, int]] = field(default_factory=dict)

    def add(self, stage: str, step: int, loss: torch.Tensor) -> None:
        """Add one step's loss (a scalar tensor) to ``stage``; every ``every`` steps a point is written."""
        acc, n = self._acc.get(stage, (0.0, 0))
        self._acc[stage] = (acc + loss.detach().float(), n + 1)
        if n + 1 >= self.every:
            self.flush(stage, step)
            log.info("%s step %d loss %.5f", stage, step, self.stages[stage][-1][1])

    def flush(self, stage: str, step: int) -> None:
        """Write the mean of the losses added since the last point as the point at ``step`` (if any)."""
        acc, n = self._acc.pop(stage, (0.0, 0))
        if n:
            self.stages.setdefault(stage, []).append((step, float(acc) / n))

    def first_last(self, stage: str) -> tuple[float, float]:
        """The first and last point's loss of ``stage``; ``(nan, nan)`` when it has none."""
        values = [v for _, v in self.stages.get(stage, [])]
        return (values[0], values[-1]) if values else (float("nan"), float("nan"))


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stage_timer(name: str, times: dict[str, float], device: torch.device) -> Iterator[None]:
    """Time the ``with`` block into ``times[name]`` (seconds), waiting for the device before and after.

    Args:
        name: the stage's name.
        times: where the seconds are written.
        device: the device whose queued work counts (CUDA is synchronised).
    """
    _sync(device)
    t0 = time.perf_counter()
    yield
    _sync(device)
    times[name] = time.perf_counter() - t0
    log.info("stage %s took %.1f s", name, times[name])


def _steps(total: int, max_seconds: float | None, device: torch.device) -> Iterator[int]:
    """Yield step indices until ``total`` or until ``max_seconds`` have passed.

    The clock is read before every step on the CPU and every 25 steps on an accelerator (where reading it
    waits for the queued work), so a CPU stage overruns its budget by less than one step.
    """
    t0 = time.perf_counter()
    every = 25 if device.type == "cuda" else 1
    for step in range(total):
        if max_seconds is not None and step and step % every == 0:
            _sync(device)
            if time.perf_counter() - t0 > max_seconds:
                log.warning("stopping after %d of %d steps: max_seconds=%.0f reached", step, total, max_seconds)
                return
        yield step


def _snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-γ weights for ε prediction: min(SNR, γ) / SNR (ones when ``gamma`` is None)."""
    if gamma is None:
        return torch.ones(t.shape[0], device=t.device)
    ab = alphas_cumprod[t]
    snr = ab / (1 - ab)
    return snr.clamp(max=gamma) / snr


def _add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def _autocast(device: torch.device, enabled: bool) -> Any:
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---- VAE -------------------------------------------------------------------------------------------------------
def train_vae(
    vae: AutoencoderKL,
    data: ShapesData,
    cfg: VaeConfig,
    device: torch.device,
    amp: bool,
    losses: LossLog,
    gen: torch.Generator,
) -> int:
    """Stage 1: reconstruction (L1 + L2) + ``kl_weight`` · KL on the posterior (per latent element).

    Args:
        vae: the VAE, trained in place (left in eval mode without gradients).
        data: the training scenes.
        cfg: steps, batch size, learning rate, KL weight, time budget.
        device: where to train.
        amp: bf16 autocast.
        losses: the loss log (stage ``"vae"``).
        gen: random generator on ``device``.

    Returns:
        Steps done.
    """
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    n = len(data)
    done = 0
    for step in _steps(cfg.steps, cfg.max_seconds, device):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=data.images.device)
        x = to_model_tensor(data.images[idx].to(device))
        with _autocast(device, amp):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / float(np.prod(z.shape[1:]))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.add("vae", step, loss)
        done = step + 1
    losses.flush("vae", done)
    vae.eval().requires_grad_(False)
    return done


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, images: torch.Tensor, device: torch.device, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of all images (unscaled latents).

    Args:
        vae: the trained VAE.
        images: (N, H, W, 3) uint8.
        device: where to encode.
        batch: images per forward pass.

    Returns:
        ``(mean, std)``, each (N, C, h, w) float32 on ``device``.
    """
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        dist = vae.encode(to_model_tensor(images[i : i + batch].to(device))).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images_u8: torch.Tensor, device: torch.device) -> float:
    """Mean PSNR of posterior-mean reconstructions, measured in 8-bit steps.

    Args:
        vae: the trained VAE.
        images_u8: (B, H, W, 3) uint8.
        device: where to run.

    Returns:
        Mean PSNR in dB over the images.
    """
    x = to_model_tensor(images_u8.to(device))
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    rec_u8 = ((rec + 1) * 127.5).round()
    mse = ((rec_u8 - (x + 1) * 127.5) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


# ---- text encoder + UNet ---------------------------------------------------------------------------------------
def train_unet(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    alphas: torch.Tensor,
    cfg: UNetConfig,
    device: torch.device,
    amp: bool,
    losses: LossLog,
    gen: torch.Generator,
    grounding: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint: Callable[[int], None] | None = None,
) -> int:
    """Stage 2: text encoder + UNet with the ε loss, caption dropout and EMA.

    Each step samples z0 from the cached posteriors, a timestep and noise, and regresses the noise (min-SNR-γ
    weighted when ``cfg.snr_gamma`` is set). ``cfg.text_lr == 0`` keeps the text encoder frozen.

    Args:
        text_encoder: trained in place (unless frozen); left in eval mode without gradients.
        unet: trained in place; left in eval mode without gradients, with its attention processors restored.
        latents: ``(mean, std)`` (N, C, h, w) of the scaled posteriors, on ``device``.
        ids: (N, 77) caption token ids on ``device``.
        empty_ids: (1, 77) token ids of the empty caption (for caption dropout).
        alphas: (1000,) the scheduler's ᾱ_t on ``device``.
        cfg: the stage's settings.
        device: where to train.
        amp: bf16 autocast.
        losses: the loss log (stage ``"unet"``; ``"ground"`` for the grounding loss).
        gen: random generator on ``device``.
        grounding: ``(region fractions (N, V, S, S), token targets (N, T))`` turns on the token grounding loss
            (:mod:`instdiff.training.grounding`) with weight ``cfg.grounding_weight``.
        checkpoint: called with the steps done every ``cfg.checkpoint_every`` steps, while the modules hold
            the EMA weights (it saves them; the training weights come back afterwards).

    Returns:
        Steps done.
    """
    mean, std = latents
    train_text = cfg.text_lr > 0
    text_encoder.train(train_text).requires_grad_(train_text)
    unet.train().requires_grad_(True)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    groups = [{"params": list(unet.parameters()), "lr": cfg.lr}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps))
    ema = Ema(params, cfg.ema_decay)
    ground = grounding is not None and cfg.grounding_weight > 0
    recorders, previous = install_grounding(unet, cfg.grounding_downsample) if ground else ({}, None)
    n = mean.shape[0]
    done = 0
    try:
        for step in _steps(cfg.steps, cfg.max_seconds, device):
            idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=device)
            z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen, device=device)
            tok = ids[idx]
            drop = torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.caption_dropout
            tok = torch.where(drop[:, None], empty_ids.expand_as(tok), tok)
            t = torch.randint(0, alphas.shape[0], (cfg.batch_size,), generator=gen, device=device)
            noise = torch.randn(z0.shape, generator=gen, device=device)
            zt = _add_noise(alphas, z0, noise, t)
            with _autocast(device, amp):
                with torch.set_grad_enabled(train_text):
                    emb = text_encoder(tok)[0]
                pred = unet(zt, t, encoder_hidden_states=emb).sample.float()
            per = ((pred - noise) ** 2).flatten(1).mean(dim=1)
            loss = (per * _snr_weights(alphas, t, cfg.snr_gamma)).mean()
            if ground:
                regions, targets = grounding
                tgt = torch.where(drop[:, None], torch.full_like(targets[idx], -1), targets[idx])
                g = grounding_loss(recorders, regions[idx].float(), tgt)
                loss = loss + cfg.grounding_weight * g
                losses.add("ground", step, g.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema.update()
            losses.add("unet", step, per.mean())
            done = step + 1
            if checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                for rec in recorders.values():
                    rec.probs = None  # drop the last step's graph (the modules are copied to be saved)
                with ema.swapped():
                    checkpoint(done)
    finally:
        if previous is not None:
            unet.set_attn_processor(previous)
    losses.flush("unet", done)
    if ground:
        losses.flush("ground", done)
    ema.copy_to()
    text_encoder.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    return done


# ---- inpainting UNet -------------------------------------------------------------------------------------------
def train_inpaint(
    inpaint_unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    data: ShapesData,
    latents: tuple[torch.Tensor, torch.Tensor],
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    alphas: torch.Tensor,
    cfg: InpaintConfig,
    device: torch.device,
    amp: bool,
    losses: LossLog,
    gen: torch.Generator,
) -> int:
    """Stage 3: inpainting fine-tune with (noisy latents, mask, masked-image latents) as the UNet's input.

    Masks come from :func:`~instdiff.training.data.random_inpaint_masks`; the masked image is encoded with the
    (frozen) VAE's posterior mean, the mask max-pooled to the latent grid, as the editors do at inference.

    Args:
        inpaint_unet: the widened UNet (see :func:`~instdiff.training.networks.widen_to_inpaint`), trained in
            place; left in eval mode without gradients.
        text_encoder: frozen; encodes the captions.
        vae: frozen; encodes the masked images.
        data: the training scenes (images and labels).
        latents: ``(mean, std)`` (N, C, h, w) of the scaled posteriors, on ``device``.
        ids: (N, 77) caption token ids on ``device``.
        empty_ids: (1, 77) token ids of the empty caption (for caption dropout).
        alphas: (1000,) the scheduler's ᾱ_t on ``device``.
        cfg: the stage's settings.
        device: where to train.
        amp: bf16 autocast.
        losses: the loss log (stage ``"inpaint"``).
        gen: random generator on ``device``.

    Returns:
        Steps done.
    """
    mean, std = latents
    scale = float(vae.config.scaling_factor)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    inpaint_unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(inpaint_unet.parameters(), lr=cfg.lr, weight_decay=1e-2, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps))
    ema = Ema(list(inpaint_unet.parameters()), cfg.ema_decay)
    n = mean.shape[0]
    done = 0
    for step in _steps(cfg.steps, cfg.max_seconds, device):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=device)
        with torch.no_grad():
            images = to_model_tensor(data.images[idx.to(data.images.device)].to(device))
            mask_px = random_inpaint_masks(
                data.labels[idx.to(data.labels.device)].to(device), cfg.mask_mix, factor, gen
            )
            with _autocast(device, amp):
                masked_lat = vae.encode(images * (1 - mask_px)).latent_dist.mean.float() * scale
                tok = ids[idx]
                drop = torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.caption_dropout
                emb = text_encoder(torch.where(drop[:, None], empty_ids.expand_as(tok), tok))[0]
            mask_lat = F.max_pool2d(mask_px, factor)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen, device=device)
        t = torch.randint(0, alphas.shape[0], (cfg.batch_size,), generator=gen, device=device)
        noise = torch.randn(z0.shape, generator=gen, device=device)
        zt = _add_noise(alphas, z0, noise, t)
        with _autocast(device, amp):
            pred = inpaint_unet(torch.cat([zt, mask_lat, masked_lat], dim=1), t, encoder_hidden_states=emb).sample
        per = ((pred.float() - noise) ** 2).flatten(1).mean(dim=1)
        loss = (per * _snr_weights(alphas, t, cfg.snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(inpaint_unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update()
        losses.add("inpaint", step, per.mean())
        done = step + 1
    losses.flush("inpaint", done)
    ema.copy_to()
    inpaint_unet.eval().requires_grad_(False)
    return done


__all__ = [
    "Ema",
    "LossLog",
    "encode_dataset",
    "stage_timer",
    "train_inpaint",
    "train_unet",
    "train_vae",
    "vae_psnr",
]
