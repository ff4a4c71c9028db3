"""The batch job's stages in one process (no Ray): decode/validate, edit with per-row isolation, finalize."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from instdiff import editing
from instdiff.editing import EditResult, Method, expected_unet_calls
from instdiff.imageio import decode_image, decode_mask, encode_png
from pipelines import schema as S
from pipelines.batch import (
    DECODED_SCHEMA,
    DecodeOptions,
    EditStage,
    decode_batch,
    finalize_batch,
    finalize_row,
    row_seed,
    run_in_process,
)
from pipelines.config import BatchConfig, parse_config
from pipelines.make_dataset import shapes_table

SIZE = 32
MAX_PIXELS = 48 * 48  # the "huge" row (64×64) is over it


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # (H, W, 4) uint8 → RGBA
    return buf.getvalue()


def mixed_table(n_good: int = 4, seed: int = 0) -> tuple[pa.Table, dict[str, str]]:
    """Shapes rows plus one of each bad kind; returns (table, {bad id: expected text in its error})."""
    good = shapes_table(n_good, seed=seed, size=SIZE).to_pylist()
    base = good[0]
    rgb = np.asarray(decode_image(base[S.IMAGE])[0])
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])

    def row(rid: str, **kw: object) -> dict:
        return {**base, S.ID: rid, S.MASK: None, **kw}

    bad = {
        "bad-corrupt": (row("bad-corrupt", image=b"\x89PNG\r\n\x1a\n not really"), "cannot decode image"),
        "bad-empty-prompt": (row("bad-empty-prompt", target_prompt="  "), "target_prompt is empty"),
        "bad-1x1": (row("bad-1x1", image=_png(np.zeros((1, 1, 3), np.uint8))), "image is 1x1; both sides"),
        "bad-huge": (row("bad-huge", image=_png(np.zeros((64, 64, 3), np.uint8))), "over the limit of 2304"),
        "bad-mask": (row("bad-mask", mask=_png(np.zeros((16, 16), np.uint8))), "mask is 16x16 but the image is 32x32"),
        "bad-no-image": (row("bad-no-image", image=None), "image is missing (null)"),
    }
    rgba_row = row("ok-rgba", image=_png(rgba), mask=base[S.MASK])
    rest = [v[0] for k, v in bad.items() if k != "bad-corrupt"]
    rows = good[:2] + [bad["bad-corrupt"][0], rgba_row] + good[2:] + rest
    return pa.Table.from_pylist(rows, schema=S.INPUT_SCHEMA), {k: v[1] for k, v in bad.items()}


def job_config(**overrides: object) -> BatchConfig:
    data = {
        "input": "unused",
        "output": "unused",
        "model": {"spec": "tiny"},
        "method": {"name": "instdiffedit", "steps": 2, "n_noises": 1},
        "image": {"max_pixels": MAX_PIXELS},
        "actors": {"batch_size": 4},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


@pytest.fixture(scope="module")
def stage() -> EditStage:
    cfg = job_config()
    return EditStage(cfg.model, cfg.method, cfg.image, threads=2)


def test_decode_marks_each_bad_row_with_its_reason():
    table, reasons = mixed_table()
    out = decode_batch(table, opts=DecodeOptions.from_config(job_config()))
    assert out.schema.equals(DECODED_SCHEMA) and out.num_rows == table.num_rows
    rows = {r[S.ID]: r for r in out.to_pylist()}
    for rid, text in reasons.items():
        assert rows[rid][S.STATUS] == S.STATUS_ERROR, rid
        assert text in rows[rid][S.ERROR], (rid, rows[rid][S.ERROR])
        assert rows[rid][S.RGB] is None
    good = [r for rid, r in rows.items() if rid not in reasons]
    assert len(good) == 5 and all(r[S.STATUS] == S.STATUS_OK and r[S.ERROR] is None for r in good)
    assert "composited RGBA alpha onto white" in rows["ok-rgba"][S.NOTES]
    assert len(rows["ok-rgba"][S.RGB]) == SIZE * SIZE * 3


def test_alpha_policy_error_refuses_transparency_and_skip_ids_drop_rows():
    table, _ = mixed_table()
    opts = DecodeOptions.from_config(job_config(image={"alpha": "error"}))
    out = decode_batch(table, opts=opts, skip_ids=pa.array(["shapes-0-000000", "bad-1x1"]))
    rows = {r[S.ID]: r for r in out.to_pylist()}
    assert "shapes-0-000000" not in rows and "bad-1x1" not in rows and out.num_rows == table.num_rows - 2
    assert rows["ok-rgba"][S.STATUS] == S.STATUS_ERROR and "transparency" in rows["ok-rgba"][S.ERROR]


def test_source_prompt_needed_only_by_methods_that_read_it():
    table = shapes_table(1, size=SIZE).to_pylist()
    table[0][S.SOURCE_PROMPT] = ""
    t = pa.Table.from_pylist(table, schema=S.INPUT_SCHEMA)
    inst = decode_batch(t, opts=DecodeOptions.from_config(job_config())).to_pylist()[0]
    assert inst[S.STATUS] == S.STATUS_OK and "source_prompt is empty (not used by instdiffedit)" in inst[S.NOTES]
    diff = decode_batch(t, opts=DecodeOptions.from_config(job_config(method={"name": "diffedit"}))).to_pylist()[0]
    assert diff[S.STATUS] == S.STATUS_ERROR and "method diffedit needs" in diff[S.ERROR]


def test_in_process_job_edits_good_rows_and_reports_bad_ones(stage):
    table, reasons = mixed_table()
    cfg = job_config()
    out = run_in_process(cfg, table, stage=stage, run_id="t1")
    assert out.schema.equals(S.OUTPUT_SCHEMA)
    assert sorted(out[S.ID].to_pylist()) == sorted(table[S.ID].to_pylist())  # nothing lost
    expected_calls = expected_unet_calls(cfg.method)
    for r in out.to_pylist():
        if r[S.ID] in reasons:
            assert r[S.STATUS] == S.STATUS_ERROR and reasons[r[S.ID]] in r[S.ERROR]
            assert r[S.EDITED] is None and r[S.PRED_MASK] is None and r[S.IOU] is None
            continue
        assert r[S.STATUS] == S.STATUS_OK, r[S.ERROR]
        edited, _ = decode_image(r[S.EDITED])
        assert edited.shape == (SIZE, SIZE, 3)
        mask = decode_mask(r[S.PRED_MASK], size=(SIZE, SIZE))
        assert r[S.MASK_AREA] == pytest.approx(mask.mean())
        for name in (S.IOU, S.C_M, S.C_NON):
            assert 0.0 <= r[name] <= 1.0, name
        # the change inside the predicted mask: defined exactly when the mask has a pixel
        inside = r[S.CHANGE_INSIDE_PRED]
        assert (inside is None) == (not mask.any()) and (inside is None or 0.0 <= inside <= 1.0)
        assert r[S.UNET_CALLS] == expected_calls
        assert r[S.SEED] == row_seed(cfg.seed, r[S.ID])
        assert r[S.METHOD] == "instdiffedit" and r[S.MODEL] == "tiny" and r[S.RUN_ID] == "t1"
        assert r[S.LATENCY_S] > 0 and 1 <= r[S.BATCH_ROWS] <= cfg.actors.batch_size


def _decoded(n: int, prompts: list[str] | None = None) -> pa.Table:
    rows = shapes_table(n, size=SIZE).to_pylist()
    for r, p in zip(rows, prompts or [], strict=False):
        r[S.TARGET_PROMPT] = p
    return decode_batch(pa.Table.from_pylist(rows, schema=S.INPUT_SCHEMA), opts=DecodeOptions.from_config(job_config()))


def test_an_editor_exception_fails_only_its_row(stage, monkeypatch):
    real = editing.edit

    def flaky(bundle, images, sources, targets, cfg, seeds=None):  # noqa: ANN001, ANN202
        if any("EXPLODE" in t for t in targets):
            raise RuntimeError("the editor broke on this prompt")
        return real(bundle, images, sources, targets, cfg, seeds)

    monkeypatch.setattr(editing, "edit", flaky)
    out = stage(_decoded(3, ["a red circle", "EXPLODE a blue square", "a green star"])).to_pylist()
    status = {r[S.TARGET_PROMPT]: r for r in out}
    bad = status["EXPLODE a blue square"]
    assert bad[S.STATUS] == S.STATUS_ERROR and bad[S.ERROR] == "RuntimeError: the editor broke on this prompt"
    for prompt in ("a red circle", "a green star"):
        assert status[prompt][S.STATUS] == S.STATUS_OK and status[prompt][S.BATCH_ROWS] == 1


def test_out_of_memory_on_a_batch_retries_rows_one_by_one(stage, monkeypatch):
    real = editing.edit
    calls = []

    def small_gpu(bundle, images, sources, targets, cfg, seeds=None):  # noqa: ANN001, ANN202
        calls.append(images.shape[0])
        if images.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(bundle, images, sources, targets, cfg, seeds)

    monkeypatch.setattr(editing, "edit", small_gpu)
    out = finalize_batch(stage(_decoded(3)), run_id="oom").to_pylist()
    assert calls == [3, 1, 1, 1]
    assert all(r[S.STATUS] == S.STATUS_OK and r[S.BATCH_ROWS] == 1 for r in out)


def test_generating_methods_accept_prompt_only_rows(stage, monkeypatch):
    def fake_fisedit(bundle, images, sources, targets, cfg, seeds):  # noqa: ANN001, ANN202
        masks = torch.zeros(images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
        masks[..., :8, :8] = True
        return EditResult(images.clamp(-1, 1).flip(-1).cpu(), masks, {"total": 0.0}, 2.0)

    monkeypatch.setitem(editing.EDITORS, Method.FISEDIT, fake_fisedit)
    cfg = job_config(method={"name": "fisedit"})
    rows = shapes_table(2, size=SIZE).to_pylist()
    rows[0][S.IMAGE], rows[0][S.MASK] = None, None
    table = pa.Table.from_pylist(rows, schema=S.INPUT_SCHEMA)
    fis = EditStage(cfg.model, cfg.method, cfg.image, threads=2)
    out = {r[S.ID]: r for r in run_in_process(cfg, table, stage=fis).to_pylist()}
    generated, given = out[rows[0][S.ID]], out[rows[1][S.ID]]
    assert generated[S.STATUS] == S.STATUS_OK and generated[S.GENERATED_SOURCE] is not None
    assert decode_image(generated[S.GENERATED_SOURCE])[0].shape == (SIZE, SIZE, 3)
    assert "source generated from source_prompt" in generated[S.NOTES] and generated[S.IOU] is None
    assert generated[S.MASK_AREA] == pytest.approx(64 / SIZE**2)
    assert given[S.STATUS] == S.STATUS_OK and given[S.GENERATED_SOURCE] is None and given[S.IOU] is not None


def test_finalize_metrics_on_a_constructed_edit():
    h = w = 8
    src = np.zeros((h, w, 3), np.uint8)
    region = np.zeros((h, w), bool)
    region[:4, :4] = True  # a quarter of the image
    edited = src.copy()
    edited[region] = 255
    gt = np.zeros((h, w), bool)
    gt[:4, :] = True  # half the image; the edit fills half of it
    pack = lambda m: np.packbits(m).tobytes()  # noqa: E731
    row = {
        S.ID: "x",
        S.STATUS: S.STATUS_OK,
        S.HEIGHT: h,
        S.WIDTH: w,
        S.RGB: src.tobytes(),
        S.EDITED_RGB: edited.tobytes(),
        S.PRED_BITS: pack(region),
        S.GT_BITS: pack(gt),
        S.GENERATE: False,
    }
    out = finalize_row(row, "r")
    assert out[S.STATUS] == S.STATUS_OK
    assert out[S.MASK_AREA] == 0.25 and out[S.IOU] == 0.5
    assert out[S.C_M] == pytest.approx(0.5) and out[S.C_NON] == 0.0
    assert out[S.CHANGE_INSIDE_PRED] == 1.0  # every predicted pixel went from 0 to 255 in all three channels
    assert np.array_equal(decode_mask(out[S.PRED_MASK]), region)
    assert np.array_equal(decode_image(out[S.EDITED])[0], edited)
    # a no-op edit: nothing changed inside the predicted mask (no ground truth needed to see it)
    half = src.copy()
    half[:2, :4] = 51  # half the predicted region changes by 51/255 in every channel
    assert finalize_row({**row, S.EDITED_RGB: half.tobytes()}, "r")[S.CHANGE_INSIDE_PRED] == pytest.approx(0.1)
    assert finalize_row({**row, S.EDITED_RGB: src.tobytes(), S.GT_BITS: None}, "r")[S.CHANGE_INSIDE_PRED] == 0.0
    empty = finalize_row({**row, S.PRED_BITS: pack(np.zeros((h, w), bool))}, "r")
    assert empty[S.STATUS] == S.STATUS_OK and empty[S.CHANGE_INSIDE_PRED] is None  # no predicted region
    broken = finalize_row({**row, S.EDITED_RGB: b"short"}, "r")
    assert broken[S.STATUS] == S.STATUS_ERROR and broken[S.ERROR].startswith("could not encode or score")


def test_row_seed_depends_on_id_and_base_only():
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(1, "a")
    assert row_seed(0, "a") != row_seed(0, "b") and 0 <= row_seed(123, "zz") < 2**31
    assert encode_png(np.zeros((2, 2), bool))  # masks encode as 8-bit PNG


def test_resume_compares_settings_only_with_runs_that_wrote_rows(tmp_path):
    import json

    import pyarrow.parquet as pq

    from pipelines.batch import check_resumable, scan_output
    from pipelines.config import ConfigError, fingerprint

    cfg = job_config()
    other = job_config(method={"steps": 7})
    runs = tmp_path / "_runs"
    runs.mkdir()
    for run_id, c in (("20260101T000000-aaaaaa", other), ("20260101T000001-bbbbbb", cfg)):
        (runs / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "fingerprint": fingerprint(c)}))
    row = {f.name: None for f in S.OUTPUT_SCHEMA} | {S.ID: "a", S.STATUS: S.STATUS_OK}
    pq.write_table(
        pa.Table.from_pylist([row], schema=S.OUTPUT_SCHEMA),
        tmp_path / "part-20260101T000001-bbbbbb-0f0f-000000-0.parquet",
    )
    prior = scan_output(pafs.LocalFileSystem(), str(tmp_path))
    assert prior.ok_ids == {"a"} and set(prior.fingerprints) == {"20260101T000001-bbbbbb"}
    check_resumable(prior, cfg, str(tmp_path))  # the run that failed before writing rows does not count
    with pytest.raises(ConfigError, match="method.steps: earlier 2, now 7"):
        check_resumable(prior, other, str(tmp_path))


def test_decode_and_finalize_workers_never_load_the_editors():
    """The decode and finalize stages (Ray tasks) import the package but never diffusers or the editors."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "import pyarrow as pa\n"
        "from pipelines import schema as S\n"
        "from pipelines.batch import EDITED_SCHEMA, DecodeOptions, decode_batch, finalize_batch\n"
        "from pipelines.make_dataset import shapes_table\n"
        "rows = decode_batch(shapes_table(2, size=32), opts=DecodeOptions('sdedit', False, 10**6, 16)).to_pylist()\n"
        "for r in rows:\n"
        "    r.update({S.EDITED_RGB: r[S.RGB], S.PRED_BITS: r[S.GT_BITS], S.SEED: 0, S.BATCH_ROWS: 2})\n"
        "out = finalize_batch(pa.Table.from_pylist(rows, schema=EDITED_SCHEMA), run_id='r')\n"
        "assert out[S.STATUS].to_pylist() == ['ok', 'ok'], out[S.ERROR].to_pylist()\n"
        "loaded = ('diffusers', 'transformers', 'instdiff.editing', 'instdiff.models')\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(loaded))))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"decode/finalize loaded: {out.stdout.strip()}"


