"""Typed configuration of the batch job: ``configs/batch/*.yaml`` parsed into frozen dataclasses.

Layout (every key optional except ``input`` and ``output``; defaults are the dataclass defaults)::

    input: data/shapes-64.parquet        # Parquet file or folder, local or s3://bucket/prefix
    output: out/demo                     # output folder, local or s3://; re-runs resume into it
    seed: 0                              # base seed; each row gets seed + crc32(id) (written to the row)
    resume: true                         # skip ids already written with status ok
    retry_errors: false                  # also re-run ids whose earlier row is an error
    model:   {spec: default, inpaint: null, device: auto, dtype: auto, local_files_only: false}
    method:  {name: instdiffedit, steps: 50, strength: 0.5, guidance: 7.5, n_noises: 3,
              mask: {phi: 0.2, gamma1: 0.9, gamma2: 0.6, ...}, inpaint: auto, ...}   # any EditConfig field
    image:   {size: model, size_policy: resize, max_pixels: 16777216, min_side: 16, alpha: convert}
    actors:  {pool_size: 1, num_gpus: 0, num_cpus: 1, batch_size: 8}
    write:   {max_rows_per_file: 1000, compression: zstd}
    storage: {endpoint_url: null, region: null, anonymous: false}       # plus AWS_* environment variables
    ray:     {num_cpus: null, object_store_memory: null, task_cpus: 1, progress_bars: true, datasource_v2: false}

Unknown keys and wrong values raise :class:`ConfigError` naming the key and what it accepts. Command-line
flags override the file; ``--set a.b=value`` overrides any key (the value is read as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines.storage import StorageConfig

if TYPE_CHECKING:  # imported lazily: Ray workers unpickling these configs must not pay for torch/diffusers
    from instdiff.editing import EditConfig

DEFAULT_MAX_PIXELS = 4096 * 4096  # instdiff.imageio.DEFAULT_MAX_PIXELS (a test keeps them equal)
SIZE_POLICIES = ("resize", "pad", "refuse")  # instdiff.imageio.SizePolicy values


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the accepted values."""


class AlphaPolicy(StrEnum):
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
    """Everything one bulk-edit job needs."""

    input: str
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    method: EditConfig = field(default_factory=lambda: _editing().EditConfig())
    seed: int = 0
    image: ImageConfig = field(default_factory=ImageConfig)
    actors: ActorConfig = field(default_factory=ActorConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resume: bool = True
    retry_errors: bool = False

    def with_(self, **kw: Any) -> BatchConfig:
        return dataclasses.replace(self, **kw)


def _editing() -> Any:
    import instdiff.editing

    return instdiff.editing


def _type_namespace() -> dict[str, Any]:
    """Names the string annotations of the config dataclasses refer to (resolved when parsing)."""
    editing = _editing()
    from instdiff.masks import MaskConfig, Refinement

    return {"EditConfig": editing.EditConfig, "Method": editing.Method, "MaskConfig": MaskConfig,
            "Refinement": Refinement, "Inpaint": editing.Inpaint, "PromptMode": editing.PromptMode}


# keys of the method section that are not EditConfig fields, or are set elsewhere
_METHOD_NAME_KEY = "name"
_METHOD_EXCLUDED = ("method", "seed")
_PARQUET_CODECS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")


# ---- generic dataclass parsing ----------------------------------------------------------------------------------
def _accepted_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be null; accepted: {' or '.join(_type_name(o) for o in options)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        accepted = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{key}: got {value!r}; accepted: {accepted}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping with keys {', '.join(_accepted_keys(tp))}; got {value!r}")
        return _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{key}: {value!r} is not accepted; accepted: {', '.join(m.value for m in tp)}"
            ) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer; got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string; got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls, localns=_type_namespace())
    names = _accepted_keys(cls)
    where = f"{prefix}." if prefix else ""
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; accepted keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}{f.name}: required key is missing")
    return cls(**kwargs)


def _parse_method(data: Any, seed: int) -> EditConfig:
    EditConfig, Method = _editing().EditConfig, _editing().Method  # noqa: N806 - classes
    if data is None:
        return EditConfig(seed=seed)
    if isinstance(data, str):
        data = {_METHOD_NAME_KEY: data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"method: expected a mapping (name: instdiffedit, steps: ...); got {data!r}")
    data = dict(data)
    accepted = [_METHOD_NAME_KEY] + [k for k in _accepted_keys(EditConfig) if k not in _METHOD_EXCLUDED]
    for key in data:
        if key not in accepted:
            hint = " (the seed is the top-level key 'seed')" if key == "seed" else ""
            raise ConfigError(f"method.{key}: unknown key{hint}; accepted keys in method: {', '.join(accepted)}")
    name = data.pop(_METHOD_NAME_KEY, Method.INSTDIFFEDIT.value)
    method = _coerce(Method, name, "method.name")
    cfg = _build(EditConfig, data, "method")
    return cfg.with_(method=method, seed=seed)


