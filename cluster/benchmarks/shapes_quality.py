"""Quality of the embedded shapes-world model on held-out scenes and edit pairs; writes JSON and Markdown.

    python -m cluster.benchmarks.shapes_quality --out docs/results/shapes_quality.json

Figures (all on data the training never saw: training used scene seeds 0..9999, this uses 10000+):

1. scorer accuracy on clean rendered scenes and on their VAE reconstructions, and the VAE's PSNR;
2. generation fidelity: share of images generated from held-out captions in which the scorer finds every
   captioned object (goal ≥ 0.8);
3. optional sweep of InstDiffEdit's attention resolution / φ / prompt mode on *validation* pairs (seed
   10001), masks only;
4. on the *test* pairs (seed 10000): mask IoU against the exact edit mask (InstDiffEdit goal ≥ 0.5; the
   paper reports 0.562 with SD 1.4), edit success (the target phrase is found inside the edit region) and
   C_non (mean |Δ|/255 outside it) for InstDiffEdit with the model's recommended settings (instdiff.json),
   InstDiffEdit with the paper's, DiffEdit and SDEdit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instdiff import synthetic
from instdiff.config import to_plain
from instdiff.editing import EditConfig, Inpaint, Method, PromptMode, edit, generate
from instdiff.imageio import from_model_tensor
from instdiff.masks import MaskConfig, iou
from instdiff.metrics import change_outside_mask
from instdiff.models import ModelBundle, load_bundle
from instdiff.runinfo import git_commit, machine_info
from instdiff.scorer import estimate_background, find_objects, phrase_present, scorer_accuracy

log = logging.getLogger(__name__)

TEST_PAIR_SEED = 10_000
VALIDATION_PAIR_SEED = 10_001
SCORER_SCENE_SEED = 10_002
GENERATION_SCENE_SEED = 10_003
GOALS = {"generation_fidelity": 0.8, "instdiffedit_iou": 0.5}
PAPER_IOU_SD14 = 0.562


METHODS = ("instdiffedit", "instdiffedit_paper", "diffedit", "sdedit")
METHODS_HELP = (
    "instdiffedit: the model's recommended settings (instdiff.json, EditConfig.for_model preset 'model'); "
    "instdiffedit_paper: the paper's Eq. 6-9 and loop (preset 'paper'); diffedit; sdedit"
)


def method_config(name: str, defaults: dict[str, Any], steps: int, guidance: float) -> EditConfig:
    """The settings one row of the edit table runs with (:meth:`EditConfig.for_model`).

    Args:
        name: one of :data:`METHODS`.
        defaults: the model folder's ``instdiff.json`` (empty for SD checkpoints: then both InstDiffEdit rows
            are the paper's).
        steps: DDIM steps.
        guidance: classifier-free guidance scale.

    Returns:
        The config.
    """
    if name == "instdiffedit_paper":
        return EditConfig.for_model(defaults, "paper", steps=steps, guidance=guidance)
    return EditConfig.for_model(defaults, "model", method=name, steps=steps, guidance=guidance)


def _batches(n: int, size: int) -> list[range]:
    """Consecutive index ranges of at most ``size`` covering ``range(n)``."""
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


# ---- figures ---------------------------------------------------------------------------------
@torch.no_grad()
def vae_and_scorer(bundle: ModelBundle, n_scenes: int, batch: int) -> dict[str, Any]:
    """Scorer accuracy on clean held-out scenes and on their VAE reconstructions; the VAE's PSNR.

    Args:
        bundle: the model.
        n_scenes: held-out scenes (seed 10002).
        batch: images per VAE call.

    Returns:
        ``{"scenes_seed", "clean", "vae_reconstructions", "vae_psnr_db"}``: the two
        :func:`instdiff.scorer.scorer_accuracy` results and the mean PSNR in dB (8-bit pixels).
    """
    scenes = synthetic.make_scenes(n_scenes, seed=SCORER_SCENE_SEED, size=bundle.resolution)
    recon: list[np.ndarray] = []
    psnr: list[float] = []
    for idx in _batches(len(scenes), batch):
        x = torch.stack([synthetic.scene_to_tensor(scenes[i]) for i in idx])
        rec = from_model_tensor(bundle.decode_latents(bundle.encode_images(x)))
        for i, r in zip(idx, rec, strict=True):
            mse = max(1e-10, float(((r.astype(np.float64) - scenes[i].image) ** 2).mean()))
            psnr.append(10 * np.log10(255.0**2 / mse))
        recon += list(rec)
    return {
        "scenes_seed": SCORER_SCENE_SEED,
        "clean": scorer_accuracy(scenes),
        "vae_reconstructions": scorer_accuracy(scenes, recon),
        "vae_psnr_db": float(np.mean(psnr)),
    }


def generation_fidelity(
    bundle: ModelBundle, n: int, steps: int, guidance: float, batch: int, seed: int = GENERATION_SCENE_SEED
) -> dict[str, Any]:
    """Share of generated images (held-out captions) in which every captioned object is found.

    Args:
        bundle: the model.
        n: captions (scenes of ``seed``), one image each (noise seed = index).
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        batch: images per generation call.
        seed: shapes-world seed of the captions.

    Returns:
        Shares of images with every object found, of objects found and of right background colours, the goal
        and the settings, and the seconds taken.
    """
    scenes = synthetic.make_scenes(n, seed=seed, size=bundle.resolution)
    all_found = bg_ok = 0
    per_object = []
    t0 = time.perf_counter()
    for idx in _batches(n, batch):
        images = from_model_tensor(
            generate(bundle, [scenes[i].caption for i in idx], steps=steps, guidance=guidance, seeds=list(idx))
        )
        for i, img in zip(idx, images, strict=True):
            found = {(d.color, d.kind) for d in find_objects(img)}
            hits = [(o.color, o.kind) in found for o in scenes[i].objects]
            per_object += hits
            all_found += int(all(hits))
            bg_ok += int(estimate_background(img).color == scenes[i].background)
    return {
        "n": n,
        "scenes_seed": seed,
        "steps": steps,
        "guidance": guidance,
        "all_objects_found": all_found / n,
        "objects_found": float(np.mean(per_object)),
        "background_colour_correct": bg_ok / n,
        "goal": GOALS["generation_fidelity"],
        "seconds": time.perf_counter() - t0,
    }


def run_edits(
    bundle: ModelBundle, pairs: Sequence[synthetic.EditPair], cfg: EditConfig, batch: int, score: bool = True
) -> dict[str, Any]:
    """Edit every pair with ``cfg``; mask IoU, edit success, source removal and C_non, overall and per kind.

    IoU is :func:`instdiff.masks.iou` against the exact edit mask; C_non is
    :func:`instdiff.metrics.change_outside_mask` (InstDiffEdit appendix, Eq. III) outside it.

    Args:
        bundle: the model.
        pairs: edit pairs (noise seed = index).
        cfg: the editor's settings.
        batch: pairs per edit call.
        score: also run the scorer (success, source removal) and C_non; otherwise masks only.

    Returns:
        :func:`summarize_rows` of the per-pair rows plus ``seconds_per_image`` and ``unet_calls_per_image``.
    """
    rows: list[dict[str, Any]] = []
    seconds = 0.0
    calls = 0.0
    for idx in _batches(len(pairs), batch):
        part = [pairs[i] for i in idx]
        images = torch.stack([synthetic.scene_to_tensor(p.source) for p in part])
        t0 = time.perf_counter()
        res = edit(
            bundle, images, [p.source_prompt for p in part], [p.target_prompt for p in part], cfg, seeds=list(idx)
        )
        seconds += time.perf_counter() - t0
        calls = res.unet_calls
        edited = from_model_tensor(res.images)
        masks = res.masks[:, 0].cpu()  # (B, H, W) bool
        ious = iou(masks, torch.from_numpy(np.stack([p.edit_mask for p in part])))
        for p, img, m, m_iou in zip(part, edited, masks.numpy(), ious.tolist(), strict=True):
            row: dict[str, Any] = {"kind": p.kind, "iou": m_iou, "mask_area": float(m.mean())}
            if score:
                dets = find_objects(img)
                row["success"] = phrase_present(img, p.target_phrase, region=p.edit_mask, detections=dets)
                row["source_removed"] = not phrase_present(img, p.source_phrase, region=p.edit_mask, detections=dets)
                row["c_non"] = float(change_outside_mask(p.source.image, img, p.edit_mask)[0])
            rows.append(row)
    return summarize_rows(rows) | {"seconds_per_image": seconds / len(pairs), "unet_calls_per_image": calls}


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of the per-pair figures (NaN ignored), overall and per edit kind.

    Args:
        rows: per-pair dicts with ``kind`` and some of ``iou``, ``success``, ``source_removed``, ``c_non``,
            ``mask_area`` (the keys of the first row are averaged).

    Returns:
        ``{"n", <key>: mean, ..., "per_kind": {kind: {"n", <key>: mean, ...}}}``.
    """
    keys = [k for k in ("iou", "success", "source_removed", "c_non", "mask_area") if k in rows[0]]

    def mean(rs: Sequence[dict[str, Any]]) -> dict[str, float]:
        return {k: float(np.nanmean([float(r[k]) for r in rs])) for k in keys}

    out: dict[str, Any] = {"n": len(rows), **mean(rows)}
    out["per_kind"] = {
        kind: {"n": len(rs), **mean(rs)}
        for kind in synthetic.EDIT_KINDS
        if (rs := [r for r in rows if r["kind"] == kind])
    }
    return out


