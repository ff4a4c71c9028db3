"""Which Ray cluster a command runs on, and where its relative paths point: the one set of connection rules.

The bulk job (``instdiff batch`` / ``python -m pipelines.batch``), ``instdiff bench`` and ``instdiff serve``
connect through :func:`connect`. The rules, in order:

1. Ray is already initialised in this process (a test, a notebook, a Ray task): use it as it is.
2. ``--address`` (the ``address`` argument) or ``RAY_ADDRESS``: join that cluster. A job started by
   ``ray job submit`` is this case: Ray's job supervisor sets ``RAY_ADDRESS`` to the job's cluster. Joining
   never passes ``num_cpus`` / ``num_gpus`` (Ray refuses them for an existing cluster). The address is checked
   first (:func:`check_address`: its form, a TCP connection, one gRPC call, each bounded by
   :data:`PROBE_TIMEOUT_S`), so a malformed address, or one where no Ray server answers, is refused within
   seconds instead of after Ray's own half a minute of retries; :func:`will_be_local`, which the bulk job asks
   before anything else, checks it too, so the job refuses it also when it turns out to have nothing to do.
3. Neither: a private cluster on this machine (``ray.init(address="local")``, node address 127.0.0.1, without
   dashboard, Ray's token authentication left on: Ray 2.60 binds some of its services beyond 127.0.0.1).
   Plain ``ray.init()`` would join the cluster named in Ray's address file (the last ``ray start`` on this
   machine, possibly someone else's); ``address="local"`` never does.

Relative paths (:func:`resolve_path`): a command started by the user resolves them against the directory it
was started from. A job started by ``ray job submit`` runs in a directory Ray chose (with ``--working-dir``, a
temporary copy of the upload that Ray deletes later), so the user's directory is not knowable there and
relative data paths are refused with a message asking for an absolute or ``s3://`` path.

Source: Ray's ``ray.init`` address resolution (``RAY_ADDRESS``, then the address file, then a new local
instance) and its job supervisor, which sets ``RAY_ADDRESS`` and ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (the job's
runtime environment, with ``working_dir``) for the entry point (Ray 2.60).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instdiff.errors import ConfigError, InstdiffError, UsageError

log = logging.getLogger(__name__)

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's entry point
ADDRESS_ENV = "RAY_ADDRESS"
PROBE_TIMEOUT_S = 5.0


class RayConnectError(InstdiffError, ConnectionError):
    """The Ray cluster named by ``--address`` / ``RAY_ADDRESS`` cannot be joined (wrong form, not answering)."""


@dataclass(frozen=True)
class ClusterInfo:
    """The cluster a command runs on.

    Attributes:
        kind: ``"local"`` (a private cluster this call started), ``"address"`` (joined ``--address`` /
            ``RAY_ADDRESS``), ``"job"`` (the cluster of the Ray job this process is the entry point of) or
            ``"existing"`` (Ray was already initialised in this process).
        address: the cluster's GCS address (``host:port``).
        started: this call started or joined Ray, so the caller shuts it down when done (:func:`disconnect`).
        nodes: alive nodes when connected.
        cpus: CPUs in the cluster when connected.
        gpus: GPUs in the cluster when connected.
    """

    kind: str
    address: str
    started: bool
    nodes: int
    cpus: float
    gpus: float

    @property
    def local(self) -> bool:
        """The cluster is this process's private one (it cannot grow; a pool that does not fit never will)."""
        return self.kind == "local"

    def describe(self) -> str:
        """One line for the log: which cluster, where, how big."""
        what = {
            "local": "a private local Ray cluster",
            "address": "the Ray cluster at",
            "job": "the Ray job's cluster at",
            "existing": "the Ray cluster this process is already connected to at",
        }[self.kind]
        where = f" ({self.address})" if self.kind == "local" else f" {self.address}"
        return f"{what}{where}: {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs"


