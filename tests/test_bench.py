"""instdiff bench: config expansion, aggregation on constructed outputs (exact values), and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from instdiff.errors import ConfigError
from instdiff.imageio import encode_png
from instdiff.synthetic import make_edit_pairs
from pipelines import bench
from pipelines import schema as S
from pipelines.contact_sheet import TILE
from pipelines.make_dataset import shapes_table


def _config(tmp_path, **over):
    data = {
        "name": "t",
        "output": str(tmp_path / "runs"),
        "results": str(tmp_path / "results" / "bench-t"),
        "engine": "in-process",
        "data": {"make": "shapes", "n": 4, "seed": 3, "size": 32},
        "base": {
            "model": {"spec": "tiny"},
            "method": {"steps": 2, "n_noises": 1, "diffedit_noises": 1},
            "actors": {"batch_size": 4},
        },
        "runs": [
            {"label": "SDEdit", "method": "sdedit"},
            {"label": "InstDiffEdit", "method": {"name": "instdiffedit"}},
        ],
        "sweeps": [
            {
                "name": "r-phi",
                "label": "InstDiffEdit r={method.strength} φ={method.mask.phi}",
                "settings": {"method": {"name": "instdiffedit"}},
                "grid": {"method.strength": [0.4, 0.6], "method.mask.phi": [0.1, 0.3]},
            }
        ],
        "metrics": {"lpips": False, "fid": False, "class_key": "target_phrase", "ref_class_key": "source_phrase"},
    }
    data.update(over)
    return data


def test_config_expands_sweeps_and_merges_settings(tmp_path):
    cfg = bench.parse_bench_config(_config(tmp_path))
    labels = [r.label for r in cfg.runs]
    assert labels[:2] == ["SDEdit", "InstDiffEdit"]
    assert labels[2:] == [
        "InstDiffEdit r=0.4 φ=0.1",
        "InstDiffEdit r=0.4 φ=0.3",
        "InstDiffEdit r=0.6 φ=0.1",
        "InstDiffEdit r=0.6 φ=0.3",
    ]
    assert cfg.runs[3].slug == "instdiffedit-r-0.4-phi-0.3"
    assert cfg.runs[3].params == {"method.strength": 0.4, "method.mask.phi": 0.3}
    bcfg = bench.batch_config(cfg, cfg.runs[3], "in.parquet")
    assert bcfg.method.method.value == "instdiffedit" and bcfg.method.strength == 0.4
    assert bcfg.method.mask.phi == 0.3 and bcfg.method.steps == 2 and bcfg.method.n_noises == 1
    assert bcfg.output.endswith("runs/instdiffedit-r-0.4-phi-0.3") and bcfg.input == "in.parquet"
    sd = bench.batch_config(cfg, cfg.runs[0], "in.parquet")
    assert sd.method.method.value == "sdedit" and sd.method.steps == 2  # 'method: sdedit' keeps base.method keys
    # --set style overrides reach the data and base sections
    small = bench.parse_bench_config(_config(tmp_path), {"data.n": 2, "base.method.steps": 3})
    assert small.data.n == 2 and bench.batch_config(small, small.runs[0], "x").method.steps == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "colour: unknown key"),
        ({"runs": [{"label": "A", "method": "sdedit"}, {"label": "a", "method": "sdedit"}]}, "repeated: a"),
        ({"runs": [{"label": "bad", "method": {"name": "sdedit", "steps": 0}}]}, "run 'bad': method.steps"),
        ({"runs": [{"label": "bad", "method": {"name": "nope"}}]}, "method.name"),
        ({"data": {"make": "shapes", "input": "x.parquet"}}, "exactly one of"),
        ({"sweeps": [{"name": "s", "grid": {"method.strength": []}}]}, "non-empty lists"),
        ({"metrics": {"text_score": "bleu"}}, "metrics.text_score"),
        ({"engine": "spark"}, "engine"),
        ({"notes": "one string"}, "notes: expected a list"),
        ({"data": {"make": "shapes", "n": "8"}}, "data.n: expected an integer"),
        ({"data": ["make"]}, "data: expected a mapping"),
        ({"sheet": {"runs": "SDEdit"}}, "sheet.runs"),
        ({"sheet": {"colour": 1}}, "sheet.colour: unknown key; accepted keys in sheet: rows, runs"),
        ({"runs": 5}, "runs: expected a list of runs"),
        ({"sweeps": 5}, "sweeps: expected a list of sweeps"),
        ({"notes": 5}, "notes: expected a list of strings; got 5"),
        (
            {"sweeps": [{"name": "s", "settings": 5, "grid": {"method.strength": [0.5]}}]},
            r"sweeps\[0\].settings: expected",
        ),
        ({"sweeps": [{"name": "s", "grid": {1: [0.5]}}]}, r"sweeps\[0\].grid: 1 is not a dotted batch-job key"),
        ({"runs": [{"label": "a", "input": "x"}]}, r"runs\[0\].input: not accepted here \(the bench sets input and"),
        ({"runs": [{"label": "a", "output": "x"}]}, r"runs\[0\].output: not accepted here"),
        (
            {"sweeps": [{"name": "s", "settings": {"input": "x"}, "grid": {"method.strength": [0.5]}}]},
            r"sweeps\[0\].settings.input: not accepted here",
        ),
        ({"sweeps": [{"name": "s", "grid": {"output": ["a", "b"]}}]}, r"sweeps\[0\].grid.output: not accepted here"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        bench.parse_bench_config(_config(tmp_path, **change))


def test_earlier_runs_are_tabulated_and_checked(tmp_path):
    from pipelines.bench.render import earlier_runs

    earlier = tmp_path / "t-2026-01-01.json"
    results = [
        {"label": "SDEdit", "params": {}, "iou": 0.25, "ok": 4, "rows": 4},
        {"label": "s a", "sweep": "s", "params": {"method.strength": 0.4}, "iou": 0.5, "ok": 3, "rows": 4},
    ]
    earlier.write_text(json.dumps({"commit": "abc123", "created": "2026-01-01", "results": results}))
    cfg = bench.parse_bench_config(_config(tmp_path, earlier=[str(earlier)]))
    md = "\n".join(earlier_runs(cfg.earlier))
    assert "## Earlier run: [t-2026-01-01.json](t-2026-01-01.json)" in md and "Commit `abc123`, 2026-01-01" in md
    assert "| SDEdit |" in md and "| 25.0 |" in md  # IoU in %
    assert "| 0.4 |" in md and "| 3 / 4 |" in md  # the sweep's table, by its parameter
    with pytest.raises(ConfigError, match=r"earlier: .*missing.json does not exist"):
        bench.parse_bench_config(_config(tmp_path, earlier=[str(tmp_path / "missing.json")]))
    with pytest.raises(ConfigError, match="earlier: expected a list of results .json paths"):
        bench.parse_bench_config(_config(tmp_path, earlier="x.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="bad.json is not a readable benchmark results file"):
        earlier_runs([str(tmp_path / "bad.json")])
    # every shape of a wrong file is refused when the config is read, before any run is made
    for i, doc in enumerate(
        [
            "x",
            "[1]",
            '{"results": [1, 2]}',
            '{"results": {"a": 1}}',
            '{"results": [{}]}',
            '{"results": [{"label": "s", "sweep": "r"}]}',
        ]
    ):
        (tmp_path / f"w{i}.json").write_text(doc)
        with pytest.raises(ConfigError, match=f"earlier: .*w{i}.json is not a readable benchmark results file"):
            bench.parse_bench_config(_config(tmp_path, earlier=[str(tmp_path / f"w{i}.json")]))


def _fake_output(path, pairs, edited, pred, latency=0.8, batch_rows=4, unet=20.0, method="sdedit"):
    """A run output folder in the job's output schema, made from known images and masks."""
    from instdiff import metrics

    cols = {f.name: [] for f in S.OUTPUT_SCHEMA}
    for p, e, m in zip(pairs, edited, pred, strict=True):
        row = {f.name: None for f in S.OUTPUT_SCHEMA}
        src, gt = p.source.image, p.edit_mask
        row.update(
            {
                S.ID: p.id,
                S.STATUS: S.STATUS_OK,
                S.METHOD: method,
                S.MODEL: "tiny",
                S.EDITED: encode_png(e),
                S.PRED_MASK: encode_png(m),
                S.MASK_AREA: float(m.mean()),
                S.UNET_CALLS: unet,
                S.LATENCY_S: latency,
                S.BATCH_ROWS: batch_rows,
                S.RUN_ID: "r1",
                S.IOU: float(metrics.iou(m, gt)[0]),
                S.C_M: float(metrics.change_in_mask(src, e, gt)[0]),
                S.C_NON: float(metrics.change_outside_mask(src, e, gt)[0]),
            }
        )
        for k, v in row.items():
            cols[k].append(v)
    path.mkdir(parents=True)
    pq.write_table(S.output_table(cols), path / "part-0.parquet")


