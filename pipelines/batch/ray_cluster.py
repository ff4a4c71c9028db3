"""The Ray cluster a job runs on (the rules are :mod:`pipelines.ray_connect`'s), and whether it can run the pool."""

from __future__ import annotations

import logging

from instdiff.errors import ConfigError
from pipelines.config import BatchConfig
from pipelines.ray_connect import ClusterInfo, connect

log = logging.getLogger(__name__)


def connect_ray(cfg: BatchConfig, address: str | None = None) -> ClusterInfo:
    """Start or join the job's Ray cluster by the project's connection rules (:mod:`pipelines.ray_connect`).

    Args:
        cfg: the job config (its ``ray`` section sizes a private local cluster; ignored when joining one).
        address: ``--address`` (``None``: ``RAY_ADDRESS``, else a private local cluster).

    Returns:
        The cluster; ``started`` is true when this call started or joined Ray (the caller shuts it down).

    Raises:
        RayConnectError: the address is malformed or does not answer.
        ConfigError: Ray refuses the ``ray`` section's settings for a local cluster (e.g. an object store below
            its minimum size).
    """
    return connect(
        address,
        num_cpus=cfg.ray.num_cpus,
        object_store_memory=cfg.ray.object_store_memory,
    )


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
