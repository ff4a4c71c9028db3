"""InstDiffEdit variants against DiffEdit and SDEdit on the same shapes-world pairs: quality and cost.

    python -m cluster.benchmarks.instdiffedit_variants --models default --pairs 200 --steps 50 \
        --out docs/results/instdiffedit_variants.json

For each model and each row (the model's recommended InstDiffEdit settings from its ``instdiff.json``, the
paper's, the variants of :data:`VARIANTS`, DiffEdit, SDEdit), on the same pairs and seeds
(:func:`cluster.benchmarks.shapes_quality.run_edits`): mask IoU against the exact edit mask, edit success,
source removal, C_non, mask area, UNet row-evaluations per image and seconds per image (after a warm-up
edit), overall and per edit kind. The Markdown checks issue 13's goals against the same run: InstDiffEdit
(model default) IoU ≥ 0.6 and ≥ DiffEdit's, success ≥ SDEdit's, C_non ≤ 0.02, rows ≤ 1.2 × SDEdit's, time
below DiffEdit's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cluster.benchmarks.shapes_quality import TEST_PAIR_SEED, run_edits
from instdiff import synthetic
from instdiff.config import EditConfig, to_plain
from instdiff.editing import edit
from instdiff.models import load_bundle
from instdiff.runinfo import git_commit, machine_info

log = logging.getLogger(__name__)

Variant = Callable[[Mapping[str, Any], int], EditConfig]


def _model(defaults: Mapping[str, Any], steps: int, **kw: Any) -> EditConfig:
    """The model's recommended InstDiffEdit settings with ``kw`` on top (``mask`` merged)."""
    return EditConfig.for_model(defaults, steps=steps, **kw)


