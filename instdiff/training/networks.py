"""The networks of the shapes-world model, built fresh from a :class:`~instdiff.training.config.TrainConfig`.

The architecture is Stable Diffusion 1.x's at a small size: a word tokenizer over the shapes world's
vocabulary (77 positions), a CLIP text encoder, an AutoencoderKL, a UNet2DConditionModel with
cross-attention, SD 1.x's DDIM scheduler, and the inpainting UNet made by widening ``conv_in`` as SD's
inpainting model was.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from instdiff import synthetic
from instdiff.models import BASE_WORDS, MAX_TOKENS, build_word_tokenizer
from instdiff.training.config import TrainConfig


def shapes_vocabulary() -> list[str]:
    """The tokenizer's words: the shapes world's vocabulary, the comma and the generic base words, sorted."""
    return sorted(set(synthetic.VOCABULARY) | {","} | set(BASE_WORDS))


def build_models(
    cfg: TrainConfig,
) -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDIMScheduler]:
    """Fresh (randomly initialised) networks from ``cfg``.

    The scheduler is SD 1.x's: 1000 steps, scaled-linear betas 0.00085–0.012, ε prediction, ``steps_offset`` 1.

    Args:
        cfg: the training config (``text``, ``vae``, ``unet`` and ``image_size`` are read).

    Returns:
        ``(tokenizer, text_encoder, vae, unet, scheduler)``, on the CPU in float32.
    """
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
    """A copy of ``unet`` whose ``conv_in`` takes ``extra_channels`` more inputs, zero-initialised.

    SD's inpainting model was made this way from the base UNet (inputs: noisy latents, the mask and the
    masked image's latents); with zero extra weights the copy computes exactly what ``unet`` does.

    Args:
        unet: the base UNet (left unchanged).
        extra_channels: input channels to add (1 mask + the latent channels for SD-style inpainting).

    Returns:
        The widened UNet, on ``unet``'s device.
    """
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
    """Number of parameters (elements) of ``module``, trainable or not."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["build_models", "count_parameters", "shapes_vocabulary", "widen_to_inpaint"]