def _job(tmp_path, **overrides: object) -> BatchConfig:
    """A tiny job on two shapes rows written under ``tmp_path`` (input ``in.parquet``, output ``out``)."""
    import pyarrow.parquet as pq

    if not (tmp_path / "in.parquet").exists():
        pq.write_table(shapes_table(2, size=SIZE), tmp_path / "in.parquet")
    return job_config(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), **overrides)


def test_the_driver_refuses_a_missing_model_folder_or_a_bad_dtype_before_anything_is_written(tmp_path):
    from instdiff.errors import InstdiffError, ModelLoadError
    from pipelines.batch import run_job

    with pytest.raises(ModelLoadError, match=r"model.spec: model path '/nonexistent/model' does not exist"):
        run_job(_job(tmp_path, model={"spec": "/nonexistent/model"}))
    with pytest.raises(InstdiffError, match="fp12"):
        run_job(_job(tmp_path, model={"dtype": "fp12"}))
    assert not (tmp_path / "out").exists()  # no stray _runs/<id>.json


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_output_that_is_a_file_or_below_one_is_refused_before_the_input_is_read(tmp_path, where):
    from instdiff.errors import StorageError
    from pipelines.batch import run_job

    (tmp_path / "taken").write_bytes(b"x")
    output = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "out"
    cfg = job_config(input=str(tmp_path / "absent.parquet"), output=str(output))
    message = "is a file; expected a folder" if where == "file" else "taken is a file, so no folder can be made"
    with pytest.raises(StorageError, match=message):
        run_job(cfg)


