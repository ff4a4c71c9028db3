"""Train the embedded shapes-world model: an SD-architecture bundle learned from rendered scenes.

Recipe (``train_shapes(config, out_dir)``; the CLI runs it as ``instdiff train-shapes``):

1. render the training scenes (:mod:`instdiff.synthetic`, seeds ``data_seed .. data_seed + chunks``),
   in worker processes, into uint8 tensors: images, per-pixel object labels and captions;
2. train the VAE (``AutoencoderKL``, 4 latent channels, factor 4) on L1 + L2 + a small KL term, then
   set its ``scaling_factor`` so that scaled latents have unit standard deviation (SD's 0.18215 analogue);
3. train the CLIP text encoder and the UNet jointly with the DDPM ε loss (min-SNR weighting optional),
   caption dropout for classifier-free guidance and an EMA of the weights;
4. fine-tune the inpainting UNet, copied from the base UNet with ``conv_in`` widened to 9 channels (the
   new channels zero-initialised), on random boxes, object masks, background masks and whole images, with
   masked-image latents, as SD's inpainting model was;
5. save a standard diffusers folder (``model_index.json``, safetensors, tokenizer and scheduler configs,
   ``inpaint_unet/``), the loss log and plot, a sample grid and ``training_summary.json``.

Everything runs on a CUDA device when one is present (bf16 autocast) and on the CPU otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from instdiff import synthetic
from instdiff.errors import TrainConfigError
from instdiff.grounding import grounding_loss, install_grounding, region_fractions, token_targets
from instdiff.models import (
    BASE_WORDS,
    MAX_TOKENS,
    ModelBundle,
    build_word_tokenizer,
    load_pretrained,
    pick_device,
    save_bundle,
)

log = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"
LOSSES_FILE = "losses.json"
LOSS_PLOT = "loss.png"
SAMPLE_GRID = "samples.png"
SCENES_PER_CHUNK = 250
HELD_OUT_SEED = 10_000  # first seed of held-out scenes; training chunks must stay below it


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VaeConfig:
    """AutoencoderKL: 3 levels (64 px → 16×16×4 latents) trained on L1 + L2 + ``kl_weight`` · KL."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    latent_channels: int = 4
    kl_weight: float = 1e-6
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    max_seconds: float | None = None


