"""The model bundle: everything an editor needs from a Stable-Diffusion-family checkpoint, on one device.

:class:`ModelBundle` holds the components and the few operations every editor shares (tokenize, encode
prompts and images, decode latents, per-token word ids); :func:`pick_device` / :func:`pick_dtype` resolve the
device and dtype specs. Loading and saving are in :mod:`instdiff.models`, the random ``tiny`` bundle in
:mod:`instdiff.tiny`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from instdiff.errors import DeviceError

log = logging.getLogger(__name__)

MAX_TOKENS = 77
"""CLIP's sequence length (start token, up to 75 word pieces, end token)."""


def token_ids(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids as every part of the project tokenizes: padded to the tokenizer's length (77 for CLIP), over-long
    prompts truncated.

    Args:
        tokenizer: a CLIP tokenizer.
        prompts: B prompts.

    Returns:
        (B, 77) int64 token ids on the CPU.
    """
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@dataclass
class ModelBundle:
    """Tokenizer, text encoder, VAE, UNet, scheduler and an optional inpainting UNet, on one device.

    Attributes:
        tokenizer: CLIP BPE tokenizer (77 positions).
        text_encoder: CLIP text model; its last hidden state conditions the UNet.
        vae: the latent autoencoder.
        unet: the denoiser.
        scheduler: the DDIM scheduler config (editors take a fresh copy per run).
        inpaint_unet: SD's 9-channel inpainting UNet, or ``None``.
        name: the spec it was loaded from.
        device: where every module lives.
        dtype: the modules' dtype.
        defaults: editor defaults a model folder may carry in ``instdiff.json`` (e.g.
            ``{"attention_downsample": 1}``).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    inpaint_unet: UNet2DConditionModel | None = None
    name: str = "custom"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    defaults: dict = field(default_factory=dict)

    # ---- geometry -------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel on a side: 2^(VAE blocks − 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents (4 for SD)."""
        return int(self.vae.config.latent_channels)

    @property
    def resolution(self) -> int:
        """Native image size in pixels (the UNet's sample size times the VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``epsilon``, ``v_prediction`` or ``sample``."""
        return str(self.scheduler.config.prediction_type)

    # ---- encoders -------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids of prompts, padded to 77; over-long prompts are truncated.

        Args:
            prompts: B prompts.

        Returns:
            (B, 77) long on the CPU.
        """
        return token_ids(self.tokenizer, prompts)

    def word_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Which word each token position belongs to, from CLIP's BPE pieces (a piece ending in ``</w>`` ends a
        word), for :func:`instdiff.masks.merge_word_pieces`.

        Positions follow :meth:`tokenize`: the start token has its own id, the pieces of one word share one id,
        and the end token and every padding position have their own ids. Ids increase along the sequence.

        Args:
            prompts: B prompts.

        Returns:
            (B, 77) long on the CPU, values in [0, 77).
        """
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
        )
        rows = []
        for ids, attention in zip(enc.input_ids, enc.attention_mask, strict=True):
            n = sum(attention)  # start, word pieces, end
            pieces = self.tokenizer.convert_ids_to_tokens(ids[1 : n - 1])
            out, word = [0], 1
            for piece in pieces:
                out.append(word)
                if piece.endswith("</w>"):
                    word += 1
            if pieces and not pieces[-1].endswith("</w>"):  # a word cut by truncation
                word += 1
            out.extend(range(word, word + len(ids) - len(out)))  # end token and padding: one id each
            rows.append(out)
        return torch.tensor(rows, dtype=torch.long)

    def unknown_words(self, prompts: Sequence[str]) -> list[str]:
        """Words the tokenizer spells out in letters: split into two or more pieces of at most two characters.

        A model never saw such a word as a unit (the embedded model's vocabulary is the shapes world's; SD's
        CLIP splits only rare words, into longer pieces), so its maps and edits for it are noise.

        Args:
            prompts: prompts to look through.

        Returns:
            The distinct such words, in order of first appearance.
        """
        found: list[str] = []
        for prompt in prompts:
            word: list[str] = []
            for piece in self.tokenizer.tokenize(prompt):
                word.append(piece.removesuffix("</w>"))
                if piece.endswith("</w>"):
                    text = "".join(word)
                    if len(word) >= 2 and max(len(w) for w in word) <= 2 and text not in found:
                        found.append(text)
                    word = []
        return found

    def token_count(self, prompt: str) -> int:
        """Number of tokens of ``prompt`` including start and end tokens, before truncation."""
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings from the text encoder's last hidden state.

        Args:
            prompts: B prompts.

        Returns:
            (B, 77, D) in the bundle's dtype on its device.
        """
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images to latents: the posterior mean, times the VAE's scaling factor.

        Args:
            images: (B, 3, H, W) in [-1, 1].

        Returns:
            (B, C, H/f, W/f) in the bundle's dtype on its device.
        """
        images = images.to(self.device, self.vae.dtype)
        dist = self.vae.encode(images).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents to images.

        Args:
            latents: (B, C, h, w) scaled latents.

        Returns:
            (B, 3, h·f, w·f) float32 in [-1, 1] on the bundle's device.
        """
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample.clamp(-1, 1).float()

    def fresh_scheduler(self) -> DDIMScheduler:
        """A new DDIM scheduler with this bundle's config (schedulers carry per-run state)."""
        return DDIMScheduler.from_config(self.scheduler.config)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
        """Move all modules; returns self."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for module in self.modules():
            current = next(module.parameters()).dtype
            if current != self.dtype:
                module.to(device=self.device, dtype=self.dtype)
            else:
                module.to(self.device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The text encoder, VAE, UNet and (when present) the inpainting UNet."""
        mods: list[torch.nn.Module] = [self.text_encoder, self.vae, self.unet]
        if self.inpaint_unet is not None:
            mods.append(self.inpaint_unet)
        return mods