def in_ray_job() -> bool:
    """Whether this process is the entry point of a job started through Ray's job API (``ray job submit``)."""
    return bool(os.environ.get(JOB_CONFIG_ENV))


def job_working_dir() -> str | None:
    """The ``working_dir`` of the submitted job this process runs in (a ``gcs://`` package URI), else ``None``."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return str(working_dir) if working_dir else None


def target(address: str | None = None) -> tuple[str, str | None]:
    """Which cluster :func:`connect` would use, without connecting: ``(kind, address)``.

    Args:
        address: the ``--address`` flag (``None``: not given).

    Returns:
        ``("existing", None)`` when Ray is initialised in this process; ``("address", ADDR)`` for ``--address``
        or ``RAY_ADDRESS`` (``("job", ADDR)`` when this process is a submitted job's entry point and
        ``--address`` was not given); ``("local", None)`` otherwise. ``--address local`` asks for the private
        cluster explicitly.
    """
    import ray

    if ray.is_initialized():
        return "existing", None
    if address:
        return ("local", None) if address == "local" else ("address", address)
    env = os.environ.get(ADDRESS_ENV, "").strip()
    if env and env != "local":
        return ("job" if in_ray_job() else "address"), env
    return "local", None


def will_be_local(address: str | None = None) -> bool:
    """Whether the work will run on this machine only (a private local cluster, or Ray already started here
    without an address to join) — what the driver may check against this machine's devices and folders.

    An address to join is checked here (:func:`check_address`), so a command that asks this first refuses a
    malformed or dead address before it reads or writes anything, also when it turns out to have nothing to do.

    Args:
        address: the ``--address`` flag (``None``: ``RAY_ADDRESS``, else a private local cluster).

    Returns:
        True for a private local cluster (or Ray already running here on one node without ``RAY_ADDRESS``).

    Raises:
        RayConnectError: the address from ``--address`` / ``RAY_ADDRESS`` is malformed or does not answer.
    """
    kind, addr = target(address)
    if kind == "existing":
        import ray

        return len(ray.nodes()) <= 1 and not os.environ.get(ADDRESS_ENV)
    if addr is not None:
        check_address(addr, _source(address))
    return kind == "local"


def _source(address: str | None) -> str:
    """Where the address came from, for messages."""
    return "--address" if address else ADDRESS_ENV


ACCEPTED_ADDRESSES = (
    "HOST:PORT (the head's GCS port, 6379 by default), ray://HOST:PORT (Ray Client, port 10001 by default), "
    "'auto' (the cluster started on this machine with `ray start`), or 'local' (a private cluster on this machine)"
)


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` / ``ray://HOST[:PORT]`` (IPv6 hosts in brackets), else ``None``."""
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [IPv6]:PORT
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if address.startswith("ray://") and not sep and rest and "/" not in rest:
        host, port = rest, "10001"  # Ray Client's default port
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/ @?#"):
        return None
    return host, int(port)


def check_address_form(address: str, source: str = "--address") -> None:
    """Refuse an address Ray would not take (or would take for something else), without touching the network.

    Args:
        address: the address as given.
        source: the flag or variable that gave it, for the message.

    Raises:
        RayConnectError: a dashboard URL (``http(s)://``), or anything but ``HOST:PORT``, ``ray://HOST[:PORT]``,
            ``auto`` or ``local`` (the message names the accepted forms).
    """
    if address.startswith(("http://", "https://")):
        raise RayConnectError(
            f"{source} {address!r} is the dashboard's HTTP address (what `ray job submit --address` takes); "
            "to run on a cluster give its GCS address HOST:PORT (port 6379 by default), or submit the command "
            "with `ray job submit`"
        )
    if address in ("auto", "local"):
        return
    if _host_port(address) is None:
        shown = address if len(address) <= 80 else f"{address[:60]}... ({len(address)} characters)"
        raise RayConnectError(f"{source} {shown!r} is not a Ray address; accepted: {ACCEPTED_ADDRESSES}")


