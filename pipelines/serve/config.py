"""Typed settings of the HTTP app: the ``args:`` of an application in a Ray Serve config file.

``configs/serve/*.yaml`` are Ray Serve config files (``serve run``, ``serve deploy``, ``instdiff serve --config``
all read them); the application's ``args`` mapping is parsed here into frozen dataclasses with the one parser,
:func:`instdiff.config.from_mapping`, so an unknown key or a wrong value is a :class:`ConfigError` naming the key
and what it accepts. Layout (every key optional; defaults are the dataclass defaults)::

    model:    {spec: default, inpaint: null, device: auto, dtype: auto, local_files_only: false}
    replicas: {num_replicas: 1, num_cpus: 1, num_gpus: 0, threads: null, max_ongoing_requests: 16,
               max_queued_requests: 64, autoscaling: null}            # autoscaling: Ray's autoscaling_config
    batching: {max_batch_size: 8, batch_wait_timeout_s: 0.05}
    limits:   {max_body_bytes: 20971520, max_image_pixels: 4194304, max_image_side: 4096, max_steps: 200,
               request_timeout_s: 300, retry_after_s: 5}
    edits:    {size: model, size_policy: resize}
    sessions: {steps: null, max_bytes: 1073741824, ttl_s: 1800, max_sessions: null, mask_steps: null}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instdiff.config import SizePolicy, from_mapping, load_yaml
from instdiff.errors import ConfigError
from pipelines.config import ModelConfig

IMPORT_PATH = "pipelines.serve.app:build_app"
"""The Serve application builder every config file names."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ReplicaConfig:
    """Replicas of the model deployment and what each one holds.

    Attributes:
        num_replicas: fixed replica count (ignored when ``autoscaling`` is set).
        num_cpus: CPUs Ray reserves per replica.
        num_gpus: GPUs per replica (1 on GPU configs, 0 on the CPU one).
        threads: torch CPU threads per replica (``None``: torch's default).
        max_ongoing_requests: requests a replica accepts at once; at least ``batching.max_batch_size``, or batches
            cannot form (Ray hands a replica no more than this).
        max_queued_requests: requests waiting for a replica beyond that; more are answered 503 with
            ``Retry-After`` (-1: unbounded, not recommended).
        autoscaling: Ray Serve's ``autoscaling_config`` (e.g. ``{min_replicas: 1, max_replicas: 4,
            target_ongoing_requests: 8}``), or ``None`` for a fixed count.
    """

    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int | None = None
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    autoscaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check(self.num_replicas >= 1, f"replicas.num_replicas: must be >= 1; got {self.num_replicas}")
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, "replicas.num_cpus and num_gpus: must be >= 0")
        _check(self.threads is None or self.threads >= 1, f"replicas.threads: must be null or >= 1; got {self.threads}")
        _check(self.max_ongoing_requests >= 1, "replicas.max_ongoing_requests: must be >= 1")
        _check(
            self.max_queued_requests == -1 or self.max_queued_requests >= 1,
            f"replicas.max_queued_requests: must be >= 1 or -1 (unbounded); got {self.max_queued_requests}",
        )


@dataclass(frozen=True)
class BatchingConfig:
    """``@serve.batch`` settings of the edit endpoint (1 turns batching off)."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        _check(self.max_batch_size >= 1, f"batching.max_batch_size: must be >= 1; got {self.max_batch_size}")
        _check(self.batch_wait_timeout_s >= 0, "batching.batch_wait_timeout_s: must be >= 0 seconds")


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may ask for; beyond it the answer is 413 (sizes), 422 (steps) or 504 (time).

    Attributes:
        max_body_bytes: request body size.
        max_image_pixels: decoded pixels of the input image (W·H).
        max_image_side: longer side of the input image, px.
        max_steps: DDIM steps an edit or a session may ask for.
        request_timeout_s: seconds the ingress waits for the model before answering 504.
        retry_after_s: the ``Retry-After`` seconds sent with 503 (queue full, out of memory).
    """

    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 2048 * 2048
    max_image_side: int = 4096
    max_steps: int = 200
    request_timeout_s: float = 300.0
    retry_after_s: int = 5

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_image_side", "max_steps", "retry_after_s"):
            _check(getattr(self, name) >= 1, f"limits.{name}: must be >= 1; got {getattr(self, name)}")
        _check(self.request_timeout_s > 0, f"limits.request_timeout_s: must be > 0; got {self.request_timeout_s}")


