"""FISEdit (Yu et al., AAAI 2024) under the editor contract: an adapter over :mod:`instdiff.sparse`.

FISEdit edits its own generations: for each prompt pair the session generates the source prompt (recording its
per-step cache), then re-generates sparsely with the target prompt. This is the only module of
:mod:`instdiff.editing` that imports the sparse engine (which itself imports only :mod:`instdiff.sampling`, so
there is no cycle).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Method
from instdiff.editing.contract import register
from instdiff.sparse import FISEditConfig, fisedit_edit_pairs
from instdiff.types import EditResult

log = logging.getLogger(__name__)


@register(Method.FISEDIT)
def fisedit(
    bundle: ModelBundle,
    images: torch.Tensor,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: EditConfig,
    seeds: Sequence[int],
) -> EditResult:
    """FISEdit for prompt pairs: generate each source prompt, then re-generate sparsely with the target prompt.

    ``images`` only fix the output size. They should be ``generate(bundle, source_prompts, cfg.steps,
    cfg.guidance, seeds)``: both that and the session start from :func:`instdiff.sampling.initial_latents` and
    guide with :func:`instdiff.sampling.guided_eps`, so they equal ``extras["source_images"]`` (up to float
    rounding of the text encoder's batching). The difference mask comes from steps 5–10 of 50 in the paper;
    those fractions of ``cfg.steps`` are kept at other step counts.

    Args:
        bundle: the models.
        images: (B, 3, H, W), their side is the generated size.
        source_prompts: B prompts to generate.
        target_prompts: B prompts to edit the generations to.
        cfg: ``steps`` and ``guidance``.
        seeds: one seed per pair.

    Returns:
        The edits; extras hold ``source_images`` (B, 3, H, W) and per-row session extras under ``rows``.
    """
    mask_steps = max(1, round(cfg.steps * 0.2))
    fcfg = FISEditConfig(
        num_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        image_size=int(images.shape[-1]),
        mask_steps=mask_steps,
        mask_from=max(1, min(mask_steps, round(cfg.steps * 0.1))),
    )
    return fisedit_edit_pairs(bundle, source_prompts, target_prompts, fcfg, list(seeds))