def check_address(address: str, source: str = "--address") -> None:
    """Refuse a malformed address, and one nothing listens on, within :data:`PROBE_TIMEOUT_S` seconds.

    ``HOST:PORT`` and ``ray://HOST:PORT`` are probed with a TCP connection (Ray itself retries a dead address for
    half a minute or more before it gives up); ``auto`` and ``local`` are left to Ray.

    Args:
        address: the address as given.
        source: the flag or variable that gave it (``--address``, ``RAY_ADDRESS``), for the message.

    Raises:
        RayConnectError: the address is not of an accepted form (:func:`check_address_form`), its host does not
            resolve, or nothing accepts a connection there within :data:`PROBE_TIMEOUT_S` seconds.
    """
    check_address_form(address, source)
    hp = _host_port(address) if address not in ("auto", "local") else None
    if hp is None:
        return
    why = None
    try:
        with socket.create_connection(hp, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        why = f"no answer within {PROBE_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
    if why is None and not _tls():
        why = _grpc_problem(*hp, "client server" if address.startswith("ray://") else "head (GCS)")
    if why is not None:
        hint = " (set by the environment; unset it to run on a private local cluster)" if "RAY" in source else ""
        raise RayConnectError(
            f"cannot reach the Ray cluster at {address} from {source}{hint}: {why}; start the cluster "
            f"(`ray start --head`) or give the address of a running one ({ACCEPTED_ADDRESSES})"
        )


def _tls() -> bool:
    """Ray's gRPC connections use TLS (``RAY_USE_TLS``): the plain-text handshake check does not apply."""
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true", "yes")


PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
"""The RPC of the handshake check: the first one Ray itself makes on a head; any gRPC server answers it (a server
without that method with UNIMPLEMENTED), which is all the check asks."""


def _grpc_problem(host: str, port: int, what: str) -> str | None:
    """Why ``host:port`` is no gRPC server (``None``: it is one), from one RPC with a :data:`PROBE_TIMEOUT_S` deadline.

    Ray's head (GCS) and its client server are gRPC servers. A TCP connection alone proves little: a firewall or
    proxy may accept any connection, or another service may own the port, and Ray then retries for half a minute
    or more before it gives up. A gRPC server answers any RPC with a gRPC status (also "unauthenticated", under
    Ray's token authentication, or "unimplemented"); a plain HTTP server, a proxy that cannot reach the host, or a
    silent port does not.

    Args:
        host: the host.
        port: the port.
        what: the kind of Ray server expected there, for the message.

    Returns:
        ``None`` when a gRPC server answered (or ``grpcio``, which ``ray[serve]`` installs, is absent: then the TCP
        check alone applies), else the reason, for the message.
    """
    try:
        import grpc
    except ImportError:
        return None

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    try:
        probe = channel.unary_unary(PROBE_METHOD, request_serializer=bytes, response_deserializer=bytes)
        probe(b"", timeout=PROBE_TIMEOUT_S, wait_for_ready=True)
        return None
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"the port accepts connections, but no Ray {what} answered there within {PROBE_TIMEOUT_S:g} s"
        if code == grpc.StatusCode.UNAVAILABLE or details.startswith("Received http2 header with status"):
            return f"no Ray {what} answers there ({' '.join(details.split())[:120]})"
        return None  # a gRPC server's own answer
    finally:
        channel.close()


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    log_to_driver: bool = True,
) -> ClusterInfo:
    """Start or join the Ray cluster the connection rules pick (module docstring) and say which it is.

    Args:
        address: ``--address`` (``None``: ``RAY_ADDRESS``, else a private local cluster; ``"local"``: a private
            local cluster even when ``RAY_ADDRESS`` is set).
        num_cpus: CPUs of a private local cluster (``None``: this machine's). Ignored when joining.
        num_gpus: GPUs of a private local cluster (``None``: those found). Ignored when joining.
        object_store_memory: object store bytes of a private local cluster (``None``: Ray's default).
        log_to_driver: stream the workers' log lines to this process's stderr.

    Returns:
        The cluster (logged at INFO: kind, address, nodes, CPUs, GPUs).

    Raises:
        RayConnectError: the address is a dashboard URL or malformed, or nothing answers there.
        ConfigError: Ray refuses the settings of a private local cluster (e.g. an object store below its
            minimum size).
    """
    import ray

    kind, addr = target(address)
    if kind == "existing":
        return _info("existing", started=False)
    if kind == "local":
        # Ray 2.60 turns token auth on for a local cluster unless RAY_AUTH_MODE says otherwise; keep it: some of
        # Ray's own services listen beyond 127.0.0.1 whatever _node_ip_address says, and the token is what keeps
        # other users of the network out of this cluster
        try:
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=object_store_memory,
                log_to_driver=log_to_driver,
            )
        except ValueError as exc:  # Ray's own limits, e.g. its minimum object store size
            raise ConfigError(f"ray: cannot start a local cluster with these settings: {exc}") from None
    else:
        source = _source(address)
        assert addr is not None
        check_address(addr, source)
        ignored = [n for n, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None]
        if ignored:
            log.info("joining an existing cluster: ray.%s apply to a private local cluster only", "/".join(ignored))
        try:
            ray.init(address=addr, log_to_driver=log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayConnectError(f"cannot join the Ray cluster at {addr} ({source}): {_first_line(exc)}") from None
    info = _info(kind, started=True)
    log.info("Ray: %s", info.describe())
    return info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _info(kind: str, started: bool) -> ClusterInfo:
    import ray

    total = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        kind=kind,
        address=str(ray.get_runtime_context().gcs_address),
        started=started,
        nodes=len(alive),
        cpus=float(total.get("CPU", 0.0)),
        gpus=float(total.get("GPU", 0.0)),
    )


