"""The README's ``ray job submit`` on a real two-node Ray cluster on this machine, then a lost worker node (slow);
the cluster's token authentication: clients without its token are refused (slow), its token file and client
environments (quick, no cluster started).

The cluster is :class:`cluster.local.LocalCluster`: ``ray start --head`` + ``ray start --address`` on 127.0.0.1
with a private temp dir and Ray's token authentication; everything it started is stopped by process id at the
end.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster.local import AUTH_VARS, RAY_BIN, LocalCluster
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


@pytest.fixture(scope="module")
def two_nodes():
    """A head (1 CPU) and a worker node (2 CPUs) on 127.0.0.1 with token auth, shared by the slow tests here
    (the token test first: the chaos run replaces the worker node)."""
    with LocalCluster(head_cpus=1, worker_cpus=[2]) as c:
        yield c


def _token(c: LocalCluster) -> str:
    return c.token_path.read_text().strip()


def _without_token(**extra: str) -> dict[str, str]:
    """This process's environment with none of Ray's token settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in (*AUTH_VARS, "RAY_ADDRESS")}
    return env | extra


def test_token_file_and_client_environments(monkeypatch, caplog):
    """Quick: the token is 256 random bits in a 0600 file of the 0700 temp dir; the nodes' and clients'
    environments point at the file and never hold the token; a caller's own token settings cannot leak in."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token-of-the-callers-own")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    caplog.set_level(logging.DEBUG)
    a, b = LocalCluster(env={"RAY_AUTH_MODE": "disabled"}), LocalCluster()
    try:
        token = _token(a)
        assert len(token) == 64 and int(token, 16) >= 0 and token != _token(b)
        assert stat.S_IMODE(a.token_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(a.temp_dir).stat().st_mode) == 0o700
        assert a.token_path.parent == Path(a.temp_dir)
        for env in (a.env, a.client_environ(), a.client_environ({"PATH": "/usr/bin"})):
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(a.token_path)
            assert "RAY_AUTH_TOKEN" not in env  # it would take precedence over the file
            assert not any(token in v for v in env.values())
        assert a.client_environ({"PATH": "/usr/bin"})["PATH"] == "/usr/bin"
        assert a.auth_headers == {"Authorization": f"Bearer {token}"}
        assert token not in repr(a) and token not in caplog.text
        # client_env in a fresh process (this one may hold the session's Ray driver): Ray sees the token inside
        # the block, and the caller's settings again after it
        probe = (
            "import os, sys; sys.path.insert(0, os.getcwd()); import ray; from ray._raylet import "
            "AuthenticationMode as M, AuthenticationTokenLoader as L, get_authentication_mode as mode\n"
            "from cluster.local import LocalCluster\n"
            "c = LocalCluster()\n"
            "with c.client_env():\n"
            "    inside = (mode() == M.TOKEN, L.instance().get_token_for_http_header() == "
            "{'authorization': c.auth_headers['Authorization']}, os.environ['RAY_AUTH_MODE'], "
            "'RAY_AUTH_TOKEN' in os.environ)\n"
            "after = (mode() == M.TOKEN, os.environ.get('RAY_AUTH_MODE'), os.environ.get('RAY_AUTH_TOKEN'), "
            "'RAY_AUTH_TOKEN_PATH' in os.environ)\n"
            "c.stop()\n"
            "print(inside, after)"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
            env=_without_token(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="callers"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert (
            done.stdout.strip().splitlines()[-1] == "(True, True, 'token', False) (False, 'disabled', 'callers', False)"
        )
    finally:
        a.stop()
        b.stop()
    assert not Path(a.temp_dir).exists()  # stop removes the token file with the temp dir, started or not


@pytest.mark.slow
def test_a_client_without_the_token_is_refused(two_nodes, tmp_path):
    """Negative control: the dashboard's HTTP API, ``ray job submit`` and a driver's ``ray.init`` are refused
    without the cluster's token or with a wrong one, and accepted with it."""
    from ray.job_submission import JobSubmissionClient

    c = two_nodes
    nodes = f"{c.dashboard_url}/api/v0/nodes?limit=10"
    codes = {}
    for name, headers in (("none", {}), ("wrong", {"Authorization": f"Bearer {secrets.token_hex(32)}"})):
        try:
            urllib.request.urlopen(urllib.request.Request(nodes, headers=headers), timeout=10)
            codes[name] = 200
        except urllib.error.HTTPError as exc:
            codes[name] = exc.code
    assert codes == {"none": 401, "wrong": 403}
    assert c.alive_nodes() == 2  # the same request with the token

    intruders = {
        "no-token": _without_token(RAY_AUTH_MODE="disabled"),
        "wrong-token": _without_token(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)),
    }
    for name, env in intruders.items():
        cmd = [str(RAY_BIN), "job", "submit", "--address", c.dashboard_url, "--submission-id", name, "--no-wait"]
        done = subprocess.run([*cmd, "--", "echo", "intruder"], env=env, capture_output=True, text=True, timeout=120)
        said = done.stdout + done.stderr
        assert done.returncode != 0 and "Authentication" in said, said[-2000:]
    listed = [j.submission_id for j in JobSubmissionClient(c.dashboard_url, headers=c.auth_headers).list_jobs()]
    assert not set(intruders) & set(listed)

    # a driver through the GCS port (gRPC): both intruders at once, each bounded in time
    driver = f"import ray; ray.init(address='{c.gcs_address}', log_to_driver=False); print('JOINED')"
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", driver], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, env in [*intruders.items(), ("token", c.client_environ(_without_token()))]
    }
    said = {}
    for name, proc in procs.items():
        try:
            said[name] = (proc.wait(timeout=180), proc.stdout.read())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    for name in intruders:
        code, out = said[name]
        assert code != 0 and "JOINED" not in out and "AuthenticationError" in out, (name, out[-2000:])
    assert said["token"][0] == 0 and "JOINED" in said["token"][1], said["token"][1][-2000:]
    first = next(line for line in said["no-token"][1].splitlines() if "AuthenticationError" in line)
    print("refused:", first[:300])


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
def test_ray_job_submit_on_two_nodes_and_a_lost_worker(two_nodes, tmp_path):
    from ray.job_submission import JobSubmissionClient

    table = shapes_table(16, size=32)
    ids = table["id"].to_pylist()
    pq.write_table(table, tmp_path / "in.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"), **JOB}))
    # the head holds at most one of the two actors, so the worker node always runs an editing actor
    c = two_nodes
    client = JobSubmissionClient(c.dashboard_url, headers=c.auth_headers)
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

    # the token is in its 0600 file only: not in any node's or job's log, nor in what the clients printed
    token = c.token_path.read_text().strip()
    leaks = [p for p in Path(c.temp_dir).rglob("*") if p.is_file() and p != c.token_path and token in _text(p)]
    assert not leaks, leaks
    assert all(token not in client.get_job_logs(j) for j in ("plain", "relative", "chaos"))
    assert token not in proc.stdout + proc.stderr


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # a socket, or a file Ray removed meanwhile
        return ""
