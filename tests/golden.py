"""Golden outputs: fixed seeds and inputs, recorded output values (the diffusers ``expected_slice`` habit).

Each case runs one editor (or the batch job) through its public entry point and summarises the result as
plain numbers: a strided slice of the output images, per-image means, the exact mask bits, the UNet call
count and the extras that a refactor could silently change. ``tests/test_golden.py`` compares the summaries
with ``tests/golden_values.json``.

Recording is explicit and never happens in a test run::

    python tests/golden.py --record            # all cases
    python tests/golden.py --record tiny-sdedit  # some cases

A commit that re-records values must say why the numbers changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

VALUES = Path(__file__).with_name("golden_values.json")
ATOL = 1e-4  # images in [-1, 1]; float32 on the CPU
RTOL = 1e-4


# ---- inputs (built here, not with the project's converters, so a converter change cannot hide) -----------------
def _pairs(n: int, seed: int, size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    from instdiff.synthetic import make_edit_pairs

    pairs = make_edit_pairs(n, seed=seed, size=size)
    images = torch.stack(
        [
            torch.from_numpy(np.ascontiguousarray(p.source.image, np.float32)).permute(2, 0, 1) / 127.5 - 1.0
            for p in pairs
        ]
    )
    return images, [p.source_prompt for p in pairs], [p.target_prompt for p in pairs]


_BUNDLES: dict[str, Any] = {}


def _bundle(name: str) -> Any:
    if name not in _BUNDLES:
        from instdiff.models import load_bundle, tiny_bundle

        if name == "tiny":
            _BUNDLES[name] = tiny_bundle(seed=0, with_inpaint=True)
        else:
            _BUNDLES[name] = load_bundle("default", device="cpu", dtype="fp32")
    return _BUNDLES[name]


# ---- summaries ---------------------------------------------------------------------------------------------------
def _floats(x: Any) -> list:
    return np.round(np.asarray(x, dtype=np.float64), 7).tolist()


def _bits(mask: torch.Tensor) -> str:
    return np.packbits(mask.detach().cpu().numpy().astype(bool), axis=None).tobytes().hex()


def summarize_result(res: Any) -> dict[str, Any]:
    """An EditResult as numbers: images (B, 3, H, W) strided to a 4×4 grid, means, mask bits, UNet calls."""
    images, masks = res.images.float().cpu(), res.masks.cpu()
    step = max(1, images.shape[-1] // 4)
    out = {
        "shape": list(images.shape),
        "image_slice": _floats(images[:, :, step // 2 :: step, step // 2 :: step]),
        "image_mean": _floats(images.mean(dim=(1, 2, 3))),
        "image_abs_mean": _floats(images.abs().mean(dim=(1, 2, 3))),
        "mask_shape": list(masks.shape),
        "mask_bits": _bits(masks),
        "mask_sum": [int(m.sum()) for m in masks],
        "unet_calls": float(res.unet_calls),
    }
    extras = res.extras or {}
    if "position" in extras:
        out["position"] = _floats(extras["position"])
        out["mask_area_per_step"] = _floats(extras["mask_area_per_step"])
        out["attention_downsample"] = int(extras["attention_downsample"])
    if "rows" in extras:  # FISEdit prompt pairs
        out["rows"] = [
            {
                "active_fraction": {str(k): round(float(v), 7) for k, v in sorted(r["active_fraction"].items())},
                "macs_ratio": round(float(r["macs"]["ratio"]), 5),
                "mask_source": r["mask_source"],
                "dense_steps": int(r["dense_steps"]),
                "sparse_steps": int(r["sparse_steps"]),
                "changed": bool(r["changed"]),
            }
            for r in extras["rows"]
        ]
        src = extras["source_images"].float()
        out["source_slice"] = _floats(src[:, :, step // 2 :: step, step // 2 :: step])
    if "active_fraction" in extras:  # one FISEdit session edit
        out["active_fraction"] = {str(k): round(float(v), 7) for k, v in sorted(extras["active_fraction"].items())}
        out["macs_ratio"] = round(float(extras["macs"]["ratio"]), 5)
        out["dense_steps"] = int(extras["dense_steps"])
        out["sparse_steps"] = int(extras["sparse_steps"])
    return out


# ---- editor cases ------------------------------------------------------------------------------------------------
def _editor_case(model: str, method: str, **cfg_kw: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        from instdiff.editing import EditConfig, Method, edit, generate

        bundle = _bundle(model)
        size = 32 if model == "tiny" else 64
        steps = 6 if model == "tiny" else 10
        images, src, tgt = _pairs(2, seed=5, size=size)
        base = dict(method=Method(method), steps=steps, strength=0.5, guidance=5.0, n_noises=2, diffedit_noises=2)
        cfg = EditConfig(**{**base, **cfg_kw})
        if method == "fisedit":  # FISEdit edits its own generations of the source prompts
            images = generate(bundle, src, steps=cfg.steps, guidance=cfg.guidance, seeds=[3, 4])
        return summarize_result(edit(bundle, images, src, tgt, cfg, seeds=[3, 4]))

    return run


def _official_options_case() -> dict[str, Any]:
    """InstDiffEdit with the official code's variants on, latent-blend inpainting and edit-word prompts."""
    from instdiff.editing import EditConfig, Inpaint, PromptMode, edit
    from instdiff.masks import MaskConfig, Refinement

    bundle = _bundle("tiny")
    images, src, tgt = _pairs(2, seed=7, size=32)
    mask = MaskConfig(
        phi=0.3,
        refinement=Refinement.OFFICIAL,
        invert_start=True,
        running_mean=True,
        smooth_resolution=16,
        smooth_iters=2,
    )
    cfg = EditConfig(
        steps=8,
        strength=0.6,
        guidance=7.5,
        n_noises=3,
        mask=mask,
        inpaint=Inpaint.BLEND,
        prompt_mode=PromptMode.EDIT_WORDS,
        inpaint_steps=4,
        seed=11,
    )
    return summarize_result(edit(bundle, images, src, tgt, cfg))