def sweep(
    bundle: ModelBundle,
    pairs: Sequence[synthetic.EditPair],
    base: EditConfig,
    batch: int,
    downsamples: Sequence[int],
    phis: Sequence[float],
    modes: Sequence[PromptMode],
) -> list[dict[str, Any]]:
    """InstDiffEdit mask IoU (no inpainting, no scoring) over attention resolution × φ × prompt mode.

    Args:
        bundle: the model.
        pairs: validation edit pairs.
        base: the settings the grid varies.
        batch: pairs per edit call.
        downsamples: attention downsample factors.
        phis: mask thresholds φ.
        modes: prompt modes.

    Returns:
        One row per grid point: its settings, the mean ``iou`` and ``per_kind_iou``.
    """
    out = []
    for f in downsamples:
        for phi in phis:
            for mode in modes:
                cfg = base.with_(
                    attention_downsample=f, mask=replace(base.mask, phi=phi), prompt_mode=mode, inpaint=Inpaint.NONE
                )
                r = run_edits(bundle, pairs, cfg, batch, score=False)
                out.append(
                    {
                        "attention_downsample": f,
                        "phi": phi,
                        "prompt_mode": mode.value,
                        "iou": r["iou"],
                        "per_kind_iou": {k: v["iou"] for k, v in r["per_kind"].items()},
                    }
                )
                log.info("sweep f=%d phi=%.2f mode=%s: IoU %.3f", f, phi, mode.value, r["iou"])
    return out


