"""How well a model's cross-attention maps localise the shapes world's words, and what that allows InstDiffEdit.

    python -m cluster.benchmarks.attention_probe --models default out/shapes-grounding \
        --out docs/results/attention_probe.json

Runs on the CPU (fp32; the embedded model takes about half a minute). For each model, on held-out
*validation* data (seed 10001; the test pairs, seed 10000, are not touched):

1. per cross-attention layer, at timesteps 200 / 500 / 800: the AUC with which the map of an object's shape
   word, colour word and of the start token separates the object's pixels from the rest (0.5 = chance),
   mean over objects; and the share of attention mass on the start token, the caption's words and padding;
2. on edit pairs, the first-step InstDiffEdit mask (paper Eq. 6–9, target prompt, 3 noises, r = 0.5) per
   attention layer set, and an *oracle* mask from the target phrase's own tokens (hand-picked, which the
   method cannot do) at several thresholds: mask IoU against the exact edit mask, overall and per edit kind.
   The oracle bounds what any token selection could get from these maps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from instdiff import synthetic
from instdiff.attention import AttentionSelection, AttentionStore, capture_attention, cross_attention_paths
from instdiff.editing import make_noise
from instdiff.masks import MaskConfig, instdiffedit_mask, iou, steps_for_strength
from instdiff.models import ModelBundle, load_bundle
from pipelines.runinfo import write_report

log = logging.getLogger(__name__)
VALIDATION_SEED = 10_001
ROOT = Path(__file__).resolve().parents[2]


def short(path: str) -> str:
    """A short label for a cross-attention layer's module path.

    Args:
        path: e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor``.

    Returns:
        e.g. ``down_blocks.0.a0`` (block, block index, attention index; ``mid_block.a0`` for the middle block).
    """
    parts = path.split(".")
    return f"{parts[0]}.{parts[1]}.a{parts[3]}" if parts[0] != "mid_block" else "mid_block.a0"


@torch.no_grad()
def layer_maps(
    bundle: ModelBundle, latents: torch.Tensor, prompts: Sequence[str], t: int, n_noises: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Head-averaged cross-attention maps of every layer at one timestep, mean over ``n_noises`` noises.

    Args:
        latents: (B, C, h, w) clean latents of the images.
        prompts: B prompts the UNet is conditioned on.
        t: the timestep the latents are noised to (one UNet call).
        n_noises: noises per image (seeds ``seed + i``, :func:`instdiff.editing.make_noise`).
        seed: first noise seed.

    Returns:
        Short layer label (:func:`short`) → (B, T, h', w') float maps at that layer's resolution.
    """
    b = latents.shape[0]
    noise = make_noise([seed + i for i in range(b)], n_noises, tuple(latents.shape[1:]))
    sched = bundle.fresh_scheduler()
    tt = torch.tensor([t])
    x = sched.add_noise(latents.repeat_interleave(n_noises, 0), noise, tt)
    emb = bundle.encode_prompt(list(prompts)).repeat_interleave(n_noises, 0)
    stores = {p: AttentionStore() for p in cross_attention_paths(bundle.unet)}
    with contextlib.ExitStack() as stack:
        for path, store in stores.items():  # one recorder and store per layer, nested
            stack.enter_context(
                capture_attention(bundle.unet, store, AttentionSelection(downsample=None, paths=(path,)))
            )
        bundle.unet(x, tt, encoder_hidden_states=emb)
    out = {}
    for path, store in stores.items():
        m = store.mean(0)  # (B·n, T, h, w)
        out[short(path)] = m.view(b, n_noises, *m.shape[1:]).mean(1)
    return out


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    pos, neg = scores[positive], scores[~positive]
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


