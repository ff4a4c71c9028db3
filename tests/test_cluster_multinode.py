"""The README's ``ray job submit`` on a real two-node Ray cluster on this machine, then a lost worker node (slow).

The cluster is :class:`cluster.local.LocalCluster`: ``ray start --head`` + ``ray start --address`` on 127.0.0.1
with a private temp dir; everything it started is stopped by process id at the end.
"""

from __future__ import annotations

import collections
import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster.local import LocalCluster
from pipelines.make_dataset import shapes_table

ROOT = Path(__file__).resolve().parents[1]
JOB = {
    "seed": 0,
    "model": {"spec": "tiny"},
    "method": {"name": "instdiffedit", "steps": 6, "n_noises": 1},
    "actors": {"pool_size": 2, "num_cpus": 1, "batch_size": 2},
    "write": {"max_rows_per_file": 2},
    "ray": {"progress_bars": False},
}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _submit(c: LocalCluster, job_id: str, config: Path, *extra: str, wait: bool) -> subprocess.CompletedProcess:
    """The README's command: ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m ...``."""
    cmd = ["ray", "job", "submit", "--address", c.dashboard_url, "--working-dir", ".", "--submission-id", job_id]
    cmd += [] if wait else ["--no-wait"]
    cmd += ["--", "python", "-m", "pipelines.batch", "--config", str(config), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=c.env, capture_output=True, text=True, timeout=600)


def _wait(client, job_id: str, timeout_s: float, until=lambda status, logs: status in TERMINAL):  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, logs = str(client.get_job_status(job_id)).rsplit(".", 1)[-1], client.get_job_logs(job_id)
        if until(status, logs):
            return status, logs
        time.sleep(2)
    raise TimeoutError(f"job {job_id}: no change in {timeout_s:.0f} s; logs: {client.get_job_logs(job_id)[-2000:]}")


def _ids_once(out: Path, expected: list[str]) -> None:
    ids = pq.read_table(out)["id"].to_pylist()  # a plain pyarrow reader: every part is whole
    counts = collections.Counter(ids)
    assert sorted(counts) == sorted(expected) and max(counts.values()) == 1, counts.most_common(3)


@pytest.mark.slow
def test_ray_job_submit_on_two_nodes_and_a_lost_worker(tmp_path):
    from ray.job_submission import JobSubmissionClient

    table = shapes_table(16, size=32)
    ids = table["id"].to_pylist()
    pq.write_table(table, tmp_path / "in.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"), **JOB}))
    # the head holds at most one of the two actors, so the worker node always runs an editing actor
    with LocalCluster(head_cpus=1, worker_cpus=[2]) as c:
        client = JobSubmissionClient(c.dashboard_url)
        # 1. the README's command, waiting for the end; status, logs and output checked
        proc = _submit(c, "plain", config, wait=True)
        assert proc.returncode == 0, proc.stdout[-4000:]
        status, logs = _wait(client, "plain", 30)
        assert status == "SUCCEEDED"
        assert "Ray: the Ray job's cluster at" in logs and "2 node(s), 3 CPUs" in logs
        summary = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
        assert (summary["ok"], summary["cluster"]["nodes"]) == (len(ids), 2)
        _ids_once(tmp_path / "out", ids)

        # 2. a relative output under --working-dir is refused, not written into Ray's temporary copy
        proc = _submit(c, "relative", config, "--output", "out/rel", wait=True)
        status, logs = _wait(client, "relative", 60)
        assert status == "FAILED"
        assert (
            "python -m pipelines.batch: error: output 'out/rel' is a relative path, but the job runs in Ray's "
            "temporary copy of its --working-dir upload" in logs
        )

        # 3. chaos: the worker node (with an editing actor) is lost mid-job and replaced, as an autoscaler would
        chaos_out = tmp_path / "chaos"
        _submit(c, "chaos", config, "--output", str(chaos_out), wait=False)
        _wait(client, "chaos", 300, until=lambda s, lg: s in TERMINAL or "Starting execution of Dataset" in lg)
        time.sleep(8)  # the pool is editing
        worker = next(n for n in c.nodes if n.name != "head")
        killed = c.kill_node(worker)
        c.add_worker(2)
        status, logs = _wait(client, "chaos", 420)
        outcome = {
            "killed_processes": len(killed),
            "first_status": status,
            "node_loss_seen_by_job": "dead or unavailable" in logs or "marked dead" in logs,
            "retried_after_loss": "will be retried" in logs,
        }
        if status != "SUCCEEDED":  # a clear failure, then a re-run completes without duplicates
            last = [line for line in logs.splitlines() if line.strip()][-1]
            outcome["failure"] = last
            _submit(c, "chaos-rerun", config, "--output", str(chaos_out), wait=True)
            status, logs = _wait(client, "chaos-rerun", 60)
            assert status == "SUCCEEDED", logs[-3000:]
            outcome["rerun_status"] = status
        _ids_once(chaos_out, ids)
        outcome["rows"] = len(pq.read_table(chaos_out))
        print("chaos:", json.dumps(outcome))