# ---- report ----------------------------------------------------------------------------------
EDIT_ROW_KEYS = ("iou", "success", "source_removed", "c_non", "seconds_per_image", "unet_calls_per_image", "per_kind")


def load_earlier(path: str) -> dict[str, Any]:
    """An earlier run's results JSON, checked for the edit table :func:`markdown` tabulates from it.

    Args:
        path: a JSON file this benchmark wrote.

    Returns:
        The parsed document (its ``edits`` section holds ``n_pairs`` and per-method rows with
        :data:`EDIT_ROW_KEYS`).

    Raises:
        ValueError: the problem in a few words (missing, not JSON, no such edit table).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError("does not exist")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"is not readable JSON ({exc})") from None
    edits = data.get("edits") if isinstance(data, dict) else None
    methods = edits.get("methods") if isinstance(edits, dict) else None
    if not isinstance(methods, dict) or not methods or not isinstance(edits.get("n_pairs"), int):
        raise ValueError(
            "holds no edit table (expected an 'edits' section with 'n_pairs' and 'methods', as this benchmark writes)"
        )
    bad = [m for m, r in methods.items() if not isinstance(r, dict) or any(k not in r for k in EDIT_ROW_KEYS)]
    if bad:
        raise ValueError(
            f"has an edit row without the benchmark's figures: {bad[0]!r} (needs {', '.join(EDIT_ROW_KEYS)})"
        )
    return data


def edits_table(e: dict[str, Any]) -> list[str]:
    """The edit table and the per-kind table of one ``edits`` section (Markdown lines).

    Args:
        e: ``res["edits"]`` of this or an earlier run.

    Returns:
        Markdown lines, ending with an empty line.
    """
    lines = [
        "| method | mask IoU | edit success | source removed | C_non | s / image | UNet calls |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in e["methods"].items():
        lines.append(
            f"| {m} | {r['iou']:.3f} | {r['success']:.3f} | {r['source_removed']:.3f} | "
            f"{r['c_non']:.4f} | {r['seconds_per_image']:.3f} | {r['unet_calls_per_image']:.0f} |"
        )
    lines += [
        "",
        "Per edit kind (IoU / success):",
        "",
        "| method | " + " | ".join(synthetic.EDIT_KINDS) + " |",
        "| --- |" + " --- |" * len(synthetic.EDIT_KINDS),
    ]
    for m, r in e["methods"].items():
        cells = [
            f"{r['per_kind'][k]['iou']:.3f} / {r['per_kind'][k]['success']:.3f}" if k in r["per_kind"] else "-"
            for k in synthetic.EDIT_KINDS
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(res: dict[str, Any], earlier: dict[str, dict[str, Any]] | None = None) -> str:
    """A short Markdown report of the JSON result.

    Args:
        res: the result written by :func:`main` (the sections present so far).
        earlier: earlier runs' documents by path (:func:`load_earlier`), tabulated after this run's edits.

    Returns:
        The Markdown page.
    """
    lines = [
        f"# Shapes-world quality ({res['model']})",
        "",
        f"Machine: {res['machine'].get('gpu', res['machine']['device'])}, commit {res['git_commit']}, "
        f"{res['seconds']:.0f} s. Held-out data only (training used scene seeds < 10000).",
        "",
    ]
    if "scorer" in res:
        s = res["scorer"]
        lines += [
            "## Scorer and VAE",
            "",
            "| images | objects | object acc. | background acc. | texture acc. |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ("clean", "vae_reconstructions"):
            a = s[name]
            lines.append(
                f"| {name} | {a['objects']} | {a['object_accuracy']:.3f} | {a['background_accuracy']:.3f} | "
                f"{a['texture_accuracy']:.3f} |"
            )
        lines += ["", f"VAE PSNR on held-out scenes: {s['vae_psnr_db']:.2f} dB.", ""]
    if "generation" in res:
        g = res["generation"]
        lines += [
            "## Generation fidelity",
            "",
            f"{g['n']} held-out captions, {g['steps']} DDIM steps, guidance {g['guidance']}: every captioned "
            f"object found in **{g['all_objects_found']:.3f}** of the images (goal ≥ {g['goal']}); "
            f"{g['objects_found']:.3f} of all objects; background colour right in "
            f"{g['background_colour_correct']:.3f}.",
            "",
        ]
    if "guidance_sweep" in res:
        lines += [
            "## Generation fidelity over guidance (validation captions, seed 10001)",
            "",
            "| guidance | every object found | objects found | background colour right |",
            "| --- | --- | --- | --- |",
        ]
        for g in res["guidance_sweep"]:
            lines.append(
                f"| {g['guidance']} | {g['all_objects_found']:.3f} | {g['objects_found']:.3f} | "
                f"{g['background_colour_correct']:.3f} |"
            )
        lines.append("")
    if "sweep" in res:
        lines += [
            "## InstDiffEdit mask sweep (validation pairs, seed 10001)",
            "",
            "| attention downsample | φ | prompt | IoU |",
            "| --- | --- | --- | --- |",
        ]
        for r in res["sweep"]:
            lines.append(f"| {r['attention_downsample']} | {r['phi']} | {r['prompt_mode']} | {r['iou']:.3f} |")
        lines.append("")
    if "edits" in res:
        e = res["edits"]
        lines += [f"## Edits ({e['n_pairs']} test pairs, seed {e['pairs_seed']})", "", *edits_table(e)]
        lines += [
            f"InstDiffEdit IoU goal ≥ {GOALS['instdiffedit_iou']} (paper, SD 1.4 on Editing-Mask: "
            f"{PAPER_IOU_SD14}). SDEdit's mask is the whole image.",
            "",
        ]
    for path, doc in (earlier or {}).items():
        e = doc["edits"]
        lines += [
            f"## Earlier run: [{Path(path).name}]({Path(path).name}) ({e['n_pairs']} test pairs)",
            "",
            f"Commit `{doc.get('git_commit', '?')}`; kept for comparison.",
            "",
            *edits_table(e),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the figures not skipped; rewrite the JSON and Markdown reports after each one.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0 (the exit status).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec (default: the embedded shapes model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--pairs", type=int, default=200, help="test edit pairs (seed 10000)")
    ap.add_argument("--captions", type=int, default=200, help="held-out captions for generation fidelity")
    ap.add_argument("--scorer-scenes", type=int, default=300, help="held-out scenes for the scorer (≥ 500 objects)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's, else 50)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, else 7.5)")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--sweep-pairs", type=int, default=0, help="validation pairs for the mask sweep (0 = no sweep)")
    ap.add_argument("--sweep-downsample", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sweep-phi", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    ap.add_argument("--sweep-prompt", nargs="+", default=["full", "edit_words"])
    ap.add_argument(
        "--guidance-sweep",
        type=float,
        nargs="*",
        default=[],
        help="also measure generation fidelity at these guidance scales on validation captions",
    )
    ap.add_argument("--guidance-sweep-captions", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help=METHODS_HELP)
    ap.add_argument("--skip", nargs="*", default=[], choices=["scorer", "generation", "edits"])
    ap.add_argument("--out", default="docs/results/shapes_quality.json")
    ap.add_argument("--md", default=None, help="Markdown report (default: --out with .md)")
    ap.add_argument("--earlier", nargs="*", default=[], help="results JSON of earlier runs, tabulated for comparison")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    earlier: dict[str, dict[str, Any]] = {}
    for path in args.earlier:  # read once, before anything runs: a bad file must not surface after the edits
        try:
            earlier[path] = load_earlier(path)
        except ValueError as exc:
            ap.error(f"--earlier: {path} {exc}")

    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = Path(args.md) if args.md else out.with_suffix(".md")

    def write(res: dict[str, Any]) -> None:
        res["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        md.write_text(markdown(res, earlier))

    bundle = load_bundle(args.model, device=args.device, dtype=args.dtype)
    steps = args.steps or int(bundle.defaults.get("steps", 50))
    guidance = args.guidance if args.guidance is not None else float(bundle.defaults.get("guidance", 7.5))
    base = EditConfig.for_model(bundle.defaults, "paper", steps=steps, guidance=guidance)
    res: dict[str, Any] = {
        "model": args.model,
        "model_defaults": bundle.defaults,
        "machine": machine_info(bundle.device) | {"dtype": str(bundle.dtype)},
        "git_commit": git_commit(),
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "edit_config": json.loads(json.dumps(asdict(base), default=str)),
        "earlier": list(args.earlier),
    }
    # 1. scorer and VAE
    if "scorer" not in args.skip:
        res["scorer"] = vae_and_scorer(bundle, args.scorer_scenes, args.batch * 4)
        log.info("scorer: %s", res["scorer"])
        write(res)
    # 2. sweeps on validation data: guidance for generation, then mask settings
    if args.guidance_sweep:
        res["guidance_sweep"] = [
            generation_fidelity(
                bundle, args.guidance_sweep_captions, steps, g, args.batch * 4, seed=VALIDATION_PAIR_SEED
            )
            for g in args.guidance_sweep
        ]
        write(res)
    if args.sweep_pairs:
        val = synthetic.make_edit_pairs(args.sweep_pairs, seed=VALIDATION_PAIR_SEED, size=bundle.resolution)
        res["sweep"] = sweep(
            bundle,
            val,
            base,
            args.batch,
            args.sweep_downsample,
            args.sweep_phi,
            [PromptMode(m) for m in args.sweep_prompt],
        )
        write(res)
    # 3. edits on test pairs: paper defaults (φ 0.2, full prompt) at the attention resolution that was best on
    #    the validation pairs (else the model's default); plus the best validation setting when it differs
    if "edits" not in args.skip:
        pairs = synthetic.make_edit_pairs(args.pairs, seed=TEST_PAIR_SEED, size=bundle.resolution)
        configs = {name: method_config(name, bundle.defaults, steps, guidance) for name in args.methods}
        if "sweep" in res and "instdiffedit_paper" in configs:
            paper = [r for r in res["sweep"] if r["phi"] == MaskConfig().phi and r["prompt_mode"] == "full"]
            best = max(res["sweep"], key=lambda r: r["iou"])
            if paper:
                f = max(paper, key=lambda r: r["iou"])["attention_downsample"]
                configs["instdiffedit_paper"] = configs["instdiffedit_paper"].with_(attention_downsample=f)
            if paper and (best["phi"], best["prompt_mode"]) != (MaskConfig().phi, "full"):
                configs["instdiffedit_paper_tuned"] = base.with_(
                    method=Method.INSTDIFFEDIT,
                    attention_downsample=best["attention_downsample"],
                    mask=replace(base.mask, phi=best["phi"]),
                    prompt_mode=PromptMode(best["prompt_mode"]),
                )
        methods: dict[str, Any] = {}
        res["edits"] = {"n_pairs": len(pairs), "pairs_seed": TEST_PAIR_SEED, "methods": methods}
        for name, cfg in configs.items():
            methods[name] = run_edits(bundle, pairs, cfg, args.batch)
            methods[name]["config"] = to_plain(cfg)
            log.info("%s: %s", name, {k: v for k, v in methods[name].items() if k != "per_kind"})
            write(res)
    # 4. generation fidelity
    if "generation" not in args.skip:
        res["generation"] = generation_fidelity(bundle, args.captions, steps, guidance, args.batch * 4)
        log.info("generation: %s", res["generation"])
        write(res)
    write(res)
    log.info("wrote %s and %s", out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
