"""Typed configuration at the bottom of the project: choices and editor settings.

Torch-free on purpose (a leaf module): the batch job's configs are unpickled on Ray workers that never load
torch, and every other module may import this one without a cycle.

* enums: :class:`Method` (which owns the rule "needs a source prompt"), :class:`Inpaint`, :class:`PromptMode`,
  :class:`MaskPreset`, :class:`Refinement`, :class:`SizePolicy`;
* :class:`MaskConfig` (InstDiffEdit Eq. 6–9 and the official code's variants) and :class:`EditConfig` (all
  editor options), validated in ``__post_init__``: a value of the wrong type or out of range raises
  :class:`~instdiff.errors.ConfigError` naming the field and the accepted values;
* :func:`from_mapping` turns a parsed YAML mapping into a frozen dataclass, checking every key and type
  (training, batch and bench configs all use it), with :func:`load_yaml`, :func:`apply_override`,
  :func:`parse_assignment` and :func:`to_plain` around it; :func:`check_fields`, called first in the
  ``__post_init__`` of every config dataclass, checks each field against its annotation with :func:`coerce`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from instdiff.errors import ConfigError, InputNotFoundError, StorageError

DEFAULT_MAX_PIXELS = 4096 * 4096  # decoded images larger than this are refused (decompression bombs)
MAX_GUIDANCE = 100.0
"""The largest classifier-free guidance scale accepted (SD uses 7.5; far larger scales saturate the image)."""
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the seeds torch.Generator.manual_seed takes (negative: modulo 2^64)


# ---- choices ---------------------------------------------------------------------------------------------------
class Method(StrEnum):
    """An editor. Every one is called through the same contract (``instdiff.editing.edit``)."""

    INSTDIFFEDIT = "instdiffedit"
    SDEDIT = "sdedit"
    DIFFEDIT = "diffedit"
    FISEDIT = "fisedit"

    def needs_source_prompt(self, prompt_mode: PromptMode | str = "full") -> bool:
        """Whether the method reads the source prompt, so an empty one is an error.

        DiffEdit contrasts the source and target prompts (its mask and its inversion); FISEdit generates the
        source prompt's image before editing it; InstDiffEdit reads it only in ``edit_words`` prompt mode (the
        target's words that are not in the source). SDEdit never reads it.
        """
        if self in (Method.DIFFEDIT, Method.FISEDIT):
            return True
        return self is Method.INSTDIFFEDIT and PromptMode(prompt_mode) is PromptMode.EDIT_WORDS

    @property
    def generates_source(self) -> bool:
        """Whether the method edits its own generation of the source prompt, so a row needs no input image."""
        return self is Method.FISEDIT


class Inpaint(StrEnum):
    """InstDiffEdit's final step (paper §3.3: inpaint the input inside the last mask)."""

    AUTO = "auto"  # the bundle's inpainting UNet when present, latent-blend otherwise
    UNET = "unet"  # require the inpainting UNet
    BLEND = "blend"  # latent-blend inpainting with the base UNet (Blended Latent Diffusion)
    NONE = "none"  # keep the blended-denoising result of the first noise


class PromptMode(StrEnum):
    """What InstDiffEdit conditions on."""

    FULL = "full"  # the whole target prompt (paper)
    EDIT_WORDS = "edit_words"  # only the target's words absent from the source (official code's phrase)


class MaskPreset(StrEnum):
    """Which InstDiffEdit mask computation runs (:class:`MaskConfig`'s ``preset``)."""

    PAPER = "paper"  # Eq. 6–9 on the averaged float maps, with MaskConfig's option fields (instdiff.masks)
    OFFICIAL = "official"  # the official code's recipe, 8-bit per-word images (instdiff.masks_official)


class Refinement(StrEnum):
    """How the position vector P turns token maps into one map."""

    WEIGHTED = "weighted"  # paper Eq. 9: A_ref = Σ_i P_i · A_i
    OFFICIAL = "official"  # official code: norm(mean(+1 maps)) − norm(mean(−1 maps)), clamped at 0


