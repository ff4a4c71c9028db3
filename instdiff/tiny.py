"""The ``tiny`` bundle: random weights built from config in code, with an offline CLIP tokenizer (tests).

Geometry mirrors SD at a size a CPU runs in about a second per edit (diffusers' ``get_dummy_components``
style). The tokenizer's BPE merges are learned here from a word list, so it needs no files and no network.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from instdiff.bundle import MAX_TOKENS, ModelBundle, pick_device, pick_dtype

log = logging.getLogger(__name__)

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

    Args:
        words: the words to make single tokens.
        model_max_length: sequence length (77 for CLIP).

    Returns:
        A slow ``CLIPTokenizer`` built in memory (no files, no network).
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

    Args:
        seed: torch seed of the random weights.
        device: device spec (:func:`pick_device`).
        dtype: dtype spec (:func:`pick_dtype`).
        image_size: native image side in pixels.
        with_inpaint: also build a 9-channel inpainting UNet.
        prediction_type: the scheduler's prediction type.

    Returns:
        The bundle, in eval mode without gradients.
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
    scheduler = tiny_scheduler(prediction_type)
    bundle = ModelBundle(tokenizer, text_encoder, vae, unet, scheduler, inpaint, name="tiny")
    for m in bundle.modules():
        m.eval().requires_grad_(False)
    return bundle.to(dev, dt)


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """The tiny bundle's DDIM scheduler: SD's schedule (1000 steps, scaled-linear betas 0.00085–0.012, offset 1)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
