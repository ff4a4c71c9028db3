"""Bulk-edit throughput: the Ray Data job vs a plain single-process loop over the same rows and editor.

Same run, same rows (shapes-world pairs), same editor settings, same per-worker torch threads (1):

* **loop**: ``pipelines.batch.run_in_process`` — decode → edit → encode + metrics, one process, the model
  already loaded (its load time is reported apart).
* **ray, k actors**: ``pipelines.batch.run_job`` on a local Ray cluster (``--cpus`` logical CPUs) with an
  actor pool of k, Parquet in and out. Each k is timed twice, on ``--rows`` rows and on one batch per
  actor; the difference gives the steady-state rate ``(N - n) / (T_N - T_n)`` free of the fixed cost
  (actor processes, imports, model load, read/write set-up), which is reported as well.

The loop is timed right before and right after each k's Ray jobs and averaged, so that a change in the load
of a shared machine hits both sides alike. Ray overhead per actor = 1 - (steady rows/s / k) / (loop rows/s);
scaling = steady(k) / (k · steady(1)). (Ray runs its workers at a lower CPU priority (nice) than the loop; on
a machine shared with other work that shows up as overhead.)

Wall-clock rates need idle cores. CPU time does not: the benchmark also counts the CPU seconds of this process
and of every process under it (the Ray head, raylet, workers and actors; see :class:`TreeCpu`) per row, for
the loop and for each Ray job; ``cpu_overhead`` = Ray's steady CPU seconds per row / the loop's - 1 is the
work Ray adds per row, whatever else the machine is doing.

    python -m cluster.benchmarks.batch --model default --rows 24 --steps 20 --out docs/results/batch-default.json
    python -m cluster.benchmarks.batch --model tiny --rows 48 --steps 10 --out docs/results/batch-tiny.json

Writes JSON (machine, commit, parameters, results, load averages) and prints a small table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines import batch
from pipelines.config import BatchConfig, parse_config
from pipelines.make_dataset import shapes_table
from pipelines.ray_connect import connect, disconnect
from pipelines.runinfo import write_report
from pipelines.storage import write_table

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def job_config(
    args: argparse.Namespace, input_path: str, output: str, actors: int = 1, actor_cpus: float = 1.0
) -> BatchConfig:
    """The bulk-job config of one timed run (CPU model, seed 0, no progress bars).

    Args:
        args: the benchmark's options (model, method, steps, guidance, batch size).
        input_path: Parquet file of input rows.
        output: the job's output folder.
        actors: editing actors in the pool.
        actor_cpus: logical CPUs reserved per actor.

    Returns:
        The validated job config (:func:`pipelines.config.parse_config`).
    """
    return parse_config(
        {
            "input": input_path,
            "output": output,
            "seed": 0,
            "model": {"spec": args.model, "device": "cpu"},
            "method": {"name": args.method, "steps": args.steps, "guidance": args.guidance},
            "actors": {"pool_size": actors, "num_cpus": actor_cpus, "batch_size": args.batch_size},
            "write": {"max_rows_per_file": 1000},
            "ray": {"progress_bars": False, "task_cpus": 1.0},
        }
    )


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class TreeCpu:
    """CPU seconds (user + system) used by this process and every process under it while the block runs.

    Ray's raylet does not collect the CPU time of workers that exit, so live processes are sampled every
    ``interval`` seconds and each one's last reading is kept: an exiting process loses at most one interval.
    The sampler thread's own CPU time is subtracted. ``by_kind`` splits the total into the editing actors,
    the other Ray workers (read/decode/encode/write tasks, Ray Data's helpers), Ray's system processes
    (raylet, GCS, agents) and this driver process.
    """

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval = interval
        self.last: dict[tuple[int, float], float] = {}
        self.base: dict[tuple[int, float], float] = {}
        self.kind: dict[tuple[int, float], str] = {}
        self.own = 0.0
        self.seconds = 0.0
        self.by_kind: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _kind(proc: Any, me: Any) -> str:
        if proc.pid == me.pid:
            return "driver"
        title = " ".join(proc.cmdline()[:1])
        if "EditStage" in title:
            return "edit_actors"
        if title.startswith("ray::") or "default_worker.py" in " ".join(proc.cmdline()):
            return "other_workers"
        return "ray_system"

    def _snapshot(self) -> dict[tuple[int, float], float]:
        import psutil

        me = psutil.Process()
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                out[key] = t.user + t.system
                kind = self._kind(proc, me)
                if self.kind.get(key) != "edit_actors":  # a worker that became an editing actor stays one
                    self.kind[key] = kind
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval):
            self.last.update(self._snapshot())
        self.own = time.thread_time() - start

    def __enter__(self) -> TreeCpu:
        self.base = self._snapshot()
        self.last = dict(self.base)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(self._snapshot())
        self.by_kind = {}
        for key, value in self.last.items():
            kind = self.kind.get(key, "ray_system")
            self.by_kind[kind] = self.by_kind.get(kind, 0.0) + value - self.base.get(key, 0.0)
        self.by_kind["driver"] = self.by_kind.get("driver", 0.0) - self.own
        self.seconds = sum(self.by_kind.values())


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process alone (the loop runs here)."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def time_loop(
    args: argparse.Namespace, input_path: str, work: Path, stage: batch.EditStage | None = None
) -> dict[str, Any]:
    """The single-process baseline (model loaded first, timed apart).

    Args:
        args: the benchmark's options.
        input_path: Parquet file of the rows to edit.
        work: scratch folder.
        stage: an editing stage already loaded (``None``: load one and report its load time).

    Returns:
        Rows, seconds, rows/s, CPU seconds per row, model load seconds and the load averages around the run.

    Raises:
        RuntimeError: a row did not come back ``ok``.
    """
    table = pq.read_table(input_path)
    cfg = job_config(args, input_path, str(work / "unused"))
    load_before = _load()
    t0 = time.perf_counter()
    stage = stage or batch.EditStage(cfg.model, cfg.method, cfg.image, threads=1)
    load_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), own_cpu_seconds()
    out = batch.run_in_process(cfg, table, stage=stage, run_id="loop")
    seconds, cpu = time.perf_counter() - t0, own_cpu_seconds() - c0
    ok = sum(1 for s in out["status"].to_pylist() if s == "ok")
    if ok != table.num_rows:
        raise RuntimeError(f"loop: only {ok} of {table.num_rows} rows ok")
    return {
        "rows": table.num_rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(table.num_rows / seconds, 4),
        "cpu_s_per_row": round(cpu / table.num_rows, 4),
        "model_load_s": round(load_s, 3),
        "load_avg_before": load_before,
        "load_avg_after": _load(),
    }


def time_ray(
    args: argparse.Namespace, input_path: str, small_path: str, work: Path, actors: int, cpus: int
) -> dict[str, Any]:
    """Two Ray jobs with ``actors`` actors (one batch per actor, then all rows); steady rate from the difference.

    Args:
        args: the benchmark's options.
        input_path: Parquet file of all rows.
        small_path: Parquet file of one batch per actor.
        work: scratch folder for the jobs' outputs.
        actors: editing actors in the pool.
        cpus: logical CPUs of the local Ray cluster (one is left to Ray Data's tasks).

    Returns:
        Both runs' times and CPU seconds, the end-to-end and steady rows/s, the fixed cost (seconds and CPU
        seconds) and the steady CPU seconds per row, in total and per process kind (see :class:`TreeCpu`).

    Raises:
        RuntimeError: a job wrote rows that are not ``ok``.
    """
    actor_cpus = min(1.0, (cpus - 1.0) / actors)  # leave one CPU for Ray Data's read/decode/write tasks
    runs = {}
    for name, path in (("small", small_path), ("full", input_path)):
        cfg = job_config(args, path, str(work / f"ray-{actors}-{name}"), actors, actor_cpus)
        load_before = _load()
        with TreeCpu() as meter:
            t0 = time.perf_counter()
            summary = batch.run_job(cfg)
            seconds = time.perf_counter() - t0
        cpu = meter.seconds
        if summary.ok != summary.written:
            raise RuntimeError(f"ray {actors} actors ({name}): {summary.error} error rows: {summary.top_errors}")
        runs[name] = {
            "rows": summary.written,
            "seconds": round(seconds, 3),
            "cpu_s": round(cpu, 2),
            "cpu_s_by_kind": {k: round(v, 2) for k, v in sorted(meter.by_kind.items())},
            "load_avg_before": load_before,
            "load_avg_after": _load(),
        }
    small, full = runs["small"], runs["full"]
    extra_rows = full["rows"] - small["rows"]
    cpu_per_row = (full["cpu_s"] - small["cpu_s"]) / extra_rows
    kinds = set(small["cpu_s_by_kind"]) | set(full["cpu_s_by_kind"])
    cpu_per_row_by_kind = {
        k: round((full["cpu_s_by_kind"].get(k, 0.0) - small["cpu_s_by_kind"].get(k, 0.0)) / extra_rows, 4)
        for k in sorted(kinds)
    }
    extra_s = full["seconds"] - small["seconds"]
    # the difference is only meaningful when the extra rows cost clearly more than the fixed cost's jitter
    steady = (full["rows"] - small["rows"]) / extra_s if extra_s > 0.2 * full["seconds"] else None
    fixed = max(full["seconds"] - full["rows"] / steady, 0.0) if steady else None
    return {
        "actors": actors,
        "actor_cpus": actor_cpus,
        "runs": runs,
        "end_to_end_rows_per_s": round(full["rows"] / full["seconds"], 4),
        "steady_rows_per_s": round(steady, 4) if steady else None,
        "fixed_cost_s": round(fixed, 2) if fixed is not None else None,
        "steady_cpu_s_per_row": round(cpu_per_row, 4),
        "steady_cpu_s_per_row_by_kind": cpu_per_row_by_kind,
        "fixed_cpu_s": round(full["cpu_s"] - cpu_per_row * full["rows"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Time the loop and the Ray job for each actor count; write the JSON report and print a table.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0 (the exit status).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default (embedded shapes model, 64 px) or tiny (32 px)")
    p.add_argument("--method", default="instdiffedit")
    p.add_argument("--rows", type=int, default=24, help="rows of each full Ray job")
    p.add_argument("--loop-rows", type=int, default=12, help="rows of each loop timing")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="logical CPUs of the local Ray cluster")
    p.add_argument("--out", default=None, help="JSON path (default docs/results/batch-MODEL.json)")
    args = p.parse_args(argv)
    if args.rows <= args.batch_size * max(args.actors):  # the steady rate needs rows beyond one batch per actor
        p.error(f"--rows must exceed --batch-size × the most --actors ({args.batch_size * max(args.actors)})")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    out = Path(args.out or ROOT / "docs" / "results" / f"batch-{args.model}.json")
    size = 32 if args.model == "tiny" else 64
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        table = shapes_table(args.rows, seed=0, size=size)
        input_path, small_path = str(work / "in.parquet"), str(work / "small.parquet")
        write_table(table, input_path, compression="snappy")
        loop_path = str(work / "loop.parquet")
        write_table(table.slice(0, args.loop_rows), loop_path, compression="snappy")
        cfg = job_config(args, loop_path, str(work / "unused"))
        t0 = time.perf_counter()
        stage = batch.EditStage(cfg.model, cfg.method, cfg.image, threads=1)
        model_load_s = time.perf_counter() - t0
        # a private cluster on this machine, never the one in Ray's address file (pipelines.ray_connect)
        cluster = connect("local", num_cpus=args.cpus, log_to_driver=False)
        niceness = int(ray.get(ray.remote(lambda: os.nice(0)).remote()))  # Ray workers' CPU priority
        # an unmeasured job first: task workers import their libraries once per cluster, not once per job
        write_table(table.slice(0, args.batch_size), small_path, compression="snappy")
        batch.run_job(job_config(args, small_path, str(work / "warm-up")))
        results = []
        loops = []
        try:
            for k in args.actors:
                # 1. the plain loop, 2. the Ray job with k actors on the same rows, 3. the loop again
                before = time_loop(args, loop_path, work, stage)
                write_table(table.slice(0, args.batch_size * k), small_path, compression="snappy")
                r = time_ray(args, input_path, small_path, work, k, args.cpus)
                after = time_loop(args, loop_path, work, stage)
                loop = {
                    "rows_per_s": round((before["rows_per_s"] + after["rows_per_s"]) / 2, 4),
                    "cpu_s_per_row": round((before["cpu_s_per_row"] + after["cpu_s_per_row"]) / 2, 4),
                    "before": before,
                    "after": after,
                    "model_load_s": round(model_load_s, 3),
                }
                loops.append(loop)
                r["loop_rows_per_s"] = loop["rows_per_s"]
                r["loop_cpu_s_per_row"] = loop["cpu_s_per_row"]
                r["cpu_overhead"] = round(r["steady_cpu_s_per_row"] / loop["cpu_s_per_row"] - 1.0, 4)
                log.info(
                    "loop around %d actor(s): %.3f rows/s before, %.3f after",
                    k,
                    before["rows_per_s"],
                    after["rows_per_s"],
                )
                steady = r["steady_rows_per_s"]
                r["ratio_to_loop"] = round(steady / loop["rows_per_s"], 4) if steady else None
                r["overhead_per_actor"] = round(1.0 - r["ratio_to_loop"] / k, 4) if steady else None
                r["end_to_end_ratio_to_loop"] = round(r["end_to_end_rows_per_s"] / loop["rows_per_s"], 4)
                results.append(r)
                log.info(
                    "ray %d actor(s): steady %s rows/s (x%s of the loop), end to end %.3f rows/s, fixed %s s",
                    k,
                    steady,
                    r["ratio_to_loop"],
                    r["end_to_end_rows_per_s"],
                    r["fixed_cost_s"],
                )
        finally:
            disconnect(cluster)
    by_k = {r["actors"]: r for r in results}
    scaling = {}
    for k, r in by_k.items():
        if k != 1 and 1 in by_k and r["steady_rows_per_s"] and by_k[1]["steady_rows_per_s"]:
            scaling[f"{k}_vs_1"] = round(r["steady_rows_per_s"] / (k * by_k[1]["steady_rows_per_s"]), 4)
    params = {k: v for k, v in vars(args).items() if k != "out"} | {"image_size": size}
    path = write_report(
        out,
        params,
        {"loop": loops, "ray": results, "scaling_efficiency": scaling},
        ray_worker_niceness=niceness,
        loop_niceness=os.nice(0),
    )

    def cell(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "n/a"

    print(
        f"{'':16}{'steady rows/s':>14}{'x loop':>8}{'overhead/actor':>16}{'e2e rows/s':>12}{'fixed s':>9}"
        f"{'CPU s/row':>11}{'CPU overhead':>14}"
    )
    for r in results:
        print(
            f"{'loop (around)':16}{r['loop_rows_per_s']:>14.3f}{1.0:>8.2f}{'':>16}{r['loop_rows_per_s']:>12.3f}"
            f"{model_load_s:>9.1f}{r['loop_cpu_s_per_row']:>11.3f}"
        )
        print(
            f"{'ray ' + str(r['actors']) + ' actor(s)':16}{cell(r['steady_rows_per_s'], '.3f'):>14}"
            f"{cell(r['ratio_to_loop'], '.2f'):>8}{cell(r['overhead_per_actor'], '.1%'):>16}"
            f"{r['end_to_end_rows_per_s']:>12.3f}{cell(r['fixed_cost_s'], '.1f'):>9}"
            f"{r['steady_cpu_s_per_row']:>11.3f}{r['cpu_overhead']:>14.1%}"
        )
    for r in results:
        print(f"ray {r['actors']} actor(s), steady CPU s/row by process: {r['steady_cpu_s_per_row_by_kind']}")
    print(f"scaling efficiency (steady, k actors vs k x 1 actor): {scaling}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