class MaskPrompt(StrEnum):
    """Which prompt InstDiffEdit's mask phase conditions on (and reads the maps of)."""

    TARGET = "target"  # the paper: the target prompt (or its edit words)
    SOURCE = "source"  # the source prompt: its edited words' maps find the object that is in the image


class Preset(StrEnum):
    """Where InstDiffEdit's settings come from (:meth:`EditConfig.for_model`)."""

    MODEL = "model"  # the model folder's instdiff.json (the embedded model: its measured best variant)
    PAPER = "paper"  # the paper's Eq. 6–9 and loop


class Reference(StrEnum):
    """The map Eq. 6 compares the word maps with, to pick the index token."""

    START = "start"  # paper Eq. 6: the start token's map
    SINK = "sink"  # the attention sink: the non-word token (start, end or padding) holding the most mass


class TokenChoice(StrEnum):
    """Which token maps make the mask."""

    PAPER = "paper"  # paper Eq. 6–8: the index token and the position vector P from map similarities
    EDIT_SPAN = "edit_span"  # +1 on the target's words that differ from the source (a word diff), −1 on the rest


class SizePolicy(StrEnum):
    """What to do with image sides that are not multiples of the model's step (VAE factor × UNet downsampling)."""

    RESIZE = "resize"  # resize to the nearest multiple (aspect kept within one step)
    PAD = "pad"  # pad right/bottom by edge replication; outputs are cropped back by callers
    REFUSE = "refuse"  # raise ImageInputError