def test_aggregate_exact_values_on_constructed_outputs(tmp_path):
    cfg = bench.parse_bench_config(
        _config(tmp_path, sweeps=[], metrics={"lpips": False, "fid": False}, notes=["2 steps (paper: 50)"])
    )
    table = shapes_table(4, seed=3, size=32)
    pairs = make_edit_pairs(4, seed=3, size=32)
    # "SDEdit": perfect edits (the ground-truth targets) with perfect masks
    _fake_output(tmp_path / "runs" / "sdedit", pairs, [p.target.image for p in pairs], [p.edit_mask for p in pairs])
    # "InstDiffEdit": no change at all, an empty mask, on only 3 of the 4 rows
    _fake_output(
        tmp_path / "runs" / "instdiffedit",
        pairs[:3],
        [p.source.image for p in pairs[:3]],
        [np.zeros_like(p.edit_mask) for p in pairs[:3]],
        latency=0.3,
        batch_rows=3,
        unet=7.0,
    )
    paths = bench.aggregate(cfg, table, "instdiff bench --config t.yaml")
    doc = json.loads(open(paths["json"]).read())
    perfect, unchanged = doc["results"]
    assert perfect["iou"] == 1.0 and perfect["c_non"] == 0.0 and perfect["ratio"] is None
    assert perfect["c_m"] > 0.05 and perfect["time_per_image_s"] == pytest.approx(0.2)
    assert perfect["unet_calls"] == 20.0 and perfect["ok"] == 4
    assert perfect["text_score"] == 1.0  # the scorer finds every target phrase in the true targets
    assert unchanged["iou"] == 0.0 and unchanged["c_m"] == 0.0 and unchanged["c_non"] == 0.0
    assert unchanged["time_per_image_s"] == pytest.approx(0.1) and unchanged["written"] == 3
    assert unchanged["text_score"] == 0.0
    assert doc["input_text_score"] == 0.0 and doc["params"]["text_score"] == "shapes"
    md = open(paths["markdown"]).read()
    assert "Made with: `instdiff bench --config t.yaml`" in md
    assert "| SDEdit | 0.200 | 20 | 100.0 |" in md
    assert "| InstDiffEdit | 0.100 | 7 | 0.0 | 0.0 | 0.0 | n/a |" in md and "| 3 / 4 |" in md
    assert "CLIPScore: n/a: no CLIP model given" in md and "FID, CSFID: not computed" in md
    assert "* 2 steps (paper: 50)" in md
    for key in ("iou_vs_time", "cm_vs_cnon", "contact"):
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # contact sheet: 200 px of labels, input + gt mask + (mask, edit) of both runs; the 3 rows both runs edited
    assert Image.open(paths["contact"]).size == (200 + 6 * (TILE + 4), 34 + 3 * (TILE + 4))