def test_unreadable_or_unreachable_input_is_one_storage_error(tmp_path):
    from instdiff.errors import StorageError
    from pipelines.batch import run_job

    (tmp_path / "garbage.parquet").write_bytes(b"garbage")
    with pytest.raises(StorageError, match=r"cannot read input .*garbage.parquet: .*garbage.parquet"):
        run_job(job_config(input=str(tmp_path / "garbage.parquet"), output=str(tmp_path / "out")))
    cfg = job_config(
        input="s3://no-such-bucket/in",
        output=str(tmp_path / "out"),
        storage={"endpoint_url": "http://127.0.0.1:9", "access_key_id": "k", "secret_access_key": "s"},
    )
    with pytest.raises(StorageError, match=r"cannot access s3://no-such-bucket/in: .*127\.0\.0\.1:9") as info:
        run_job(cfg)
    assert "\n" not in str(info.value)


def test_resume_false_refuses_an_output_that_already_holds_data(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.batch import run_job
    from pipelines.config import ConfigError

    (tmp_path / "out").mkdir()
    row = {f.name: None for f in S.OUTPUT_SCHEMA} | {S.ID: "a", S.STATUS: S.STATUS_OK}
    pq.write_table(pa.Table.from_pylist([row], schema=S.OUTPUT_SCHEMA), tmp_path / "out" / "part-x.parquet")
    with pytest.raises(ConfigError, match=r"resume: false but output .*out already holds data; use an empty output"):
        run_job(_job(tmp_path, resume=False))
    assert not (tmp_path / "out" / "_runs").exists()


def test_an_actor_that_cannot_load_the_model_ends_the_job_with_its_own_error(tmp_path, monkeypatch):
    """Ray's ActorDiedError (its message: the actor's whole traceback) becomes one ModelLoadError line."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from instdiff.errors import ModelLoadError
    from pipelines.batch import driver
    from pipelines.ray_connect import ClusterInfo

    traceback_text = (
        "\x1b[36mray::MapWorker(MapBatches(EditStage)).__init__()\x1b[39m (pid=1, ip=127.0.0.1)\n"
        '  File "pipelines/batch/edit_stage.py", line 61, in __init__\n'
        "    self.bundle = load_bundle(\n"
        "instdiff.errors.ModelLoadError: cannot load model 'org/absent' from the hub\n"
        "(offline: only local folders, 'tiny' and 'default' work)\n"
    )
    died = ActorDiedError(RayTaskError("__init__", traceback_text, ModelLoadError("x")))

    class Dataset:
        def write_datasink(self, *args: object, **kwargs: object) -> None:
            raise died

    cluster = ClusterInfo(kind="local", address="127.0.0.1:1", started=False, nodes=1, cpus=2.0, gpus=0.0)
    monkeypatch.setattr(driver, "connect_ray", lambda cfg, address=None: cluster)
    monkeypatch.setattr(driver, "check_resources", lambda cfg, local: None)
    monkeypatch.setattr(driver, "build_dataset", lambda *args, **kwargs: Dataset())
    with pytest.raises(ModelLoadError) as info:
        driver.run_job(_job(tmp_path, model={"spec": "org/absent"}))
    assert str(info.value) == (
        "the editing actors could not load model 'org/absent' (device 'auto'): ModelLoadError: cannot load model "
        "'org/absent' from the hub (offline: only local folders, 'tiny' and 'default' work)"
    )
    assert list((tmp_path / "out" / "_runs").iterdir()) == []  # the manifest of a run that wrote nothing is gone


def test_check_model_reads_device_names_everywhere_and_availability_only_locally(caplog):
    from instdiff.errors import ConfigError, ModelLoadError
    from pipelines.batch.driver import check_model
    from pipelines.config import ModelConfig

    with pytest.raises(ConfigError, match="model.device: device 'nonsense' is not a device"):
        check_model(ModelConfig(spec="tiny", device="nonsense"), local=False)
    with pytest.raises(ConfigError, match="model.dtype"):
        check_model(ModelConfig(spec="tiny", dtype="fp12"), local=False)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="model.device: .*CUDA is not available"):
            check_model(ModelConfig(spec="tiny", device="cuda"), local=True)
        check_model(ModelConfig(spec="tiny", device="cuda"), local=False)  # the workers may have it
    with pytest.raises(ModelLoadError, match="model.spec: model path './no-such-model' does not exist"):
        check_model(ModelConfig(spec="./no-such-model"), local=True)
    check_model(ModelConfig(spec="tiny"), local=True)
