"""pipelines.storage: local paths and s3:// URIs, settings from the config or the AWS environment variables."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from instdiff.errors import ConfigError, StorageError
from pipelines import storage
from pipelines.storage import StorageConfig


def test_local_paths_resolve_to_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("data/x.parquet")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "data" / "x.parquet")
    assert storage.resolve(f"file://{tmp_path}/y")[1] == str(tmp_path / "y")
    assert not storage.is_remote("data/x") and storage.is_remote("s3://b/k") and storage.is_s3("s3://b/k")


def test_list_files_skips_hidden_parts_and_other_suffixes(tmp_path):
    for rel in ("a.parquet", "sub/b.parquet", "_runs/c.parquet", ".tmp/d.parquet", "sub/_e.parquet", "f.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    fs, path = storage.resolve(str(tmp_path))
    assert storage.list_files(fs, path) == [f"{path}/a.parquet", f"{path}/sub/b.parquet"]
    assert storage.list_files(fs, f"{path}/a.parquet") == [f"{path}/a.parquet"]
    assert storage.list_files(fs, f"{path}/missing") == []
    storage.write_bytes(fs, f"{path}/new/dir/z.json", b"{}")
    assert storage.read_bytes(fs, f"{path}/new/dir/z.json") == b"{}"


def test_s3_settings_from_environment_and_config(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs, path = storage.resolve("s3://bucket/a/b/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b"
    assert fs.region == "eu-west-1"
    assert storage.display(fs, path) == "s3://bucket/a/b"
    cfg_fs, _ = storage.resolve("s3://bucket/k", StorageConfig(region="us-west-2"))
    assert cfg_fs.region == "us-west-2"  # the config wins over the environment
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="set both storage.access_key_id and storage.secret_access_key"):
        storage.s3_filesystem()
    with pytest.raises(ConfigError, match="has no bucket"):
        storage.resolve("s3:///key")


def test_an_unreachable_endpoint_is_one_storage_error_naming_path_and_endpoint():
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", access_key_id="k", secret_access_key="s", region="us-east-1")
    fs, path = storage.resolve("s3://no-such-bucket/in", cfg)
    for call in (storage.list_files, storage.exists, storage.is_dir):
        with pytest.raises(StorageError, match=r"^cannot access s3://no-such-bucket/in: .*127\.0\.0\.1:9") as info:
            call(fs, path)
        assert "\n" not in str(info.value)


def test_check_output_refuses_files_and_folders_in_the_way(tmp_path):
    (tmp_path / "f.parquet").write_bytes(b"x")
    (tmp_path / "d.parquet").mkdir()
    storage.check_output(str(tmp_path / "new" / "deeper" / "x.parquet"), "--out")  # folders to be created: fine
    storage.check_output(str(tmp_path / "d.parquet"), "output", folder=True)
    storage.check_output("s3://bucket/anything", "output", folder=True)  # object stores are not checked
    with pytest.raises(StorageError, match=r"^output .*f.parquet is a file; expected a folder$"):
        storage.check_output(str(tmp_path / "f.parquet"), "output", folder=True)
    with pytest.raises(StorageError, match=r"^--out .*d.parquet is a folder; expected a file$"):
        storage.check_output(str(tmp_path / "d.parquet"), "--out")
    with pytest.raises(StorageError, match=r"f.parquet is a file, so no folder can be made there$"):
        storage.check_output(str(tmp_path / "f.parquet" / "a" / "b.parquet"), "--out")
    with pytest.raises(StorageError, match="is a folder; expected a file"):
        storage.write_table(pa.table({"a": [1]}), str(tmp_path / "d.parquet"))


def test_reading_turns_arrow_and_os_errors_into_one_storage_error(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(StorageError, match=r"^cannot read input x: .*bad.parquet") as info:
        with storage.reading("input x"):
            pq.read_table(tmp_path / "bad.parquet")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="passes through"), storage.reading("input x"):
        raise ConfigError("passes through")


def test_an_input_with_no_rows_is_refused_before_anything_is_written(tmp_path):
    import pyarrow.parquet as pq

    from instdiff.errors import InputNotFoundError
    from pipelines.batch import run_job
    from pipelines.config import parse_config
    from pipelines.make_dataset import shapes_table

    empty = shapes_table(1, seed=0, size=32).slice(0, 0)
    pq.write_table(empty, tmp_path / "in.parquet")
    out = tmp_path / "out"
    cfg = parse_config({"input": str(tmp_path / "in.parquet"), "output": str(out), "model": {"spec": "tiny"}})
    with pytest.raises(InputNotFoundError, match=r"in\.parquet holds no rows .*nothing to edit"):
        run_job(cfg, address="local")
    assert not out.exists() or not any(out.rglob("*"))  # no manifest, no summary


@pytest.mark.parametrize("spec", ["tiny", "default"])
def test_steps_the_scheduler_cannot_run_are_refused_before_anything_is_written(tmp_path, spec):
    import pyarrow.parquet as pq

    from pipelines.batch import run_job
    from pipelines.config import parse_config
    from pipelines.make_dataset import shapes_table

    pq.write_table(shapes_table(2, seed=0, size=32), tmp_path / "in.parquet")
    out = tmp_path / "out"
    for steps, message in (
        (1001, r"method\.steps: at most 1000 \(the scheduler's training steps\); got 1001"),
        (1000, r"method\.steps: 1000 puts a timestep at 1000, past this scheduler's 1000"),
    ):
        cfg = parse_config(
            {
                "input": str(tmp_path / "in.parquet"),
                "output": str(out),
                "model": {"spec": spec},
                "method": {"steps": steps},
            }
        )
        with pytest.raises(ConfigError, match=message):
            run_job(cfg, address="local")
        assert not out.exists()