def _check_values(cfg: BatchConfig) -> None:
    """Range checks the types alone do not express."""
    checks: list[tuple[bool, str]] = [
        (bool(cfg.input.strip()), "input: must be a Parquet file/folder path or s3:// URI"),
        (bool(cfg.output.strip()), "output: must be a folder path or s3:// URI"),
        (cfg.actors.pool_size >= 1, f"actors.pool_size: must be >= 1; got {cfg.actors.pool_size}"),
        (cfg.actors.batch_size >= 1, f"actors.batch_size: must be >= 1; got {cfg.actors.batch_size}"),
        (cfg.actors.num_gpus >= 0, f"actors.num_gpus: must be >= 0; got {cfg.actors.num_gpus}"),
        (cfg.actors.num_cpus > 0, f"actors.num_cpus: must be > 0; got {cfg.actors.num_cpus}"),
        (cfg.ray.task_cpus > 0, f"ray.task_cpus: must be > 0; got {cfg.ray.task_cpus}"),
        (cfg.write.max_rows_per_file >= 1, f"write.max_rows_per_file: must be >= 1; got {cfg.write.max_rows_per_file}"),
        (cfg.write.compression in _PARQUET_CODECS,
         f"write.compression: {cfg.write.compression!r} is not accepted; accepted: {', '.join(_PARQUET_CODECS)}"),
        (cfg.image.max_pixels >= 1, f"image.max_pixels: must be >= 1; got {cfg.image.max_pixels}"),
        (cfg.image.min_side >= 1, f"image.min_side: must be >= 1; got {cfg.image.min_side}"),
        (cfg.image.size_policy in SIZE_POLICIES,
         f"image.size_policy: {cfg.image.size_policy!r} is not accepted; accepted: {', '.join(SIZE_POLICIES)}"),
        (cfg.method.steps >= 1, f"method.steps: must be >= 1; got {cfg.method.steps}"),
        (0.0 < cfg.method.strength <= 1.0, f"method.strength: must be in (0, 1]; got {cfg.method.strength}"),
        (cfg.method.n_noises >= 1, f"method.n_noises: must be >= 1; got {cfg.method.n_noises}"),
        (cfg.seed >= 0, f"seed: must be >= 0; got {cfg.seed}"),
    ]
    size = cfg.image.size
    checks.append((
        size is None or size == "model" or (isinstance(size, int) and size >= 1),
        f"image.size: {size!r} is not accepted; accepted: a positive integer (longer side in px), 'model', or null",
    ))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def parse_config(data: Mapping[str, Any]) -> BatchConfig:
    """Turn a mapping (parsed YAML) into a validated :class:`BatchConfig`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a batch config must be a mapping of keys; got {type(data).__name__}")
    data = dict(data)
    seed = _coerce(int, data.get("seed", 0), "seed")
    method = _parse_method(data.pop("method", None), seed)
    cfg = _build(BatchConfig, data, "")
    cfg = cfg.with_(method=method)
    _check_values(cfg)
    return cfg


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b] = value`` for ``dotted = "a.b"`` (creating sections as needed)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif isinstance(child, str) and part == "method":
            child = {_METHOD_NAME_KEY: child}
            node[part] = child
        elif not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section (it is {child!r})")
        node = child
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"method.steps=4"`` → ``("method.steps", 4)``; the value is read as YAML (so 4 → int, null → None)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. method.steps=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: cannot read the value ({exc})") from None
    return key, value


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> BatchConfig:
    """Read a YAML file (``None``: start from defaults) and apply dotted-key ``overrides`` on top."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a batch config must be a mapping of keys; got {type(loaded).__name__}")
        data = copy.deepcopy(loaded or {})
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    return parse_config(data)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML/JSON-able data (enums by value); secrets are masked."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name in ("access_key_id", "secret_access_key", "session_token") and value:
                value = "***"
            out[f.name] = to_dict(value)
        if isinstance(obj, _editing().EditConfig):
            out[_METHOD_NAME_KEY] = out.pop("method")
            out.pop("seed")
        return out
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def fingerprint(cfg: BatchConfig) -> dict[str, Any]:
    """The settings that decide what a row's output is; a resumed job must match them."""
    return {
        "model": {"spec": cfg.model.spec, "inpaint": cfg.model.inpaint, "dtype": cfg.model.dtype},
        "method": to_dict(cfg.method),
        "seed": cfg.seed,
        "image": {"size": cfg.image.size, "size_policy": cfg.image.size_policy, "alpha": cfg.image.alpha.value},
    }