def _generate_case() -> dict[str, Any]:
    from instdiff.editing import generate

    images = generate(
        _bundle("tiny"), ["a red circle on a gray background", "a blue square"], steps=5, guidance=7.5, seeds=[1, 2]
    )
    return {
        "shape": list(images.shape),
        "image_slice": _floats(images[:, :, 4::8, 4::8]),
        "image_mean": _floats(images.mean(dim=(1, 2, 3))),
    }


def _session_case() -> dict[str, Any]:
    """FISEdit session: generate, then edit with a caller-given mask (all sparse) and with the difference mask."""
    from instdiff.sparse import FISEditConfig, FISEditSession

    bundle = _bundle("tiny")
    session = FISEditSession(bundle, FISEditConfig(num_steps=8, guidance_scale=5.0, mask_steps=3, mask_from=1))
    image, cache = session.generate("a red circle on a gray background", seed=9)
    given = torch.zeros(32, 32, dtype=torch.bool)
    given[8:20, 4:16] = True
    with_mask = session.edit(cache, "a blue circle on a gray background", mask=given)
    found = session.edit(cache, "a red square on a gray background")
    return {
        "generated_slice": _floats(image[:, :, 4::8, 4::8]),
        "given_mask": summarize_result(with_mask),
        "difference_mask": summarize_result(found),
    }


