"""``instdiff serve``: run the HTTP app from a Ray Serve config file until Ctrl-C.

Ray by the project's connection rules (:func:`pipelines.ray_connect.connect`): ``--address`` or ``RAY_ADDRESS``
joins that cluster, inside a Ray job the job's cluster, otherwise a private local Ray (never someone else's).
The same file works with ``serve run FILE`` and ``serve deploy FILE``; its ``deployments:`` overrides are applied
here too (:func:`pipelines.serve.app.make_app`).
"""

from __future__ import annotations

import argparse
import logging
import time

from pipelines.commands import add_address_arg
from pipelines.serve.config import load_serve_file

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/serve/default.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    p = sub.add_parser(
        "serve",
        help="serve the HTTP API and web page (Ray Serve)",
        description="Serve edits and FISEdit sessions over HTTP from a Ray Serve config file; Ctrl-C stops.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"Ray Serve config file (default: {DEFAULT_CONFIG})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    add_address_arg(p)
    p.set_defaults(func=run)


def connect(host: str, port: int, address: str | None = None) -> None:
    """Start or join Ray by the connection rules (:func:`pipelines.ray_connect.connect`); start Serve's HTTP
    proxy on ``host:port``.

    Raises:
        RayConnectError: the cluster named by ``address`` / ``RAY_ADDRESS`` cannot be joined.
    """
    from ray import serve

    from pipelines.ray_connect import connect as connect_ray

    connect_ray(address, log_to_driver=False)  # logs which cluster it is
    serve.start(http_options={"host": host, "port": port})


def run(args: argparse.Namespace) -> int:
    """Deploy the app, print its URL, wait for Ctrl-C, then shut Serve and Ray down.

    Returns:
        0 after Ctrl-C.

    Raises:
        InputNotFoundError: no such config file.
        ConfigError: not a Serve config of this app, or bad ``args``.
        UsageError: a port outside 1–65535.
    """
    from ray import serve

    from instdiff.errors import UsageError
    from pipelines.serve.app import make_app

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1 to 65535; got {args.port}")
    spec = load_serve_file(args.config)
    connect(args.host, args.port, args.address)
    try:
        serve.run(make_app(spec.args, spec.deployments), name=spec.name, route_prefix=spec.route_prefix)
        url = f"http://{args.host}:{args.port}{spec.route_prefix}"
        print(f"instdiff serve: {url} (API docs: {url.rstrip('/')}/docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        _shutdown_quietly()
    return 0


def _shutdown_quietly() -> None:
    """Stop Serve and Ray without a traceback: a terminal's Ctrl-C reaches Ray's processes too (same process
    group), and a second Ctrl-C while they stop must not interrupt the shutdown half-way."""
    import signal

    import ray
    from ray import serve

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for stop in (serve.shutdown, ray.shutdown):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - already stopping; say what failed and go on
                log.warning("while stopping: %s: %s", type(exc).__name__, exc)
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["connect", "register", "run"]
