"""The job's console on a healthy run: no error-level Ray line (Ray core's false "actor restart will fail" for the
edit pool is filtered, :mod:`pipelines.batch.stderr_filter`), and the restart that line warns about works."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_batch_stages import SIZE

from pipelines.batch.stderr_filter import FALSE_RESTART_WARNING, NativeStderrFilter
from pipelines.make_dataset import shapes_table

ROOT = Path(__file__).resolve().parents[1]
JOB = {
    "model": {"spec": "tiny"},
    "method": {"name": "instdiffedit", "steps": 2, "n_noises": 1},
    "actors": {"pool_size": 1, "num_cpus": 1, "batch_size": 2},
    "write": {"max_rows_per_file": 2},
    "ray": {"progress_bars": False, "num_cpus": 2, "object_store_memory": 256 * 2**20},
}
POOL_CLASS = "MapWorker(MapBatches(EditStage))"
# what Ray 2.60's core worker writes (core_worker.cc, CoreWorker::CreateActor), ids and numbers made up
RECORD = (
    "[2026-11-30 00:31:02,117 E 4242 4290] core_worker.cc:2221: Actor with class name: '{cls}' and ID: "
    "'d352c685f6de81d94645726d02000000' has constructor arguments in the object store and max_restarts > 0. If "
    "the arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.\n"
)
# an error-level line of Ray's C++ core ("[date time E pid tid] file.cc:line:") or of Python logging
ERROR_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} E \d+ \d+\] \S+\.cc:\d+:|\bERROR\b")


def _write_fd2(*pieces: str) -> None:
    for piece in pieces:
        os.write(2, piece.encode())


def test_the_filter_removes_only_the_edit_pools_record(capfd):
    other = RECORD.format(cls="Trainer")
    fused = RECORD.format(cls="MapWorker(MapBatches(EditStage)->MapBatches(finalize_batch))")
    with NativeStderrFilter(once=False) as f:
        _write_fd2("before\n", RECORD.format(cls=POOL_CLASS), other, "\rRunning 0: 3 row [00:01]")
        _write_fd2(fused, "tail without line end")
        time.sleep(0.5)  # past hold_s: the last piece is forwarded without its line end
        _write_fd2(" and after\n")
    err = capfd.readouterr().err
    assert err == f"before\n{other}\rRunning 0: 3 row [00:01]tail without line end and after\n"
    assert f.dropped == 2


def test_after_its_one_record_the_console_is_given_back(capfd):
    record = RECORD.format(cls=POOL_CLASS)
    with NativeStderrFilter() as f:
        _write_fd2("a\n", record)
        deadline = time.monotonic() + 5
        while f._saved is not None and time.monotonic() < deadline:  # the reader put fd 2 back
            time.sleep(0.01)
        assert f._saved is None
        _write_fd2(record)  # Ray logs it once per process; anything after passes untouched
    assert capfd.readouterr().err == "a\n" + record
    assert f.dropped == 1
    assert FALSE_RESTART_WARNING.fullmatch(record.encode())


def _job(tmp_path: Path, rows: int, steps: int) -> tuple[Path, list[str]]:
    table = shapes_table(rows, size=SIZE)
    pq.write_table(table, tmp_path / "in.parquet")
    job = {**JOB, "method": {**JOB["method"], "steps": steps}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"), **job}))
    return config, table["id"].to_pylist()


def _run(config: Path, on_start=None) -> subprocess.CompletedProcess:  # noqa: ANN001
    """``python -m pipelines.batch --config`` in a fresh process (Ray core logs the record once per process),
    on its own private local cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.batch", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    watcher = threading.Thread(target=on_start, args=(proc.pid,), daemon=True) if on_start else None
    if watcher:
        watcher.start()
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end in 240 s: {err[-3000:]}")
    if watcher:
        watcher.join(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ids_once(out: Path, expected: list[str]) -> None:
    ids = pq.read_table(out)["id"].to_pylist()  # a plain pyarrow reader: every part is whole
    assert sorted(ids) == sorted(expected), (len(ids), len(expected))  # each id exactly once


def test_a_healthy_job_prints_no_error_line(tmp_path):
    config, ids = _job(tmp_path, rows=2, steps=2)
    proc = _run(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == len(ids)
    errors = [line for line in proc.stderr.splitlines() if ERROR_LINE.search(line)]
    assert errors == [], errors
    assert "restart will fail" not in proc.stderr and "will hang" not in proc.stderr
    _ids_once(tmp_path / "out", ids)


def _pool_process(job_pid: int):  # noqa: ANN202
    """The edit pool's actor process among the job's descendants (its local cluster is the job's children)."""
    import psutil

    try:
        for p in psutil.Process(job_pid).children(recursive=True):
            try:
                if POOL_CLASS in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
    except psutil.Error:
        return None
    return None


@pytest.mark.slow
def test_a_killed_editing_actor_is_restarted_and_the_job_completes(tmp_path):
    """The restart the record warns about: the actor's process is killed mid-job, Ray starts it again with the same
    constructor arguments (``max_restarts=-1``; a new process of the pool's class), its task is retried, and the job
    writes every row once."""
    config, ids = _job(tmp_path, rows=12, steps=8)
    killed: list[int] = []
    restarted: list[int] = []

    def kill_the_pool_actor_once(job_pid: int) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not restarted:
            actor = _pool_process(job_pid)
            if actor is not None and killed and actor.pid != killed[0]:
                restarted.append(actor.pid)
            elif actor is not None and not killed and list((tmp_path / "out").glob("part-*.parquet")):  # editing
                os.kill(actor.pid, signal.SIGKILL)
                killed.append(actor.pid)
            time.sleep(0.05)

    proc = _run(config, on_start=kill_the_pool_actor_once)
    assert killed, "the pool's actor was not found while the job ran"
    assert restarted, "no new process of the pool's actor after the kill"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "will be retried" in proc.stdout + proc.stderr  # Ray's line for the task the killed actor held
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["error"]) == (len(ids), 0)
    _ids_once(tmp_path / "out", ids)


def test_the_jobs_filter_stands_aside_once_ray_has_logged_the_record(capfd):
    from pipelines.batch import stderr_filter

    seen = stderr_filter._logged_in_process
    was_set = seen.is_set()  # an in-process job of an earlier test may have met the record already
    seen.clear()
    try:
        with stderr_filter.drop_false_restart_warning() as f:
            _write_fd2(RECORD.format(cls=POOL_CLASS))
            deadline = time.monotonic() + 5
            while not seen.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert f.dropped == 1 and capfd.readouterr().err == ""
        assert isinstance(stderr_filter.drop_false_restart_warning(), contextlib.nullcontext)
    finally:
        if not was_set:
            seen.clear()
