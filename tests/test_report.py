"""``instdiff report``: HTML page, contact sheet and summary of a batch output (built here without a model)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from instdiff.imageio import decode_image, decode_mask
from pipelines import schema as S
from pipelines.batch import finalize_row
from pipelines.cli import main
from pipelines.make_dataset import shapes_table
from pipelines.report import TILE, latest_rows, make_report, summarize, verdict


def _output_rows(inputs: pa.Table, run_id: str) -> list[dict]:
    """Output rows as the job would write them: the edit inverts the image inside the ground-truth mask."""
    rows = []
    for r in inputs.to_pylist():
        src = decode_image(r[S.IMAGE])[0]
        gt = decode_mask(r[S.MASK])
        edited = np.where(gt[..., None], 255 - src, src).astype(np.uint8)
        h, w = gt.shape
        row = {
            **r,
            S.STATUS: S.STATUS_OK,
            S.ERROR: None,
            S.NOTES: None,
            S.HEIGHT: h,
            S.WIDTH: w,
            S.RGB: src.tobytes(),
            S.EDITED_RGB: edited.tobytes(),
            S.GENERATE: False,
            S.PRED_BITS: np.packbits(gt).tobytes(),
            S.GT_BITS: np.packbits(gt).tobytes(),
            S.METHOD: "instdiffedit",
            S.MODEL: "tiny",
            S.SEED: 1,
            S.UNET_CALLS: 4.0,
            S.LATENCY_S: 0.5,
            S.BATCH_ROWS: 2,
        }
        rows.append(finalize_row(row, run_id))
    return rows


@pytest.fixture()
def output(tmp_path):
    inputs = shapes_table(4, size=32)
    pq.write_table(inputs, tmp_path / "in.parquet")
    out = tmp_path / "out"
    (out / "_runs").mkdir(parents=True)
    (out / "_runs" / "r1.json").write_text(
        json.dumps({"run_id": "r1", "input": str(tmp_path / "in.parquet"), "fingerprint": {}})
    )
    rows = _output_rows(inputs.slice(0, 3), "r2")
    failed = {
        **rows[0],
        S.STATUS: S.STATUS_ERROR,
        S.ERROR: "RuntimeError: out of memory",
        S.EDITED: None,
        S.PRED_MASK: None,
        S.RUN_ID: "r1",
    }  # an earlier error row of an id that later succeeded
    last = {
        **_output_rows(inputs.slice(3, 1), "r1")[0],
        S.STATUS: S.STATUS_ERROR,
        S.ERROR: "cannot decode image",
        S.EDITED: None,
        S.PRED_MASK: None,
        S.IOU: None,
    }
    pq.write_table(pa.Table.from_pylist([failed, last], schema=S.OUTPUT_SCHEMA), out / "part-r1-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=S.OUTPUT_SCHEMA), out / "part-r2-a.parquet")
    return out


def test_latest_rows_prefers_ok_then_the_latest_run():
    rows = [
        {S.ID: "a", S.STATUS: "error", S.RUN_ID: "r1"},
        {S.ID: "b", S.STATUS: "error", S.RUN_ID: "r1"},
        {S.ID: "a", S.STATUS: "ok", S.RUN_ID: "r0"},
        {S.ID: "b", S.STATUS: "error", S.RUN_ID: "r2"},
    ]
    t = latest_rows(pa.Table.from_pylist(rows))
    assert t.to_pylist() == [
        {S.ID: "a", S.STATUS: "ok", S.RUN_ID: "r0"},
        {S.ID: "b", S.STATUS: "error", S.RUN_ID: "r2"},
    ]


def test_report_page_sheet_and_summary(output):
    paths = make_report(str(output), limit=2)
    page = (output / "_report" / "index.html").read_text()
    assert paths["index.html"] == str(output / "_report" / "index.html")
    assert page.count("data:image/png;base64,") == 2 * 4  # input, gt mask, pred mask, edited per shown row
    assert "shapes-0-000000" in page and "shapes-0-000001" in page and "shapes-0-000002" not in page
    assert "cannot decode image" in page and "out of memory" not in page  # superseded error rows are hidden
    assert "<td>iou</td>" in page and "C_m: mean pixel change inside" in page
    sheet = Image.open(io.BytesIO((output / "_report" / "contact_sheet.png").read_bytes()))
    assert sheet.size[1] >= 2 * TILE
    assert sheet.size == (300 + 4 * (TILE + 4), 20 + 2 * (TILE + 4))  # 300 px of labels, 4 panels, 2 rows
    summary = json.loads((output / "_report" / "summary.json").read_text())
    assert (summary["rows"], summary["ok"], summary["error"]) == (4, 3, 1)
    assert summary["metrics"]["iou"]["mean"] == 1.0 and summary["metrics"]["c_non"]["max"] == 0.0
    assert summary["metrics"]["c_m"]["min"] > 0.0
    assert summary["top_errors"] == {"cannot decode image": 1}
    assert summary["verdict"].startswith("verdict: 3/4 rows ok, mean IoU 1.00")
    assert summary["no_op"] == 0 and summary["verdict"].endswith(
        ", 0 no-op edits (change < 1/255 inside the predicted mask)"
    )
    assert paths["verdict"] == summary["verdict"]


def test_verdict_and_prompt_wrapping():
    from pipelines.report import _wrap

    s = {"rows": 10, "ok": 9, "metrics": {"iou": {"mean": 0.6234}}, "edit_success": 0.7, "edit_success_rows": 9}
    assert verdict(s) == "verdict: 9/10 rows ok, mean IoU 0.62, edit success 0.70 (9 shapes rows)"
    assert verdict({"rows": 1, "ok": 0, "metrics": {"iou": {"mean": None}}}) == "verdict: 0/1 rows ok, no IoU"
    lines = _wrap("to: " + "a red circle " * 20, width=20, lines=3)
    assert len(lines) == 3 and all(len(x) <= 20 for x in lines) and lines[-1].endswith("...")


def test_no_op_edits_are_counted_in_the_summary_and_the_verdict():
    base = {f.name: None for f in S.OUTPUT_SCHEMA} | {S.STATUS: S.STATUS_OK}
    changes = {"a": 0.0, "b": 0.5 / 255, "c": 1.0 / 255, "d": 0.2, "e": None}  # e: an empty predicted mask
    rows = [base | {S.ID: k, S.CHANGE_INSIDE_PRED: v} for k, v in changes.items()]
    rows.append(base | {S.ID: "f", S.STATUS: S.STATUS_ERROR, S.ERROR: "bad"})
    s = summarize(pa.Table.from_pylist(rows, schema=S.OUTPUT_SCHEMA))
    assert s["no_op"] == 2 and s["metrics"][S.CHANGE_INSIDE_PRED]["count"] == 4  # below 1/255: a and b
    assert verdict(s) == "verdict: 5/6 rows ok, no IoU, 2 no-op edits (change < 1/255 inside the predicted mask)"


def test_summarize_handles_outputs_without_ok_rows():
    t = pa.Table.from_pylist(
        [{f.name: None for f in S.OUTPUT_SCHEMA} | {S.ID: "x", S.STATUS: "error", S.ERROR: "bad"}],
        schema=S.OUTPUT_SCHEMA,
    )
    s = summarize(t)
    assert s["ok"] == 0 and s["metrics"]["iou"] == {"mean": None, "std": None, "min": None, "max": None, "count": 0}


def test_report_command(output, tmp_path, capsys):
    assert main(["report", str(output), "--out", str(tmp_path / "rep"), "--limit", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[-2])
    assert lines[-1].startswith("verdict: ") and "rows ok, mean IoU" in lines[-1]
    assert printed["contact_sheet.png"] == str(tmp_path / "rep" / "contact_sheet.png")
    assert (tmp_path / "rep" / "index.html").read_text().count("<figure>") == 4
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no Parquet files under" in capsys.readouterr().err


def test_contact_sheet_tiles_and_frames():
    from instdiff.imageio import encode_png
    from pipelines.contact_sheet import FRAME, Panel, SheetRow, draw_contact_sheet

    red = encode_png(np.full((8, 16, 3), (255, 0, 0), np.uint8))  # letterboxed: 128 x 64 in the middle
    rows = [SheetRow("a\nb", [Panel(red), Panel(None, mask=True)])]
    plain = np.asarray(Image.open(io.BytesIO(draw_contact_sheet(["x", "y"], rows, label_width=10, header_height=6))))
    framed = np.asarray(
        Image.open(io.BytesIO(draw_contact_sheet(["x", "y"], rows, label_width=10, header_height=6, frame=True)))
    )
    assert plain.shape == (6 + TILE + 4, 10 + 2 * (TILE + 4), 3)
    assert (plain[6 + TILE // 2, 10 + TILE // 2] == (255, 0, 0)).all()
    assert (plain[6 + 2, 10 + TILE // 2] == (200, 200, 200)).all()  # letterbox
    assert (plain[6 + TILE // 2, 10 + TILE + 4 + TILE // 2] == (200, 200, 200)).all()  # missing picture
    assert (plain[5, 10 + TILE // 2] == 255).all() and (framed[5, 10 + TILE // 2] == FRAME).all()


def test_report_on_unreadable_parquet_or_into_a_file_is_one_line(output, tmp_path, capsys, caplog):
    garbage = tmp_path / "notparquet.parquet"
    garbage.write_bytes(b"garbage")
    assert main(["report", str(garbage)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"instdiff report: error: no readable Parquet files under {garbage}"
    # a truncated part (a writer killed midway) is skipped with a warning naming it; the rest is reported
    (output / "part-zzz.parquet").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="pipelines.report"):
        assert main(["report", str(output), "--out", str(tmp_path / "rep")]) == 0
    assert "skipping unreadable file" in caplog.text and "part-zzz.parquet" in caplog.text
    assert (tmp_path / "rep" / "index.html").exists()
    (output / "part-zzz.parquet").unlink()
    assert main(["report", str(output), "--out", str(garbage)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"instdiff report: error: report folder {garbage} is a file; expected a folder"
    )


def test_an_output_of_an_older_version_is_reported_without_the_no_op_count(output, tmp_path, capsys, caplog):
    old = tmp_path / "old"
    old.mkdir()
    for f in sorted(output.glob("*.parquet")):
        t = pq.read_table(f)
        i = t.schema.get_field_index(S.CHANGE_INSIDE_PRED)
        pq.write_table(t.set_column(i, "change_outside_pred", t.column(i)), old / f.name)  # the pre-rename schema
    assert main(["report", str(old), "--out", str(tmp_path / "rep")]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: ") and "no-op" not in verdict
    assert "written by an older instdiff (no change_inside_pred column)" in caplog.text
