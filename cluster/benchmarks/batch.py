"""Bulk-edit throughput: the Ray Data job vs a plain single-process loop over the same rows and editor.

Same run, same rows (shapes-world pairs), same editor settings, same per-worker torch threads (1):

* **loop**: ``pipelines.batch.run_in_process`` — decode → edit → encode + metrics, one process, the model
  already loaded (its load time is reported apart).
* **ray, k actors**: ``pipelines.batch.run_job`` on a local Ray cluster (``--cpus`` logical CPUs) with an
  actor pool of k, Parquet in and out. Each k is timed twice, on ``--rows`` rows and on one batch per
  actor; the difference gives the steady-state rate ``(N - n) / (T_N - T_n)`` free of the fixed cost
  (actor processes, imports, model load, read/write set-up), which is reported as well.

Ray overhead per actor = 1 - (steady rows/s / k) / (loop rows/s); scaling = steady(k) / (k · steady(1)).

    python cluster/benchmarks/batch.py --model default --rows 24 --steps 20 --out docs/results/batch-default.json
    python cluster/benchmarks/batch.py --model tiny --rows 48 --steps 10 --out docs/results/batch-tiny.json

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

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cluster.benchmarks.common import write_report  # noqa: E402
from pipelines import batch  # noqa: E402
from pipelines.config import BatchConfig, parse_config  # noqa: E402
from pipelines.make_dataset import shapes_table  # noqa: E402

log = logging.getLogger("bench.batch")


def job_config(args: argparse.Namespace, input_path: str, output: str, actors: int = 1,
               actor_cpus: float = 1.0) -> BatchConfig:
    return parse_config({
        "input": input_path, "output": output, "seed": 0,
        "model": {"spec": args.model, "device": "cpu"},
        "method": {"name": args.method, "steps": args.steps, "guidance": args.guidance},
        "actors": {"pool_size": actors, "num_cpus": actor_cpus, "batch_size": args.batch_size},
        "write": {"max_rows_per_file": 1000},
        "ray": {"progress_bars": False, "task_cpus": 1.0},
    })


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def time_loop(args: argparse.Namespace, input_path: str, work: Path) -> dict[str, Any]:
    """The single-process baseline (model loaded first, timed apart)."""
    table = pq.read_table(input_path)
    cfg = job_config(args, input_path, str(work / "unused"))
    load_before = _load()
    t0 = time.perf_counter()
    stage = batch.EditStage(cfg.model, cfg.method, cfg.image, threads=1)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = batch.run_in_process(cfg, table, stage=stage, run_id="loop")
    seconds = time.perf_counter() - t0
    ok = sum(1 for s in out["status"].to_pylist() if s == "ok")
    if ok != table.num_rows:
        raise RuntimeError(f"loop: only {ok} of {table.num_rows} rows ok")
    return {"rows": table.num_rows, "seconds": round(seconds, 3), "rows_per_s": round(table.num_rows / seconds, 4),
            "model_load_s": round(load_s, 3), "load_avg_before": load_before, "load_avg_after": _load()}


def time_ray(args: argparse.Namespace, input_path: str, small_path: str, work: Path, actors: int,
             cpus: int) -> dict[str, Any]:
    """Two Ray jobs with ``actors`` actors (one batch per actor, then all rows); steady rate from the difference."""
    actor_cpus = min(1.0, (cpus - 1.0) / actors)  # leave one CPU for Ray Data's read/decode/write tasks
    runs = {}
    for name, path in (("small", small_path), ("full", input_path)):
        cfg = job_config(args, path, str(work / f"ray-{actors}-{name}"), actors, actor_cpus)
        load_before = _load()
        t0 = time.perf_counter()
        summary = batch.run_job(cfg)
        seconds = time.perf_counter() - t0
        if summary.ok != summary.written:
            raise RuntimeError(f"ray {actors} actors ({name}): {summary.error} error rows: {summary.top_errors}")
        runs[name] = {"rows": summary.written, "seconds": round(seconds, 3), "load_avg_before": load_before,
                      "load_avg_after": _load()}
    small, full = runs["small"], runs["full"]
    extra_s = full["seconds"] - small["seconds"]
    # the difference is only meaningful when the extra rows cost clearly more than the fixed cost's jitter
    steady = (full["rows"] - small["rows"]) / extra_s if extra_s > 0.2 * full["seconds"] else None
    fixed = max(full["seconds"] - full["rows"] / steady, 0.0) if steady else None
    return {"actors": actors, "actor_cpus": actor_cpus, "runs": runs,
            "end_to_end_rows_per_s": round(full["rows"] / full["seconds"], 4),
            "steady_rows_per_s": round(steady, 4) if steady else None,
            "fixed_cost_s": round(fixed, 2) if fixed is not None else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default (embedded shapes model, 64 px) or tiny (32 px)")
    p.add_argument("--method", default="instdiffedit")
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="logical CPUs of the local Ray cluster")
    p.add_argument("--out", default=None, help="JSON path (default docs/results/batch-MODEL.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out or ROOT / "docs" / "results" / f"batch-{args.model}.json")
    size = 32 if args.model == "tiny" else 64
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        table = shapes_table(args.rows, seed=0, size=size)
        input_path, small_path = str(work / "in.parquet"), str(work / "small.parquet")
        pq.write_table(table, input_path)
        # 1. the plain loop
        loop = time_loop(args, input_path, work)
        log.info("loop: %.3f rows/s (%d rows in %.1f s)", loop["rows_per_s"], loop["rows"], loop["seconds"])
        # 2. the Ray job with each pool size, on the same rows
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        results = []
        try:
            for k in args.actors:
                pq.write_table(table.slice(0, args.batch_size * k), small_path)
                r = time_ray(args, input_path, small_path, work, k, args.cpus)
                steady = r["steady_rows_per_s"]
                r["ratio_to_loop"] = round(steady / loop["rows_per_s"], 4) if steady else None
                r["overhead_per_actor"] = round(1.0 - r["ratio_to_loop"] / k, 4) if steady else None
                r["end_to_end_ratio_to_loop"] = round(r["end_to_end_rows_per_s"] / loop["rows_per_s"], 4)
                results.append(r)
                log.info("ray %d actor(s): steady %s rows/s (x%s of the loop), end to end %.3f rows/s, fixed %s s",
                         k, steady, r["ratio_to_loop"], r["end_to_end_rows_per_s"], r["fixed_cost_s"])
        finally:
            ray.shutdown()
    by_k = {r["actors"]: r for r in results}
    scaling = {}
    for k, r in by_k.items():
        if k != 1 and 1 in by_k and r["steady_rows_per_s"] and by_k[1]["steady_rows_per_s"]:
            scaling[f"{k}_vs_1"] = round(r["steady_rows_per_s"] / (k * by_k[1]["steady_rows_per_s"]), 4)
    params = {k: v for k, v in vars(args).items() if k != "out"} | {"image_size": size}
    path = write_report(out, params, {"loop": loop, "ray": results, "scaling_efficiency": scaling})

    def cell(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "n/a"

    print(f"{'':16}{'steady rows/s':>14}{'x loop':>8}{'overhead/actor':>16}{'e2e rows/s':>12}{'fixed s':>9}")
    print(f"{'loop':16}{loop['rows_per_s']:>14.3f}{1.0:>8.2f}{'':>16}{loop['rows_per_s']:>12.3f}"
          f"{loop['model_load_s']:>9.1f}")
    for r in results:
        print(f"{'ray ' + str(r['actors']) + ' actor(s)':16}{cell(r['steady_rows_per_s'], '.3f'):>14}"
              f"{cell(r['ratio_to_loop'], '.2f'):>8}{cell(r['overhead_per_actor'], '.1%'):>16}"
              f"{r['end_to_end_rows_per_s']:>12.3f}{cell(r['fixed_cost_s'], '.1f'):>9}")
    print(f"scaling efficiency (steady, k actors vs k x 1 actor): {scaling}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