@dataclass(frozen=True)
class EditsConfig:
    """How input images are brought to the model's geometry (as the batch job's ``image`` section).

    Attributes:
        size: longer side edited at, px; ``"model"``: the model's resolution; ``None``: the image's own size.
            The answer is always at the input's size
            (:func:`instdiff.composite.paste_back`: the original pixels kept outside the edit).
        size_policy: sides not a multiple of the model's step: resize or pad.
    """

    size: int | str | None = "model"
    size_policy: SizePolicy = SizePolicy.RESIZE

    def __post_init__(self) -> None:
        ok = self.size is None or self.size == "model" or (isinstance(self.size, int) and self.size >= 16)
        _check(ok, f"edits.size: accepted: model, null or an integer >= 16 (px); got {self.size!r}")


@dataclass(frozen=True)
class SessionsConfig:
    """FISEdit sessions kept per replica (least recently used dropped first, and after ``ttl_s`` idle).

    Attributes:
        steps: default DDIM steps of a session (``None``: the model's default, else 50).
        mask_steps: dense steps of an edit that find the changed region (``None``: a fifth of the steps).
        max_bytes: cache memory per replica, bytes: the limit that matters, since a session's cache grows with the
            model's resolution and the steps (about 150 MiB for the embedded 64-px model at its default steps, so
            the default 1 GiB keeps about 6). Each replica logs at start-up how many of its sessions fit.
        ttl_s: a session unused this long is dropped, seconds.
        max_sessions: sessions per replica at most, whatever their size (``None``: as many as ``max_bytes``
            holds).
    """

    steps: int | None = None
    mask_steps: int | None = None
    max_bytes: int = 2**30
    ttl_s: float = 1800.0
    max_sessions: int | None = None

    def __post_init__(self) -> None:
        _check(self.steps is None or self.steps >= 1, f"sessions.steps: must be null or >= 1; got {self.steps}")
        _check(self.mask_steps is None or self.mask_steps >= 1, "sessions.mask_steps: must be null or >= 1")
        _check(self.max_bytes >= 1, f"sessions.max_bytes: must be >= 1; got {self.max_bytes}")
        _check(
            self.max_sessions is None or self.max_sessions >= 1,
            f"sessions.max_sessions: must be null (as many as max_bytes holds) or >= 1; got {self.max_sessions}",
        )
        _check(self.ttl_s > 0, f"sessions.ttl_s: must be > 0 seconds; got {self.ttl_s}")


@dataclass(frozen=True)
class ServeArgs:
    """The ``args`` of the app (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    edits: EditsConfig = field(default_factory=EditsConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)

    def __post_init__(self) -> None:
        _check(
            self.replicas.max_ongoing_requests >= self.batching.max_batch_size,
            f"replicas.max_ongoing_requests ({self.replicas.max_ongoing_requests}) must be >= "
            f"batching.max_batch_size ({self.batching.max_batch_size}): Ray hands a replica no more requests at "
            "once, so larger batches could never form",
        )


def parse_args(args: Mapping[str, Any] | None) -> ServeArgs:
    """The app's ``args`` mapping → :class:`ServeArgs`.

    Raises:
        ConfigError: an unknown key (the accepted ones listed), a wrong type or a value out of range.
    """
    return from_mapping(ServeArgs, args or {}, "args")


@dataclass(frozen=True)
class ServeFile:
    """One application of a Ray Serve config file.

    Attributes:
        name: the application's name.
        route_prefix: where it is mounted.
        args: its parsed ``args``.
        deployments: the file's per-deployment overrides by deployment name (what ``serve run`` applies).
    """

    name: str
    route_prefix: str
    args: ServeArgs
    deployments: dict[str, dict[str, Any]]


def load_serve_file(path: str | Path) -> ServeFile:
    """Read a Ray Serve config file and return its instdiff application.

    Raises:
        InputNotFoundError: no such file.
        ConfigError: not a Serve config (no ``applications`` list), no application with ``import_path``
            :data:`IMPORT_PATH`, or bad ``args``.
    """
    data = load_yaml(path, "serve config")
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{path}: expected a Ray Serve config with an 'applications:' list")
    mine = [a for a in apps if isinstance(a, Mapping) and a.get("import_path") == IMPORT_PATH]
    if not mine:
        raise ConfigError(f"{path}: no application with import_path: {IMPORT_PATH}")
    app = mine[0]
    deployments = {}
    for d in app.get("deployments") or []:
        if not isinstance(d, Mapping) or "name" not in d:
            raise ConfigError(f"{path}: each deployments entry must be a mapping with a name")
        deployments[str(d["name"])] = {k: v for k, v in d.items() if k != "name"}
    return ServeFile(
        name=str(app.get("name", "instdiff")),
        route_prefix=str(app.get("route_prefix", "/")),
        args=parse_args(app.get("args")),
        deployments=deployments,
    )


__all__ = [
    "IMPORT_PATH",
    "BatchingConfig",
    "EditsConfig",
    "LimitsConfig",
    "ReplicaConfig",
    "ServeArgs",
    "ServeFile",
    "SessionsConfig",
    "load_serve_file",
    "parse_args",
]
