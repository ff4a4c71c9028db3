"""Model bundles: everything an editor needs from a Stable-Diffusion-family checkpoint.

One loader serves three sources:

* a hub id or a local diffusers folder (``from_pretrained``; SD 1.x, 2.x, v-prediction included),
* ``tiny``: random weights built from config in code, with an offline CLIP tokenizer (tests),
* ``default``: the embedded shapes-world model shipped in ``instdiff/assets/shapes`` (``tiny`` until
  that folder exists).
"""

from __future__ import annotations

import json
import logging
import os
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from instdiff.errors import ModelLoadError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL_DIR = ASSETS / "shapes"
DEFAULT_MODEL = "default"
MAX_TOKENS = 77
DEFAULTS_FILE = "instdiff.json"


@dataclass
class ModelBundle:
    """Tokenizer, text encoder, VAE, UNet, scheduler and an optional inpainting UNet, on one device."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    inpaint_unet: UNet2DConditionModel | None = None
    name: str = "custom"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # editor defaults a model folder may carry in ``instdiff.json`` (e.g. {"attention_downsample": 1})
    defaults: dict = field(default_factory=dict)

    # ---- geometry -------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def resolution(self) -> int:
        """Native image size in pixels (the UNet's sample size times the VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    # ---- encoders -------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, 77), padded; over-long prompts are truncated (see ``check_prompt``)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids

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

    def token_count(self, prompt: str) -> int:
        """Number of tokens of ``prompt`` including start and end tokens, before truncation."""
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (B, 77, D) from the text encoder's last hidden state."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H/f, W/f) from images (B, 3, H, W) in [-1, 1]; the posterior mean, scaled."""
        images = images.to(self.device, self.vae.dtype)
        dist = self.vae.encode(images).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from scaled latents."""
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
        mods: list[torch.nn.Module] = [self.text_encoder, self.vae, self.unet]
        if self.inpaint_unet is not None:
            mods.append(self.inpaint_unet)
        return mods


# ---- device / dtype ---------------------------------------------------------------------------
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` → cuda, then mps, then cpu. Anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
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
    """``None``/``"auto"`` → fp16 on CUDA and MPS, fp32 on the CPU. Accepts fp32/fp16/bf16 names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(sorted(_DTYPES))}") from None


# ---- offline tokenizer ------------------------------------------------------------------------
BASE_WORDS = (
    "a an the of on in with and at to photo picture image painting drawing big small large tiny "
    "cat dog bird horse car tree house flower apple ball hat"
).split()


