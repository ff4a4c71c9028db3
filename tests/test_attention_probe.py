"""The attention probe benchmark runs end to end on the tiny model and writes sane JSON and Markdown."""

import json

from cluster.benchmarks import attention_probe


def test_probe_writes_aucs_and_mask_ious(tmp_path):
    out = tmp_path / "probe.json"
    assert (
        attention_probe.main(
            [
                "--models",
                "tiny",
                "--scenes",
                "4",
                "--pairs",
                "6",
                "--timesteps",
                "500",
                "--phi",
                "0.2",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    res = doc["results"]["tiny"]
    layers = res["localisation"]["500"]
    assert layers, "no cross-attention layer recorded"
    for r in layers.values():
        for key in ("auc_shape_word", "auc_colour_word", "auc_start_token"):
            assert r[key] is not None and 0.0 <= r[key] <= 1.0
        total = r["mass_start"] + r["mass_words"] + r["mass_end_and_padding"]
        assert abs(total - 1.0) < 1e-4  # every token's mass is counted once
    sets = res["pair_masks"]["sets"]
    assert sets and res["pair_masks"]["n_pairs"] == 6
    for row in sets.values():
        assert 0.0 <= row["paper"]["iou"] <= 1.0
        assert set(row["oracle"]) == {"0.2", "0.5"}
        # a higher threshold never grows the oracle mask
        assert row["oracle"]["0.5"]["mask_area"] <= row["oracle"]["0.2"]["mask_area"]
    md = out.with_suffix(".md").read_text()
    assert "## `tiny`" in md and "oracle: target-phrase tokens" in md
    assert doc["params"]["pairs"] == 6 and doc["commit"]
