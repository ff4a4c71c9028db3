"""Local means local: how much of an input outside the edit mask survives an edit made at a smaller working size.

For each input size and method, one edit on the embedded model (a red circle on a gray background → "a blue
circle"), then the same working-size result brought back to the input's size two ways, side by side:

* ``resample`` — the whole image resized back (:func:`instdiff.imageio.undo_fit`, the earlier behaviour);
* ``composite`` — pasted onto the original pixels (:func:`instdiff.composite.restore`).

Figures per way: mean |Δ| (in /255 units) outside the predicted mask, outside the mask dilated by the feather,
and the fraction of pixels changed there. Writes JSON and a Markdown table beside it.

    python -m cluster.benchmarks.composite --out docs/results/composite.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from instdiff.composite import feather_alpha, restore
from instdiff.config import EditConfig, Method
from instdiff.editing import edit, size_multiple
from instdiff.imageio import fit_to_multiple, from_model_tensor, to_model_tensor, undo_fit
from instdiff.models import load_bundle
from pipelines.runinfo import write_report

log = logging.getLogger(__name__)

SOURCE, TARGET = "a red circle", "a blue circle"


def circle_image(w: int, h: int, background: str = "textured", seed: int = 0) -> np.ndarray:
    """A red disc (diameter 45 % of the shorter side, centred) on gray, drawn anti-aliased by Pillow.

    ``flat``: a uniform mid-gray background. ``textured``: a photo-like one, mid gray with a diagonal gradient
    (±20) and grain (Gaussian noise σ = 24, blurred with radius 1 px), so it has detail that a 64 px working
    size cannot carry.
    """
    scale = 4
    if background == "flat":
        bg = Image.new("RGB", (w, h), (128, 128, 128))
    else:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w]
        base = 128 + 20 * ((xx / max(w - 1, 1) + yy / max(h - 1, 1)) - 1.0)
        grain = Image.fromarray(np.clip(128 + rng.normal(0, 24, (h, w, 3)), 0, 255).astype(np.uint8))
        grain_arr = np.asarray(grain.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64) - 128
        bg = Image.fromarray(np.clip(np.rint(base[..., None] + grain_arr), 0, 255).astype(np.uint8))
    big = bg.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    r = 0.225 * min(w, h) * scale
    cx, cy = w * scale / 2, h * scale / 2
    disc = Image.new("L", big.size, 0)
    ImageDraw.Draw(disc).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    alpha = disc.resize((w, h), Image.Resampling.BOX)
    return np.asarray(Image.composite(Image.new("RGB", (w, h), (220, 30, 30)), bg, alpha), dtype=np.uint8).copy()


def _change(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> dict[str, float | None]:
    if not region.any():
        return {"mean_abs": None, "changed_fraction": None}
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))[region]  # (N, 3)
    return {"mean_abs": round(float(d.mean()), 4), "changed_fraction": round(float((d.max(axis=1) > 0).mean()), 5)}


def main(argv: list[str] | None = None) -> Path:
    """Edit each size with each method; write the JSON report and a Markdown table beside it.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        Path of the JSON report (the table is the same path with ``.md``).
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--sizes", nargs="+", default=["640x480", "97x61", "33x200"], help="input sizes WxH")
    ap.add_argument("--backgrounds", nargs="+", default=["textured", "flat"], choices=["textured", "flat"])
    ap.add_argument("--methods", nargs="+", default=["instdiffedit", "diffedit", "sdedit"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--feather", type=int, default=EditConfig.feather)
    ap.add_argument("--out", default="docs/results/composite.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    bundle = load_bundle(args.model, device="cpu", dtype="fp32")
    rows = []
    for size, background in ((s, b) for b in args.backgrounds for s in args.sizes):
        w, h = (int(v) for v in size.lower().split("x"))
        original = circle_image(w, h, background)
        prepared = fit_to_multiple(original, size_multiple(bundle), "resize", bundle.resolution)
        for name in args.methods:
            cfg = EditConfig(method=Method(name), steps=args.steps, feather=args.feather)
            result = edit(bundle, to_model_tensor(prepared.array), [SOURCE], [TARGET], cfg)
            t0 = time.perf_counter()
            ((out, mask),) = restore(result, [original], [prepared], cfg)
            seconds = time.perf_counter() - t0
            before = undo_fit(from_model_tensor(result.images)[0], prepared)
            outside, beyond = ~mask, feather_alpha(mask, cfg.feather) == 0
            rows.append(
                {
                    "size": f"{w}x{h}",
                    "background": background,
                    "working": f"{prepared.array.shape[1]}x{prepared.array.shape[0]}",
                    "method": name,
                    "mask_area": round(float(mask.mean()), 4),
                    "resample": {"outside_mask": _change(before, original, outside)},
                    "composite": {
                        "outside_mask": _change(out, original, outside),
                        "outside_feathered_mask": _change(out, original, beyond),
                        "inside_mask_equals_upsampled_edit": bool(np.array_equal(out[mask], before[mask])),
                        "seconds": round(seconds, 4),
                    },
                }
            )
            log.info("%s %s: %s", size, name, rows[-1])
    params = {
        "model": bundle.name,
        "source": SOURCE,
        "target": TARGET,
        "steps": args.steps,
        "feather": args.feather,
        "size_policy": "resize",
        "working_side": bundle.resolution,
    }
    path = write_report(args.out, params, rows)
    lines = [
        f"# Local means local ({bundle.name}, {args.steps} steps, feather {args.feather} px)",
        "",
        f"'{SOURCE}' → '{TARGET}' on a red disc over gray (flat, or textured like a photo), edited at the "
        "working size and brought back to the input's size. Mean |Δ| in /255 units against the input; "
        "*changed* is the fraction of pixels with any channel changed.",
        "",
        "| input | background | working | method | mask area | resample: mean abs Δ outside mask | resample: changed "
        "| composite: mean abs Δ outside mask | composite: changed | composite: mean abs Δ beyond feather "
        "| composite: changed beyond feather | inside = upsampled edit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        a, c = r["resample"]["outside_mask"], r["composite"]
        lines.append(
            f"| {r['size']} | {r['background']} | {r['working']} | {r['method']} | {r['mask_area']} | {a['mean_abs']} "
            f"| {a['changed_fraction']} | {c['outside_mask']['mean_abs']} | {c['outside_mask']['changed_fraction']} "
            f"| {c['outside_feathered_mask']['mean_abs']} | {c['outside_feathered_mask']['changed_fraction']} "
            f"| {c['inside_mask_equals_upsampled_edit']} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
