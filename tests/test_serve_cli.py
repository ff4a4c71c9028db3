"""``instdiff serve``: config errors exit 2 with one line; a real run prints its URL, serves, and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from serve_helpers import TINY_ARGS, free_port

from pipelines.cli import main


def _config(tmp_path, args):
    path = tmp_path / "serve.yaml"
    app = {"name": "instdiff", "route_prefix": "/", "import_path": "pipelines.serve.app:build_app", "args": args}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return path


def test_bad_config_is_one_line_exit_2(tmp_path, capsys):
    assert main(["serve", "--config", str(_config(tmp_path, {"modle": {}}))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("instdiff serve: error: args.modle: unknown key") and "\n" not in err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    other = tmp_path / "other.yaml"
    other.write_text("applications: [{name: x, import_path: mod:app}]\n")
    assert main(["serve", "--config", str(other)]) == 2
    assert "pipelines.serve.app:build_app" in capsys.readouterr().err


@pytest.mark.slow
def test_instdiff_serve_runs_and_stops_on_ctrl_c(tmp_path):
    requests = pytest.importorskip("requests")
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.getcwd())
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--config", str(_config(tmp_path, TINY_ARGS))]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline and "http://" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert f"http://127.0.0.1:{port}/" in line, line
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