# ---- device / dtype ---------------------------------------------------------------------------
DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Device types a bundle can be loaded on."""


def available_devices() -> list[str]:
    """The devices this machine has, as specs :func:`pick_device` takes (for messages and reports).

    Returns:
        ``"cpu"``, then ``"cuda:0"`` … for each visible CUDA device, then ``"mps"`` when MPS is available.
    """
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def parse_device(device: str | torch.device) -> torch.device:
    """Read a device spec without asking whether this machine has it (a driver checking a job for its workers).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.

    Returns:
        The device.

    Raises:
        DeviceError: a spec that is not a device, or a device type other than cpu / cuda / mps.
    """
    has = f"this machine has: {', '.join(available_devices())}"
    accepted = f"accepted: auto, {', '.join(DEVICE_TYPES)}, cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {device!r} is not a device; {accepted}; {has}") from None
    if dev.type not in DEVICE_TYPES:
        raise DeviceError(f"device {device!r}: models cannot run on {dev.type!r}; {accepted}; {has}")
    return dev


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Choose the device: ``None``/``"auto"`` → cuda, then mps, then cpu; else a spec such as ``"cpu"``,
    ``"cuda"``, ``"cuda:1"`` or ``"mps"`` that this machine has.

    Args:
        device: the spec, a ``torch.device`` or ``None``.

    Returns:
        The device.

    Raises:
        DeviceError: (a ``ConfigError`` and a ``ModelLoadError``) a spec that is not a device, a device type
            other than cpu / cuda / mps, CUDA or MPS asked for but not available, a CUDA index this machine does
            not have; the message lists what this machine has.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = parse_device(device)
    has = f"this machine has: {', '.join(available_devices())}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for but CUDA is not available; use 'cpu' or 'auto' ({has})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} was asked for but there is no CUDA device {dev.index}; {has}")
    if dev.type == "mps" and not _mps_available():
        raise DeviceError(f"device {device!r} was asked for but MPS is not available; use 'cpu' or 'auto' ({has})")
    return dev


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Choose the dtype: ``None``/``"auto"`` → fp16 on CUDA and MPS, fp32 on the CPU; or fp32/fp16/bf16 names.

    Args:
        dtype: a name, a floating-point ``torch.dtype`` (fp32, fp16 or bf16) or ``None``.
        device: the device the dtype is for (``auto``).

    Returns:
        The dtype.

    Raises:
        DeviceError: (a ``ConfigError`` and a ``ModelLoadError``) an unknown dtype name, or a ``torch.dtype``
            other than fp32, fp16 and bf16.
    """
    accepted = f"accepted: auto, {', '.join(sorted(_DTYPES))}"
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise DeviceError(f"dtype {dtype} cannot hold model weights; {accepted}")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise DeviceError(f"unknown dtype {dtype!r}; {accepted}") from None
