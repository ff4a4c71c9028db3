"""Connection rules, path rules, atomic part writes, moving unreadable parts aside, the progress line (all fast)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from instdiff.errors import UsageError
from pipelines import ray_connect, storage
from pipelines import schema as S
from pipelines.batch.progress import ProgressLine, format_eta
from pipelines.batch.resume import INVALID_DIR, scan_output, set_aside

ROOT = Path(__file__).resolve().parents[1]
JOB_ENV = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}


@pytest.fixture
def no_ray(monkeypatch):
    """Ray not initialised in this process, no RAY_ADDRESS, not a submitted job; ``ray.init`` records its kwargs."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(
        ray_connect, "_info", lambda kind, started: ray_connect.ClusterInfo(kind, "x:1", started, 1, 2, 0)
    )
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(ray_connect.JOB_CONFIG_ENV, raising=False)
    return calls


def _rows(ids: list[str], status: str = S.STATUS_OK) -> pa.Table:
    return pa.Table.from_pylist(
        [{f.name: None for f in S.OUTPUT_SCHEMA} | {S.ID: i, S.STATUS: status} for i in ids], schema=S.OUTPUT_SCHEMA
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_without_an_address_the_cluster_is_a_private_local_one(no_ray):
    assert ray_connect.target() == ("local", None)
    info = ray_connect.connect(num_cpus=2, object_store_memory=2**28)
    (kw,) = no_ray
    # never plain ray.init(): that would join the cluster in Ray's address file (the last `ray start` here)
    assert kw["address"] == "local" and kw["_node_ip_address"] == "127.0.0.1" and kw["include_dashboard"] is False
    assert (kw["num_cpus"], kw["object_store_memory"]) == (2, 2**28)
    assert info.local and info.started


@pytest.fixture
def grpc_port():
    """A gRPC server on 127.0.0.1 with no services (it answers every RPC "unimplemented", as a head answers what
    it does not serve): what the handshake check of an address needs to see."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_an_address_is_joined_without_cpu_or_gpu_counts(no_ray, monkeypatch, grpc_port):
    if True:  # a gRPC server listening, as a head's GCS port would be
        addr = f"127.0.0.1:{grpc_port}"
        info = ray_connect.connect(addr, num_cpus=2, num_gpus=1)
        assert no_ray[-1] == {"address": addr, "log_to_driver": True} and info.kind == "address" and not info.local
        monkeypatch.setenv("RAY_ADDRESS", addr)
        assert ray_connect.target() == ("address", addr)
        assert ray_connect.target("local") == ("local", None)  # --address local wins over RAY_ADDRESS
        monkeypatch.setenv(ray_connect.JOB_CONFIG_ENV, json.dumps(JOB_ENV))
        assert ray_connect.target() == ("job", addr)  # under `ray job submit`: the job's cluster
        ray_connect.connect()
        assert no_ray[-1]["address"] == addr


def test_a_dashboard_url_or_a_dead_address_is_refused_at_once(no_ray, monkeypatch):
    with pytest.raises(ray_connect.RayConnectError, match=r"dashboard's HTTP address .* GCS address HOST:PORT"):
        ray_connect.connect("http://127.0.0.1:8265")
    with pytest.raises(ray_connect.RayConnectError, match="is not a Ray address; accepted: HOST:PORT"):
        ray_connect.connect("head-node")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    t0 = time.perf_counter()
    with pytest.raises(
        ray_connect.RayConnectError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+ from RAY_ADDRESS"
    ):
        ray_connect.connect()
    assert time.perf_counter() - t0 < ray_connect.PROBE_TIMEOUT_S + 1 and no_ray == []


def test_a_dead_ray_client_address_is_refused_within_seconds_naming_it(no_ray):
    dead = f"ray://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(ray_connect.RayConnectError) as e:
        ray_connect.connect(dead)
    assert time.perf_counter() - t0 < ray_connect.PROBE_TIMEOUT_S + 1 and no_ray == []  # Ray Client never tried
    msg = str(e.value)
    assert f"cannot reach the Ray cluster at {dead} from --address" in msg and "ray://HOST:PORT" in msg
    with pytest.raises(ray_connect.RayConnectError, match="is not a Ray address; accepted: HOST:PORT"):
        ray_connect.connect("ray://")
    with pytest.raises(ray_connect.RayConnectError, match=r"is not a Ray address; accepted: .*'auto'.*'local'"):
        ray_connect.connect("127.0.0.1:99999")


def test_a_port_that_is_no_ray_server_is_refused_within_seconds(no_ray, grpc_port):
    """A firewall or proxy that accepts any connection, or another service on the port, would make Ray retry for
    half a minute or more; the handshake check refuses it within the probe timeout."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(ray_connect.RayConnectError, match=r"no Ray head \(GCS\) answered there within 5 s"):
            ray_connect.connect(addr)
        assert time.perf_counter() - t0 < ray_connect.PROBE_TIMEOUT_S + 2

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    http = HTTPServer(("127.0.0.1", 0), Quiet)  # a web server on the port
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(
            ray_connect.RayConnectError, match=r"ray://127\.0\.0\.1:\d+ from --address: .*no Ray client server answer"
        ):
            ray_connect.connect(f"ray://127.0.0.1:{http.server_address[1]}")
        assert time.perf_counter() - t0 < ray_connect.PROBE_TIMEOUT_S + 2
    finally:
        http.shutdown()
        http.server_close()
    assert no_ray == []
    ray_connect.connect(f"ray://127.0.0.1:{grpc_port}")  # a gRPC server is taken for a Ray one: Ray goes on
    assert no_ray[-1]["address"] == f"ray://127.0.0.1:{grpc_port}"


def test_the_address_flag_is_checked_by_the_parser(capsys):
    from pipelines.cli import main

    for bad, words in (("head-node", "is not a Ray address; accepted: HOST:PORT"), ("http://h:8265", "dashboard")):
        with pytest.raises(SystemExit) as e:
            main(["batch", "--input", "x.parquet", "--output", "o", "--address", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "argument --address: " in err[-1] and words in err[-1], err
    from pipelines.commands import address_arg

    assert address_arg(" 10.0.0.5:6379 ") == "10.0.0.5:6379" and address_arg("ray://head") == "ray://head"
    assert address_arg("[::1]:6379") == "[::1]:6379" and address_arg("auto") == "auto"


def test_the_batch_job_refuses_a_dead_address_before_anything_else(no_ray, tmp_path, capsys):
    """The address is checked first (``will_be_local``), so a job with nothing to do (all ids done) is refused too:
    the check comes before the input and the output are looked at."""
    from pipelines.cli import main

    pq.write_table(pa.table({"x": [1]}), tmp_path / "in.parquet")
    dead = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    argv = ["batch", "--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model", "tiny"]
    assert main([*argv, "--address", dead]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"instdiff batch: error: cannot reach the Ray cluster at {dead} from --address"), err
    assert not out.exists() and no_ray == []
    with pytest.raises(ray_connect.RayConnectError):
        ray_connect.will_be_local(dead)


def test_relative_paths_resolve_against_the_cwd_and_are_refused_in_a_submitted_job(monkeypatch, tmp_path):
    monkeypatch.delenv(ray_connect.JOB_CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert ray_connect.resolve_path("out/x", "output") == str(tmp_path / "out" / "x")
    assert ray_connect.resolve_path("s3://b/k", "output") == "s3://b/k"
    assert ray_connect.resolve_path("/data/in.parquet", "input") == "/data/in.parquet"
    monkeypatch.setenv(ray_connect.JOB_CONFIG_ENV, json.dumps(JOB_ENV))
    assert ray_connect.job_working_dir() == "gcs://_ray_pkg_0123.zip"
    with pytest.raises(UsageError, match=r"output 'out/x' is a relative path, but .*working-dir upload.*absolute path"):
        ray_connect.resolve_path("out/x", "output")
    assert ray_connect.resolve_path("s3://b/k", "output") == "s3://b/k"
    monkeypatch.setenv(ray_connect.JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))
    with pytest.raises(UsageError, match=r"input 'data/a.parquet' is a relative path, but a job started by"):
        ray_connect.resolve_path("data/a.parquet", "input")


def test_the_batch_cli_refuses_a_relative_output_under_ray_job_submit(monkeypatch, tmp_path, capsys):
    from pipelines.cli import main

    pq.write_table(pa.table({"x": [1]}), tmp_path / "in.parquet")
    monkeypatch.setenv(ray_connect.JOB_CONFIG_ENV, json.dumps(JOB_ENV))
    code = main(["batch", "--input", str(tmp_path / "in.parquet"), "--output", "out/x", "--model", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("instdiff batch: error: output 'out/x' is a relative path")


_KILLED_WRITER = """
import sys, time
import pyarrow as pa, pyarrow.fs as pafs, pyarrow.parquet as pq
from pipelines import storage
real = pq.write_table
def half_then_hang(table, where, **kw):  # a writer that dies midway: half a file, then the kill
    real(table, where, **kw)
    data = open(where, "rb").read()
    open(where, "wb").write(data[: len(data) // 2])
    print("writing", flush=True)
    time.sleep(60)
pq.write_table = half_then_hang
storage.write_parquet_part(pafs.LocalFileSystem(), sys.argv[1], pa.table({"id": ["b"], "status": ["ok"]}))
"""


def test_a_writer_killed_midway_leaves_nothing_that_breaks_readers(tmp_path):
    folder = tmp_path / "out"
    storage.write_parquet_part(
        pafs.LocalFileSystem(), str(folder / "part-a.parquet"), pa.table({"id": ["a"], "status": ["ok"]})
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(folder / "part-b.parquet")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    leftovers = sorted(p.name for p in folder.iterdir())
    assert leftovers[0].startswith(".part-b.parquet.") and leftovers[1:] == ["part-a.parquet"]
    assert pq.read_table(folder)["id"].to_pylist() == ["a"]  # the hidden temporary file is not data


def test_resume_moves_an_unreadable_part_aside_and_redoes_its_ids(tmp_path, caplog):
    fs = pafs.LocalFileSystem()
    run = "20260101T000000-aaaaaa"
    pq.write_table(_rows(["a", "b"]), tmp_path / f"part-{run}-w-000000-000.parquet")
    pq.write_table(_rows(["c", "d"]), tmp_path / f"part-{run}-w-000001-000.parquet")
    bad = tmp_path / f"part-{run}-w-000001-000.parquet"
    bad.write_bytes(bad.read_bytes()[:300])  # what a writer killed in the middle of a plain write leaves
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(tmp_path)
    prior = scan_output(fs, str(tmp_path))
    assert prior.ok_ids == {"a", "b"} and prior.unreadable == [str(bad)]
    with caplog.at_level(logging.WARNING, logger="pipelines.batch.resume"):
        set_aside(fs, str(tmp_path), prior)
    moved = tmp_path / INVALID_DIR / bad.name
    assert prior.moved == [str(moved)] and moved.exists() and not bad.exists()
    assert str(bad) in caplog.text and f"moved it to {moved}" in caplog.text and "edited again" in caplog.text
    assert sorted(pq.read_table(tmp_path)["id"].to_pylist()) == ["a", "b"]  # the folder reads again


def test_report_skips_an_unreadable_file_with_a_warning(tmp_path, caplog):
    from pipelines.report import read_output

    pq.write_table(_rows(["a"]), tmp_path / "part-1.parquet")
    (tmp_path / "part-2.parquet").write_bytes(b"PAR1 truncated")
    with caplog.at_level(logging.WARNING, logger="pipelines.report"):
        table = read_output(str(tmp_path))
    assert table[S.ID].to_pylist() == ["a"]
    assert "skipping unreadable file" in caplog.text and "part-2.parquet" in caplog.text


def test_progress_line_counts_committed_rows(tmp_path):
    fs = pafs.LocalFileSystem()
    line = ProgressLine(fs, str(tmp_path), "r1", total=4, interval_s=3600)
    pq.write_table(_rows(["a", "b"]), tmp_path / "part-r1-w-000000-000.parquet")
    pq.write_table(_rows(["c"], S.STATUS_ERROR), tmp_path / "part-r1-w-000001-000.parquet")
    pq.write_table(_rows(["z"]), tmp_path / "part-r0-w-000000-000.parquet")  # another run's rows
    (tmp_path / ".part-r1-w-000002-000.parquet.abc.tmp").write_bytes(b"half")  # not committed yet
    line.poll()
    line.poll()  # counted once
    assert (line.ok, line.error, line.done) == (2, 1, 3)
    assert line.line().startswith("progress: 3/4 rows written (2 ok, 1 error), ") and "ETA " in line.line()
    assert [format_eta(x) for x in (None, 8.4, 200, 3900)] == ["?", "8 s", "3 min 20 s", "1 h 05 min"]