def localisation(bundle: ModelBundle, n_scenes: int, timesteps: Sequence[int]) -> dict[str, Any]:
    """How well each layer's word maps separate an object's pixels from the rest (figure 1 of the module doc).

    Args:
        bundle: the model.
        n_scenes: validation scenes (seed 10001).
        timesteps: timesteps to probe.

    Returns:
        ``{str(t): {layer: {"map", "auc_shape_word", "auc_colour_word", "auc_start_token", "objects",
        "mass_start", "mass_words", "mass_end_and_padding"}}}``; AUCs are means over objects (None without any).
    """
    scenes = synthetic.make_scenes(n_scenes, seed=VALIDATION_SEED, size=bundle.resolution)
    images = torch.stack([synthetic.scene_to_tensor(s) for s in scenes])
    latents = bundle.encode_images(images)
    captions = [s.caption for s in scenes]
    ids = bundle.tokenize(captions)
    words = [[w.removesuffix("</w>") for w in bundle.tokenizer.convert_ids_to_tokens(r.tolist())] for r in ids]
    n_caption = [bundle.token_count(c) for c in captions]
    out: dict[str, Any] = {}
    for t in timesteps:
        maps = layer_maps(bundle, latents, captions, t, 1)
        per_layer = {}
        for name, m in maps.items():
            side = m.shape[-1]
            auc: dict[str, list[float]] = {"shape": [], "colour": [], "start": []}
            for i, s in enumerate(scenes):
                k = 0
                for j in range(1, n_caption[i] - 1):
                    if words[i][j] in synthetic.SHAPES and words[i][j - 1] in synthetic.COLORS and k < len(s.objects):
                        region = torch.from_numpy(s.masks[k]).float()[None, None]
                        k += 1
                        pos = F.adaptive_avg_pool2d(region, side)[0, 0].flatten() > 0.5
                        if pos.all() or not pos.any():
                            continue
                        flat = m[i].flatten(1)
                        auc["shape"].append(_auc(flat[j], pos))
                        auc["colour"].append(_auc(flat[j - 1], pos))
                        auc["start"].append(_auc(flat[0], pos))
            mass = m.flatten(2).mean(-1)  # (B, T) mean probability per token
            n_tok = torch.tensor(n_caption)
            idx = torch.arange(mass.shape[1])[None]
            words_mask = (idx >= 1) & (idx < n_tok[:, None] - 1)
            per_layer[name] = {
                "map": f"{side}x{side}",
                **{
                    f"auc_{key}": float(np.mean(auc[k])) if auc[k] else None
                    for key, k in (("shape_word", "shape"), ("colour_word", "colour"), ("start_token", "start"))
                },
                "objects": len(auc["shape"]),
                "mass_start": float(mass[:, 0].mean()),
                "mass_words": float((mass * words_mask).sum(1).mean()),
                "mass_end_and_padding": float((mass * (idx >= n_tok[:, None] - 1)).sum(1).mean()),
            }
        out[str(t)] = per_layer
    return out


