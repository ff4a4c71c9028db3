"""The bulk job end to end on a local 2-CPU Ray cluster with the tiny model: local Parquet and S3 (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from test_batch_stages import MAX_PIXELS, SIZE, mixed_table

from instdiff.imageio import decode_image, decode_mask
from pipelines import schema as S
from pipelines.batch import run_job
from pipelines.cli import main
from pipelines.config import ConfigError, parse_config
from pipelines.make_dataset import shapes_table
from pipelines.storage import write_table

ROOT = Path(__file__).resolve().parents[1]
JOB = {
    "model": {"spec": "tiny"},
    "method": {"name": "instdiffedit", "steps": 2, "n_noises": 1},
    "image": {"max_pixels": MAX_PIXELS},
    "actors": {"pool_size": 1, "num_cpus": 1, "batch_size": 4},
    "write": {"max_rows_per_file": 3},
    "ray": {"progress_bars": False},
}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.parquet")}


def _check_rows(table, reasons: dict[str, str]) -> None:  # noqa: ANN001
    """Every good row ok with decodable PNGs and metrics in range; every bad row an error with its reason."""
    for r in table.to_pylist():
        if r["id"] in reasons:
            assert r["status"] == "error" and reasons[r["id"]] in r["error"], r
            continue
        assert r["status"] == "ok", r["error"]
        assert decode_image(r["edited"])[0].shape == (SIZE, SIZE, 3)
        assert decode_mask(r["pred_mask"], size=(SIZE, SIZE)).any()
        for name in ("iou", "c_m", "c_non", "mask_area", "change_inside_pred"):
            assert 0.0 <= r[name] <= 1.0, (name, r[name])


def test_local_job_with_bad_rows_resumes_without_duplicates(ray_local, tmp_path, capsys):
    table, reasons = mixed_table(n_good=4)
    half = table.slice(0, table.num_rows // 2)
    pq.write_table(table, tmp_path / "all.parquet")
    pq.write_table(half, tmp_path / "half.parquet")
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": str(tmp_path / "all.parquet"), "output": str(out), **JOB}))

    # 1. the CLI on half of the ids (flags override the file)
    assert main(["batch", "--config", str(config), "--input", str(tmp_path / "half.parquet")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    half_errors = sum(1 for i in half["id"].to_pylist() if i in reasons)
    assert (first["written"], first["error"]) == (half.num_rows, half_errors)
    before = _digests(out)
    assert before and all(name.startswith(f"part-{first['run_id']}-") for name in before)

    # 2. the same job on all ids: the earlier rows are skipped, their files untouched
    cfg = parse_config({**yaml.safe_load(config.read_text())})
    second = run_job(cfg)
    assert second.skipped_ok == half.num_rows - half_errors and second.skipped_error == half_errors
    assert second.written == table.num_rows - half.num_rows
    after = _digests(out)
    assert {k: after[k] for k in before} == before

    # 3. a plain pyarrow reader sees every id once, in the output schema, at most 3 rows a file
    result = pq.read_table(out)
    assert sorted(result["id"].to_pylist()) == sorted(table["id"].to_pylist())
    assert S.output_schema_problems(result.schema) == []
    assert all(pq.read_metadata(out / name).num_rows <= 3 for name in after)
    _check_rows(result, reasons)
    rgba = next(r for r in result.to_pylist() if r["id"] == "ok-rgba")
    assert rgba["status"] == "ok" and "composited RGBA alpha onto white" in rgba["notes"]
    assert {json.loads(p.read_text())["run_id"] for p in (out / "_runs").glob("*.summary.json")} == {
        first["run_id"],
        second.run_id,
    }

    # 4. nothing left to do: no rows, no files; other settings are refused
    third = run_job(cfg)
    assert (third.written, third.files, third.skipped_ok + third.skipped_error) == (0, 0, table.num_rows)
    with pytest.raises(ConfigError, match=r"other settings \(method.steps: earlier 2, now 3\)"):
        run_job(cfg.with_(method=cfg.method.with_(steps=3)))


def test_s3_input_and_output_through_moto(ray_local, s3_server, tmp_path):
    s3 = s3_server.client()
    for bucket in ("instdiff-in", "instdiff-out"):
        s3.create_bucket(Bucket=bucket)
    write_table(shapes_table(5, size=SIZE), "s3://instdiff-in/sets/shapes.parquet")
    cfg = parse_config({"input": "s3://instdiff-in/sets/", "output": "s3://instdiff-out/edits/run", **JOB})
    summary = run_job(cfg)
    assert (summary.ok, summary.error, summary.output) == (5, 0, "s3://instdiff-out/edits/run")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="instdiff-out", Prefix="edits/run/")["Contents"]]
    assert sum(k.endswith(".parquet") for k in keys) >= 2 and any(k.startswith("edits/run/_runs/") for k in keys)
    # read back with plain pyarrow (no project code)
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint_url, access_key="testing", secret_key="testing", region="us-east-1"
    )
    result = pq.read_table("instdiff-out/edits/run", filesystem=fs)
    assert result.num_rows == 5 and set(result["status"].to_pylist()) == {"ok"}
    _check_rows(result, {})


def test_a_pool_that_leaves_no_cpu_for_reading_is_refused(ray_local, tmp_path):
    pq.write_table(shapes_table(1, size=SIZE), tmp_path / "in.parquet")
    cfg = parse_config(
        {
            "input": str(tmp_path / "in.parquet"),
            "output": str(tmp_path / "out"),
            **{**JOB, "actors": {"pool_size": 2, "num_cpus": 1}},
        }
    )
    with pytest.raises(ConfigError, match=r"actors.pool_size × actors.num_cpus = 2 × 1 reserves 2"):
        run_job(cfg)


def test_a_model_the_actors_cannot_load_ends_the_job_with_one_line(ray_local, tmp_path, capsys):
    pq.write_table(shapes_table(1, size=SIZE), tmp_path / "in.parquet")
    job = {**JOB, "model": {"spec": "instdiff-test/absent", "local_files_only": True}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"), **job}))
    assert main(["batch", "--config", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("instdiff batch: error:")]
    assert len(err) == 1 and err[0].startswith(  # then the hub library's own reason
        "instdiff batch: error: the editing actors could not load model 'instdiff-test/absent' (device 'auto'): "
        "ModelLoadError: could not load model 'instdiff-test/absent' (offline: only local folders, 'tiny' and "
        "'default' work): "
    )
    assert list((tmp_path / "out" / "_runs").glob("*.json")) == []  # no stray manifest


@pytest.mark.slow
def test_python_m_entry_point_joins_the_cluster_at_ray_address(ray_local, tmp_path):
    import ray

    pq.write_table(shapes_table(2, size=SIZE), tmp_path / "in.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"), **JOB}))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.batch", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Ray: the Ray cluster at" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == 2