def build_word_tokenizer(words: Iterable[str], model_max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make every word in ``words`` one token.

    The merges are learned offline by byte-pair encoding on the word list itself (each word once): the most
    frequent adjacent pair is merged first, ties go to the lexicographically smallest pair, so the same
    words always give the same ids (the ``tokenizers`` trainer breaks ties in hash order, which changed the
    ids from one process to the next). Every lowercase letter, digit and common punctuation mark is in the
    vocabulary, also as a word-final piece, so any lowercase ASCII text tokenizes without unknown tokens.
    """
    alphabet = string.ascii_lowercase + string.digits + ".,!?'-:;()"
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    corpus = [[*w[:-1], w[-1] + "</w>"] for w in sorted({w.lower() for w in words if w})]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces in corpus:
            for pair in zip(pieces, pieces[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for k, pieces in enumerate(corpus):
            merged: list[str] = []
            i = 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            corpus[k] = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_vocabulary() -> list[str]:
    """Words of the tiny tokenizer: a few generic ones plus the shapes world's vocabulary when present."""
    words = list(BASE_WORDS)
    try:
        from instdiff import synthetic

        words += list(synthetic.VOCABULARY)
    except (ImportError, AttributeError):  # pragma: no cover - synthetic is part of the package
        pass
    return words


# ---- tiny random bundle -----------------------------------------------------------------------
def tiny_bundle(
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = "fp32",
    image_size: int = 32,
    with_inpaint: bool = False,
    prediction_type: str = "epsilon",
) -> ModelBundle:
    """Random-weight bundle built from config, small enough for CPU tests (about a second per edit).

    Geometry mirrors SD: 4 latent channels, VAE factor 4 (``image_size`` 32 → 8×8 latents), a UNet with
    cross-attention at two resolutions, CLIP text encoder with 77 positions.
    """
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(tiny_vocabulary())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
    )
    unet_kwargs = dict(
        sample_size=image_size // 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet = UNet2DConditionModel(in_channels=4, **unet_kwargs)
    inpaint = UNet2DConditionModel(in_channels=9, **unet_kwargs) if with_inpaint else None
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    bundle = ModelBundle(tokenizer, text_encoder, vae, unet, scheduler, inpaint, name="tiny")
    for m in bundle.modules():
        m.eval().requires_grad_(False)
    return bundle.to(dev, dt)


# ---- pretrained -----------------------------------------------------------------------------
def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec and Path(spec).expanduser().exists()


def load_pretrained(
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    local_files_only: bool = False,
    inpaint: str | None = None,
    revision: str | None = None,
) -> ModelBundle:
    """Load from a hub id or a local diffusers folder (``model_index.json`` with the usual subfolders).

    ``inpaint`` names a separate inpainting checkpoint (e.g. ``runwayml/stable-diffusion-inpainting``)
    whose UNet (9 input channels) is used for the final step; a folder with an ``inpaint_unet``
    subfolder (the embedded model's layout) provides it by itself.
    """
    path = Path(spec).expanduser()
    is_local = path.exists()
    if _looks_local(spec) and not is_local:
        raise ModelLoadError(
            f"model path {spec!r} does not exist; give a diffusers folder, a hub id, 'tiny' or 'default'"
        )
    if is_local and not (path / "model_index.json").exists():
        if (path / "unet").is_dir() or (path / "config.json").exists():
            raise ModelLoadError(
                f"{spec!r} has no model_index.json: it looks like a single component (e.g. an inpainting "
                "UNet alone). Give the full pipeline folder, and pass the inpainting model with --inpaint-model"
            )
        raise ModelLoadError(f"{spec!r} is not a diffusers model folder (no model_index.json)")
    src = str(path) if is_local else spec
    kw = dict(local_files_only=local_files_only or is_local, revision=revision)
    try:
        index = _read_model_index(src, kw)
        if index.get("_class_name") == "StableDiffusionInpaintPipeline" and inpaint is None:
            raise ModelLoadError(
                f"{spec!r} is an inpainting-only checkpoint; it needs its base model. Use e.g. "
                f"--model CompVis/stable-diffusion-v1-4 --inpaint-model {spec}"
            )
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        inpaint_unet = None
        if is_local and (path / "inpaint_unet").is_dir():
            inpaint_unet = UNet2DConditionModel.from_pretrained(src, subfolder="inpaint_unet", **kw)
        if inpaint is not None:
            ipath = Path(inpaint).expanduser()
            ikw = dict(local_files_only=local_files_only or ipath.exists(), revision=None)
            isrc = str(ipath) if ipath.exists() else inpaint
            inpaint_unet = UNet2DConditionModel.from_pretrained(isrc, subfolder="unet", **ikw)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        hint = " (offline: only local folders, 'tiny' and 'default' work)" if not is_local else ""
        raise ModelLoadError(f"could not load model {spec!r}{hint}: {exc}") from None
    if inpaint_unet is not None and inpaint_unet.config.in_channels != 4 + 1 + vae.config.latent_channels:
        raise ModelLoadError(
            f"inpainting UNet of {inpaint or spec!r} has {inpaint_unet.config.in_channels} input channels; "
            f"expected {4 + 1 + vae.config.latent_channels} (latents + mask + masked-image latents)"
        )
    bundle = ModelBundle(tokenizer, text_encoder, vae, unet, scheduler, inpaint_unet, name=spec)
    if is_local and (path / DEFAULTS_FILE).exists():
        bundle.defaults = json.loads((path / DEFAULTS_FILE).read_text())
    for m in bundle.modules():
        m.eval().requires_grad_(False)
    return bundle.to(device, dtype)


def _read_model_index(src: str, kw: dict) -> dict:
    path = Path(src)
    if path.exists():
        return json.loads((path / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download

    local = hf_hub_download(src, "model_index.json", local_files_only=kw["local_files_only"], revision=kw["revision"])
    return json.loads(Path(local).read_text())


def embedded_model_available() -> bool:
    return (EMBEDDED_MODEL_DIR / "model_index.json").exists()


def load_bundle(
    spec: str | None = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    local_files_only: bool = False,
    inpaint: str | None = None,
) -> ModelBundle:
    """Turn a model spec into a bundle.

    ``spec``: ``"default"`` (the embedded shapes model; ``tiny`` until it ships), ``"tiny"`` (random,
    for tests), a local diffusers folder, or a hub id such as ``CompVis/stable-diffusion-v1-4``.
    ``device``: auto/cuda/mps/cpu. ``dtype``: auto (fp16 on accelerators, fp32 on the CPU)/fp32/fp16/bf16.
    """
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        if embedded_model_available():
            bundle = load_pretrained(str(EMBEDDED_MODEL_DIR), dev, dt, local_files_only=True, inpaint=inpaint)
            bundle.name = DEFAULT_MODEL
            return bundle
        log.warning("embedded model not found in %s; using the random 'tiny' model", EMBEDDED_MODEL_DIR)
        spec = "tiny"
    if spec == "tiny":
        if inpaint is not None:
            raise ModelLoadError("'tiny' builds its own inpainting UNet; --inpaint-model cannot be combined with it")
        return tiny_bundle(device=dev, dtype=dt)
    if spec == "tiny-inpaint":
        return tiny_bundle(device=dev, dtype=dt, with_inpaint=True)
    return load_pretrained(spec, dev, dt, local_files_only=local_files_only, inpaint=inpaint)


def save_bundle(bundle: ModelBundle, out: str | Path) -> Path:
    """Write a bundle as a standard diffusers folder (``model_index.json`` + component subfolders)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle.tokenizer.save_pretrained(out / "tokenizer")
    bundle.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    bundle.vae.save_pretrained(out / "vae", safe_serialization=True)
    bundle.unet.save_pretrained(out / "unet", safe_serialization=True)
    bundle.scheduler.save_pretrained(out / "scheduler")
    if bundle.inpaint_unet is not None:
        bundle.inpaint_unet.save_pretrained(out / "inpaint_unet", safe_serialization=True)
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if bundle.defaults:
        (out / DEFAULTS_FILE).write_text(json.dumps(bundle.defaults, indent=2) + "\n")
    return out