def _layer_sets(names: Sequence[str], maps: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    by_side: dict[int, list[str]] = {}
    for n in names:
        by_side.setdefault(maps[n].shape[-1], []).append(n)
    sides = sorted(by_side, reverse=True)
    sets = {f"all {s}x{s}": by_side[s] for s in sides[:2]}
    if len(sides) > 1:
        sets[f"all {sides[0]}x{sides[0]} + {sides[1]}x{sides[1]}"] = by_side[sides[0]] + by_side[sides[1]]
    return sets


def _combine(maps: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    side = max(maps[n].shape[-1] for n in names)
    return torch.stack([F.interpolate(maps[n], size=(side, side), mode="bilinear") for n in names]).mean(0)


def pair_masks(
    bundle: ModelBundle, n_pairs: int, phis: Sequence[float], strength: float = 0.5, steps: int = 50, n_noises: int = 3
) -> dict[str, Any]:
    """First-step InstDiffEdit masks and oracle masks per layer set vs the exact edit masks (figure 2).

    Args:
        bundle: the model.
        n_pairs: validation edit pairs (seed 10001).
        phis: thresholds of the oracle masks.
        strength: noise strength r; the maps are taken at the edit's first timestep.
        steps: DDIM steps the strength applies to.
        n_noises: noises averaged per image.

    Returns:
        ``{"n_pairs", "timestep", "n_noises", "sets": {label: {"layers", "paper", "oracle": {str(phi): ...}}}}``;
        each score holds the mean ``iou``, ``per_kind`` IoU and ``mask_area``.
    """
    pairs = synthetic.make_edit_pairs(n_pairs, seed=VALIDATION_SEED, size=bundle.resolution)
    images = torch.stack([synthetic.scene_to_tensor(p.source) for p in pairs])
    latents = bundle.encode_images(images)
    latent_hw = tuple(latents.shape[-2:])
    prompts = [p.target_prompt for p in pairs]
    sched = bundle.fresh_scheduler()
    sched.set_timesteps(steps)
    t0 = int(sched.timesteps[-steps_for_strength(steps, strength)])  # first step of the edit at strength r
    maps = layer_maps(bundle, latents, prompts, t0, n_noises)
    n_tok = torch.tensor([bundle.token_count(p) for p in prompts])
    gt = torch.from_numpy(np.stack([p.edit_mask for p in pairs]))[:, None]
    kinds = [p.kind for p in pairs]
    ids = bundle.tokenize(prompts)
    oracle = torch.zeros(len(pairs), ids.shape[1])
    for i, p in enumerate(pairs):
        words = [w.removesuffix("</w>") for w in bundle.tokenizer.convert_ids_to_tokens(ids[i].tolist())]
        phrase = [w for w in p.target_phrase.split() if w not in ("a", "an")]
        last = int(n_tok[i]) - 1
        if p.kind == "background":  # the phrase's words after "on"
            on = words.index("on") if "on" in words[:last] else 0
            hits = [j for j in range(on + 1, last) if words[j] in phrase]
        else:  # the colour + shape pair of the edited object
            hits = next(([j, j + 1] for j in range(1, last - 1) if words[j : j + 2] == phrase), [])
        oracle[i, hits] = 1.0

    def score(mask: torch.Tensor) -> dict[str, Any]:
        up = F.interpolate(mask.float(), size=gt.shape[-2:], mode="nearest") > 0.5
        r = iou(up, gt)
        per = {
            k: float(r[[i for i, kk in enumerate(kinds) if kk == k]].mean()) for k in synthetic.EDIT_KINDS if k in kinds
        }
        return {"iou": float(r.mean()), "per_kind": per, "mask_area": float(mask.float().mean())}

    out: dict[str, Any] = {"n_pairs": len(pairs), "timestep": t0, "n_noises": n_noises, "sets": {}}
    for label, names in _layer_sets(list(maps), maps).items():
        a = _combine(maps, names)
        mk, _, position = instdiffedit_mask(a, n_tok, latent_hw, MaskConfig())
        row = {
            "layers": names,
            "paper": score(mk)
            | {
                "plus_one_tokens": float((position > 0).sum(1).float().mean()),
                "minus_one_tokens": float((position < 0).sum(1).float().mean()),
            },
        }
        row["oracle"] = {
            str(phi): score(instdiffedit_mask(a, n_tok, latent_hw, MaskConfig(phi=phi), oracle)[0]) for phi in phis
        }
        out["sets"][label] = row
    return out


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown page of a report written by :func:`main`.

    Args:
        doc: the JSON report (``machine``, ``commit``, ``created``, ``params``, ``results``).

    Returns:
        The page, ending in a newline.
    """
    lines = [
        "# Cross-attention localisation probe",
        "",
        f"Commit `{doc['commit']}` · {doc['created']} · {doc['machine'].get('cpu')} · "
        f"`{' '.join(doc['params']['argv'])}`",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
    ]
    for model, res in doc["results"].items():
        lines += [
            f"## `{model}`",
            "",
            "### Word maps vs object pixels (AUC; 0.5 = chance)",
            "",
            "| t | layer | map | shape word | colour word | start token | mass start / words / end+pad |",
            "|---|---|---|---|---|---|---|",
        ]
        for t, layers in res["localisation"].items():
            for name, r in layers.items():
                aucs = " | ".join(
                    "–" if r[k] is None else f"{r[k]:.3f}"
                    for k in ("auc_shape_word", "auc_colour_word", "auc_start_token")
                )
                lines.append(
                    f"| {t} | {name} | {r['map']} | {aucs} | {r['mass_start']:.2f} / {r['mass_words']:.2f} / "
                    f"{r['mass_end_and_padding']:.2f} |"
                )
        pm = res["pair_masks"]
        lines += [
            "",
            f"### First-step masks on {pm['n_pairs']} validation pairs (t = {pm['timestep']}, "
            f"{pm['n_noises']} noises): IoU with the exact edit mask",
            "",
            "| layers | mask | IoU | object | colour | background | mask area |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, row in pm["sets"].items():
            p = row["paper"]
            lines.append(
                f"| {label} | InstDiffEdit, paper Eq. 6–9 (+1: {p['plus_one_tokens']:.1f} tokens, −1: "
                f"{p['minus_one_tokens']:.1f}) | **{p['iou']:.3f}** | "
                + " | ".join(f"{p['per_kind'].get(k, float('nan')):.3f}" for k in synthetic.EDIT_KINDS)
                + f" | {p['mask_area']:.2f} |"
            )
            for phi, o in row["oracle"].items():
                lines.append(
                    f"| {label} | oracle: target-phrase tokens, φ {phi} | {o['iou']:.3f} | "
                    + " | ".join(f"{o['per_kind'].get(k, float('nan')):.3f}" for k in synthetic.EDIT_KINDS)
                    + f" | {o['mask_area']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Probe every model on the CPU; write the JSON report and its Markdown page beside it.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0 (the exit status).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default"])
    ap.add_argument("--scenes", type=int, default=48, help="validation scenes for the localisation AUCs")
    ap.add_argument("--pairs", type=int, default=100, help="validation edit pairs for the mask IoUs")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[200, 500, 800])
    ap.add_argument("--phi", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs/results/attention_probe.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    results = {}
    for spec in args.models:
        bundle = load_bundle(spec, device="cpu", dtype="fp32")
        with torch.no_grad():
            results[spec] = {
                "localisation": localisation(bundle, args.scenes, args.timesteps),
                "pair_masks": pair_masks(bundle, args.pairs, args.phi),
            }
        log.info("%s done", spec)
    params = {k: v for k, v in vars(args).items() if k != "out"}
    params["argv"] = list(argv if argv is not None else sys.argv[1:])
    params["wall_s"] = round(time.perf_counter() - t0, 1)
    path = write_report(args.out, params, results)
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