def _enum(cls: type[Enum], value: Any, key: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not accepted; accepted: {', '.join(m.value for m in cls)}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---- editor settings -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskConfig:
    """InstDiffEdit mask options. Defaults follow the paper (§3.2, Eq. 6–9); the official code's variants
    (xiaotianqing/InstDiffEdit) are options.

    ``gamma1`` / ``gamma2``: the thresholds of Eq. 8 on cosine similarities (+1 above γ1, −1 below γ2).
    ``phi``: the binarisation threshold of Eq. 9 on the min-max normalised map, in [0, 1].
    ``refinement``: Eq. 9's weighted sum or the official code's difference of normalised means.
    ``invert_start``: official code inverts the start-token map before the cosine of Eq. 6.
    ``merge_bpe``: merge the BPE pieces of one word into one word map (their mean) that counts once in Eq.
    6–9: only the word's first piece can be the index token or carry P_i, so a word split into k pieces
    weighs as one word in Eq. 9's sum and the refinement means, not k times (the official code's word maps).
    Off by default, also in :meth:`paper`: the paper states Eq. 6–9 per token, and an SD user asking for the
    paper gets its equations as written; the official recipe (:meth:`official`) always merges. On the shipped
    models it changes nothing (their tokenizers keep every known word whole), so the golden values do not
    decide it either way.
    ``running_mean``: average maps over the steps so far (official code) instead of the current step.
    ``smooth_size`` (odd, px) / ``smooth_sigma`` (px) / ``smooth_iters``: the Gaussian smoothing;
    ``smooth_resolution`` is the square grid it runs on (``None`` = the latent grid; the official code uses
    5×5 twice at 64×64).
    ``blend_current_step``: after the step t → t_prev, blend with the input noised to t (the official loop)
    instead of t_prev (paper Eq. 5).
    ``preset``: ``paper`` runs Eq. 6–9 (:mod:`instdiff.masks`) with the fields above; ``official`` runs the
    official code's recipe (:mod:`instdiff.masks_official`: per-word 8-bit images, PIL bicubic resize to the
    latent grid, per-word min-max, ``>=``/``<=`` at γ1/γ2, mean-difference refinement, OpenCV's 5×5 binomial
    blur twice), always with the running mean and the current-step blend; it reads ``gamma1``, ``gamma2`` and
    ``phi`` and refuses non-default values of the paper pipeline's fields. :meth:`official` and :meth:`paper`
    build the two presets.
    ``reference``: the map Eq. 6 compares word maps with: the start token (paper) or the measured attention
    sink, the non-word token holding the most attention mass (the start token on SD, so the same there; the end
    and padding tokens on the embedded model). ``tokens``: Eq. 6–8's similarity-based choice (paper) or
    ``edit_span``: +1 on the target prompt's words that a word diff against the source prompt marks as new,
    −1 on the other words (Eq. 6–8 are used when the prompts do not differ).

    Raises:
        ConfigError: a value outside the ranges above, or a paper-pipeline field set with ``preset: official``.
    """

    gamma1: float = 0.9
    gamma2: float = 0.6
    phi: float = 0.2
    refinement: Refinement = Refinement.WEIGHTED
    invert_start: bool = False
    merge_bpe: bool = False
    running_mean: bool = False
    smooth_size: int = 5
    smooth_sigma: float = 1.0
    smooth_iters: int = 1
    smooth_resolution: int | None = None
    blend_current_step: bool = False
    preset: MaskPreset = MaskPreset.PAPER

    @classmethod
    def paper(cls, **kw: Any) -> MaskConfig:
        """The paper's Eq. 6–9 (γ1 = 0.9, γ2 = 0.6, φ = 0.2, §4.1); ``kw`` overrides fields."""
        return cls(**{**kw, "preset": MaskPreset.PAPER})

    @classmethod
    def official(cls, **kw: Any) -> MaskConfig:
        """The official code's mask computation (xiaotianqing/InstDiffEdit ``model/InstDiffEdit.py``).

        Args:
            **kw: ``gamma1``, ``gamma2``, ``phi`` overrides (its command line's ``--threshold`` is φ).
        """
        return cls(**{**kw, "preset": MaskPreset.OFFICIAL})

    @property
    def uses_running_mean(self) -> bool:
        """Whether the maps are averaged over the steps so far (the official recipe always does)."""
        return self.running_mean or self.preset is MaskPreset.OFFICIAL

    @property
    def blends_at_current_step(self) -> bool:
        """Whether Eq. 5 blends with the input noised to the current step t (the official recipe always does)."""
        return self.blend_current_step or self.preset is MaskPreset.OFFICIAL

    reference: Reference = Reference.START
    tokens: TokenChoice = TokenChoice.PAPER

    def __post_init__(self) -> None:
        check_fields(self)
        if self.preset is MaskPreset.OFFICIAL:
            fixed = (
                "refinement",
                "invert_start",
                "merge_bpe",
                "smooth_size",
                "smooth_sigma",
                "smooth_iters",
                "smooth_resolution",
            )
            changed = [f.name for f in fields(self) if f.name in fixed and getattr(self, f.name) != f.default]
            _check(
                not changed,
                f"{', '.join(changed)}: fixed by preset 'official' (the official code's recipe); leave unset or "
                "use preset 'paper'",
            )
        _check(
            -1.0 <= self.gamma2 <= self.gamma1 <= 1.0,
            f"gamma1, gamma2: need -1 <= gamma2 <= gamma1 <= 1 (cosine thresholds); got {self.gamma1}, {self.gamma2}",
        )
        _check(0.0 <= self.phi <= 1.0, f"phi: must be in [0, 1]; got {self.phi}")
        _check(
            self.smooth_size >= 1 and self.smooth_size % 2 == 1,
            f"smooth_size: must be an odd number >= 1; got {self.smooth_size}",
        )
        _check(self.smooth_sigma > 0, f"smooth_sigma: must be > 0; got {self.smooth_sigma}")
        _check(self.smooth_iters >= 0, f"smooth_iters: must be >= 0; got {self.smooth_iters}")
        _check(
            self.smooth_resolution is None or self.smooth_resolution >= 1,
            f"smooth_resolution: must be null or >= 1; got {self.smooth_resolution}",
        )


@dataclass(frozen=True)
class EditConfig:
    """All editor options; defaults are InstDiffEdit's paper settings (SD 1.4, 50 DDIM steps, r = 0.5, n = 3).

    ``steps``: DDIM steps of the full schedule; ``strength``: noise strength r in (0, 1], so ⌊r·steps⌋ steps
    run (at least one; diffusers' convention; τ = r·T). ``guidance``: classifier-free guidance scale.
    ``seed``: default per-image seed.
    InstDiffEdit: ``n_noises`` parallel noises per image, ``mask``, ``attention_downsample`` (UNet layers whose
    feature map is the latent's size / this factor; ``None`` = the bundle's 16×16-class layers),
    ``prompt_mode``, ``inpaint`` / ``inpaint_steps`` (``None`` = ``steps``) / ``inpaint_strength`` for the final
    step, ``paste_back`` (composite the input back outside the final mask, in pixel space).
    Every editor with a mask (InstDiffEdit, DiffEdit): ``feather``, the width in px, at the input's size, of the
    soft edge laid outside the mask when an edit made at a smaller working size is pasted onto the original
    pixels (``instdiff.composite.paste_back``; 0 = a hard edge).
    ``prompt_mode``, ``inpaint`` / ``inpaint_steps`` (``None`` = ``steps``) / ``inpaint_strength`` (``None`` =
    ``strength``: start from the input noised to r; 1.0: from pure noise) for the final step;
    ``inpaint_steps_match``: the final step's schedule has ⌊r·steps⌋ steps (the edit's count; from pure noise it
    then costs what SDEdit's loop costs), overriding ``inpaint_steps``; ``paste_back`` (composite the input back
    outside the final mask, in pixel space).
    The n-noise mask phase: ``mask_steps`` caps how many steps run the n noises and update the mask (``None`` =
    every step, the paper); ``mask_stable`` ends the phase early once every image's mask has at least this IoU
    with its previous step's mask; ``mask_guidance`` ``False`` runs the phase on the conditional rows alone (the
    maps come from them; half the UNet rows). After the phase the final inpainting does the edit (with
    ``inpaint_strength`` = r it starts from the input noised to r, as SDEdit does); with ``inpaint: none`` the
    first noise's blended denoising continues alone. ``mask_prompt``: the mask phase conditions on the target
    prompt (paper) or on the source prompt, whose edited words name what is in the image (rows with an empty
    source prompt use the target; needs a final inpainting, ``inpaint`` not ``none``). ``attention_layers``:
    fnmatch patterns on the cross-attention processor paths read at ``attention_downsample`` (``None`` = all
    of them), e.g. the layers a probe measured to localise (``cluster.benchmarks.attention_probe``).
    DiffEdit: ``diffedit_noises`` noises for the mask, ``diffedit_mask_strength`` (their noise level) and
    ``diffedit_threshold`` on the min-max normalised difference.

    Raises:
        ConfigError: a value outside its range (the message names the field and what is accepted).
    """

    method: Method = Method.INSTDIFFEDIT
    steps: int = 50
    strength: float = 0.5
    guidance: float = 7.5
    seed: int = 0
    # InstDiffEdit
    n_noises: int = 3
    mask: MaskConfig = field(default_factory=MaskConfig)
    attention_downsample: int | None = None
    prompt_mode: PromptMode = PromptMode.FULL
    inpaint: Inpaint = Inpaint.AUTO
    inpaint_steps: int | None = None
    inpaint_strength: float | None = 1.0
    inpaint_steps_match: bool = False
    paste_back: bool = True
    feather: int = 4
    mask_steps: int | None = None
    mask_stable: float | None = None
    mask_guidance: bool = True
    mask_prompt: MaskPrompt = MaskPrompt.TARGET
    attention_layers: tuple[str, ...] | None = None
    # DiffEdit
    diffedit_noises: int = 10
    diffedit_mask_strength: float = 0.5
    diffedit_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_fields(self)
        _check(self.steps >= 1, f"steps: must be >= 1; got {self.steps}")
        _check(0.0 < self.strength <= 1.0, f"strength: must be in (0, 1]; got {self.strength}")
        _check(
            math.isfinite(self.guidance) and 0.0 <= self.guidance <= MAX_GUIDANCE,
            f"guidance: accepted 0 to {MAX_GUIDANCE:g} (classifier-free guidance; SD uses 7.5); got {self.guidance}",
        )
        _check(
            SEED_MIN <= self.seed <= SEED_MAX,
            f"seed: must be in [{SEED_MIN}, {SEED_MAX}] (what torch.Generator.manual_seed takes); got {self.seed}",
        )
        _check(self.feather >= 0, f"feather: must be an integer number of px >= 0; got {self.feather}")
        _check(self.n_noises >= 1, f"n_noises: must be >= 1; got {self.n_noises}")
        _check(
            self.attention_downsample is None or self.attention_downsample >= 1,
            f"attention_downsample: must be null or >= 1; got {self.attention_downsample}",
        )
        _check(
            self.inpaint_steps is None or self.inpaint_steps >= 1,
            f"inpaint_steps: must be null or >= 1; got {self.inpaint_steps}",
        )
        _check(
            self.inpaint_strength is None or 0.0 < self.inpaint_strength <= 1.0,
            f"inpaint_strength: must be null (the edit's strength r) or in (0, 1]; got {self.inpaint_strength}",
        )
        _check(
            self.mask_prompt is MaskPrompt.TARGET or self.inpaint is not Inpaint.NONE,
            "mask_prompt: 'source' needs a final inpainting (inpaint auto, unet or blend), not inpaint: none",
        )
        _check(
            self.mask_steps is None or self.mask_steps >= 1, f"mask_steps: must be null or >= 1; got {self.mask_steps}"
        )
        _check(
            self.mask_stable is None or 0.0 < self.mask_stable <= 1.0,
            f"mask_stable: must be null or in (0, 1] (an IoU); got {self.mask_stable}",
        )
        _check(self.diffedit_noises >= 1, f"diffedit_noises: must be >= 1; got {self.diffedit_noises}")
        _check(
            0.0 < self.diffedit_mask_strength <= 1.0,
            f"diffedit_mask_strength: must be in (0, 1]; got {self.diffedit_mask_strength}",
        )
        _check(
            0.0 <= self.diffedit_threshold <= 1.0,
            f"diffedit_threshold: must be in [0, 1]; got {self.diffedit_threshold}",
        )

    @property
    def needs_source_prompt(self) -> bool:
        """Whether this configuration reads the source prompt (see :meth:`Method.needs_source_prompt`)."""
        return self.method.needs_source_prompt(self.prompt_mode)

    def with_(self, **kw: Any) -> EditConfig:
        """A copy with ``kw`` replaced (validated again)."""
        return replace(self, **kw)

    @classmethod
    def for_model(
        cls,
        defaults: Mapping[str, Any],
        preset: Preset | str = "model",
        *,
        where: str = "instdiffedit",
        **overrides: Any,
    ) -> EditConfig:
        """The settings a model folder recommends (its ``instdiff.json``), with ``overrides`` on top.

        ``steps`` and ``guidance`` come from the folder's top-level keys; with ``preset="model"`` an
        InstDiffEdit config also takes the folder's ``instdiffedit`` section (any EditConfig fields, ``mask``
        nested), e.g. the embedded model's measured best variant. ``preset="paper"`` keeps the paper's
        InstDiffEdit (Eq. 6–9, every step with n noises); SDEdit and DiffEdit read only steps and guidance.

        Args:
            defaults: the bundle's ``defaults`` (the parsed ``instdiff.json``; empty for SD checkpoints).
            preset: ``model`` or ``paper``.
            where: the dotted path named in error messages (the batch config's ``method``).
            **overrides: EditConfig fields; ``mask`` may be a mapping of MaskConfig fields, merged over the
                preset's.

        Returns:
            The config.

        Raises:
            ConfigError: an unknown preset, key or a value out of range (in the folder's section or the
                overrides).
        """
        preset = _enum(Preset, preset, f"{where}.preset" if where != "instdiffedit" else "preset")
        data: dict[str, Any] = {k: defaults[k] for k in ("steps", "guidance") if k in defaults}
        method = Method(_enum(Method, overrides.get("method", Method.INSTDIFFEDIT), f"{where}.method"))
        if method is Method.INSTDIFFEDIT and preset is Preset.MODEL:
            section = defaults.get("instdiffedit", {})
            if not isinstance(section, Mapping):
                raise ConfigError(
                    f"instdiff.json: instdiffedit must be a mapping of EditConfig fields; got {section!r}"
                )
            data.update(copy.deepcopy(dict(section)))
        for key, value in overrides.items():
            if key == "mask" and isinstance(value, Mapping):
                data["mask"] = {**data.get("mask", {}), **value}
            else:
                data[key] = value
        data["method"] = method
        return from_mapping(cls, data, where)


# ---- mapping → dataclass ---------------------------------------------------------------------------------------
def accepted_keys(cls: type) -> list[str]:
    """The field names of dataclass ``cls``, in declaration order."""
    return [f.name for f in fields(cls)]


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check and convert one parsed-YAML ``value`` to the annotated type ``tp``.

    Understands ``X | None`` and other unions, nested dataclasses (an instance passes unchanged; a mapping is
    built with :func:`from_mapping`), enums (from their values), ``bool``, ``int`` (any integral number but a
    bool), ``float`` (any real number but a bool, converted), ``str``, ``tuple[T, ...]``, fixed-length
    ``tuple[A, B]`` (the length is checked) and ``list[T]`` (from sequences), ``dict[str, T]`` and ``Any``.

    Raises:
        ConfigError: naming ``key``, the value given and what is accepted.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be null; accepted: {' or '.join(_type_name(o) for o in options)}")
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, key)
            except ConfigError:
                continue
        accepted = " or ".join(_type_name(o) for o in options if o is not type(None))
        if type(None) in options:
            accepted += " or null"
        raise ConfigError(f"{key}: got {value!r}; accepted: {accepted}")
    if origin in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list; got {value!r}")
        args = typing.get_args(tp)
        if origin is list or not args or Ellipsis in args:
            item = args[0] if args else Any
            items = [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} items; got {len(value)}: {list(value)!r}")
            items = [coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping; got {value!r}")
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {str(k): coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping with keys {', '.join(accepted_keys(tp))}; got {value!r}")
        return from_mapping(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return _enum(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{key}: expected an integer; got {value!r}")
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string; got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any, error: type[ConfigError] = ConfigError) -> None:
    """Check every field of the (frozen) dataclass instance ``obj`` with :func:`coerce`, storing converted values.

    Called first in every config's ``__post_init__``, so ``EditConfig(steps="4")`` is refused like ``steps: "4"``
    in YAML; enum values become members, ints floats for float fields, lists tuples, mappings nested configs.

    Args:
        obj: a dataclass instance.
        error: the :class:`~instdiff.errors.ConfigError` subclass to raise (e.g. ``TrainConfigError``).

    Raises:
        ConfigError: (``error``) a value of the wrong type, naming the field and what is accepted.
    """
    hints = _field_hints(type(obj))
    try:
        for f in fields(obj):
            tp, value = hints[f.name], getattr(obj, f.name)
            if value is None and dataclasses.is_dataclass(tp):
                raise ConfigError(f"{f.name}: expected a {tp.__name__} (or a mapping of its keys); got None")
            object.__setattr__(obj, f.name, coerce(tp, value, f.name))
    except ConfigError as exc:
        if isinstance(exc, error):
            raise
        raise error(str(exc)) from None


def from_mapping(cls: type, data: Mapping[str, Any], where: str = "", exclude: tuple[str, ...] = ()) -> Any:
    """Build the frozen dataclass ``cls`` from a parsed YAML mapping; missing keys keep their defaults.

    ``where`` is the dotted path of ``data`` in the whole file (for messages); ``exclude`` names fields that
    may not be given here (set elsewhere). Values are checked with :func:`coerce`; a ``ConfigError`` from
    the dataclass's own ``__post_init__`` is prefixed with ``where``.

    Raises:
        ConfigError: an unknown or excluded key (the message lists the accepted ones), a missing required key,
            a value of the wrong type or out of range.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys; got {type(data).__name__}")
    names = [n for n in accepted_keys(cls) if n not in exclude]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; accepted keys{' in ' + where if where else ''}: {', '.join(names)}"
        )
    hints = _field_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = coerce(hints[f.name], data[f.name], f"{prefix}{f.name}")
        elif f.name not in exclude and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if not prefix or str(exc).startswith(prefix):
            raise
        raise ConfigError(f"{prefix}{exc}") from None


def load_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping (an empty file is ``{}``).

    Raises:
        InputNotFoundError: the file does not exist.
        StorageError: the path is a folder, or the file cannot be read.
        ConfigError: not UTF-8 text, not valid YAML (one line: where and what), or its top level is not a
            mapping.
    """
    import yaml

    p = Path(path)
    if p.is_dir():
        raise StorageError(f"{what} file {str(p)!r} is a folder; a YAML file is needed")
    if not p.exists():
        raise InputNotFoundError(f"{what} file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); a {what} is a YAML text file") from None
    except OSError as exc:
        raise StorageError(f"{what} file {str(p)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({_yaml_problem(exc)})") from None
    except ValueError:  # Python's integer-conversion limit (> 4300 digits)
        raise ConfigError(f"{p}: holds a number with thousands of digits; no setting accepts one") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: a {what} must be a mapping of keys; got {type(data).__name__}")
    return dict(data)


def _yaml_problem(exc: Exception) -> str:
    """A YAML error as one line: ``line L, column C: problem (context)`` (PyYAML's own text has caret marks)."""
    mark, problem, context = (getattr(exc, a, None) for a in ("problem_mark", "problem", "context"))
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = f"{where}{problem}{f' ({context})' if context else ''}" if problem else str(exc)
    return " ".join(text.split())


def _check_key(dotted: str, where: str) -> list[str]:
    """The parts of a dotted key; refuses empty parts (``a..b``, ``.a``, ``..``)."""
    parts = dotted.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"{where}: the key {dotted!r} has an empty part; write SECTION.KEY, e.g. method.steps")
    return parts


def apply_override(data: dict[str, Any], dotted: str, value: Any, shorthands: Mapping[str, str] | None = None) -> None:
    """Set ``data[a][b] = value`` for ``dotted = "a.b"``, creating sections as needed.

    ``shorthands`` maps a section that may be written as a plain string to the key that string sets (the
    batch config's ``method: diffedit`` means ``method: {name: diffedit}``).

    Raises:
        ConfigError: an empty part in ``dotted``, or a part of the path is a value, not a section.
    """
    parts = _check_key(dotted, dotted)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif isinstance(child, str) and shorthands and part in shorthands:
            child = {shorthands[part]: child}
            node[part] = child
        elif not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section (it is {child!r})")
        node = child
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"method.steps=4"`` → ``("method.steps", 4)``; the value is read as YAML (so 4 → int, null → None).

    Raises:
        ConfigError: no ``=``, an empty key or key part, or a value that is not valid YAML.
    """
    import yaml

    shown = text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"
    if "=" not in text:
        raise ConfigError(f"--set {shown!r}: expected KEY=VALUE, e.g. method.steps=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {shown!r}: the key is empty")
    _check_key(key, f"--set {shown!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {shown!r}: cannot read the value ({_yaml_problem(exc)})") from None
    except ValueError:  # Python's integer-conversion limit (> 4300 digits)
        raise ConfigError(
            f"--set {key}: a {len(raw.strip())}-character number is out of range for any setting"
        ) from None
    return key, value


def to_plain(obj: Any) -> Any:
    """A dataclass config as plain YAML/JSON-able data: enums by value, tuples as lists, nested dataclasses as
    mappings (the inverse of :func:`from_mapping`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_GUIDANCE",
    "EditConfig",
    "Inpaint",
    "MaskConfig",
    "Method",
    "PromptMode",
    "Refinement",
    "SEED_MAX",
    "SEED_MIN",
    "SizePolicy",
    "accepted_keys",
    "apply_override",
    "check_fields",
    "coerce",
    "from_mapping",
    "load_yaml",
    "parse_assignment",
    "to_plain",
]