def disconnect(info: ClusterInfo | None) -> None:
    """Shut Ray down in this process if :func:`connect` started or joined it (a private cluster stops with it)."""
    if info is not None and info.started:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def resolve_path(path: str, what: str) -> str:
    """An input or output path as the job's processes must see it: URIs unchanged, local paths absolute.

    Args:
        path: a local path, ``file://`` URI or a remote URI (``s3://``, ``gs://``, ...).
        what: the key or flag that named it, for the message (``"input"``, ``"--output"``).

    Returns:
        ``path`` unchanged when it is a remote URI or absolute; otherwise resolved against the directory the
        command was started from (``~`` expanded).

    Raises:
        UsageError: a relative path in a job started through Ray's job API (``ray job submit``), where the
            directory the user ran the command from is not known (with ``--working-dir`` the process runs in a
            temporary copy of the upload, which Ray deletes later).
    """
    from urllib.parse import urlparse

    text = str(path)
    scheme = urlparse(text).scheme
    if len(scheme) > 1 and scheme != "file":
        return text
    local = urlparse(text).path if scheme == "file" else text
    p = Path(local).expanduser()
    if p.is_absolute():
        return str(p)
    if in_ray_job():
        where = (
            f"the job runs in Ray's temporary copy of its --working-dir upload ({os.getcwd()}), which Ray deletes "
            "after the job, so a relative path would read from or write into that copy"
            if job_working_dir()
            else f"a job started by `ray job submit` runs in a directory Ray chose ({os.getcwd()}), not the one "
            "you submitted it from"
        )
        raise UsageError(
            f"{what} {text!r} is a relative path, but {where}; give an absolute path (on storage every node "
            "shares) or an s3:// URI"
        )
    return str(p.resolve())


def summary_fields(info: ClusterInfo | None) -> dict[str, Any]:
    """The cluster as plain data for a run's summary or a benchmark record (``{}`` when none was used)."""
    if info is None:
        return {}
    return {"kind": info.kind, "address": info.address, "nodes": info.nodes, "cpus": info.cpus, "gpus": info.gpus}
