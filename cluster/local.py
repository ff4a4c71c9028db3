"""A real multi-node Ray cluster on this machine (head + worker nodes from ``ray start``), for tests and benchmarks.

Every node is a ``ray start --block`` process in its own process group, bound to 127.0.0.1, with its own
free ports and a private ``--temp-dir`` (so Ray's address file of this machine's other users is neither read
nor written). The head runs the dashboard on 127.0.0.1 (``ray job submit`` needs it). :meth:`LocalCluster.
kill_node` kills one node's whole process tree by process id (a lost machine); :meth:`LocalCluster.stop` stops
everything that was started, by process id and process group, never with ``ray stop``.

Ray's token authentication is on: Ray 2.60 binds some of its services (GCS, raylet, agents) beyond 127.0.0.1
whatever ``--node-ip-address`` says, so without it anyone who reaches this machine could submit work. Each
cluster gets its own random token (``secrets.token_hex(32)``, 256 bits as Ray's ``ray get-auth-token
--generate``), kept in a file readable by this user only (0600, in the 0700 temp dir), never in an environment
variable's value or a log line. Ray (``ray/_private/authentication`` and its C++ ``AuthenticationTokenLoader``)
reads the mode from ``RAY_AUTH_MODE`` and the token from, in this order, ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; the nodes, every job they start, ``ray job submit`` and
``ray.init`` all read the same variables, and the dashboard's HTTP API wants ``Authorization: Bearer TOKEN``
(401 without, 403 with a wrong one).

Usage::

    with LocalCluster(head_cpus=2, worker_cpus=[2]) as c:
        c.gcs_address        # 127.0.0.1:PORT, for ray.init(address=...) / --address / RAY_ADDRESS
        c.dashboard_url      # http://127.0.0.1:PORT, for ray job submit --address
        subprocess.run(["ray", "job", "submit", "--address", c.dashboard_url, ...], env=c.client_environ())
        JobSubmissionClient(c.dashboard_url, headers=c.auth_headers)
        with c.client_env():  # this process's os.environ (and Ray's cached auth settings), restored after
            ray.init(address=c.gcs_address)
            ...
            ray.shutdown()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RAY_BIN = Path(sys.executable).with_name("ray")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # what Ray reads for token authentication


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_ports() -> list[str]:
    """Free ports for one node's Ray services (Ray's fixed defaults would collide with other clusters here)."""
    return [
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
    ]


@dataclass
class Node:
    """One ``ray start --block`` process (its process group holds the node's Ray processes)."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    pids: dict[int, float] = field(default_factory=dict)  # pid → create time (a reused pid is never signalled)

    def tree(self) -> dict[int, float]:
        """The node's processes now (the ``ray start`` process and everything under it) and those seen before."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    self.pids[p.pid] = p.create_time()
                except psutil.NoSuchProcess:
                    continue
        except psutil.NoSuchProcess:
            pass
        return dict(self.pids)


class LocalCluster:
    """Head + worker nodes on 127.0.0.1, started by ``ray start`` (see the module docstring).

    The temp dir and the token file are made at construction; :meth:`stop` removes them (also when the cluster
    was never started).

    Args:
        head_cpus: logical CPUs of the head.
        worker_cpus: logical CPUs of each worker node (one node per entry; ``[]``: the head alone).
        object_store_mb: object store of each node, MiB.
        env: extra environment of every node (and of the jobs the head starts); ``PATH`` starts with this
            interpreter's folder so that a job's ``python`` is this environment's. The token-authentication
            variables (``AUTH_VARS``) are always the cluster's own.
        start_timeout_s: how long to wait for the nodes to join.

    Attributes:
        env: the nodes' environment (also right for a client subprocess such as ``ray job submit``, but
            :meth:`client_environ` keeps the caller's own environment apart from the auth variables).
        token_path: the 0600 file holding this cluster's token.
    """

    def __init__(
        self,
        head_cpus: int = 1,
        worker_cpus: list[int] | None = None,
        object_store_mb: int = 160,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.head_cpus = head_cpus
        self.worker_cpus = list(worker_cpus) if worker_cpus is not None else [1]
        self.object_store = str(object_store_mb * 2**20)
        self.start_timeout_s = start_timeout_s
        self.temp_dir = tempfile.mkdtemp(prefix="idc", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.token_path = Path(self.temp_dir) / "auth_token"
        _write_private(self.token_path, secrets.token_hex(32))
        self.port = free_port()
        self.dashboard_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
        self.env.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        self.env.update(env or {})
        self.env = self.client_environ(self.env)
        self.nodes: list[Node] = []
        self.lost: list[Node] = []  # nodes killed by kill_node (their leftovers are still stopped by stop)
        self._previous_sigterm: Any = None

    @property
    def gcs_address(self) -> str:
        """``127.0.0.1:PORT``: what ``ray.init(address=...)``, ``--address`` and ``RAY_ADDRESS`` take."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """``http://127.0.0.1:PORT``: what ``ray job submit --address`` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_env(self) -> dict[str, str]:
        """The variables that make a Ray client use this cluster's token: ``RAY_AUTH_MODE=token`` and
        ``RAY_AUTH_TOKEN_PATH`` (the token file; ``RAY_AUTH_TOKEN`` must be unset, it would take precedence)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    @property
    def auth_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer TOKEN"}``: what the dashboard's HTTP API (jobs, state) requires, e.g.
        ``JobSubmissionClient(c.dashboard_url, headers=c.auth_headers)``. Keep it out of logs."""
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def client_environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for a client subprocess of this cluster (``ray job submit``, a driver script).

        Args:
            base: the environment to start from (``None``: this process's ``os.environ``).

        Returns:
            A copy of ``base`` with :attr:`auth_env` set and ``RAY_AUTH_TOKEN`` removed.
        """
        environ = {k: v for k, v in (os.environ if base is None else base).items() if k not in AUTH_VARS}
        environ.update(self.auth_env)
        return environ

    @contextlib.contextmanager
    def client_env(self) -> Iterator[LocalCluster]:
        """Make this process a client of the cluster: ``os.environ`` gets :attr:`auth_env` (``RAY_AUTH_TOKEN``
        removed), restored on exit.

        Ray caches the auth mode (its ``RayConfig``) and the token (``AuthenticationTokenLoader``) per process;
        both caches are refreshed on entry and on exit, so call ``ray.init`` inside the block; a driver still
        connected at the end is shut down (``ray.shutdown``). One process can be a client of several clusters in
        turn.

        Yields:
            This cluster.

        Raises:
            RuntimeError: this process is connected to a Ray cluster already.
        """
        import ray

        if ray.is_initialized():  # Ray's config would be re-read under a connected driver
            raise RuntimeError("LocalCluster.client_env: call ray.shutdown() before entering the block")
        saved = {k: os.environ.get(k) for k in AUTH_VARS}
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(self.auth_env)
        _refresh_ray_auth()
        try:
            yield self
        finally:
            if ray.is_initialized():  # a driver of this cluster: it cannot go on without the token
                ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _refresh_ray_auth()

    def _start(self, name: str, args: list[str]) -> Node:
        log_path = Path(self.temp_dir) / f"{name}.log"
        cmd = [
            str(RAY_BIN),
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            self.temp_dir,
            "--object-store-memory",
            self.object_store,
            "--disable-usage-stats",
            *_node_ports(),
            *args,
        ]
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir
            )
        node = Node(name, proc, log_path)
        self.nodes.append(node)
        return node

    def add_worker(self, cpus: int) -> Node:
        """Start one more worker node with ``cpus`` logical CPUs and wait until it has joined."""
        node = self._start(
            f"worker{len(self.nodes) + len(self.lost)}", ["--address", self.gcs_address, "--num-cpus", str(cpus)]
        )
        self._wait_nodes(len(self.nodes))
        return node

    def start(self) -> LocalCluster:
        """Start the head (with the dashboard on 127.0.0.1) and the workers; wait until all have joined.

        While the cluster runs, SIGTERM to this process (e.g. ``timeout``) stops its nodes and then raises
        ``SystemExit`` (the default action would exit and leave them running).
        """
        _LIVE.append(self)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL,
            None,
        ):
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._start(
                "head",
                [
                    "--head",
                    "--port",
                    str(self.port),
                    "--num-cpus",
                    str(self.head_cpus),
                    "--include-dashboard",
                    "true",
                    "--dashboard-host",
                    "127.0.0.1",
                    "--dashboard-port",
                    str(self.dashboard_port),
                    "--ray-client-server-port",
                    str(free_port()),
                ],
            )
            self._wait_nodes(1)
            for cpus in self.worker_cpus:
                self.add_worker(cpus)
        except BaseException:
            self.stop()
            raise
        log.info(
            "local cluster: head %s, dashboard %s, %d node(s)", self.gcs_address, self.dashboard_url, len(self.nodes)
        )
        return self

    def alive_nodes(self) -> int:
        """Nodes the cluster reports alive (through the dashboard's state API; 0 while it is not up)."""
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?limit=100", headers=self.auth_headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                data = json.load(r)
        except (OSError, ValueError):
            return 0
        rows = data.get("data", {}).get("result", {}).get("result", [])
        return sum(1 for n in rows if n.get("state") == "ALIVE")

    def _wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray start ({node.name}) exited: {node.log_path.read_text()[-2000:]}")
            if self.alive_nodes() >= n:
                return
            time.sleep(2)
        raise TimeoutError(f"the local cluster did not reach {n} alive node(s) in {self.start_timeout_s:.0f} s")

    def kill_node(self, node: Node) -> list[int]:
        """Kill one node's processes at once (SIGKILL, by process id and group): a machine that is lost.

        Returns:
            The process ids killed.
        """
        pids = node.tree()
        _kill(pids, node.proc, signal.SIGKILL)
        node.proc.wait(timeout=30)
        self.nodes.remove(node)
        self.lost.append(node)
        return sorted(pids)

    def stop(self) -> None:
        """Stop every node this object started (SIGTERM, then SIGKILL after 10 s), then remove the temp dir."""
        self.nodes += self.lost
        self.lost = []
        trees = {node.name: node.tree() for node in self.nodes}
        for node in reversed(self.nodes):
            _kill(trees[node.name], node.proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p, t) for tree in trees.values() for p, t in tree.items()):
            time.sleep(0.5)
        for node in self.nodes:
            _kill(trees[node.name], node.proc, signal.SIGKILL)
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("ray start (%s, pid %d) did not exit", node.name, node.proc.pid)
        self.nodes = []
        if self in _LIVE:
            _LIVE.remove(self)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE: list[LocalCluster] = []  # clusters started in this process and not stopped yet


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file ``path`` that only this user can read (mode 0600 from creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _refresh_ray_auth() -> None:
    """Make Ray in this process re-read ``RAY_AUTH_MODE`` and the token (it caches both at first use).

    The order is Ray's own (``ray._private.authentication_test_utils.reset_auth_token_state``): the config
    first, then the token cache, so that no thread reloads a token under a stale mode.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """Stop every live cluster of this process (by process id), then exit."""
    for cluster in list(_LIVE):
        cluster.stop()
    raise SystemExit(128 + signum)


def _alive(pid: int, created: float) -> bool:
    """Whether process ``pid`` started at ``created`` still runs (not a zombie, not a reused pid)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pids: dict[int, float], leader: subprocess.Popen, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of ``leader`` (a node's ``ray start``, our child, not yet reaped) and to
    each process of ``pids`` that is still the one recorded (same create time)."""
    if leader.poll() is None:
        try:
            os.killpg(leader.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid, created in pids.items():
        if _alive(pid, created):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
