"""cluster.benchmarks.shapes_quality: which settings each edit row runs, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from cluster.benchmarks import shapes_quality as sq
from instdiff.config import MaskPreset, Method
from instdiff.models import load_bundle


def test_rows_use_the_model_defaults_and_the_paper_preset():
    defaults = load_bundle("default").defaults
    model = sq.method_config("instdiffedit", defaults, 50, 5.0)
    paper = sq.method_config("instdiffedit_paper", defaults, 50, 5.0)
    section = defaults["instdiffedit"]
    assert model.mask_steps == section["mask_steps"] and model.mask.phi == section["mask"]["phi"]
    assert model.attention_downsample == section["attention_downsample"]
    assert paper.mask_steps != section["mask_steps"] and paper.mask.phi == 0.2  # the paper's φ
    assert paper.mask.preset is MaskPreset.PAPER
    assert sq.method_config("diffedit", defaults, 50, 5.0).method is Method.DIFFEDIT
    # an SD folder has no instdiff.json: both InstDiffEdit rows are the paper's
    assert sq.method_config("instdiffedit", {}, 50, 7.5) == sq.method_config("instdiffedit_paper", {}, 50, 7.5)


def test_tiny_run_writes_every_requested_row(tmp_path):
    out = tmp_path / "q.json"
    argv = ["--model", "tiny", "--pairs", "2", "--steps", "2", "--batch", "2", "--skip", "scorer", "generation"]
    sq.main([*argv, "--methods", "instdiffedit", "instdiffedit_paper", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["edits"]["methods"]) == {"instdiffedit", "instdiffedit_paper"}
    for row in res["edits"]["methods"].values():
        assert row["n"] == 2 and 0.0 <= row["iou"] <= 1.0 and row["config"]["steps"] == 2
    assert "| instdiffedit_paper |" in out.with_suffix(".md").read_text()
    # an earlier run's edit rows are tabulated beside the new ones
    again = tmp_path / "again.json"
    sq.main([*argv, "--methods", "sdedit", "--earlier", str(out), "--out", str(again)])
    md = again.with_suffix(".md").read_text()
    assert (
        "## Earlier run: [q.json](q.json) (2 test pairs)" in md and md.count("| instdiffedit_paper |") == 2
    )  # its edit and per-kind rows
    for i, doc in enumerate(
        [
            "not json",
            '{"scorer": {}}',
            "[1]",
            '{"edits": {"x": 1}}',
            '{"edits": {"n_pairs": 2, "methods": {"sdedit": {"iou": 1}}}}',
        ]
    ):
        (tmp_path / f"bad{i}.json").write_text(doc)
    before = again.read_text()
    for name in ["missing.json"] + [f"bad{i}.json" for i in range(5)]:
        with pytest.raises(SystemExit) as e:
            sq.main([*argv, "--earlier", str(tmp_path / name), "--out", str(again)])
        assert e.value.code == 2
    assert again.read_text() == before  # refused before anything ran or was written
