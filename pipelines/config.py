"""Typed configuration of the batch job: ``configs/batch/*.yaml`` parsed into frozen dataclasses.

Layout (every key optional except ``input`` and ``output``; defaults are the dataclass defaults)::

    input: data/shapes-64.parquet        # Parquet file or folder, local or s3://bucket/prefix
    output: out/demo                     # output folder, local or s3://; re-runs resume into it
    seed: 0                              # base seed; each row gets seed + crc32(id) (written to the row)
    resume: true                         # skip ids already written with status ok
    retry_errors: false                  # also re-run ids whose earlier row is an error
    carry: []                            # input columns copied into the output rows unchanged, e.g. [url, label]
    model:   {spec: default, inpaint: null, device: auto, dtype: auto, local_files_only: false}
    method:  {name: instdiffedit, preset: model, steps: 50, strength: 0.5, n_noises: 3,
              mask: {phi: 0.2, gamma1: 0.9, gamma2: 0.6, ...}, inpaint: auto, ...}   # any EditConfig field
    image:   {size: model, size_policy: resize, max_pixels: 16777216, min_side: 16, alpha: convert}
    actors:  {pool_size: 1, num_gpus: 0, num_cpus: 1, batch_size: 8}
    write:   {max_rows_per_file: 1000, compression: zstd}
    storage: {endpoint_url: null, region: null, anonymous: false}       # plus AWS_* environment variables
    ray:     {num_cpus: null, object_store_memory: null, task_cpus: 1, progress_bars: true, datasource_v2: false}

``method.preset`` says where the unset method keys come from, as ``instdiff edit --preset`` does
(:meth:`instdiff.config.EditConfig.for_model`): ``model`` (the default) takes the model folder's
``instdiff.json`` (steps, guidance and, for InstDiffEdit, its ``instdiffedit`` section: the embedded model's
measured best variant; SD checkpoints and hub ids have none, so the paper's settings), ``paper`` the paper's
InstDiffEdit with the folder's steps and guidance. The keys given in ``method`` override either. The file is
read without loading the model (:func:`instdiff.model_defaults.model_defaults`). ``mask.preset: official``
runs on the paper's loop (``preset`` then defaults to ``paper``). The resolved settings and the preset are
what a run records in ``_runs/<run_id>.json``.

Unknown keys and wrong values raise :class:`ConfigError` naming the key and what it accepts. Command-line
flags override the file; ``--set a.b=value`` overrides any key (the value is read as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from instdiff.config import (
    DEFAULT_MAX_PIXELS,
    EditConfig,
    MaskPreset,
    Method,
    Preset,
    SizePolicy,
    coerce,
    from_mapping,
    load_yaml,
    parse_assignment,  # noqa: F401 - re-exported: pipelines' --set parsing
    to_plain,
)
from instdiff.config import apply_override as _apply_override
from instdiff.errors import ConfigError
from instdiff.model_defaults import model_defaults
from pipelines.storage import StorageConfig

SIZE_POLICIES = tuple(p.value for p in SizePolicy)


class AlphaPolicy(StrEnum):
    """What the job does with input images that carry transparency (``image.alpha``)."""

    CONVERT = "convert"  # composite RGBA/LA/transparent-P onto white; the row is ok with a note
    ERROR = "error"  # rows with transparency are errors


@dataclass(frozen=True)
class ModelConfig:
    """Which model each actor loads (see ``instdiff.models.load_bundle``)."""

    spec: str = "default"  # default (embedded shapes model) | tiny | a diffusers folder | a hub id
    inpaint: str | None = None  # inpainting checkpoint for InstDiffEdit's final step
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (fp16 on accelerators, fp32 on CPU) | fp32 | fp16 | bf16
    local_files_only: bool = False  # never contact the hub


@dataclass(frozen=True)
class ImageConfig:
    """Input image limits and how images are brought to the model's geometry."""

    size: int | str | None = "model"  # longer side in px; "model" = the model's native resolution; null = keep
    size_policy: str = "resize"  # sides not a multiple of the model's step: resize | pad | refuse
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are error rows
    min_side: int = 16  # images with a shorter side are error rows
    alpha: AlphaPolicy = AlphaPolicy.CONVERT  # what to do with transparency