def test_end_to_end_in_process_tiny(tmp_path):
    from instdiff.editing import EditConfig, Method, expected_unet_calls

    cfg = bench.parse_bench_config(
        _config(
            tmp_path,
            sweeps=[{"name": "r", "settings": {"method": "instdiffedit"}, "grid": {"method.strength": [0.5, 1.0]}}],
            metrics={"lpips": True, "fid": False, "class_key": "target_phrase", "ref_class_key": "source_phrase"},
            sheet={"rows": 2},
        )
    )
    paths = bench.run_bench(cfg, "instdiff bench --config t.yaml")
    doc = json.loads(open(paths["json"]).read())
    by_label = {r["label"]: r for r in doc["results"]}
    assert set(by_label) == {"SDEdit", "InstDiffEdit", "r method.strength=0.5", "r method.strength=1.0"}
    for res in doc["results"]:
        assert res["ok"] == 4 and res["error"] == 0
        assert 0.0 <= res["iou"] <= 1.0 and res["time_per_image_s"] > 0 and res["lpips"] >= 0
    assert by_label["SDEdit"]["unet_calls"] == expected_unet_calls(EditConfig(method=Method.SDEDIT, steps=2))
    assert by_label["SDEdit"]["mask_area"] == 1.0  # SDEdit edits everywhere
    sweep_md = open(paths["markdown"]).read()
    assert "## Sweep `r` (Table 2 layout)" in sweep_md and "| 1.0 |" in sweep_md
    assert (tmp_path / "runs" / "input.parquet").exists()
    assert doc["params"]["batch_configs"]["SDEdit"]["method"]["name"] == "sdedit"
    assert by_label["SDEdit"]["job"]["written"] == 4 and len(by_label["SDEdit"]["job"]["load_avg_1m"]) == 2
    # --aggregate-only re-renders from the outputs and the recorded job facts
    paths = bench.run_bench(cfg, "instdiff bench --config t.yaml --aggregate-only", aggregate_only=True)
    again = json.loads(open(paths["json"]).read())
    assert (
        "Made with: `instdiff bench --config t.yaml` (tables and figures re-rendered" in open(paths["markdown"]).read()
    )
    assert [r["iou"] for r in again["results"]] == [r["iou"] for r in doc["results"]]
    assert again["results"][0]["job"] == by_label["SDEdit"]["job"]


