"""What a training run leaves next to its weights: the loss log and plot, the sample grid, the generation probe
and ``training_summary.json``.

A continued run (``init_from``) extends the earlier run's loss log and summary, so the files always cover the
model's whole training history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instdiff import synthetic
from instdiff.imageio import from_model_tensor
from instdiff.models import ModelBundle
from instdiff.runinfo import git_commit, machine_info
from instdiff.training.config import HELD_OUT_SEED, SCENES_PER_CHUNK, TrainConfig
from instdiff.training.networks import count_parameters
from instdiff.training.stages import LossLog

SUMMARY_FILE = "training_summary.json"
LOSSES_FILE = "losses.json"
LOSS_PLOT = "loss.png"
SAMPLE_GRID = "samples.png"


def plot_losses(
    stages_losses: Mapping[str, Sequence[Sequence[float]]], path: Path, resumed_at: Mapping[str, int] | None = None
) -> Path:
    """One panel per stage, log-scale loss against step; a dashed line where a continued run started.

    Args:
        stages_losses: per stage (``vae``, ``unet``, ``inpaint``), the (step, loss) points.
        path: the PNG to write.
        resumed_at: per stage, the first step of the continued run (see :func:`merge_losses`).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("vae", "unet", "inpaint") if stages_losses.get(s)]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4.2 * max(1, len(stages)), 3.2))
    axes = np.atleast_1d(axes)
    titles = {"vae": "VAE (L1 + L2 + KL)", "unet": "text encoder + UNet (ε MSE)", "inpaint": "inpainting UNet (ε MSE)"}
    for ax, stage in zip(axes, stages, strict=False):
        steps, values = zip(*stages_losses[stage], strict=True)
        ax.plot(steps, values, lw=1.2)
        if resumed_at and stage in resumed_at:
            ax.axvline(resumed_at[stage], ls="--", color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(titles[stage], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], captions: Sequence[str], path: Path) -> Path:
    """A grid of images: one row per (label, images), the column captions printed below the figure.

    Args:
        rows: ``(row label, images)`` with images (H, W, 3) uint8; shorter rows leave blank cells.
        captions: one caption per column, listed under the grid with the column number.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(imgs) for _, imgs in rows)
    text_h = 0.11 * len(captions) + 0.2  # inches for the caption list
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.25 * n_cols + 1.2, 1.3 * len(rows) + text_h), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(str(c), fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=8)
    text = "\n".join(f"{i}: {c}" for i, c in enumerate(captions))
    fig.text(0.01, 0.005, text, fontsize=6.5, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, text_h / (1.3 * len(rows) + text_h), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge_losses(
    previous: Mapping[str, Sequence[Sequence[float]]] | None, current: Mapping[str, Sequence[tuple[int, float]]]
) -> tuple[dict[str, list], dict[str, int]]:
    """Loss history over an earlier run and this one, this run's steps shifted past the earlier run's.

    Args:
        previous: the earlier run's ``losses.json`` (per stage, [step, loss] pairs), or ``None``.
        current: this run's :attr:`LossLog.stages`.

    Returns:
        ``(merged history per stage, first shifted step per continued stage)``.
    """
    merged: dict[str, list] = {k: [list(p) for p in v] for k, v in (previous or {}).items()}
    resumed_at: dict[str, int] = {}
    for stage, points in current.items():
        offset = int(merged[stage][-1][0]) + 1 if merged.get(stage) else 0
        if offset:
            resumed_at[stage] = offset
        merged.setdefault(stage, []).extend([[step + offset, value] for step, value in points])
    return merged, resumed_at


def generation_probe(
    bundle: ModelBundle, scenes: Sequence[synthetic.Scene], steps: int, guidance: float, batch: int = 64
) -> dict[str, Any]:
    """Share of images generated from held-out captions in which the scorer finds every captioned object.

    Args:
        bundle: the trained model.
        scenes: held-out scenes; their captions are generated with seeds 0, 1, ... and scored against their
            objects (:func:`instdiff.scorer.objects_found`).
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        batch: captions per generation call.

    Returns:
        ``{"n", "all_objects_found" (a share in [0, 1]), "steps", "guidance"}``.
    """
    from instdiff.editing import generate
    from instdiff.scorer import objects_found

    hits, n = 0, 0
    for i in range(0, len(scenes), batch):
        part = scenes[i : i + batch]
        images = generate(
            bundle, [s.caption for s in part], steps=steps, guidance=guidance, seeds=list(range(i, i + len(part)))
        )
        for scene, img in zip(part, from_model_tensor(images), strict=True):
            hits += int(objects_found(img, scene.objects))
            n += 1
    return {"n": n, "all_objects_found": hits / max(1, n), "steps": steps, "guidance": guidance}


def _dir_size_mb(path: Path, suffix: str = ".safetensors") -> float:
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}")) / 1e6


def training_summary(
    cfg: TrainConfig,
    out: Path,
    *,
    n_scenes: int,
    steps: Mapping[str, int],
    times: Mapping[str, float],
    losses: LossLog,
    psnr: float,
    scaling: float,
    modules: Mapping[str, torch.nn.Module],
    probe: dict[str, Any] | None,
    device: torch.device,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of ``training_summary.json``.

    Args:
        cfg: the run's config.
        out: the model folder (its safetensors are measured).
        n_scenes: training scenes rendered.
        steps: steps done per stage (``vae``, ``unet``, ``inpaint``).
        times: seconds per stage and ``total``.
        losses: this run's loss log.
        psnr: held-out VAE PSNR in dB.
        scaling: the VAE's latent scaling factor.
        modules: the networks whose parameters are counted, by name.
        probe: the :func:`generation_probe` result, or ``None``.
        device: the training device (recorded with :func:`instdiff.runinfo.machine_info`).
        previous: the earlier run's summary when continuing (``init_from``), else ``None``; totals then add up.

    Returns:
        The summary: config, seed, data, steps (done and planned), seconds, first/last losses, VAE PSNR and
        scaling, parameter counts, weights size (MB), probe, machine, git commit, totals.
    """
    summary: dict[str, Any] = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "data": {
            "n_scenes": n_scenes,
            "scene_seeds": [cfg.data_seed, cfg.data_seed + -(-n_scenes // SCENES_PER_CHUNK) - 1],
            "scenes_per_seed": SCENES_PER_CHUNK,
            "image_size": cfg.image_size,
            "held_out_seed_for_samples": HELD_OUT_SEED + 1,
        },
        "steps": dict(steps),
        "planned_steps": {"vae": cfg.vae.steps, "unet": cfg.unet.steps, "inpaint": cfg.inpaint.steps},
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "loss_first_last": {s: losses.first_last(s) for s in losses.stages},
        "vae_psnr_db": round(psnr, 3),
        "vae_scaling_factor": scaling,
        "parameters": {name: count_parameters(m) for name, m in modules.items()},
        "weights_mb": round(_dir_size_mb(out), 3),
        "probe": probe,
        "machine": machine_info(device),
        "git_commit": git_commit(),
    }
    if previous is not None:
        summary["init_from"] = cfg.init_from
        summary["previous"] = previous
        before = previous.get("total_steps", previous.get("steps", {}))
        summary["total_steps"] = {k: int(before.get(k, 0)) + v for k, v in steps.items()}
        total = float(previous.get("total_seconds", previous["seconds"]["total"])) + times["total"]
        summary["total_seconds"] = round(total, 2)
    else:
        summary["total_steps"] = dict(steps)
        summary["total_seconds"] = round(times["total"], 2)
    return summary


__all__ = [
    "LOSSES_FILE",
    "LOSS_PLOT",
    "SAMPLE_GRID",
    "SUMMARY_FILE",
    "generation_probe",
    "merge_losses",
    "plot_losses",
    "sample_grid",
    "training_summary",
]
