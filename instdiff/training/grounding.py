"""Token grounding loss for training the embedded shapes-world model (optional, off by default).

Stable Diffusion's cross-attention maps localise the words of a prompt because it saw billions of
image-text pairs; the embedded model saw 2.5 M samples of one synthetic world and its word maps stay
diffuse (measured in the model card). The shapes world knows, for every scene, which pixels each caption
word describes, so training can add a grounding term that asks each colour/shape word to put its attention
inside its object and each background word inside the background. The form of the term is TokenCompose's
token loss (Wang et al., CVPR 2024, "TokenCompose: Text-to-Image Diffusion with Token-level Supervision"):

    L_ground = mean over grounded tokens i and recorded layers of (1 − Σ_{u ∈ R_i} A_i(u) / Σ_u A_i(u))²

where A_i is token i's head-averaged cross-attention map at that layer and R_i the token's region pooled to
the layer's grid (area fractions). A model trained with it is no longer "attention as it emerges": every
figure measured on such a model says so (see the model card).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPTokenizer

from instdiff import synthetic
from instdiff.attention import RecordingAttnProcessor, cross_attention_paths, layer_downsample
from instdiff.errors import TrainConfigError

NOT_GROUNDED = -1  # token_targets value of a token without a region (articles, "and", "on", specials)
BACKGROUND = 0  # token_targets value of a background word (the label value of background pixels)


def token_targets(tokenizer: CLIPTokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Which region each token of shapes-world captions describes.

    Object k's colour and shape words get ``k + 1`` (the label value of its pixels, objects in caption =
    drawing order); the background's texture, colour and "background" words get ``0`` (:data:`BACKGROUND`);
    every other token (articles, "and", "on", commas, start/end/padding) gets ``-1`` (:data:`NOT_GROUNDED`).

    Args:
        tokenizer: the shapes-world word tokenizer.
        ids: (N, T) token ids of captions from :func:`instdiff.synthetic.caption_for`, where every word is one
            token.

    Returns:
        (N, T) int8 region index per token.
    """
    colours, shapes = set(synthetic.COLORS), set(synthetic.SHAPES)
    bg_words = {w for w in synthetic.TEXTURE_WORDS.values() if w} | set(synthetic.BACKGROUNDS) | {"background"}
    out = torch.full(ids.shape, NOT_GROUNDED, dtype=torch.int8)
    vocab = {v: k.removesuffix("</w>") for k, v in tokenizer.get_vocab().items()}
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for n, row in enumerate(ids.tolist()):
        obj, after_on = 0, False
        for j, tid in enumerate(row):
            if tid in specials:
                continue
            word = vocab.get(tid, "")
            if word == "on":
                after_on = True
            elif after_on and word in bg_words:
                out[n, j] = BACKGROUND
            elif not after_on and word in colours:
                out[n, j] = obj + 1
            elif not after_on and word in shapes:
                out[n, j] = obj + 1
                obj += 1
    return out


def region_fractions(labels: torch.Tensor, size: int, n_values: int = 4) -> torch.Tensor:
    """Area fraction of each label value in each cell of a ``size`` × ``size`` grid (R_i of the token loss).

    Args:
        labels: (N, H, W) uint8 per-pixel labels (0 = background, k = object k).
        size: grid side in cells (the finest recorded attention map's side).
        n_values: label values counted (V).

    Returns:
        (N, V, size, size) float32 in [0, 1]; the V fractions of a cell sum to 1.
    """
    onehot = F.one_hot(labels.long(), n_values).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size)


