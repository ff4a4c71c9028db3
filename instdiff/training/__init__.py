"""Train the embedded shapes-world model: an SD-architecture bundle learned from rendered scenes.

Recipe (:func:`train_shapes`; the CLI runs it as ``instdiff train-shapes``):

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

Modules by responsibility: :mod:`~instdiff.training.config` (the YAML config), :mod:`~instdiff.training.data`
(scenes, token ids, inpainting masks), :mod:`~instdiff.training.networks` (model construction),
:mod:`~instdiff.training.stages` (the three training loops), :mod:`~instdiff.training.grounding` (the optional
token grounding loss), :mod:`~instdiff.training.report` (loss plot, sample grid, probe, summary) and
:mod:`~instdiff.training.recipe` (:func:`train_shapes`). This package re-exports their public names.
"""

from instdiff.bundle import token_ids
from instdiff.errors import TrainConfigError
from instdiff.training.config import (
    HELD_OUT_SEED,
    MASK_KINDS,
    SCENES_PER_CHUNK,
    InpaintConfig,
    SampleConfig,
    TextConfig,
    TrainConfig,
    UNetConfig,
    VaeConfig,
)
from instdiff.training.data import ShapesData, random_inpaint_masks, render_training_data
from instdiff.training.networks import build_models, count_parameters, shapes_vocabulary, widen_to_inpaint
from instdiff.training.recipe import train_shapes
from instdiff.training.report import (
    LOSS_PLOT,
    LOSSES_FILE,
    SAMPLE_GRID,
    SUMMARY_FILE,
    generation_probe,
    merge_losses,
    plot_losses,
    sample_grid,
    training_summary,
)
from instdiff.training.stages import (
    Ema,
    LossLog,
    encode_dataset,
    stage_timer,
    train_inpaint,
    train_unet,
    train_vae,
    vae_psnr,
)

__all__ = [
    "HELD_OUT_SEED",
    "LOSSES_FILE",
    "LOSS_PLOT",
    "MASK_KINDS",
    "SAMPLE_GRID",
    "SCENES_PER_CHUNK",
    "SUMMARY_FILE",
    "Ema",
    "InpaintConfig",
    "LossLog",
    "SampleConfig",
    "ShapesData",
    "TextConfig",
    "TrainConfig",
    "TrainConfigError",
    "UNetConfig",
    "VaeConfig",
    "build_models",
    "count_parameters",
    "encode_dataset",
    "generation_probe",
    "merge_losses",
    "plot_losses",
    "random_inpaint_masks",
    "render_training_data",
    "sample_grid",
    "shapes_vocabulary",
    "stage_timer",
    "token_ids",
    "train_inpaint",
    "train_shapes",
    "train_unet",
    "train_vae",
    "training_summary",
    "vae_psnr",
    "widen_to_inpaint",
]