@dataclass(frozen=True)
class ActorConfig:
    """The editing stage: one model per actor."""

    pool_size: int = 1  # actors (model replicas)
    num_gpus: float = 0.0  # GPUs per actor (fractions share a GPU)
    num_cpus: float = 1.0  # CPUs per actor; on CPU torch uses max(1, round(num_cpus)) threads
    batch_size: int = 8  # rows per editor call (rows of one size are edited together)


@dataclass(frozen=True)
class WriteConfig:
    """How the output Parquet files are written."""

    max_rows_per_file: int = 1000
    compression: str = "zstd"  # any pyarrow Parquet codec: zstd, snappy, gzip, none


@dataclass(frozen=True)
class RayConfig:
    """Ray settings. ``num_cpus`` and ``object_store_memory`` apply when the job starts its own local cluster
    (no ``RAY_ADDRESS``); the others on any cluster."""

    num_cpus: int | None = None  # None: all cores
    object_store_memory: int | None = None  # bytes; None: Ray's default
    task_cpus: float = 1.0  # CPUs per decode / encode+metrics task
    progress_bars: bool = True
    # Ray Data's V2 Parquet reader (the Ray 2.60 default) starts a pool of footer-reader actors on every read:
    # worth it for thousands of files on a big cluster, seconds to a minute of start-up on a small machine.
    # false reads through the V1 datasource (metadata from the driver); true uses V2.
    datasource_v2: bool = False