@dataclass(frozen=True)
class TextConfig:
    """CLIPTextModel over the shapes-world word tokenizer (77 positions, like SD's)."""

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel with cross-attention at the latent's full and half resolution.

    ``steps``/``batch_size``/``lr``/``text_lr``: the joint text-encoder + UNet stage. ``snr_gamma``: min-SNR
    loss weighting (``None`` = plain ε MSE). ``max_seconds`` stops the stage early (recorded in the summary).
    """

    block_out_channels: tuple[int, ...] = (64, 96, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-4
    text_lr: float = 1e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: float | None = 5.0
    max_seconds: float | None = None
    # TokenCompose-style token grounding loss (instdiff.grounding); 0 = off (the shipped runs 1-2 had it off).
    # text_lr 0 freezes the text encoder (keeps the inpainting UNet's conditioning valid when continuing).
    grounding_weight: float = 0.0
    grounding_downsample: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class InpaintConfig:
    """Inpainting fine-tune of a copy of the base UNet with 9 input channels.

    ``mask_mix``: probabilities of the mask kinds drawn per sample (object, dilated object, box,
    background, full); they are normalised.
    """

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: float | None = 5.0
    mask_mix: tuple[float, ...] = (0.3, 0.15, 0.3, 0.15, 0.1)
    max_seconds: float | None = None


@dataclass(frozen=True)
class SampleConfig:
    """Sample grid and the end-of-training probe (held-out captions, seed ``HELD_OUT_SEED + 1``)."""

    n_grid: int = 16
    steps: int = 50
    guidance: float = 5.0
    n_probe: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train_shapes`` needs; YAML files in ``configs/train/`` are parsed into it."""

    name: str = "shapes"
    seed: int = 0
    data_seed: int = 0
    n_scenes: int = 20_000
    image_size: int = 64
    device: str = "auto"
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | no
    workers: int = 0  # rendering processes; 0 = one per CPU core (at most 16)
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    log_every: int = 50
    save_dtype: str = "fp16"  # fp16 | fp32: storage dtype of the saved weights
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    editor_defaults: dict[str, Any] = field(default_factory=dict)
    # a model folder written by an earlier run to continue from (its architecture, tokenizer and VAE scaling
    # are kept; the architecture fields above are then ignored); a stage with 0 steps is skipped
    init_from: str | None = None

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> TrainConfig:
        """Build from a nested mapping (as read from YAML); unknown keys are refused."""
        return _from_mapping(TrainConfig, data, "config")

    @staticmethod
    def from_yaml(path: str | Path) -> TrainConfig:
        """Parse a YAML file such as ``configs/train/shapes.yaml``."""
        import yaml

        path = Path(path)
        if not path.exists():
            raise TrainConfigError(f"training config {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise TrainConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return TrainConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`TrainConfigError` for values the trainer cannot use."""
        if self.n_scenes < 8:
            raise TrainConfigError(f"n_scenes must be at least 8, got {self.n_scenes}")
        chunks = -(-self.n_scenes // SCENES_PER_CHUNK)
        if self.data_seed < 0 or self.data_seed + chunks > HELD_OUT_SEED:
            raise TrainConfigError(
                f"training scene seeds {self.data_seed}..{self.data_seed + chunks - 1} must lie in "
                f"0..{HELD_OUT_SEED - 1} (seeds from {HELD_OUT_SEED} on are held out for evaluation)"
            )
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        down = 2 ** (len(self.unet.block_out_channels) - 1)
        if self.image_size % (factor * down):
            raise TrainConfigError(f"image_size {self.image_size} must be a multiple of {factor * down}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise TrainConfigError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if self.save_dtype not in ("fp16", "fp32"):
            raise TrainConfigError(f"save_dtype must be fp16 or fp32, got {self.save_dtype!r}")
        if len(self.inpaint.mask_mix) != len(MASK_KINDS) or min(self.inpaint.mask_mix) < 0 or sum(
            self.inpaint.mask_mix
        ) <= 0:
            raise TrainConfigError(f"inpaint.mask_mix needs {len(MASK_KINDS)} non-negative weights for {MASK_KINDS}")
        if self.unet.grounding_weight < 0:
            raise TrainConfigError(f"unet.grounding_weight must be >= 0 (0 = off), got {self.unet.grounding_weight}")
        if self.unet.grounding_weight > 0 and (
            not self.unet.grounding_downsample or any(f < 1 for f in self.unet.grounding_downsample)
        ):
            raise TrainConfigError(
                f"unet.grounding_downsample needs positive downsample factors of cross-attention layers (1 = the "
                f"latent's size, 2 = half), got {list(self.unet.grounding_downsample)}"
            )
        for name, stage in (("vae", self.vae), ("unet", self.unet), ("inpaint", self.inpaint)):
            if stage.steps < 0 or stage.batch_size < 1:
                raise TrainConfigError(f"{name}.steps must be >= 0 and {name}.batch_size positive")
            if stage.steps == 0 and self.init_from is None:
                raise TrainConfigError(f"{name}.steps is 0: skipping a stage needs init_from (a trained model folder)")


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise TrainConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TrainConfigError(f"{where}: unknown keys {unknown}; accepted: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for key, value in data.items():
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current):
            kwargs[key] = _from_mapping(type(current), value or {}, f"{where}.{key}")
        elif isinstance(current, tuple) and isinstance(value, list | tuple):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


# ---- data ------------------------------------------------------------------------------------
@dataclass
class ShapesData:
    """Rendered training scenes: images (N, H, W, 3) uint8, labels (N, H, W) uint8 (0 = background,
    k = k-th object's visible pixels) and captions."""

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
    """Render ``n`` scenes as chunks of 250: chunk c is ``make_scenes(250, seed=data_seed + c)``."""
    chunks = [
        (data_seed + c, min(SCENES_PER_CHUNK, n - c * SCENES_PER_CHUNK), size)
        for c in range(-(-n // SCENES_PER_CHUNK))
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


def to_model_images(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---- model construction ----------------------------------------------------------------------
def shapes_vocabulary() -> list[str]:
    """The tokenizer's words: the shapes world's vocabulary, the comma and the generic base words."""
    return sorted(set(synthetic.VOCABULARY) | {","} | set(BASE_WORDS))


def build_models(cfg: TrainConfig) -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel,
                                            DDIMScheduler]:
    """Fresh tokenizer, text encoder, VAE, UNet and SD 1.x-style DDIM scheduler from ``cfg``."""
    tokenizer = build_word_tokenizer(shapes_vocabulary(), MAX_TOKENS)
    t = cfg.text
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    v = cfg.vae
    levels = len(v.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(v.block_out_channels),
        latent_channels=v.latent_channels,
        layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups,
        sample_size=cfg.image_size,
    )
    u = cfg.unet
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (levels - 1),
        in_channels=v.latent_channels,
        out_channels=v.latent_channels,
        layers_per_block=u.layers_per_block,
        block_out_channels=tuple(u.block_out_channels),
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        cross_attention_dim=t.hidden_size,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return tokenizer, text_encoder, vae, unet, scheduler


def widen_to_inpaint(unet: UNet2DConditionModel, extra_channels: int) -> UNet2DConditionModel:
    """A copy of ``unet`` whose ``conv_in`` takes ``extra_channels`` more inputs, zero-initialised (SD-inpaint)."""
    config = dict(unet.config)
    config["in_channels"] = unet.config.in_channels + extra_channels
    wide = UNet2DConditionModel.from_config(config)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    w = state.pop("conv_in.weight")  # (C_out, C_in, 3, 3)
    wide.load_state_dict(state, strict=False)
    with torch.no_grad():
        wide.conv_in.weight.zero_()
        wide.conv_in.weight[:, : w.shape[1]] = w
    return wide.to(next(unet.parameters()).device)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- training helpers ------------------------------------------------------------------------
class Ema:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))


@dataclass
class LossLog:
    """Losses per stage: lists of (step, loss) averaged over ``log_every`` steps."""

    every: int
    stages: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # per stage: running sum on the loss's device (no host sync between log lines) and its count
    _acc: dict[str, tuple[torch.Tensor | float, int]] = field(default_factory=dict)

    def add(self, stage: str, step: int, loss: torch.Tensor) -> None:
        acc, n = self._acc.get(stage, (0.0, 0))
        self._acc[stage] = (acc + loss.detach().float(), n + 1)
        if n + 1 >= self.every:
            self.flush(stage, step)
            log.info("%s step %d loss %.5f", stage, step, self.stages[stage][-1][1])

    def flush(self, stage: str, step: int) -> None:
        acc, n = self._acc.pop(stage, (0.0, 0))
        if n:
            self.stages.setdefault(stage, []).append((step, float(acc) / n))

    def first_last(self, stage: str) -> tuple[float, float]:
        values = [v for _, v in self.stages.get(stage, [])]
        return (values[0], values[-1]) if values else (float("nan"), float("nan"))


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _stage_timer(name: str, times: dict[str, float], device: torch.device) -> Iterator[None]:
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


MASK_KINDS: tuple[str, ...] = ("object", "dilated_object", "box", "background", "full")


def random_inpaint_masks(labels: torch.Tensor, mix: Sequence[float], factor: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Training masks (B, 1, H, W) float in {0, 1} at pixel resolution, aligned to the latent grid.

    Per sample one kind from :data:`MASK_KINDS` drawn with weights ``mix``: one object's visible pixels, the
    same dilated by 2 px, a random box (15–70 % of each side), the background, or the whole image. The mask
    is then max-pooled to the latent grid and replicated back, exactly what the editors pass at inference.
    """
    b, h, w = labels.shape
    dev = labels.device
    rand = lambda *shape: torch.rand(*shape, device=dev, generator=generator)  # noqa: E731
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
    box = ((xs >= x0.view(b, 1, 1)) & (xs < (x0 + bw).view(b, 1, 1)) & (ys >= y0.view(b, 1, 1))
           & (ys < (y0 + bh).view(b, 1, 1))).float().unsqueeze(1)
    background = (labels == 0).float().unsqueeze(1)
    full = torch.ones_like(obj)
    options = torch.stack([obj, dilated, box, background, full], dim=0)  # (5, B, 1, H, W)
    weights = torch.tensor(list(mix), dtype=torch.float32, device=dev)
    kind = torch.multinomial(weights / weights.sum(), b, replacement=True, generator=generator)
    mask = options[kind, torch.arange(b, device=dev)]
    lat = F.max_pool2d(mask, factor)
    return F.interpolate(lat, scale_factor=factor, mode="nearest")


# ---- stages ----------------------------------------------------------------------------------
def _autocast(device: torch.device, enabled: bool) -> Any:
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_vae(vae: AutoencoderKL, data: ShapesData, cfg: VaeConfig, device: torch.device, amp: bool,
              losses: LossLog, gen: torch.Generator) -> int:
    """Stage 1: reconstruction (L1 + L2) + ``kl_weight`` · KL on the posterior. Returns steps done."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    n = len(data)
    done = 0
    for step in _steps(cfg.steps, cfg.max_seconds, device):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=data.images.device)
        x = to_model_images(data.images[idx].to(device))
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
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor, device: torch.device, batch: int = 512
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations (N, C, h, w) of all images (unscaled)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        dist = vae.encode(to_model_images(images[i : i + batch].to(device))).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images_u8: torch.Tensor, device: torch.device) -> float:
    """Mean PSNR (dB) of posterior-mean reconstructions of uint8 images (B, H, W, 3), in 8-bit steps."""
    x = to_model_images(images_u8.to(device))
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    rec_u8 = ((rec + 1) * 127.5).round()
    mse = ((rec_u8 - (x + 1) * 127.5) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def _token_ids(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(text_encoder: CLIPTextModel, unet: UNet2DConditionModel, latents: tuple[torch.Tensor, torch.Tensor],
               ids: torch.Tensor, empty_ids: torch.Tensor, alphas: torch.Tensor, cfg: UNetConfig,
               device: torch.device, amp: bool, losses: LossLog, gen: torch.Generator,
               grounding: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """Stage 2: text encoder + UNet with the ε loss, caption dropout and EMA. Returns steps done.

    ``grounding`` = (region fractions (N, V, S, S), token targets (N, T)) turns on the token grounding loss
    (:mod:`instdiff.grounding`) with weight ``cfg.grounding_weight``; its value is logged as stage "ground".
    ``cfg.text_lr == 0`` keeps the text encoder frozen.
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


def train_inpaint(inpaint_unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae: AutoencoderKL,
                  data: ShapesData, latents: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor,
                  empty_ids: torch.Tensor, alphas: torch.Tensor, cfg: InpaintConfig, device: torch.device,
                  amp: bool, losses: LossLog, gen: torch.Generator) -> int:
    """Stage 3: inpainting fine-tune with (noisy latents, mask, masked-image latents). Returns steps done."""
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
            images = to_model_images(data.images[idx.to(data.images.device)].to(device))
            mask_px = random_inpaint_masks(data.labels[idx.to(data.labels.device)].to(device), cfg.mask_mix,
                                           factor, gen)
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


# ---- reporting -------------------------------------------------------------------------------
def plot_losses(stages_losses: Mapping[str, Sequence[Sequence[float]]], path: Path,
                resumed_at: Mapping[str, int] | None = None) -> Path:
    """One panel per stage, log-scale loss against step; a dashed line where a continued run started."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("vae", "unet", "inpaint") if stages_losses.get(s)]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4.2 * max(1, len(stages)), 3.2))
    axes = np.atleast_1d(axes)
    titles = {"vae": "VAE (L1 + L2 + KL)", "unet": "text encoder + UNet (ε MSE)", "inpaint": "inpainting UNet (ε MSE)"}
    for ax, stage in zip(axes, stages, strict=False):
        steps, values = zip(*stages_losses[stage], strict=True)
        ax.plot(steps, values, lw=1.2)
        if resumed_at and stage in resumed_at:
            ax.axvline(resumed_at[stage], ls="--", color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(titles[stage], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], captions: Sequence[str], path: Path) -> Path:
    """A grid: one row per (label, images) with the column captions printed below the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(imgs) for _, imgs in rows)
    text_h = 0.11 * len(captions) + 0.2  # inches for the caption list
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.25 * n_cols + 1.2, 1.3 * len(rows) + text_h),
                             squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(str(c), fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=8)
    text = "\n".join(f"{i}: {c}" for i, c in enumerate(captions))
    fig.text(0.01, 0.005, text, fontsize=6.5, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, text_h / (1.3 * len(rows) + text_h), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _to_u8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] → list of (H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(x)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).parent, timeout=10)
        commit = out.stdout.strip()
        return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None
    except (OSError, subprocess.SubprocessError):
        return None


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _dir_size_mb(path: Path, suffix: str = ".safetensors") -> float:
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}")) / 1e6


# ---- the recipe ------------------------------------------------------------------------------
def train_shapes(config: TrainConfig | str | Path, out_dir: str | Path, device: str | None = None) -> dict[str, Any]:
    """Train the shapes-world model from ``config`` (a :class:`TrainConfig` or a YAML path) into ``out_dir``.

    ``out_dir`` becomes a diffusers model folder (loadable with ``load_bundle(out_dir)``) that also holds
    ``losses.json``, ``loss.png``, ``samples.png`` and ``training_summary.json``. ``device`` overrides the
    config's. Returns the summary dict (seed, data size, steps, seconds per stage, losses, VAE PSNR, sizes).
    With ``init_from`` the run continues an earlier one; the summary then also holds the earlier summary and
    the loss log and plot cover both runs.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_yaml(config)
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device or cfg.device)
    amp = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and dev.type == "cuda")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    losses = LossLog(cfg.log_every)
    log.info("training %s on %s (amp=%s) into %s", cfg.name, dev, amp, out)

    # 1. render the training scenes
    with _stage_timer("render", times, dev):
        data = render_training_data(cfg.n_scenes, cfg.data_seed, cfg.image_size, cfg.workers)
        if dev.type == "cuda":
            data = ShapesData(data.images.to(dev), data.labels.to(dev), data.captions)
    held_out = synthetic.make_scenes(max(64, cfg.samples.n_grid, cfg.samples.n_probe), seed=HELD_OUT_SEED + 1,
                                     size=cfg.image_size)
    held_u8 = torch.from_numpy(np.stack([s.image for s in held_out]))

    torch.manual_seed(cfg.seed)
    gen = torch.Generator(dev).manual_seed(cfg.seed)
    previous: dict[str, Any] | None = None
    inpaint_unet: UNet2DConditionModel | None = None
    if cfg.init_from is not None:
        start = load_pretrained(cfg.init_from, dev, torch.float32, local_files_only=True)
        tokenizer, text_encoder, vae, unet = start.tokenizer, start.text_encoder, start.vae, start.unet
        scheduler, inpaint_unet = start.scheduler, start.inpaint_unet
        previous = _read_json(Path(cfg.init_from) / SUMMARY_FILE)
        log.info("continuing from %s", cfg.init_from)
    else:
        tokenizer, text_encoder, vae, unet, scheduler = build_models(cfg)
    for m in (text_encoder, vae, unet):
        m.to(dev)

    # 2. VAE, then the latent scaling factor (kept when the VAE is not trained in this run)
    with _stage_timer("vae", times, dev):
        vae_steps = train_vae(vae, data, cfg.vae, dev, amp, losses, gen) if cfg.vae.steps else 0
        mean, std = encode_dataset(vae, data.images, dev)
        if vae_steps:
            vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        scaling = float(vae.config.scaling_factor)
        psnr = vae_psnr(vae, held_u8, dev)
    log.info("VAE: %d steps, held-out PSNR %.2f dB, scaling_factor %.4f", vae_steps, psnr, scaling)
    latents = (mean * scaling, std * scaling)

    # 3. text encoder + UNet
    ids = _token_ids(tokenizer, data.captions).to(dev)
    empty_ids = _token_ids(tokenizer, [""]).to(dev)
    alphas = scheduler.alphas_cumprod.to(dev)
    with _stage_timer("unet", times, dev):
        unet_steps = 0
        if cfg.unet.steps:
            grounding = None
            if cfg.unet.grounding_weight > 0:
                side = cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
                grounding = (region_fractions(data.labels, side).to(dev, torch.float16),
                             token_targets(tokenizer, ids.cpu()).to(dev))
            unet_steps = train_unet(text_encoder, unet, latents, ids, empty_ids, alphas, cfg.unet, dev, amp, losses,
                                    gen, grounding)

    # 4. inpainting UNet: from the base UNet with conv_in widened to latents + mask + masked-image latents
    #    (or the earlier run's inpainting UNet, continued)
    if inpaint_unet is None:
        inpaint_unet = widen_to_inpaint(unet, 1 + vae.config.latent_channels)
    inpaint_unet.to(dev)
    with _stage_timer("inpaint", times, dev):
        inpaint_steps = 0
        if cfg.inpaint.steps:
            inpaint_steps = train_inpaint(inpaint_unet, text_encoder, vae, data, latents, ids, empty_ids, alphas,
                                          cfg.inpaint, dev, amp, losses, gen)

    # 5. save the bundle, then samples, probe, losses and the summary
    bundle = ModelBundle(tokenizer, text_encoder, vae, unet, scheduler, inpaint_unet, name=cfg.name, device=dev)
    bundle.defaults = dict(cfg.editor_defaults)
    with _stage_timer("save", times, dev):
        _save(bundle, out, cfg.save_dtype)
    from instdiff.editing import generate

    with _stage_timer("samples", times, dev):
        grid_scenes = held_out[: cfg.samples.n_grid]
        captions = [s.caption for s in grid_scenes]
        gen_images = generate(bundle, captions, steps=cfg.samples.steps, guidance=cfg.samples.guidance,
                              seeds=list(range(len(captions))))
        with torch.no_grad():
            x = to_model_images(held_u8[: len(captions)].to(dev))
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        sample_grid([("held-out scene", [s.image for s in grid_scenes]), ("VAE reconstruction", _to_u8(recon)),
                     ("generated", _to_u8(gen_images))], captions, out / SAMPLE_GRID)
    probe = None
    if cfg.samples.n_probe:
        with _stage_timer("probe", times, dev):
            probe = generation_probe(bundle, held_out[: cfg.samples.n_probe], cfg.samples.steps, cfg.samples.guidance)
    history, resumed_at = _merge_losses(_read_json(Path(cfg.init_from) / LOSSES_FILE) if cfg.init_from else None,
                                        losses.stages)
    plot_losses(history, out / LOSS_PLOT, resumed_at)
    (out / LOSSES_FILE).write_text(json.dumps(history) + "\n")
    times["total"] = time.perf_counter() - t_start
    steps = {"vae": vae_steps, "unet": unet_steps, "inpaint": inpaint_steps}
    summary: dict[str, Any] = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "data": {"n_scenes": len(data),
                 "scene_seeds": [cfg.data_seed, cfg.data_seed + -(-len(data) // SCENES_PER_CHUNK) - 1],
                 "scenes_per_seed": SCENES_PER_CHUNK, "image_size": cfg.image_size,
                 "held_out_seed_for_samples": HELD_OUT_SEED + 1},
        "steps": steps,
        "planned_steps": {"vae": cfg.vae.steps, "unet": cfg.unet.steps, "inpaint": cfg.inpaint.steps},
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "loss_first_last": {s: losses.first_last(s) for s in losses.stages},
        "vae_psnr_db": round(psnr, 3),
        "vae_scaling_factor": scaling,
        "parameters": {"text_encoder": count_parameters(text_encoder), "vae": count_parameters(vae),
                       "unet": count_parameters(unet), "inpaint_unet": count_parameters(inpaint_unet)},
        "weights_mb": round(_dir_size_mb(out), 3),
        "probe": probe,
        "machine": _machine(dev),
        "git_commit": _git_commit(),
    }
    if previous is not None:
        summary["init_from"] = cfg.init_from
        summary["previous"] = previous
        before = previous.get("total_steps", previous.get("steps", {}))
        summary["total_steps"] = {k: int(before.get(k, 0)) + v for k, v in steps.items()}
        summary["total_seconds"] = round(float(previous.get("total_seconds", previous["seconds"]["total"]))
                                         + times["total"], 2)
    else:
        summary["total_steps"] = steps
        summary["total_seconds"] = round(times["total"], 2)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done in %.1f s; weights %.2f MB", times["total"], summary["weights_mb"])
    return summary


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _merge_losses(previous: Mapping[str, Sequence[Sequence[float]]] | None,
                  current: Mapping[str, Sequence[tuple[int, float]]]) -> tuple[dict[str, list], dict[str, int]]:
    """Loss history over an earlier run and this one (this run's steps shifted past the earlier run's)."""
    merged: dict[str, list] = {k: [list(p) for p in v] for k, v in (previous or {}).items()}
    resumed_at: dict[str, int] = {}
    for stage, points in current.items():
        offset = int(merged[stage][-1][0]) + 1 if merged.get(stage) else 0
        if offset:
            resumed_at[stage] = offset
        merged.setdefault(stage, []).extend([[step + offset, value] for step, value in points])
    return merged, resumed_at


def _save(bundle: ModelBundle, out: Path, save_dtype: str) -> None:
    """Save a copy of the bundle's modules in ``save_dtype`` on the CPU (the training copy is untouched)."""
    dtype = torch.float16 if save_dtype == "fp16" else torch.float32
    copy_ = ModelBundle(
        bundle.tokenizer,
        copy.deepcopy(bundle.text_encoder).to("cpu", dtype),
        copy.deepcopy(bundle.vae).to("cpu", dtype),
        copy.deepcopy(bundle.unet).to("cpu", dtype),
        bundle.scheduler,
        copy.deepcopy(bundle.inpaint_unet).to("cpu", dtype) if bundle.inpaint_unet is not None else None,
        name=bundle.name,
        defaults=bundle.defaults,
    )
    save_bundle(copy_, out)


def generation_probe(bundle: ModelBundle, scenes: Sequence[synthetic.Scene], steps: int, guidance: float,
                     batch: int = 64) -> dict[str, Any]:
    """Share of images generated from held-out captions in which the scorer finds every captioned object."""
    from instdiff.editing import generate
    from instdiff.scorer import objects_found

    hits, n = 0, 0
    for i in range(0, len(scenes), batch):
        part = scenes[i : i + batch]
        images = generate(bundle, [s.caption for s in part], steps=steps, guidance=guidance,
                          seeds=list(range(i, i + len(part))))
        for scene, img in zip(part, _to_u8(images), strict=True):
            hits += int(objects_found(img, scene.objects))
            n += 1
    return {"n": n, "all_objects_found": hits / max(1, n), "steps": steps, "guidance": guidance}
