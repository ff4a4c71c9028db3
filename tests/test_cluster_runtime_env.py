"""``ray job submit`` with ``cluster/runtime_env.yaml`` finds the project's Python whatever the head's PATH is.

A one-node Ray cluster is started from this venv's ``ray`` with a PATH that does not contain the venv (as when a
user runs ``.venv/bin/ray start`` without activating it), on 127.0.0.1 with its own temp dir and ports. A job
whose entrypoint is plain ``python`` then fails to import the project's dependencies, and succeeds when submitted
with the runtime environment that ``python -m cluster.runtime_env`` writes. The cluster keeps Ray's token
authentication on; the submitting client gets its token through :meth:`LocalCluster.client_environ`. Everything
started is stopped by pid.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local import RAY_BIN, LocalCluster

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120

pytestmark = pytest.mark.slow  # starts a Ray node and submits two jobs: about a minute on 2 cores


@pytest.fixture(scope="module")
def head_without_venv_on_path():
    """A one-node cluster (cluster.local: 127.0.0.1, free ports, private temp dir, token auth, stopped by pid)
    whose PATH, and so its jobs' entrypoint PATH, lacks this venv."""
    if not RAY_BIN.exists():
        pytest.skip(f"no ray executable at {RAY_BIN}")
    with LocalCluster(head_cpus=1, worker_cpus=[], env={"PATH": "/usr/bin:/bin"}) as cluster:
        yield cluster


def _submit(cluster: LocalCluster, *extra: str) -> subprocess.CompletedProcess:
    probe = "import sys, pyarrow, instdiff, pipelines.batch; print('PROJECT-PYTHON', sys.prefix)"
    cmd = [str(RAY_BIN), "job", "submit", "--address", cluster.dashboard_url, *extra, "--", "python", "-c", probe]
    env = cluster.client_environ()  # this process's environment with the cluster's token settings
    env.pop("RAY_ADDRESS", None)
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # right after `ray start` the job agent may not be up yet: bounded retries
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            return done
        time.sleep(3)


def test_job_python_comes_from_the_runtime_env_not_the_heads_path(head_without_venv_on_path, tmp_path):
    cluster = head_without_venv_on_path
    bare = _submit(cluster, "--working-dir", ".")
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
    fixed = _submit(cluster, "--runtime-env", str(env_file))
    assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-2000:]
    assert f"PROJECT-PYTHON {sys.prefix}" in fixed.stdout
    assert time.monotonic() - t0 < TIMEOUT_S