def _batch_case() -> dict[str, Any]:
    """The bulk job's stages in one process on 4 rows (one with a corrupt image), embedded model."""
    import io

    import pyarrow as pa
    from PIL import Image

    from pipelines import schema as S
    from pipelines.batch import run_in_process
    from pipelines.config import parse_config
    from pipelines.make_dataset import shapes_table

    rows = shapes_table(4, seed=21, size=64).to_pylist()
    rows[2][S.IMAGE] = b"\x89PNG\r\n\x1a\n truncated"
    table = pa.Table.from_pylist(rows, schema=S.INPUT_SCHEMA)
    cfg = parse_config(
        {
            "input": "unused",
            "output": "unused",
            "seed": 4,
            "model": {"spec": "default", "device": "cpu", "dtype": "fp32"},
            "method": {"name": "instdiffedit", "steps": 10, "n_noises": 2, "guidance": 5.0},
            "actors": {"batch_size": 2},
        }
    )
    out = run_in_process(cfg, table, threads=None).to_pylist()
    summary = []
    for row in sorted(out, key=lambda r: r[S.ID]):
        item = {
            k: row[k]
            for k in (S.ID, S.STATUS, S.ERROR, S.NOTES, S.METHOD, S.MODEL, S.SEED, S.WIDTH, S.HEIGHT, S.BATCH_ROWS)
        }
        for k in (S.IOU, S.C_M, S.C_NON, S.MASK_AREA, S.CHANGE_INSIDE_PRED, S.UNET_CALLS):
            item[k] = None if row[k] is None else round(float(row[k]), 6)
        if row[S.EDITED] is not None:
            edited = np.asarray(Image.open(io.BytesIO(row[S.EDITED])).convert("RGB"), dtype=np.int64)
            mask = np.asarray(Image.open(io.BytesIO(row[S.PRED_MASK])).convert("L")) > 0
            item["edited_slice"] = edited[8::16, 8::16].tolist()
            item["edited_sum"] = int(edited.sum())
            item["pred_mask_bits"] = np.packbits(mask, axis=None).tobytes().hex()
        summary.append(item)
    return {"rows": summary}


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    **{f"tiny-{m}": _editor_case("tiny", m) for m in ("instdiffedit", "diffedit", "sdedit", "fisedit")},
    "tiny-instdiffedit-official": _official_options_case,
    "tiny-generate": _generate_case,
    "tiny-fisedit-session": _session_case,
    **{f"default-{m}": _editor_case("default", m) for m in ("instdiffedit", "diffedit", "sdedit", "fisedit")},
    "default-batch": _batch_case,
}


# ---- comparison --------------------------------------------------------------------------------------------------
def compare(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Differences between two summaries: floats within ATOL + RTOL·|expected|, everything else exactly."""
    where = path or "<root>"
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(expected) != set(actual):
            got = sorted(actual) if isinstance(actual, dict) else type(actual).__name__
            return [f"{where}: keys {sorted(expected)} != {got}"]
        return [d for k in expected for d in compare(expected[k], actual[k], f"{path}.{k}" if path else k)]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(expected) != len(actual):
            return [f"{where}: length {len(expected)} != {len(actual) if isinstance(actual, list) else actual!r}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out.extend(compare(e, a, f"{where}[{i}]"))
            if len(out) > 10:
                break
        return out
    if isinstance(expected, float) and isinstance(actual, int | float) and not isinstance(actual, bool):
        ok = abs(expected - actual) <= ATOL + RTOL * abs(expected)
        return [] if ok else [f"{where}: expected {expected!r}, got {actual!r}"]
    return [] if expected == actual else [f"{where}: expected {expected!r}, got {actual!r}"]


def load_values() -> dict[str, Any]:
    return json.loads(VALUES.read_text())


def record(names: list[str]) -> None:
    values = load_values() if VALUES.exists() else {}
    torch.set_num_threads(2)
    for name in names or list(CASES):
        print(f"recording {name} ...", file=sys.stderr)
        values[name] = CASES[name]()
    VALUES.write_text(json.dumps(dict(sorted(values.items())), indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="run the cases and write golden_values.json")
    parser.add_argument("--check", action="store_true", help="run the cases and print differences")
    parser.add_argument("cases", nargs="*", help=f"case names (default: all): {', '.join(CASES)}")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; accepted: {', '.join(CASES)}")
    if args.record:
        record(args.cases)
        return 0
    values = load_values()
    bad = 0
    for name in args.cases or list(CASES):
        diffs = compare(values[name], json.loads(json.dumps(CASES[name]())))
        print(f"{name}: {'ok' if not diffs else 'DIFFERS'}")
        for d in diffs:
            print("   ", d)
        bad += bool(diffs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
