"""Model bundles from every source, behind one loader.

* a hub id or a local diffusers folder (``from_pretrained``; SD 1.x, 2.x, v-prediction included),
* ``tiny``: random weights built from config in code, with an offline CLIP tokenizer (tests; :mod:`instdiff.tiny`),
* ``default``: the embedded shapes-world model shipped in ``instdiff/assets/shapes`` (``tiny`` until
  that folder exists).

The bundle itself is :class:`instdiff.bundle.ModelBundle`; this module re-exports it with the device/dtype
choice and the tiny builders, so ``from instdiff.models import ...`` keeps every name it had.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from instdiff.bundle import MAX_TOKENS, ModelBundle, pick_device, pick_dtype
from instdiff.errors import ModelLoadError
from instdiff.model_defaults import ASSETS, DEFAULT_MODEL, DEFAULTS_FILE, EMBEDDED_MODEL_DIR, read_defaults_file
from instdiff.tiny import BASE_WORDS, build_word_tokenizer, tiny_bundle, tiny_vocabulary

log = logging.getLogger(__name__)

__all__ = [
    "ASSETS",
    "BASE_WORDS",
    "DEFAULTS_FILE",
    "DEFAULT_MODEL",
    "EMBEDDED_MODEL_DIR",
    "MAX_TOKENS",
    "ModelBundle",
    "ModelLoadError",
    "build_word_tokenizer",
    "embedded_model_available",
    "load_bundle",
    "load_pretrained",
    "looks_local",
    "pick_device",
    "pick_dtype",
    "save_bundle",
    "tiny_bundle",
    "tiny_vocabulary",
]


# ---- pretrained -----------------------------------------------------------------------------
def looks_local(spec: str) -> bool:
    """Whether a model spec names a local folder rather than a hub id.

    Args:
        spec: ``./x``, ``/x``, ``~/x`` (always local), or ``a/b`` (local when it exists, else a hub id).

    Returns:
        True for a local path.
    """
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

    Args:
        spec: hub id or local folder.
        device: where to put the modules.
        dtype: their dtype.
        local_files_only: never reach the hub.
        inpaint: hub id or folder of an inpainting checkpoint.
        revision: hub revision.

    Returns:
        The bundle, in eval mode without gradients; ``defaults`` from the folder's ``instdiff.json``.

    Raises:
        ModelLoadError: a missing or malformed folder, an inpainting-only checkpoint without its base, an
            unreachable hub id, an inpainting UNet with the wrong number of input channels.
    """
    path = Path(spec).expanduser()
    is_local = path.exists()
    if looks_local(spec) and not is_local:
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
    if is_local:
        bundle.defaults = read_defaults_file(path)  # the same reader the batch driver uses (no weights)
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
    """Whether the embedded shapes-world model ships in ``instdiff/assets/shapes``."""
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

    Raises:
        ModelLoadError: the model cannot be loaded (see :func:`load_pretrained`), or ``tiny`` combined with a
            separate inpainting model.
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
    """Write a bundle as a standard diffusers folder (``model_index.json`` + component subfolders).

    Args:
        bundle: the bundle to save (its ``defaults`` go to ``instdiff.json``).
        out: the folder, created if needed.

    Returns:
        ``out`` as a path.
    """
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
