"""The training config: one frozen dataclass per stage and :class:`TrainConfig` around them.

YAML files in ``configs/train/`` are parsed into :class:`TrainConfig` by the project's one parser,
:func:`instdiff.config.from_mapping` (every key and type checked; lists become tuples where a field is a tuple).
Every section checks its fields' types on construction (:func:`instdiff.config.check_fields`), also when built
in Python. Values the trainer cannot use are refused by :meth:`TrainConfig.validate`. All raise
:class:`~instdiff.errors.TrainConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instdiff.config import check_fields, from_mapping, load_yaml, to_plain
from instdiff.errors import ConfigError, TrainConfigError

SCENES_PER_CHUNK = 250  # scenes rendered from one seed: chunk c is make_scenes(250, seed=data_seed + c)
HELD_OUT_SEED = 10_000  # first seed of held-out scenes; training chunks must stay below it
MASK_KINDS: tuple[str, ...] = ("object", "dilated_object", "box", "background", "full")


@dataclass(frozen=True)
class VaeConfig:
    """AutoencoderKL: 3 levels (64 px → 16×16×4 latents) trained on L1 + L2 + ``kl_weight`` · KL.

    ``steps``/``batch_size``/``lr``: the VAE stage (cosine learning-rate decay); ``max_seconds`` stops the stage
    early (recorded in the summary).
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    latent_channels: int = 4
    kl_weight: float = 1e-6
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        check_fields(self, TrainConfigError)


@dataclass(frozen=True)
class TextConfig:
    """CLIPTextModel over the shapes-world word tokenizer (77 positions, like SD's)."""

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512

    def __post_init__(self) -> None:
        check_fields(self, TrainConfigError)


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel with cross-attention at the latent's full and half resolution.

    ``steps``/``batch_size``/``lr``/``text_lr``: the joint text-encoder + UNet stage; ``text_lr`` 0 freezes the
    text encoder (keeps the inpainting UNet's conditioning valid when continuing). ``snr_gamma``: min-SNR loss
    weighting (``None`` = plain ε MSE). ``max_seconds`` stops the stage early (recorded in the summary).
    ``grounding_weight``: weight of the TokenCompose-style token grounding loss
    (:mod:`instdiff.training.grounding`; 0 = off, as in the shipped runs 1-2) on the cross-attention layers at
    the ``grounding_downsample`` factors. ``checkpoint_every``: every so many steps the EMA weights are saved as a
    complete model folder ``<out>/checkpoint`` (0 = never); a later run continues it with ``init_from``.
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
    grounding_weight: float = 0.0
    grounding_downsample: tuple[int, ...] = (1, 2)
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        check_fields(self, TrainConfigError)


@dataclass(frozen=True)
class InpaintConfig:
    """Inpainting fine-tune of a copy of the base UNet with 9 input channels.

    ``mask_mix``: probabilities of the mask kinds drawn per sample (:data:`MASK_KINDS`: object, dilated
    object, box, background, full); they are normalised.
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

    def __post_init__(self) -> None:
        check_fields(self, TrainConfigError)


@dataclass(frozen=True)
class SampleConfig:
    """Sample grid and the end-of-training probe (held-out captions, seed ``HELD_OUT_SEED + 1``)."""

    n_grid: int = 16
    steps: int = 50
    guidance: float = 5.0
    n_probe: int = 0

    def __post_init__(self) -> None:
        check_fields(self, TrainConfigError)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train_shapes`` needs; YAML files in ``configs/train/`` are parsed into it.

    ``mixed_precision``: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16`` or ``no``. ``workers``: rendering
    processes (0 = one per CPU core, at most 16). ``num_threads``: torch CPU threads (0 = torch's default).
    ``save_dtype``: storage dtype of the saved weights, ``fp16`` or ``fp32``. ``init_from``: a model folder
    written by an earlier run to continue from (its architecture, tokenizer and VAE scaling are kept; the
    architecture fields are then ignored); a stage with 0 steps is skipped.
    """

    name: str = "shapes"
    seed: int = 0
    data_seed: int = 0
    n_scenes: int = 20_000
    image_size: int = 64
    device: str = "auto"
    mixed_precision: str = "auto"
    workers: int = 0
    num_threads: int = 0
    log_every: int = 50
    save_dtype: str = "fp16"
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    editor_defaults: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, TrainConfigError)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> TrainConfig:
        """Build from a nested mapping (as read from YAML) with :func:`instdiff.config.from_mapping`.

        Args:
            data: the parsed YAML; missing keys keep their defaults, lists become tuples for tuple fields.

        Returns:
            The config (not yet validated: see :meth:`validate`).

        Raises:
            TrainConfigError: an unknown key (the message lists the accepted ones) or a value of the wrong type.
        """
        try:
            return from_mapping(TrainConfig, data)
        except ConfigError as exc:
            if isinstance(exc, TrainConfigError):
                raise
            raise TrainConfigError(str(exc)) from None

    @staticmethod
    def from_yaml(path: str | Path) -> TrainConfig:
        """Parse a YAML file such as ``configs/train/shapes.yaml``.

        Args:
            path: the YAML file; its top level is a mapping of :class:`TrainConfig`'s keys.

        Returns:
            The config (not yet validated: see :meth:`validate`).

        Raises:
            InputNotFoundError: the file does not exist.
            TrainConfigError: not valid YAML, not a mapping, an unknown key or a value of the wrong type.
        """
        try:
            data = load_yaml(path, "training config")
        except ConfigError as exc:
            raise TrainConfigError(str(exc)) from None
        return TrainConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data (nested mappings, tuples as lists), as the summary records it."""
        return to_plain(self)

    def validate(self) -> None:
        """Refuse values the trainer cannot use.

        Raises:
            TrainConfigError: too few scenes, training seeds reaching the held-out ones, an image size that is
                not a multiple of the VAE factor × UNet downsampling, an unknown ``mixed_precision`` or
                ``save_dtype``, a bad ``inpaint.mask_mix`` or grounding setting, or a stage without steps or
                batch when no ``init_from`` is given.
        """
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
        mix = self.inpaint.mask_mix
        if len(mix) != len(MASK_KINDS) or min(mix) < 0 or sum(mix) <= 0:
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


__all__ = [
    "HELD_OUT_SEED",
    "MASK_KINDS",
    "SCENES_PER_CHUNK",
    "InpaintConfig",
    "SampleConfig",
    "TextConfig",
    "TrainConfig",
    "UNetConfig",
    "VaeConfig",
]