@pytest.mark.slow
def test_end_to_end_through_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = bench.parse_bench_config(
        _config(
            tmp_path,
            engine="ray",
            sweeps=[],
            runs=[{"label": "SDEdit", "method": "sdedit"}],
            base={
                "model": {"spec": "tiny"},
                "method": {"steps": 2},
                "actors": {"batch_size": 2, "num_cpus": 1},
                "ray": {"num_cpus": 2, "progress_bars": False},
            },
        )
    )
    paths = bench.run_bench(cfg, "instdiff bench --config t.yaml")
    doc = json.loads(open(paths["json"]).read())
    assert doc["results"][0]["ok"] == 4
    assert doc["results"][0]["job"]["written"] == 4
    # a second run resumes: nothing left to edit, same numbers, the job facts of the run that edited
    again = json.loads(open(bench.run_bench(cfg, "x")["json"]).read())
    assert again["results"][0]["job"]["written"] == 4 and again["results"][0]["iou"] == doc["results"][0]["iou"]
    summaries = sorted((tmp_path / "runs" / "sdedit" / "_runs").glob("*.summary.json"))
    assert json.loads(summaries[-1].read_text())["written"] == 0


def test_cli_bench_writes_results(tmp_path, capsys):
    import yaml

    from pipelines.cli import main

    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, sweeps=[], runs=[{"label": "SDEdit", "method": "sdedit"}])))
    assert main(["bench", "--config", str(path), "--set", "data.n=2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    md = open(out["markdown"]).read()
    assert f"instdiff bench --config {path} --set data.n=2" in md and "| 2 / 2 |" in md
    assert main(["bench", "--config", str(path), "--set", "engine=spark"]) == 2
