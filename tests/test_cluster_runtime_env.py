"""``ray job submit`` with ``cluster/runtime_env.yaml`` finds the project's Python whatever the head's PATH is.

A one-node Ray cluster is started from this venv's ``ray`` with a PATH that does not contain the venv (as when a
user runs ``.venv/bin/ray start`` without activating it), on 127.0.0.1 with its own temp dir and ports. A job
whose entrypoint is plain ``python`` then fails to import the project's dependencies, and succeeds when submitted
with the runtime environment that ``python -m cluster.runtime_env`` writes. Everything started is stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.prefix) / "bin" / "ray"
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(temp_dir: str) -> None:
    """Kill the processes of the cluster that uses ``temp_dir`` (ours alone: the folder is private)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


pytestmark = pytest.mark.slow  # starts a Ray node and submits two jobs: about a minute on 2 cores


@pytest.fixture(scope="module")
def head_without_venv_on_path():
    if not RAY.exists():
        pytest.skip(f"no ray executable at {RAY}")
    temp_dir = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = _free_port(), _free_port()
    env = {
        "HOME": os.environ.get("HOME", "/tmp"),
        "PATH": "/usr/bin:/bin",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [
        str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    # Ray's fixed default ports (agent 52365, client 10001, ...) clash with any other cluster on the machine
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
    ):
        cmd += [flag, str(_free_port())]  # fmt: skip
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if started.returncode != 0:
            pytest.fail(f"ray start failed: {started.stderr[-2000:]}")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *extra: str) -> subprocess.CompletedProcess:
    probe = "import sys, pyarrow, instdiff, pipelines.batch; print('PROJECT-PYTHON', sys.prefix)"
    cmd = [str(RAY), "job", "submit", "--address", address, *extra, "--", "python", "-c", probe]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # right after `ray start` the job agent may not be up yet: bounded retries
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            return done
        time.sleep(3)


def test_job_python_comes_from_the_runtime_env_not_the_heads_path(head_without_venv_on_path, tmp_path):
    address = head_without_venv_on_path
    bare = _submit(address, "--working-dir", ".")
    # the head's PATH has no `python` at all here, or one without the project: either way the bare job fails
    said = bare.stdout + bare.stderr
    assert bare.returncode != 0 and ("No module named" in said or "python: not found" in said), said[-2000:]

    env_file = tmp_path / "runtime_env.yaml"
    written = subprocess.run(
        [sys.executable, "-m", "cluster.runtime_env", "--out", str(env_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    t0 = time.monotonic()
    fixed = _submit(address, "--runtime-env", str(env_file))
    assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-2000:]
    assert f"PROJECT-PYTHON {sys.prefix}" in fixed.stdout
    assert time.monotonic() - t0 < TIMEOUT_S