class _KeepProbs:
    """A store for :class:`~instdiff.attention.RecordingAttnProcessor` that keeps the last head-averaged
    probabilities of every row with their graph (the recording store detaches and sums them).
    """

    cond_rows = slice(None)

    def __init__(self) -> None:
        self.probs: torch.Tensor | None = None

    def wants(self) -> bool:
        """Always record (the store protocol of :class:`~instdiff.attention.AttentionStore`)."""
        return True

    def add(self, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        """Keep the last probabilities (B, HW, T), graph included."""
        self.probs = probs  # (B, HW, T)


class GroundingAttnProcessor(RecordingAttnProcessor):
    """The recording processor (same attention as SDPA) keeping the probabilities, with their graph, for the loss.

    Attributes:
        probs: (B, HW, T) head-averaged attention probabilities of the last forward pass, or ``None`` before it.
    """

    def __init__(self) -> None:
        super().__init__(_KeepProbs())

    @property
    def probs(self) -> torch.Tensor | None:
        """(B, HW, T) probabilities of the last forward pass, or ``None``."""
        return self.store.probs

    @probs.setter
    def probs(self, value: torch.Tensor | None) -> None:
        self.store.probs = value


def install_grounding(unet: UNet2DConditionModel, downsample: Sequence[int]) -> tuple[dict, dict]:
    """Put recorders on the cross-attention layers at the given downsample factors.

    Layers are chosen by module path and feature-map size (:func:`instdiff.attention.cross_attention_paths`,
    :func:`instdiff.attention.layer_downsample`); the others keep their processors.

    Args:
        unet: the UNet being trained (its processors are replaced in place).
        downsample: latent side / layer feature-map side of the layers to record (1 = the latent's size).

    Returns:
        ``(recorders by path, previous processors)``; restore with ``unet.set_attn_processor(previous)``.

    Raises:
        TrainConfigError: no cross-attention layer at these factors.
    """
    previous = dict(unet.attn_processors)
    chosen = {
        p: GroundingAttnProcessor() for p in cross_attention_paths(unet) if layer_downsample(unet, p) in set(downsample)
    }
    if not chosen:
        raise TrainConfigError(f"no cross-attention layer at downsample factors {list(downsample)}")
    unet.set_attn_processor({**previous, **chosen})
    return chosen, previous


def grounding_loss(
    recorders: dict[str, GroundingAttnProcessor], regions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """TokenCompose token loss over the recorded layers (the module's L_ground).

    Args:
        recorders: the recorders of :func:`install_grounding`, after a UNet forward pass.
        regions: (B, V, S, S) area fractions of each label value at the finest recorded grid (pooled to each
            coarser layer's grid).
        targets: (B, T) from :func:`token_targets`; rows without grounded tokens (e.g. dropped captions) add
            nothing.

    Returns:
        Scalar float32 loss (0 when no token is grounded), differentiable through the recorded probabilities.

    Raises:
        RuntimeError: no UNet forward pass has reached the recorders yet (a programming error).
    """
    valid = targets >= 0  # (B, T)
    if not bool(valid.any()):
        return regions.new_zeros(())
    idx = targets.long().clamp_min(0)
    losses = []
    for rec in recorders.values():
        probs = rec.probs  # (B, HW, T)
        if probs is None:
            raise RuntimeError("grounding_loss called before a UNet forward reached the grounding recorders")
        side = int(round(probs.shape[1] ** 0.5))
        reg = regions if regions.shape[-1] == side else F.adaptive_avg_pool2d(regions, side)
        reg = reg.flatten(2)  # (B, V, HW)
        per_token = torch.gather(reg, 1, idx.unsqueeze(-1).expand(-1, -1, reg.shape[-1]))  # (B, T, HW)
        a = probs.transpose(1, 2).float()  # (B, T, HW)
        share = (a * per_token).sum(-1) / a.sum(-1).clamp_min(1e-8)
        losses.append((((1.0 - share) ** 2) * valid).sum() / valid.sum())
    return torch.stack(losses).mean()


__all__ = [
    "BACKGROUND",
    "NOT_GROUNDED",
    "GroundingAttnProcessor",
    "grounding_loss",
    "install_grounding",
    "region_fractions",
    "token_targets",
]
