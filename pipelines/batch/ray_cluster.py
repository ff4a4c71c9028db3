"""The Ray cluster a job runs on: join ``RAY_ADDRESS`` or start a local one, and check it can run the pool."""

from __future__ import annotations

import logging
import os

from instdiff.errors import ConfigError
from pipelines.config import BatchConfig

log = logging.getLogger(__name__)


def connect_ray(cfg: BatchConfig) -> bool:
    """Connect to ``RAY_ADDRESS`` when set, else start a local cluster (``cfg.ray.num_cpus`` CPUs).

    A local cluster is single-user: unless ``RAY_AUTH_MODE`` is set, token authentication is turned off.

    Args:
        cfg: the job config (its ``ray`` section sizes a local cluster).

    Returns:
        True if this call started or joined Ray; False if Ray was already initialised.

    Raises:
        ConfigError: Ray refuses the ``ray`` section's settings for a local cluster (e.g. an object store below
            its minimum size).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        # a local single-user cluster: opt out of token auth unless the user chose a mode
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        log.info("RAY_ADDRESS is not set; starting a local Ray cluster")
        try:
            ray.init(
                num_cpus=cfg.ray.num_cpus,
                object_store_memory=cfg.ray.object_store_memory,
                include_dashboard=False,
            )
        except ValueError as exc:  # Ray's own limits, e.g. its minimum object store size
            raise ConfigError(f"ray: cannot start a local cluster with these settings: {exc}") from None
    return True


def check_resources(cfg: BatchConfig, local: bool) -> None:
    """Refuse (local cluster) or warn about (remote cluster, which may autoscale) a pool that cannot run.

    Ray Data's listing, read and write tasks need a whole free CPU next to the actor pool; when the actors
    reserve every CPU the job waits forever instead of failing.

    Args:
        cfg: the job config (its ``actors`` and ``ray.task_cpus``).
        local: the cluster cannot grow (refuse instead of warning).

    Raises:
        ConfigError: on a local cluster, the pool leaves no CPU for Ray Data's tasks or asks for more GPUs
            than the cluster has.
    """
    import ray

    a = cfg.actors
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    problems = []
    reserved = a.pool_size * a.num_cpus
    if cpus - reserved < max(1.0, cfg.ray.task_cpus):
        problems.append(
            f"the cluster has {cpus:g} CPUs and actors.pool_size × actors.num_cpus = {a.pool_size} × {a.num_cpus:g} "
            f"reserves {reserved:g}, leaving {max(cpus - reserved, 0):g}; Ray Data's read/decode/write tasks need at "
            f"least {max(1.0, cfg.ray.task_cpus):g}. Lower actors.num_cpus (e.g. "
            f"{max((cpus - 1.0) / a.pool_size, 0.0):g}; torch still gets one thread) or actors.pool_size"
        )
    if a.num_gpus and a.pool_size * a.num_gpus > gpus:
        problems.append(
            f"actors.pool_size × actors.num_gpus = {a.pool_size} × {a.num_gpus:g} GPUs, but the cluster has {gpus:g}"
        )
    for problem in problems:
        if local:
            raise ConfigError(problem)
        log.warning("%s (continuing: the cluster may scale up)", problem)
