"""FISEdit sparse UNet benchmark: dense vs sparse UNet step time and MACs at fixed edit sizes.

For an SD-1.5-shaped and an SD-2-shaped UNet built from config (random weights: timing does not depend on
them), at each image size: record the cache of one dense step (source conditioning), then time one UNet step
with a perturbed conditioning (the "edited prompt") dense (original UNet, no engine) and sparse, with a
rectangular edit region covering exactly round(f·h·w) latent pixels for each edit size f. Also a profile of
where the time goes per layer type (conv / norm / attention / ff / gather / other), dense and sparse.

Writes JSON (machine, commit, parameters, results) and a Markdown table. Depends on torch + diffusers + the repo:

    python -m cluster.benchmarks.sparse --device cpu --sizes 256 512 --out docs/results/sparse-cpu.json
    python -m cluster.benchmarks.sparse --device cuda --sizes 512 768 --out docs/results/sparse-gpu.json
    python -m cluster.benchmarks.sparse --config configs/bench/sparse-gpu.yaml      # the same, from YAML
    python -m cluster.benchmarks.sparse --mask-quality                             # cross-attention control
    python -m cluster.benchmarks.sparse --render docs/results/sparse-cpu.json docs/results/sparse-gpu.json \
        --md docs/results/sparse.md                                                 # one page from several runs
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from instdiff.config import load_yaml
from instdiff.errors import InstdiffError
from instdiff.sparse import ActivationCache, SparseConfig, SparseMode, apply_sparse, remove_sparse
from pipelines.runinfo import write_report

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]

# UNet configs of Stable Diffusion 1.5 and 2 (diffusers' unet/config.json of the public checkpoints)
SD_COMMON: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
MODELS: dict[str, dict[str, Any]] = {
    "sd15": dict(SD_COMMON, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(
        SD_COMMON,
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
}


def build_unet(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A Stable Diffusion UNet of the given shape with random weights, in eval mode without gradients.

    Args:
        name: ``sd15`` or ``sd2`` (a key of :data:`MODELS`).
        device: where the UNet goes.
        dtype: its parameter dtype.
        seed: torch seed of the random weights.

    Returns:
        A ``diffusers.UNet2DConditionModel``.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**MODELS[name])
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def rect_mask(h: int, w: int, fraction: float, rows: int, device: torch.device) -> torch.Tensor:
    """An edit region of an exact size: a centred near-square, filled column-wise.

    Args:
        h: latent height.
        w: latent width.
        fraction: share of the h·w pixels to set.
        rows: batch rows (all the same mask).
        device: where the mask goes.

    Returns:
        (rows, h, w) bool with exactly max(1, round(fraction·h·w)) pixels set.
    """
    area = max(1, round(fraction * h * w))
    side = max(1, min(h, math.isqrt(area)))
    cols = math.ceil(area / side)
    flat = torch.zeros(side * cols, dtype=torch.bool)
    flat[:area] = True
    box = flat.view(cols, side).t()  # column-major fill: (side, cols)
    m = torch.zeros(h, w, dtype=torch.bool)
    y0, x0 = (h - side) // 2, (w - cols) // 2
    m[y0 : y0 + side, x0 : x0 + cols] = box
    return m.expand(rows, -1, -1).contiguous().to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Any, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised).

    Args:
        fn: the call to time (no arguments).
        device: its device (synchronised after each call on CUDA).
        reps: timed calls.
        warmup: untimed calls first.

    Returns:
        ``reps`` durations in seconds.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def graph_time(fn: Any, device: torch.device, reps: int) -> list[float] | None:
    """Times of ``fn`` captured once in a CUDA graph and replayed (no kernel-launch overhead).

    Warm-up runs on a side stream first (plans and index tensors are built there, outside the capture).

    Args:
        fn: the call to capture (no arguments).
        device: a CUDA device.
        reps: timed replays (after 2 untimed ones).

    Returns:
        ``reps`` durations in seconds, or None when the capture fails (logged as a warning).
    """
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = time_call(graph.replay, device, reps, 2)
        del graph
        return times
    except RuntimeError as exc:  # capture is an optimisation of the measurement, not a requirement
        log.warning("CUDA graph capture failed: %s", exc)
        return None


def bench_model_size(
    name: str,
    unet: Any,
    size: int,
    fractions: list[float],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Dense vs sparse step time and MACs of one UNet at one image size, for each edit size.

    Steps: 1. dense baseline (no engine); 2. install the engine and record one source step; 3. sparse steps at
    each edit size (interleaved with dense steps on the CPU when ``args.interleave``); 4. optional profile.

    Args:
        name: the model's name (``sd15`` / ``sd2``).
        unet: the UNet (the engine is installed and removed again).
        size: image side in pixels (latent side = size / 8).
        fractions: edit sizes as shares of the latent pixels.
        args: the benchmark's options (batch, reps, warm-up, engine settings, profile and graph switches).
        device: the UNet's device.
        dtype: the UNet's dtype.

    Returns:
        (one result row per edit size, the profile ``{"dense": ms by category, "sparse_N%": ...}`` or ``{}``).
    """
    h = w = size // 8
    rows = args.batch
    cad = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(size)
    x = torch.randn(rows, 4, h, w, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    emb_src = torch.randn(rows, 77, cad, generator=g).to(device, dtype)
    emb_tgt = (emb_src.float() + 0.1 * torch.randn(rows, 77, cad, generator=g).to(device)).to(dtype)

    def call(emb: torch.Tensor) -> Any:
        return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    results: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    with torch.inference_mode():
        # 1. dense baseline: the original UNet, no engine installed
        dense_t = time_call(lambda: call(emb_tgt), device, 0 if args.interleave else args.reps, args.warmup)
        dense_s = statistics.median(dense_t) if dense_t else float("nan")
        dense_g = graph_time(lambda: call(emb_tgt), device, args.reps) if args.cuda_graphs else None
        log.info(
            "%s %dpx dense %s ms (graph %s)",
            name,
            size,
            "-" if args.interleave else f"{1e3 * dense_s:.1f}",
            f"{1e3 * statistics.median(dense_g):.1f} ms" if dense_g else "-",
        )
        # 2. install, record one step of the source run
        cfg = SparseConfig(
            mode=SparseMode.SPARSE, min_resolution_ratio=args.min_resolution_ratio, dense_fraction=args.dense_fraction
        )
        state = apply_sparse(unet, cfg)
        cache = ActivationCache(device, args.cache_budget)
        state.bind(cache)
        with state.run_step(0, record=True):
            call(emb_src)
        _sync(device)
        cache_bytes = cache.nbytes()

        # engine installed, dense step: the wrappers' own overhead
        def dense_engine() -> None:
            with state.run_step(0):
                call(emb_tgt)

        engine_dense_s = float("nan")
        if args.overhead_reps:
            engine_dense_s = statistics.median(time_call(dense_engine, device, args.overhead_reps, 0))
        # 3. sparse steps at each edit size
        masks = {f: rect_mask(h, w, f, rows, device) for f in fractions}

        def sparse_step() -> None:
            with state.run_step(0, sparse=True):
                call(emb_tgt)

        sparse_t: dict[float, list[float]] = {f: [] for f in fractions}
        sparse_g: dict[float, list[float] | None] = {}
        macs_of: dict[float, dict[str, Any]] = {}
        plans_of: dict[float, dict[str, Any]] = {}
        fractions_of: dict[float, dict[str, float]] = {}
        for f in fractions:
            state.set_mask(masks[f])
            for _ in range(args.warmup):
                sparse_step()
            state.reset_counters()  # MACs of one step
            sparse_step()
            macs_of[f], plans_of[f], fractions_of[f] = state.macs_summary(), state.plans(), state.active_fractions()
            if not args.interleave:
                sparse_t[f] = time_call(sparse_step, device, args.reps, 0)
            sparse_g[f] = graph_time(sparse_step, device, args.reps) if args.cuda_graphs else None
        if args.interleave:
            # a loaded shared CPU: alternate dense (original UNet) and sparse steps, keep the fastest of each
            dense_t = []
            for _ in range(args.reps):
                remove_sparse(unet)
                dense_t += time_call(lambda: call(emb_tgt), device, 1, 0)
                state = apply_sparse(unet, cfg)
                state.bind(cache)
                for f in fractions:
                    state.set_mask(masks[f])
                    sparse_t[f] += time_call(sparse_step, device, 1, 0)
            dense_s = min(dense_t)
        for f in fractions:
            mask, macs, sparse_s = masks[f], macs_of[f], _stat(sparse_t[f], args.interleave)
            blocks: dict[str, list[Any]] = {}
            for key, plan in plans_of[f].items():
                res = key.rsplit("@", 1)[1]
                if plan != "tokens":
                    blocks.setdefault(res, []).append(plan)
            g = sparse_g[f]
            row = {
                "model": name,
                "size": size,
                "latent": h,
                "batch": rows,
                "dtype": str(dtype).replace("torch.", ""),
                "edit_fraction": f,
                "mask_pixels": int(mask[0].sum()),
                "mask_fraction": float(mask[0].float().mean()),
                "statistic": "min" if args.interleave else "median",
                "dense_ms": 1e3 * dense_s,
                "dense_ms_all": [1e3 * v for v in dense_t],
                "engine_dense_ms": 1e3 * engine_dense_s,
                "sparse_ms": 1e3 * sparse_s,
                "sparse_ms_all": [1e3 * v for v in sparse_t[f]],
                "speedup": dense_s / sparse_s,
                "dense_graph_ms": 1e3 * statistics.median(dense_g) if dense_g else None,
                "sparse_graph_ms": 1e3 * statistics.median(g) if g else None,
                "speedup_graph": statistics.median(dense_g) / statistics.median(g) if dense_g and g else None,
                "dense_gmacs": macs["dense"] / 1e9,
                "sparse_gmacs": macs["actual"] / 1e9,
                "macs_ratio": macs["ratio"],
                "macs_by_category": {k: {kk: vv / 1e9 for kk, vv in v.items()} for k, v in macs["by_category"].items()},
                "active_fraction": fractions_of[f],
                "block_sizes": {res: sorted(set(map(str, v))) for res, v in blocks.items()},
                "cache_bytes_per_step": cache_bytes,
            }
            results.append(row)
            log.info(
                "%s %dpx %.0f%%: sparse %.1f ms (%.2fx; graph %s), MACs %.2fx, blocks %s",
                name,
                size,
                100 * f,
                1e3 * sparse_s,
                row["speedup"],
                f"{row['sparse_graph_ms']:.1f} ms {row['speedup_graph']:.2f}x" if row["speedup_graph"] else "-",
                row["macs_ratio"],
                row["block_sizes"],
            )
        remove_sparse(unet)
        # 4. profile: per-layer-type times, dense and sparse (synchronised timers; slower than the runs above)
        if args.profile and (not args.profile_sizes or size in args.profile_sizes):
            state = apply_sparse(
                unet,
                SparseConfig(
                    mode=SparseMode.PROFILE,
                    min_resolution_ratio=args.min_resolution_ratio,
                    dense_fraction=args.dense_fraction,
                ),
            )
            state.bind(cache)
            state.reset_counters()
            with state.run_step(0):
                call(emb_tgt)
            profile["dense"] = _times_ms(state)
            for f in args.profile_fractions:
                state.set_mask(rect_mask(h, w, f, rows, device))
                with state.run_step(0, sparse=True):  # warm-up (plans, indices)
                    call(emb_tgt)
                state.reset_counters()
                with state.run_step(0, sparse=True):
                    call(emb_tgt)
                profile[f"sparse_{round(100 * f)}%"] = _times_ms(state)
            remove_sparse(unet)
        del cache
    return results, profile


def mask_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Does cross-attention control make the difference mask tighter? (FISEdit §"Target Area Capture".)

    On shapes-world prompt pairs (a colour or shape change of one object): generate the source prompt, take the
    difference mask of the edit's first k steps, and compare it at latent resolution with two "true changed
    regions": (1) ``object``: the pixels of the edited object in the source generation, found by the analytic
    shapes detector (:mod:`instdiff.scorer`); pairs whose object the model did not draw are skipped;
    (2) ``regen``: where the full dense re-generation with the target prompt (the paper's SDTP baseline, from the
    same initial latents; with the control over its first k steps when the control is on) differs from the
    source generation, Σ_c|Δ| of the final latents above its Otsu threshold. Without and with the control.

    Args:
        args: the benchmark's options (``mq_model``, ``mq_pairs``, ``mq_steps``, ``mq_mask_steps``,
            ``mq_guidance``).

    Returns:
        The settings, one row per pair and setting (``pairs``), and the means ``without_control`` /
        ``with_control``.
    """
    import numpy as np

    from instdiff import scorer, synthetic
    from instdiff.imageio import from_model_tensor
    from instdiff.masks import iou
    from instdiff.models import load_bundle
    from instdiff.sparse import FISEditConfig, FISEditSession, latent_difference, otsu_threshold, pool_any

    bundle = load_bundle(args.mq_model, device="cpu", dtype="fp32")
    pairs = synthetic.make_edit_pairs(args.mq_pairs, seed=0, size=bundle.resolution, kinds=("colour", "object"))
    out: dict[str, Any] = {
        "model": bundle.name,
        "steps": args.mq_steps,
        "mask_steps": args.mq_mask_steps,
        "guidance": args.mq_guidance,
        "pairs": [],
    }
    for control in (False, True):
        cfg = FISEditConfig(
            num_steps=args.mq_steps,
            guidance_scale=args.mq_guidance,
            mask_steps=args.mq_mask_steps,
            mask_from=max(1, args.mq_mask_steps // 2),
            cross_attention_control=control,
        )
        session = FISEditSession(bundle, cfg)
        for i, pair in enumerate(pairs):
            image, run = session.generate(pair.source_prompt, seed=i)
            res = session.edit(run, pair.target_prompt)
            mask = res.extras["mask_latent"][:, 0]  # (1, h, w)
            h, w = mask.shape[-2:]
            _, regen = session.regenerate(run, pair.target_prompt)
            diff = latent_difference(regen, run.latents(cfg.num_steps))  # (1, h, w)
            changed = diff > otsu_threshold(diff)[:, None, None]
            u8 = from_model_tensor(image)[0]
            phrase = scorer.parse_phrase(pair.source_phrase)
            found = [d for d in scorer.find_objects(u8) if d.color == phrase.color and d.kind == phrase.shape]
            row: dict[str, Any] = {
                "control": control,
                "pair": pair.id,
                "kind": pair.kind,
                "source": pair.source_prompt,
                "target": pair.target_prompt,
                "mask_area": float(mask.float().mean()),
                "iou_regen": float(iou(mask, changed)[0]),
                "regen_area": float(changed.float().mean()),
            }
            if found:
                obj = torch.from_numpy(np.any([d.mask for d in found], axis=0))[None]
                obj_lat = pool_any(obj, (h, w))
                row.update(iou_object=float(iou(mask, obj_lat)[0]), object_area=float(obj_lat.float().mean()))
            out["pairs"].append(row)
            log.info(
                "mask quality control=%s %s (%s): IoU object %s, regen %.3f; mask area %.2f",
                control,
                pair.id,
                pair.kind,
                f"{row['iou_object']:.3f}" if "iou_object" in row else "-",
                row["iou_regen"],
                row["mask_area"],
            )
    # averages over the pairs whose object was found in both settings' source generations (same seeds: same image)
    for control in (False, True):
        rows = [r for r in out["pairs"] if r["control"] == control]
        with_obj = [r for r in rows if "iou_object" in r]
        out["with_control" if control else "without_control"] = {
            "pairs": len(rows),
            "pairs_with_object": len(with_obj),
            "iou_object": statistics.mean(r["iou_object"] for r in with_obj) if with_obj else None,
            "iou_regen": statistics.mean(r["iou_regen"] for r in rows),
            "mask_area": statistics.mean(r["mask_area"] for r in rows),
            "object_area": statistics.mean(r["object_area"] for r in with_obj) if with_obj else None,
            "regen_area": statistics.mean(r["regen_area"] for r in rows),
        }
    return out


def _stat(times: list[float], fastest: bool) -> float:
    return min(times) if fastest else statistics.median(times)


def _times_ms(state: Any) -> dict[str, float]:
    total = sum(state.step_times)
    times = {k: 1e3 * v for k, v in state.times.items()}
    times["other"] = max(0.0, 1e3 * total - sum(v for k, v in times.items() if k != "other"))
    times["total"] = 1e3 * total
    return times


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown page of a timing report (table of runs, profile, engine overhead).

    Args:
        doc: the JSON report of a timing run (``machine``, ``commit``, ``created``, ``params``, ``results``).

    Returns:
        The page.
    """
    m = doc["machine"]
    p = doc["params"]
    lines = [
        "# FISEdit sparse UNet: dense vs sparse",
        "",
        f"Machine: {m.get('gpu') or m.get('cpu')} · torch {m.get('torch')} · diffusers {m.get('diffusers')} · "
        f"threads {m.get('torch_threads')} · commit `{doc['commit']}` · {doc['created']} · load average at the end "
        f"{p.get('load_average')}",
        "",
        f"Device {p['device']}, dtype {p['dtype']}, batch {p['batch']} (rows of one UNet call), "
        f"{p['reps']} timed reps after {p['warmup']} warm-up "
        f"({'fastest of dense / sparse steps interleaved' if p.get('interleave') else 'median'}), random weights, "
        "one step at t=500. "
        "Edit region: a centred rectangle of exactly round(f·h·w) latent pixels. Dense = the original UNet "
        "(no engine). MACs counted analytically per op from shapes (convs, linears, attention matmuls).",
        "",
        "| model | size | edit | dense ms/step | sparse ms/step | speedup | graphed dense / sparse ms | graphed "
        "speedup | dense GMACs | sparse GMACs | MACs ratio | block sizes (per map) | cache MB/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]["runs"]:
        blocks = "; ".join(f"{k}: {','.join(v)}" for k, v in r["block_sizes"].items())
        graphed = "–"
        graphed_speedup = "–"
        if r.get("speedup_graph"):
            graphed = f"{r['dense_graph_ms']:.1f} / {r['sparse_graph_ms']:.1f}"
            graphed_speedup = f"**{r['speedup_graph']:.2f}×**"
        lines.append(
            f"| {r['model']} | {r['size']} | {100 * r['edit_fraction']:.0f}% | {r['dense_ms']:.1f} | "
            f"{r['sparse_ms']:.1f} | **{r['speedup']:.2f}×** | {graphed} | {graphed_speedup} | "
            f"{r['dense_gmacs']:.1f} | {r['sparse_gmacs']:.1f} | {r['macs_ratio']:.2f}× | {blocks} | "
            f"{r['cache_bytes_per_step'] / 2**20:.0f} |"
        )
    prof = doc["results"].get("profile", {})
    if prof:
        cats = ["conv", "norm", "attention", "ff", "gather", "other", "total"]
        lines += [
            "",
            "## Where the time goes (profile mode, ms per step, synchronised per op)",
            "",
            "| model | size | run | " + " | ".join(cats) + " |",
            "|---|---|---|" + "---|" * len(cats),
        ]
        for key, runs in prof.items():
            model, size = key.split("@")
            for run, times in runs.items():
                cells = " | ".join(f"{times.get(c, 0):.1f}" for c in cats)
                lines.append(f"| {model} | {size} | {run} | {cells} |")
    first = doc["results"]["runs"][0]["edit_fraction"] if doc["results"]["runs"] else None
    overhead = ", ".join(
        f"{r['model']}@{r['size']} {r['engine_dense_ms']:.1f} ms vs {r['dense_ms']:.1f} ms"
        for r in doc["results"]["runs"]
        if r["edit_fraction"] == first and r["engine_dense_ms"] == r["engine_dense_ms"]  # not NaN
    )
    if overhead:
        lines += ["", f"Engine installed but every layer dense (wrapper overhead): {overhead}"]
    lines.append("")
    return "\n".join(lines)


def render(paths: list[str], md: Path) -> Path:
    """One Markdown page from several result files (timing runs and the mask-quality run).

    Args:
        paths: JSON reports written by :func:`main`.
        md: the page to write (parent folders are created).

    Returns:
        ``md``.
    """
    parts = [
        "# FISEdit sparse re-generation: results",
        "",
        "Produced by `cluster/benchmarks/sparse.py` (see its docstring); one section per result file.",
        "",
        "## Summary at 5% edit size (the paper: 3.4× U-Net calls/s on an A100, SD 2 at 768 px, CFG batch)",
        "",
        "`min res` is the engine's `min_resolution_ratio`: feature maps smaller than this fraction of the latent "
        "side stay dense (0.5, the default: SD's 16×16 and 8×8 maps at 512 px; 0: every map sparse). Timing "
        "uses random weights; what sparse low-resolution maps cost in image quality was not measured on trained "
        "SD weights (none are reachable here), so the `min res 0` rows are speed figures only.",
        "",
        "| file | device | model | size | min res | speedup | graphed speedup | MACs ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    docs = [(p, json.loads(Path(p).read_text())) for p in paths]
    for p, doc in docs:
        for r in doc["results"].get("runs", []):
            if abs(r["edit_fraction"] - 0.05) < 1e-9:
                g = f"{r['speedup_graph']:.2f}×" if r.get("speedup_graph") else "–"
                dev = doc["machine"].get("gpu") or doc["machine"].get("cpu")
                ratio = doc["params"].get("min_resolution_ratio", "?")
                parts.append(
                    f"| {Path(p).name} | {dev} | {r['model']} | {r['size']} | {ratio} | {r['speedup']:.2f}× | "
                    f"{g} | {r['macs_ratio']:.2f}× |"
                )
    parts.append("")
    for p, doc in docs:
        parts.append(f"## `{Path(p).name}`")
        if "runs" in doc["results"]:
            parts += markdown(doc).split("\n")[1:]
        else:
            parts += mask_quality_markdown(doc).split("\n")[1:]
        parts.append("")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(parts))
    return md


def mask_quality_markdown(doc: dict[str, Any]) -> str:
    """The Markdown page of a ``--mask-quality`` report.

    Args:
        doc: the JSON report of :func:`mask_quality`'s run.

    Returns:
        The page, ending in a newline.
    """
    r = doc["results"]
    lines = [
        "# Difference mask with / without cross-attention control",
        "",
        f"Model `{r['model']}`, {r['steps']} DDIM steps, guidance {r['guidance']}, mask from the first "
        f"{r['mask_steps']} steps; commit `{doc['commit']}`. IoU at latent resolution.",
        "",
        "| control | pairs | pairs with object found | IoU vs object | IoU vs re-generation change | mask area | "
        "object area | re-generation change area |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    for key in ("without_control", "with_control"):
        a = r[key]
        lines.append(
            f"| {key.replace('_', ' ')} | {a['pairs']} | {a['pairs_with_object']} | {fmt(a['iou_object'])} | "
            f"{fmt(a['iou_regen'])} | {fmt(a['mask_area'])} | {fmt(a['object_area'])} | "
            f"{fmt(a['regen_area'])} |"
        )
    return "\n".join(lines) + "\n"


def _config_defaults(argv: list[str] | None) -> dict[str, Any]:
    """Option values from ``--config FILE.yaml`` (keys are option names, dashes or underscores).

    Raises:
        InputNotFoundError: the file does not exist.
        ConfigError: not valid YAML, or not a mapping.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return {}
    data = load_yaml(known.config, "benchmark config")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def main(argv: list[str] | None = None) -> int:
    """Render, measure mask quality, or time dense vs sparse UNet steps (the default); write the reports.

    Args:
        argv: command-line options (``None``: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0 (the exit status).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="YAML file of option values (command-line options win)")
    ap.add_argument("--render", nargs="+", default=None, help="only write --md from these result JSON files")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 / fp16 / bf16 (default: fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--models", nargs="+", default=["sd15", "sd2"], choices=sorted(MODELS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--edit-sizes", nargs="+", type=float, default=[0.05, 0.15, 0.30])
    ap.add_argument("--batch", type=int, default=None, help="UNet batch rows (default: 2 = CFG on cuda, 1 on cpu)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="alternate dense and sparse steps and keep the fastest (default on the CPU, a shared "
        "machine); otherwise the median of consecutive reps",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-resolution-ratio", type=float, default=SparseConfig().min_resolution_ratio)
    ap.add_argument("--dense-fraction", type=float, default=SparseConfig().dense_fraction)
    ap.add_argument("--cache-budget", type=int, default=None, help="bytes of accelerator memory for the cache")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="on cuda, also time dense and sparse steps captured in CUDA graphs (default on)",
    )
    ap.add_argument("--profile-fractions", nargs="+", type=float, default=[0.05])
    ap.add_argument("--profile-sizes", nargs="+", type=int, default=None, help="profile only these sizes")
    ap.add_argument(
        "--overhead-reps",
        type=int,
        default=1,
        help="timed dense steps with the engine installed (wrapper overhead); 0 skips",
    )
    ap.add_argument(
        "--mask-quality",
        action="store_true",
        help="instead of timing: IoU of the difference mask with / without cross-attention control",
    )
    ap.add_argument("--mq-model", default="default", help="bundle for --mask-quality (default: embedded or tiny)")
    ap.add_argument("--mq-pairs", type=int, default=12)
    ap.add_argument("--mq-steps", type=int, default=25)
    ap.add_argument("--mq-mask-steps", type=int, default=5)
    ap.add_argument("--mq-guidance", type=float, default=5.0)
    ap.add_argument(
        "--commit",
        default=None,
        help="commit to record when the working tree has no git metadata (e.g. a copy on a GPU host)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--md",
        default=None,
        help="Markdown table path (default: docs/results/sparse.md for cpu, the JSON path with .md otherwise)",
    )
    try:
        defaults = _config_defaults(argv)
    except InstdiffError as exc:
        ap.error(str(exc))
    unknown = sorted(set(defaults) - {a.dest for a in ap._actions})
    if unknown:
        ap.error(f"unknown keys in --config: {', '.join(unknown)}")
    ap.set_defaults(**defaults)
    args = ap.parse_args(argv)
    if args.render:
        path = render(args.render, Path(args.md or ROOT / "docs/results/sparse.md"))
        print(path)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    ]
    args.batch = args.batch or (2 if device.type == "cuda" else 1)
    args.cuda_graphs = args.cuda_graphs and device.type == "cuda"
    args.interleave = device.type == "cpu" if args.interleave is None else args.interleave
    args.reps = args.reps or (10 if device.type == "cuda" else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mask_quality:
        t0 = time.perf_counter()
        res = mask_quality(args)
        params = {k: v for k, v in vars(args).items() if k.startswith("mq_")}
        params["wall_s"] = time.perf_counter() - t0
        path = write_report(args.out or ROOT / "docs/results/sparse-mask-quality.json", params, res)
        Path(args.md or path.with_suffix(".md")).write_text(mask_quality_markdown(json.loads(path.read_text())))
        log.info("wrote %s: without control %s, with control %s", path, res["without_control"], res["with_control"])
        return 0
    out = Path(args.out or ROOT / f"docs/results/sparse-{device.type}.json")
    default_md = ROOT / "docs/results/sparse.md" if device.type == "cpu" else out.with_suffix(".md")
    md = Path(args.md) if args.md else default_md
    runs: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    t0 = time.perf_counter()
    params = {k: v for k, v in vars(args).items() if k not in ("out", "md")}
    params["dtype"] = str(dtype).replace("torch.", "")
    unets = {name: build_unet(name, device, dtype) for name in args.models}
    for size in args.sizes:  # all models at one size before the next size: partial results stay comparable
        for name, unet in unets.items():
            rows, prof = bench_model_size(name, unet, size, args.edit_sizes, args, device, dtype)
            runs.extend(rows)
            if prof:
                profiles[f"{name}@{size}"] = prof
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            params["wall_s"] = time.perf_counter() - t0
            params["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            extra = {"commit": args.commit} if args.commit else {}
            path = write_report(out, params, {"runs": runs, "profile": profiles}, **extra)  # after every run
            md.parent.mkdir(parents=True, exist_ok=True)
            md.write_text(markdown(json.loads(path.read_text())))
    del unets
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown(json.loads(path.read_text())))
    log.info("wrote %s and %s (%.0f s)", path, md, params["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