@dataclass(frozen=True)
class BatchConfig:
    """Everything one bulk-edit job needs.

    ``method`` is the resolved editor config (the model's recommended settings under ``preset``, with the
    YAML's ``method`` keys on top); ``preset`` is the YAML's ``method.preset`` that chose them.
    """

    input: str
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    method: EditConfig = field(default_factory=EditConfig)
    preset: Preset = Preset.MODEL
    seed: int = 0
    image: ImageConfig = field(default_factory=ImageConfig)
    actors: ActorConfig = field(default_factory=ActorConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resume: bool = True
    retry_errors: bool = False
    carry: tuple[str, ...] = ()  # input columns copied into the output rows unchanged (after the output columns)

    def with_(self, **kw: Any) -> BatchConfig:
        """A copy with the fields in ``kw`` replaced (not validated again)."""
        return dataclasses.replace(self, **kw)


# keys of the method section that are not EditConfig fields, or are set elsewhere
_METHOD_NAME_KEY = "name"
_METHOD_PRESET_KEY = "preset"
_METHOD_EXCLUDED = ("method", "seed")
_PARQUET_CODECS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
_SHORTHANDS = {"method": _METHOD_NAME_KEY}  # ``method: diffedit`` means ``method: {name: diffedit}``


def _official_mask(data: Mapping[str, Any]) -> bool:
    """Whether the method section asks for the official mask recipe (``mask: {preset: official}``)."""
    mask = data.get("mask")
    return isinstance(mask, Mapping) and mask.get("preset") == MaskPreset.OFFICIAL.value


def _parse_method(data: Any, seed: int, defaults: Mapping[str, Any]) -> tuple[EditConfig, Preset]:
    """The ``method`` section → the resolved :class:`EditConfig` and the preset that resolved it.

    Args:
        data: the section (``None``, a method name, or a mapping of EditConfig keys plus ``name``/``preset``).
        seed: the job's base seed.
        defaults: the model's recommended settings (:func:`instdiff.model_defaults.model_defaults`).

    Returns:
        ``(config, preset)``: :meth:`EditConfig.for_model` under the preset, the section's keys on top.

    Raises:
        ConfigError: an unknown key, a preset outside model/paper, ``preset: model`` with the official mask
            recipe, or a value out of range.
    """
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {_METHOD_NAME_KEY: data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"method: expected a mapping (name: instdiffedit, steps: ...); got {data!r}")
    data = dict(data)
    accepted = [_METHOD_NAME_KEY, _METHOD_PRESET_KEY] + [
        f.name for f in dataclasses.fields(EditConfig) if f.name not in _METHOD_EXCLUDED
    ]
    for key in data:
        if key not in accepted:
            hint = " (the seed is the top-level key 'seed')" if key == "seed" else ""
            raise ConfigError(f"method.{key}: unknown key{hint}; accepted keys in method: {', '.join(accepted)}")
    method = coerce(Method, data.pop(_METHOD_NAME_KEY, Method.INSTDIFFEDIT.value), "method.name")
    official = _official_mask(data)
    given = data.pop(_METHOD_PRESET_KEY, None)
    preset = (
        Preset.PAPER if given is None and official else coerce(Preset, given or Preset.MODEL.value, "method.preset")
    )
    if official and preset is Preset.MODEL:
        raise ConfigError(
            "method.preset: 'model' cannot be combined with method.mask.preset 'official' (the official recipe "
            "runs on the paper's loop); leave method.preset unset or set it to 'paper'"
        )
    cfg = EditConfig.for_model(defaults, preset, where="method", **data, method=method, seed=seed)
    return cfg, preset


def _image_size_ok(size: Any) -> bool:
    return size is None or size == "model" or (isinstance(size, int) and not isinstance(size, bool) and size >= 1)


def _image_size_message(size: Any) -> str:
    return f"image.size: {size!r} is not accepted; accepted: a positive integer (longer side in px), 'model', or null"


def _check_values(cfg: BatchConfig) -> None:
    """Range checks the types alone do not express; raises :class:`ConfigError` naming the key."""
    checks: list[tuple[bool, str]] = [
        (bool(cfg.input.strip()), "input: must be a Parquet file/folder path or s3:// URI"),
        (bool(cfg.output.strip()), "output: must be a folder path or s3:// URI"),
        (cfg.actors.pool_size >= 1, f"actors.pool_size: must be >= 1; got {cfg.actors.pool_size}"),
        (cfg.actors.batch_size >= 1, f"actors.batch_size: must be >= 1; got {cfg.actors.batch_size}"),
        (cfg.actors.num_gpus >= 0, f"actors.num_gpus: must be >= 0; got {cfg.actors.num_gpus}"),
        (cfg.actors.num_cpus > 0, f"actors.num_cpus: must be > 0; got {cfg.actors.num_cpus}"),
        (cfg.ray.task_cpus > 0, f"ray.task_cpus: must be > 0; got {cfg.ray.task_cpus}"),
        (cfg.write.max_rows_per_file >= 1, f"write.max_rows_per_file: must be >= 1; got {cfg.write.max_rows_per_file}"),
        (
            cfg.write.compression in _PARQUET_CODECS,
            f"write.compression: {cfg.write.compression!r} is not accepted; accepted: {', '.join(_PARQUET_CODECS)}",
        ),
        (cfg.image.max_pixels >= 1, f"image.max_pixels: must be >= 1; got {cfg.image.max_pixels}"),
        (cfg.image.min_side >= 1, f"image.min_side: must be >= 1; got {cfg.image.min_side}"),
        (
            cfg.image.size_policy in SIZE_POLICIES,
            f"image.size_policy: {cfg.image.size_policy!r} is not accepted; accepted: {', '.join(SIZE_POLICIES)}",
        ),
        (cfg.seed >= 0, f"seed: must be >= 0; got {cfg.seed}"),
        (
            cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1,
            f"ray.num_cpus: must be null or >= 1; got {cfg.ray.num_cpus}",
        ),
        (
            cfg.ray.object_store_memory is None or cfg.ray.object_store_memory >= 1,
            f"ray.object_store_memory: must be null or >= 1 (bytes); got {cfg.ray.object_store_memory}",
        ),
        (_image_size_ok(cfg.image.size), _image_size_message(cfg.image.size)),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def parse_config(data: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> BatchConfig:
    """Turn a mapping (parsed YAML) into a validated :class:`BatchConfig`.

    Args:
        data: the config's keys (see the module docstring); ``method`` may be a method name or a mapping.
        defaults: the model's recommended settings (``instdiff.json``); ``None`` reads them for
            ``model.spec`` (:func:`instdiff.model_defaults.model_defaults`, no weights loaded).

    Returns:
        The validated config, its ``method`` resolved under ``method.preset``.

    Raises:
        ConfigError: an unknown key, a wrong type or a value out of range (the message names the key).
        ModelLoadError: the model folder's ``instdiff.json`` is not a JSON object.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a batch config must be a mapping of keys; got {type(data).__name__}")
    data = dict(data)
    image = data.get("image")
    if isinstance(image, Mapping) and "size" in image and not _image_size_ok(image["size"]):
        raise ConfigError(_image_size_message(image["size"]))  # one message for a wrong type or range
    seed = coerce(int, data.get("seed", 0), "seed")
    section = data.pop("method", None)
    cfg = from_mapping(BatchConfig, data, "", exclude=("method", "preset"))
    if defaults is None:
        defaults = model_defaults(cfg.model.spec)
    method, preset = _parse_method(section, seed, defaults)
    cfg = cfg.with_(method=method, preset=preset)
    _check_values(cfg)
    return cfg


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b] = value`` for ``dotted = "a.b"`` (creating sections; ``method: NAME`` becomes a section).

    Raises:
        ConfigError: a key path that runs through a value that is not a section.
    """
    _apply_override(data, dotted, value, _SHORTHANDS)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> BatchConfig:
    """Read a YAML file (``None``: start from defaults) and apply dotted-key ``overrides`` on top.

    Args:
        path: a batch config file (``configs/batch/*.yaml``), or ``None``.
        overrides: dotted key → value (``--set`` assignments and flags), applied in order.

    Returns:
        The validated config.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        ConfigError: invalid YAML, keys or values.
    """
    data = copy.deepcopy(load_yaml(path, "batch config")) if path is not None else {}
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    return parse_config(data)


def to_dict(obj: Any) -> Any:
    """A config as plain YAML/JSON-able data (enums by value), as written to ``_runs/<run_id>.json``.

    Secrets (S3 keys and tokens) are masked as ``"***"``; an :class:`EditConfig` is written as the ``method``
    section (``name`` instead of ``method``, no ``seed``); a :class:`BatchConfig`'s ``preset`` goes into that
    section as ``method.preset``, so the written config reads back (:func:`parse_config`) to the same settings.

    Args:
        obj: a config dataclass, or any value inside one.

    Returns:
        Plain dicts, lists, strings and numbers.
    """
    if isinstance(obj, EditConfig):
        out = to_plain(obj)
        out[_METHOD_NAME_KEY] = out.pop("method")
        out.pop("seed")
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in ("access_key_id", "secret_access_key", "session_token") and value:
                value = "***"
            out[f.name] = to_dict(value)
        if isinstance(obj, BatchConfig):  # method: {name, preset, ...the resolved fields}
            method = out["method"]
            out["method"] = {_METHOD_NAME_KEY: method.pop(_METHOD_NAME_KEY), _METHOD_PRESET_KEY: out.pop("preset")}
            out["method"].update(method)
        return out
    return to_plain(obj)


def fingerprint(cfg: BatchConfig) -> dict[str, Any]:
    """The settings that decide what a row's output is; a resumed job must match them.

    Args:
        cfg: the job config.

    Returns:
        ``model`` (spec, inpaint, dtype), ``method`` (as :func:`to_dict` writes it), ``seed`` and ``image``
        (size, size_policy, alpha) as plain data; ``carry`` too when columns are carried (an output's files must
        agree on their columns).
    """
    out = {
        "model": {"spec": cfg.model.spec, "inpaint": cfg.model.inpaint, "dtype": cfg.model.dtype},
        "method": to_dict(cfg.method),
        "seed": cfg.seed,
        "image": {"size": cfg.image.size, "size_policy": cfg.image.size_policy, "alpha": cfg.image.alpha.value},
    }
    if cfg.carry:
        out["carry"] = list(cfg.carry)
    return out
