"""Cluster scaling of the bulk job: rows/s in total and per actor for 1, 2, ... N actors, on one or more nodes.

Each layout is a Ray cluster: the one at ``--address`` (or ``RAY_ADDRESS``), or a local multi-node cluster of
``ray start`` nodes on this machine (:class:`cluster.local.LocalCluster`, ``--layout NAME=CPUS[,CPUS...]``: the
head's logical CPUs, then one worker node per further number). For every actor count k the bulk job
(:func:`pipelines.batch.run_job`, the real pipeline and writer) runs twice, on k batches and on ``--rows`` rows;
the difference gives the steady rate ``(N - n) / (T_N - T_n)``, free of the fixed cost (actor start, model load).

Per run: rows/s end to end and steady, per actor, time to the first committed output row, Ray Data's
per-operator breakdown (``_runs/<run_id>.stats.txt``: tasks, wall and CPU seconds), where the editing actors
ran, GPU utilisation sampled through NVML when GPUs and ``pynvml`` exist, and cost per 1,000 edits for
``--usd-per-hour``. On a local cluster the CPU seconds of every process of the cluster are counted
(:class:`cluster.benchmarks.batch.TreeCpu`), so scaling can be judged by CPU accounting on a shared machine:

* wall-clock efficiency(k) = steady rows/s(k) / (k × steady rows/s(1)), needs k idle cores;
* CPU efficiency(k) = steady CPU s/row(1) / steady CPU s/row(k): 1.0 means an extra actor costs no extra CPU
  per row, i.e. k idle cores give k times the rate.

    python -m cluster.benchmarks.scaling --layout one-node=3 --layout two-nodes=2,1@2 --actors 1 2 \\
        --out docs/results/scaling.json
    RAY_ADDRESS=HEAD:6379 python -m cluster.benchmarks.scaling --actors 1 2 4 8 --num-gpus 1 --usd-per-hour 12

A local cluster runs with Ray's token authentication and its own token (:class:`cluster.local.LocalCluster`;
this process is its client only while the layout runs); with ``--address`` the environment is left as it is
(``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` as that cluster needs).

Writes JSON (machine, commit, parameters, results) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from cluster.benchmarks.batch import TreeCpu
from cluster.local import LocalCluster
from pipelines import batch
from pipelines.batch.progress import ProgressLine
from pipelines.config import BatchConfig, parse_config
from pipelines.make_dataset import shapes_table
from pipelines.ray_connect import connect, disconnect
from pipelines.runinfo import write_report
from pipelines.storage import write_table

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
_OP = re.compile(r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed, .* in (?P<wall>[\d.]+)(?P<unit>us|ms|s)")
_TOTAL = re.compile(r"Remote (?P<kind>wall|cpu) time: .*?, (?P<value>[\d.]+)(?P<unit>us|ms|s) total")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def job_config(args: argparse.Namespace, input_path: str, output: str, actors: int) -> BatchConfig:
    """The bulk-job config of one timed run: ``actors`` actors of ``--actor-cpus`` CPUs / ``--num-gpus`` GPUs."""
    return parse_config(
        {
            "input": input_path,
            "output": output,
            "seed": 0,
            "model": {"spec": args.model, "device": "cuda" if args.num_gpus else "cpu"},
            "method": {"name": "instdiffedit", "steps": args.steps, "n_noises": 1},
            "actors": {
                "pool_size": actors,
                "num_cpus": args.actor_cpus,
                "num_gpus": args.num_gpus,
                "batch_size": args.batch_size,
            },
            "write": {"max_rows_per_file": args.batch_size},
            "ray": {"progress_bars": False, "task_cpus": 1.0},
        }
    )


def parse_operator_stats(text: str) -> list[dict[str, Any]]:
    """Ray Data's stats text → one entry per operator: name, tasks, wall seconds, summed remote wall/CPU seconds.

    Args:
        text: ``Dataset.stats()`` output (``_runs/<run_id>.stats.txt``).

    Returns:
        ``[{"operator", "tasks", "wall_s", "remote_wall_s", "remote_cpu_s"}, ...]`` in plan order.
    """
    ops: list[dict[str, Any]] = []
    for line in text.splitlines():
        m = _OP.match(line.strip())
        if m:
            ops.append(
                {
                    "operator": m["name"],
                    "tasks": int(m["tasks"]),
                    "wall_s": round(float(m["wall"]) * _UNIT[m["unit"]], 3),
                    "remote_wall_s": None,
                    "remote_cpu_s": None,
                }
            )
            continue
        t = _TOTAL.search(line)
        if t and ops:
            ops[-1][f"remote_{t['kind']}_s"] = round(float(t["value"]) * _UNIT[t["unit"]], 3)
    return ops


class FirstRow:
    """Time from entering the block to the first committed output row of run ``run_id`` (polled every 0.25 s)."""

    def __init__(self, output: str, run_id: str) -> None:
        self.line = ProgressLine(pafs.LocalFileSystem(), output, run_id, total=1, interval_s=3600)
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(0.25):
            self.line.poll()
            if self.line.done:
                self.seconds = time.perf_counter() - t0
                return

    def __enter__(self) -> FirstRow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class GpuSampler:
    """Mean GPU utilisation (%) per device while the block runs, through NVML (``None`` without GPUs/pynvml)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: dict[int, list[int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no NVML here: no GPU figures
            self._nvml, self._handles = None, []

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for i, h in enumerate(self._handles):
                self.samples.setdefault(i, []).append(int(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu))

    def __enter__(self) -> GpuSampler:
        if self._handles:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, float] | None:
        """Device index → mean utilisation %, or ``None`` when nothing was sampled."""
        if not self.samples:
            return None
        return {str(i): round(sum(v) / len(v), 1) for i, v in self.samples.items() if v}


def _edit_actors() -> dict[str, str]:
    """Actor id → node id (first 8 hex) of every editing actor the cluster knows, alive or dead (state API)."""
    try:
        import ray
        from ray.util.state import list_actors

        address = ray.get_runtime_context().gcs_address
        actors = list_actors(address=address, detail=True, limit=10000, raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - placement is a by-product
        log.info("no actor placement: %s", exc)
        return {}
    out = {}
    for a in actors:
        d = a if isinstance(a, dict) else a.__dict__
        if "EditStage" in str(d.get("class_name", "")):
            out[str(d.get("actor_id"))] = str(d.get("node_id") or "?")[:8]
    return out


def time_job(args: argparse.Namespace, path: str, out: str, actors: int, local: bool) -> dict[str, Any]:
    """One bulk job: wall seconds, CPU seconds by process kind (local clusters), first row, GPU, stats, actors."""
    cfg = job_config(args, path, out, actors)
    run_id = batch.new_run_id()
    before = _edit_actors()
    with TreeCpu() as meter, GpuSampler() as gpu, FirstRow(out, run_id) as first:
        t0 = time.perf_counter()
        summary = batch.run_job(cfg, run_id=run_id)
        seconds = time.perf_counter() - t0
    if summary.ok != summary.written:
        raise RuntimeError(f"{actors} actor(s): {summary.error} error rows: {summary.top_errors}")
    stats_path = Path(out) / "_runs" / f"{run_id}.stats.txt"
    return {
        "rows": summary.written,
        "seconds": round(seconds, 3),
        "first_row_s": round(first.seconds, 2) if first.seconds is not None else None,
        "cpu_s": round(meter.seconds, 2) if local else None,
        "cpu_s_by_kind": {k: round(v, 2) for k, v in sorted(meter.by_kind.items())} if local else None,
        "gpu_util_pct": gpu.result(),
        "operators": parse_operator_stats(stats_path.read_text()) if stats_path.exists() else [],
        "actor_nodes": _count_nodes({a: n for a, n in _edit_actors().items() if a not in before}),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def _count_nodes(actor_nodes: dict[str, str]) -> dict[str, int]:
    """Node → number of this run's editing actors on it."""
    out: dict[str, int] = {}
    for node in actor_nodes.values():
        out[node] = out.get(node, 0) + 1
    return out


def time_actors(
    args: argparse.Namespace, table: Any, full_path: str, work: Path, actors: int, local: bool
) -> dict[str, Any]:
    """The small and the full job with ``actors`` actors; steady rows/s and CPU s/row from their difference."""
    small_path = str(work / f"small-{actors}.parquet")
    write_table(table.slice(0, args.batch_size * actors), small_path, compression="snappy")
    small = time_job(args, small_path, str(work / f"out-{actors}-small"), actors, local)
    full = time_job(args, full_path, str(work / f"out-{actors}-full"), actors, local)
    extra_rows, extra_s = full["rows"] - small["rows"], full["seconds"] - small["seconds"]
    steady = extra_rows / extra_s if extra_s > 0.2 * full["seconds"] else None
    r: dict[str, Any] = {
        "actors": actors,
        "runs": {"small": small, "full": full},
        "end_to_end_rows_per_s": round(full["rows"] / full["seconds"], 4),
        "steady_rows_per_s": round(steady, 4) if steady else None,
        "steady_rows_per_s_per_actor": round(steady / actors, 4) if steady else None,
        "first_row_s": full["first_row_s"],
        "fixed_cost_s": round(max(full["seconds"] - full["rows"] / steady, 0.0), 2) if steady else None,
    }
    if local:
        per_row = (full["cpu_s"] - small["cpu_s"]) / extra_rows
        kinds = set(small["cpu_s_by_kind"]) | set(full["cpu_s_by_kind"])
        r["steady_cpu_s_per_row"] = round(per_row, 4)
        r["steady_cpu_s_per_row_by_kind"] = {
            k: round((full["cpu_s_by_kind"].get(k, 0.0) - small["cpu_s_by_kind"].get(k, 0.0)) / extra_rows, 4)
            for k in sorted(kinds)
        }
    if args.usd_per_hour and steady:
        r["usd_per_1000_edits"] = round(args.usd_per_hour / 3600.0 / steady * 1000.0, 4)
    return r


def efficiencies(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """Wall-clock and CPU scaling efficiency of every k against k = 1 within one layout (see the module doc)."""
    by_k = {r["actors"]: r for r in results}
    one = by_k.get(1)
    out: dict[str, float | None] = {}
    for k, r in by_k.items():
        if k == 1 or one is None:
            continue
        wall = (
            r["steady_rows_per_s"] / (k * one["steady_rows_per_s"])
            if r["steady_rows_per_s"] and one["steady_rows_per_s"]
            else None
        )
        out[f"wall_{k}_vs_1"] = round(wall, 4) if wall is not None else None
        if r.get("steady_cpu_s_per_row") and one.get("steady_cpu_s_per_row"):
            out[f"cpu_{k}_vs_1"] = round(one["steady_cpu_s_per_row"] / r["steady_cpu_s_per_row"], 4)
    return out


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """rows/s (steady, total and per actor) against actors, one line per layout; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for layout in doc["layouts"]:
        ks = [r["actors"] for r in layout["results"]]
        axes[0].plot(ks, [r["steady_rows_per_s"] or 0 for r in layout["results"]], "o-", label=layout["name"])
        axes[1].plot(ks, [r["steady_rows_per_s_per_actor"] or 0 for r in layout["results"]], "o-", label=layout["name"])
    for ax, title in zip(axes, ("steady rows/s, total", "steady rows/s per actor"), strict=True):
        ax.set_xlabel("editing actors")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_layout(
    args: argparse.Namespace, name: str, cpus: list[int] | None, actors: list[int], table: Any, work: Path
) -> dict[str, Any]:
    """Start the layout's cluster (or join ``--address``), warm it up, time every actor count, stop it."""
    cluster = LocalCluster(head_cpus=cpus[0], worker_cpus=cpus[1:]) if cpus else None
    with contextlib.ExitStack() as stack:  # undone in reverse: disconnect, the client env, the cluster
        if cluster:
            stack.callback(cluster.stop)
            cluster.start()
            stack.enter_context(cluster.client_env())  # its own token; --address: the user's environment as is
        info = connect(cluster.gcs_address if cluster else args.address, log_to_driver=False)
        stack.callback(disconnect, info)
        log.info("layout %s: %s", name, info.describe())
        # an unmeasured job with the most actors first: every node's task workers import their libraries once
        k = max(actors)
        write_table(table.slice(0, args.batch_size * k), str(work / "warm.parquet"), compression="snappy")
        batch.run_job(job_config(args, str(work / "warm.parquet"), str(work / f"warm-{name}"), k))
        full = str(work / "full.parquet")
        results = [time_actors(args, table, full, work / name, k, local=cluster is not None) for k in actors]
    return {
        "name": name,
        "node_cpus": cpus,
        "cluster": {"nodes": info.nodes, "cpus": info.cpus, "gpus": info.gpus},
        "results": results,
        "efficiency": efficiencies(results),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every layout, write the JSON report and the plot, print one line per run.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0 (the exit status).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="a running cluster (else --layout)")
    p.add_argument(
        "--layout",
        action="append",
        default=None,
        metavar="NAME=CPUS[,CPUS][@K[,K]]",
        help="a local cluster: the head's CPUs, then one worker node per further number; @K,K: its actor counts "
        "(default --actors)",
    )
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    p.add_argument("--usd-per-hour", type=float, default=None, help="the cluster's price, for $ per 1,000 edits")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "scaling.json"))
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    layouts: list[tuple[str, list[int] | None, list[int]]] = []
    for spec in args.layout or []:
        name, _, rest = spec.partition("=")
        cpus, _, ks = rest.partition("@")
        layouts.append(
            (name, [int(c) for c in cpus.split(",")], [int(k) for k in ks.split(",")] if ks else args.actors)
        )
    if not layouts:
        if not args.address:
            p.error("give --address (or RAY_ADDRESS) or at least one --layout NAME=CPUS[,CPUS]")
        layouts = [("cluster", None, args.actors)]
    size = 32 if args.model == "tiny" else 64
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        work = Path(tmp)
        table = shapes_table(args.rows, seed=0, size=size)
        write_table(table, str(work / "full.parquet"), compression="snappy")
        for name, _, _ in layouts:
            (work / name).mkdir()
        done = [run_layout(args, name, cpus, ks, table, work) for name, cpus, ks in layouts]
    compare = {}
    if len(done) > 1:  # the same actor count on other layouts, against the first layout
        base = done[0]
        for d in done[1:]:
            for r in d["results"]:
                b = next((x for x in base["results"] if x["actors"] == r["actors"]), None)
                if b and b["steady_rows_per_s"] and r["steady_rows_per_s"]:
                    key = f"{d['name']}_vs_{base['name']}_{r['actors']}_actors"
                    compare[key] = round(r["steady_rows_per_s"] / b["steady_rows_per_s"], 4)
                    if b.get("steady_cpu_s_per_row") and r.get("steady_cpu_s_per_row"):
                        compare[key + "_cpu"] = round(b["steady_cpu_s_per_row"] / r["steady_cpu_s_per_row"], 4)
    params = {k: v for k, v in vars(args).items() if k != "out"} | {"image_size": size}
    doc = {"layouts": done, "layout_comparison": compare}
    out = Path(args.out)
    path = write_report(out, params, doc)
    png = plot(doc, out.with_suffix(".png"))
    for d in done:
        for r in d["results"]:
            log.info(
                "%s, %d actor(s): steady %s rows/s (%s per actor), end to end %.3f, first row %s s, CPU s/row %s",
                d["name"],
                r["actors"],
                r["steady_rows_per_s"],
                r["steady_rows_per_s_per_actor"],
                r["end_to_end_rows_per_s"],
                r["first_row_s"],
                r.get("steady_cpu_s_per_row"),
            )
        log.info("%s: efficiency %s", d["name"], d["efficiency"])
    log.info("layouts compared: %s; wrote %s%s", compare, path, f" and {png}" if png else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
