"""The Serve application: a FastAPI ingress bound to a model deployment (``import_path:
pipelines.serve.app:build_app`` in ``configs/serve/*.yaml``).

Sessions and routing. A FISEdit session's cache lives in the replica that generated it, so its edits must reach
that replica. Ray 2.60 offers two mechanisms; this app uses the **consistent-hash request router**
(``ray.serve.experimental.consistent_hash_router.ConsistentHashRouter``) on the model deployment, keyed by the
session id that the ingress passes as the handle's ``session_id``, with ``num_fallback_replicas: 0``:

* the replica is a pure function of the session id and the replica set, so every edit of a session reaches the
  replica holding its cache, also under load (a busy replica makes the request wait, it never sends it to one
  without the cache);
* model multiplexing (``@serve.multiplexed``) keys an LRU of *loadable* models per replica and routes to a
  replica that has the id only as a preference: under load, or once that replica is busy, it routes elsewhere
  and "loads" the id there, which for a session means a second, empty cache (a 404) — it fits models that can be
  reloaded from storage, not state that exists only in memory.

The cost: when the replica set changes (autoscaling, a crash), the sessions whose ring segment moved answer 404
with a message to start a new session; the LRU byte budget and TTL (:class:`pipelines.serve.sessions.SessionStore`)
bound what each replica keeps. Requests without a session (``/v1/edits``) are hashed by their request id, which
spreads them evenly across replicas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from pipelines.serve.config import ServeArgs, parse_args
from pipelines.serve.ingress import Ingress
from pipelines.serve.model import EditModel

SESSION_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


def model_options(args: ServeArgs) -> dict[str, Any]:
    """The model deployment's Serve options from ``args.replicas`` (resources, replicas, queue, router)."""
    r = args.replicas
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": r.max_ongoing_requests,
        "max_queued_requests": r.max_queued_requests,
        "request_router_config": RequestRouterConfig(
            request_router_class=SESSION_ROUTER, request_router_kwargs={"num_fallback_replicas": 0}
        ),
        "health_check_period_s": 10,
    }
    if r.autoscaling:
        options["autoscaling_config"] = dict(r.autoscaling)
    else:
        options["num_replicas"] = r.num_replicas
    return options


def make_app(args: ServeArgs, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Application:
    """Bind the ingress to the model deployment.

    Args:
        args: the app's settings.
        overrides: per deployment name (``EditModel``, ``Ingress``), Serve options that replace the ones from
            ``args`` (a config file's ``deployments:`` list, which ``serve run`` applies by itself).

    Returns:
        The bound application.
    """
    overrides = overrides or {}
    model = EditModel.options(**{**model_options(args), **dict(overrides.get("EditModel", {}))}).bind(args)
    ingress_options = {
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": 4 * max(args.replicas.max_ongoing_requests, 16),
        **dict(overrides.get("Ingress", {})),
    }
    return Ingress.options(**ingress_options).bind(model, args)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: the ``args`` of a config file → the bound application.

    Raises:
        ConfigError: unknown keys or bad values in ``args`` (:func:`pipelines.serve.config.parse_args`).
    """
    return make_app(parse_args(args))


__all__ = ["SESSION_ROUTER", "build_app", "make_app", "model_options"]
