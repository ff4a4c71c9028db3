"""Editors side by side on the same shapes-world pairs and model: UNet evaluations per image, wall time
per image, and mask IoU against the exact edit masks. Writes JSON (and a Markdown table beside it).

    python -m cluster.benchmarks.editors --model default --n 32 --out docs/results/editors.json

Settings come from the model folder (``EditConfig.for_model``: its steps-independent defaults such as guidance
and, for ``instdiffedit``, its recommended variant); ``instdiffedit-paper`` is the paper's InstDiffEdit.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from instdiff.editing import EditConfig, Method, edit
from instdiff.masks import iou
from instdiff.models import load_bundle
from instdiff.synthetic import image_to_tensor, make_edit_pairs
from pipelines.runinfo import write_report

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> Path:
    """Run every method on the same pairs; write the JSON report and a Markdown table beside it.

    Each method is warmed up on one pair (2 steps) so that one-time costs are not timed.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        Path of the JSON report (the table is the same path with ``.md``).
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=32, help="edit pairs (held-out seed range)")
    ap.add_argument("--seed", type=int, default=10_000, help="shapes-world seed of the pairs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["instdiffedit", "instdiffedit-paper", "diffedit", "sdedit"],
        help="editors; instdiffedit uses the model folder's instdiff.json (EditConfig.for_model), "
        "instdiffedit-paper the paper's Eq. 6-9 and loop",
    )
    ap.add_argument("--out", default="docs/results/editors.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    bundle = load_bundle(args.model, device=args.device)
    size = bundle.resolution
    pairs = make_edit_pairs(args.n, seed=args.seed, size=size)
    images = torch.stack([image_to_tensor(p.source.image) for p in pairs])
    gt = torch.stack([torch.from_numpy(p.edit_mask) for p in pairs]).unsqueeze(1)
    results = {}
    for name in args.methods:
        preset = "paper" if name.endswith("-paper") else "model"
        method = Method(name.removesuffix("-paper"))
        cfg = EditConfig.for_model(bundle.defaults, preset, method=method, steps=args.steps, strength=args.strength)
        # warm-up on one pair so one-time costs (allocations, kernel selection) are not timed
        edit(bundle, images[:1], [pairs[0].source_prompt], [pairs[0].target_prompt], cfg.with_(steps=2))
        ious, calls, t0 = [], [], time.perf_counter()
        for i in range(0, len(pairs), args.batch):
            chunk = pairs[i : i + args.batch]
            r = edit(
                bundle,
                images[i : i + len(chunk)],
                [p.source_prompt for p in chunk],
                [p.target_prompt for p in chunk],
                cfg,
                seeds=list(range(i, i + len(chunk))),
            )
            ious += iou(r.masks, gt[i : i + len(chunk)]).tolist()
            calls.append(r.unet_calls)
        wall = time.perf_counter() - t0
        by_kind: dict[str, list[float]] = {}
        for p, v in zip(pairs, ious, strict=True):
            by_kind.setdefault(p.kind, []).append(v)
        results[name] = {
            "unet_calls_per_image": sum(calls) / len(calls),
            "seconds_per_image": wall / len(pairs),
            "mask_iou_mean": sum(ious) / len(ious),
            "mask_iou_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        }
        log.info("%s: %s", name, results[name])
    params = {k: v for k, v in vars(args).items() if k != "out"} | {
        "model_name": bundle.name,
        "image_size": size,
        "device": str(bundle.device),
        "dtype": str(bundle.dtype),
    }
    out = write_report(args.out, params, results)
    rows = ["| method | UNet evals / image | s / image | mask IoU |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['unet_calls_per_image']:.0f} | {r['seconds_per_image']:.3f} | {r['mask_iou_mean']:.3f} |"
        )
    Path(out).with_suffix(".md").write_text(
        f"Editors on {args.n} shapes-world pairs (seed {args.seed}), model `{bundle.name}` at {size} px, "
        f"{args.steps} steps, r = {args.strength}, {bundle.device}.\n\n" + "\n".join(rows) + "\n"
    )
    print("\n".join(rows))
    return out


if __name__ == "__main__":
    main()