VARIANTS: dict[str, Variant] = {
    "instdiffedit (model default)": lambda d, s: _model(d, s),
    "instdiffedit (paper)": lambda d, s: EditConfig.for_model(d, "paper", steps=s),
    "diffedit": lambda d, s: EditConfig.for_model(d, method="diffedit", steps=s),
    "sdedit": lambda d, s: EditConfig.for_model(d, method="sdedit", steps=s),
    "paper + sink reference": lambda d, s: EditConfig.for_model(d, "paper", steps=s, mask={"reference": "sink"}),
    "default, target-prompt span": lambda d, s: _model(d, s, mask_prompt="target"),
    "default, 16x16 maps": lambda d, s: _model(d, s, attention_downsample=1),
    "default, phi 0.05": lambda d, s: _model(d, s, mask={"phi": 0.05}),
    "default, phi 0.2": lambda d, s: _model(d, s, mask={"phi": 0.2}),
    "default, 2 mask steps, running mean": lambda d, s: _model(d, s, mask_steps=2, mask={"running_mean": True}),
    "default, 3 mask steps, running mean": lambda d, s: _model(d, s, mask_steps=3, mask={"running_mean": True}),
    "default, mask phase guided": lambda d, s: _model(d, s, mask_guidance=True),
    "default, inpaint from noise, r·steps": lambda d, s: _model(
        d, s, inpaint_strength=1.0, inpaint_steps=max(1, s // 2)
    ),
    "default, inpaint from noise, all steps": lambda d, s: _model(d, s, inpaint_strength=1.0),
}
DEFAULT_ROW, DIFFEDIT_ROW, SDEDIT_ROW = "instdiffedit (model default)", "diffedit", "sdedit"


def goals(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Issue 13's goals for the model-default row, each with the measured value and the bar.

    Args:
        rows: results by row name (must hold the default, DiffEdit and SDEdit rows).

    Returns:
        ``{goal: {"value", "bar", "met"}}``.
    """
    d, de, sd = rows[DEFAULT_ROW], rows[DIFFEDIT_ROW], rows[SDEDIT_ROW]
    checks = {
        "mask IoU ≥ 0.6": (d["iou"], 0.6, d["iou"] >= 0.6),
        "mask IoU ≥ DiffEdit's": (d["iou"], de["iou"], d["iou"] >= de["iou"]),
        "edit success ≥ SDEdit's": (d["success"], sd["success"], d["success"] >= sd["success"]),
        "C_non ≤ 0.02": (d["c_non"], 0.02, d["c_non"] <= 0.02),
        "UNet rows ≤ 1.2 × SDEdit's": (
            d["unet_calls_per_image"],
            1.2 * sd["unet_calls_per_image"],
            d["unet_calls_per_image"] <= 1.2 * sd["unet_calls_per_image"],
        ),
        "s / image < DiffEdit's": (
            d["seconds_per_image"],
            de["seconds_per_image"],
            d["seconds_per_image"] < de["seconds_per_image"],
        ),
    }
    return {k: {"value": v, "bar": b, "met": bool(m)} for k, (v, b, m) in checks.items()}


def markdown(res: Mapping[str, Any]) -> str:
    """The Markdown report: one cost/quality table per model, per-kind IoU / success, the goals.

    Args:
        res: the JSON result of :func:`main`.

    Returns:
        The page.
    """
    p = res["params"]
    lines = [
        "# InstDiffEdit variants: quality and cost",
        "",
        f"Machine: {res['machine'].get('gpu', res['machine']['device'])}, commit {res['git_commit']}. "
        f"{p['pairs']} test pairs (seed {p['pairs_seed']}), {p['steps']} DDIM steps, r = 0.5, noise seed = pair "
        "index, same pairs for every row. UNet rows: UNet row-evaluations per image (CFG counts 2).",
        "",
    ]
    for model, r in res["models"].items():
        rows = r["rows"]
        lines += [
            f"## {model}",
            "",
            "| row | mask IoU | edit success | source removed | C_non | mask area | UNet rows | s / image |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, x in rows.items():
            lines.append(
                f"| {name} | {x['iou']:.3f} | {x['success']:.3f} | {x['source_removed']:.3f} | {x['c_non']:.4f} | "
                f"{x['mask_area']:.2f} | {x['unet_calls_per_image']:.0f} | {x['seconds_per_image']:.4f} |"
            )
        lines += ["", "Per edit kind (IoU / success):", ""]
        lines += [
            "| row | " + " | ".join(synthetic.EDIT_KINDS) + " |",
            "| --- |" + " --- |" * len(synthetic.EDIT_KINDS),
        ]
        for name, x in rows.items():
            cells = [
                f"{x['per_kind'][k]['iou']:.3f} / {x['per_kind'][k]['success']:.3f}" if k in x["per_kind"] else "-"
                for k in synthetic.EDIT_KINDS
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "goals" in r:
            lines += [
                "",
                "Goals (model-default row, this run):",
                "",
                "| goal | value | bar | met |",
                "| --- | --- | --- | --- |",
            ]
            for g, v in r["goals"].items():
                lines.append(f"| {g} | {v['value']:.4f} | {v['bar']:.4f} | {'yes' if v['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rows for every model; rewrite the JSON and Markdown after each row.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--pairs-seed", type=int, default=TEST_PAIR_SEED)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--rows", nargs="+", default=list(VARIANTS), help="row names of VARIANTS")
    ap.add_argument("--out", default="docs/results/instdiffedit_variants.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    unknown = [r for r in args.rows if r not in VARIANTS]
    if unknown:
        ap.error(f"unknown rows {unknown}; accepted: {list(VARIANTS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "git_commit": git_commit(),
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "params": {"pairs": args.pairs, "pairs_seed": args.pairs_seed, "steps": args.steps, "batch": args.batch},
        "models": {},
    }
    for spec in args.models:
        bundle = load_bundle(spec, device=args.device, dtype="fp32")
        res["machine"] = machine_info(bundle.device)
        pairs = synthetic.make_edit_pairs(args.pairs, seed=args.pairs_seed, size=bundle.resolution)
        rows: dict[str, Any] = {}
        res["models"][spec] = {"defaults": bundle.defaults, "rows": rows}
        for name in args.rows:
            cfg = VARIANTS[name](bundle.defaults, args.steps)
            warm = synthetic.scene_to_tensor(pairs[0].source)[None]
            edit(bundle, warm, [pairs[0].source_prompt], [pairs[0].target_prompt], replace(cfg, steps=2))
            if bundle.device.type == "cuda":
                torch.cuda.synchronize()
            rows[name] = run_edits(bundle, pairs, cfg, args.batch) | {"config": to_plain(cfg)}
            log.info("%s %s: IoU %.3f success %.3f", spec, name, rows[name]["iou"], rows[name]["success"])
            if all(k in rows for k in (DEFAULT_ROW, DIFFEDIT_ROW, SDEDIT_ROW)):
                res["models"][spec]["goals"] = goals(rows)
            res["seconds"] = time.perf_counter() - t0
            out.write_text(json.dumps(res, indent=2, default=str) + "\n")
            out.with_suffix(".md").write_text(markdown(res))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
