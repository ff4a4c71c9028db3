"""The recipe: train the embedded shapes-world model from a config into a diffusers model folder.

:func:`train_shapes` runs the steps in order (the CLI runs it as ``instdiff train-shapes``):

1. render the training scenes (:mod:`instdiff.training.data`) and the held-out scenes;
2. train the VAE, then set its ``scaling_factor`` so that scaled latents have unit standard deviation (SD's
   0.18215 analogue);
3. train the CLIP text encoder and the UNet jointly (optionally with the token grounding loss);
4. fine-tune the inpainting UNet, widened from the base UNet (or the earlier run's, continued);
   With ``unet.checkpoint_every`` the EMA weights are saved every so many steps as ``<out>/checkpoint``, a
   complete model folder with its loss log and summary, so a stopped run continues with
   ``init_from: <out>/checkpoint``;
5. save the bundle, the sample grid, the probe, the loss log and plot, and the summary
   (:mod:`instdiff.training.report`).

Everything runs on a CUDA device when one is present (bf16 autocast) and on the CPU otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from instdiff import synthetic
from instdiff.bundle import token_ids
from instdiff.imageio import from_model_tensor, to_model_tensor
from instdiff.models import ModelBundle, load_pretrained, pick_device, save_bundle
from instdiff.training.config import HELD_OUT_SEED, TrainConfig
from instdiff.training.data import ShapesData, render_training_data
from instdiff.training.grounding import region_fractions, token_targets
from instdiff.training.networks import build_models, widen_to_inpaint
from instdiff.training.report import (
    LOSS_PLOT,
    LOSSES_FILE,
    SAMPLE_GRID,
    SUMMARY_FILE,
    generation_probe,
    merge_losses,
    plot_losses,
    sample_grid,
    training_summary,
)
from instdiff.training.stages import (
    LossLog,
    encode_dataset,
    stage_timer,
    train_inpaint,
    train_unet,
    train_vae,
    vae_psnr,
)

log = logging.getLogger(__name__)


def train_shapes(config: TrainConfig | str | Path, out_dir: str | Path, device: str | None = None) -> dict[str, Any]:
    """Train the shapes-world model from ``config`` into ``out_dir``.

    ``out_dir`` becomes a diffusers model folder (loadable with ``load_bundle(out_dir)``) that also holds
    ``losses.json``, ``loss.png``, ``samples.png`` and ``training_summary.json``. With ``init_from`` the run
    continues an earlier one; the summary then also holds the earlier summary and the loss log and plot cover
    both runs.

    Args:
        config: a :class:`TrainConfig` or the path of a YAML file parsed into one.
        out_dir: the model folder to write (created if missing).
        device: overrides the config's ``device`` (``auto``, ``cuda``, ``cpu``).

    Returns:
        The summary written to ``training_summary.json`` (seed, data size, steps, seconds per stage, losses,
        VAE PSNR, sizes; see :func:`~instdiff.training.report.training_summary`).

    Raises:
        TrainConfigError: the config cannot be parsed or used.
        InputNotFoundError: the config file does not exist.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_yaml(config)
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device or cfg.device)
    amp = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and dev.type == "cuda")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    losses = LossLog(cfg.log_every)
    log.info("training %s on %s (amp=%s) into %s", cfg.name, dev, amp, out)

    # 1. render the training scenes
    with stage_timer("render", times, dev):
        data = render_training_data(cfg.n_scenes, cfg.data_seed, cfg.image_size, cfg.workers)
        if dev.type == "cuda":
            data = ShapesData(data.images.to(dev), data.labels.to(dev), data.captions)
    held_out = synthetic.make_scenes(
        max(64, cfg.samples.n_grid, cfg.samples.n_probe), seed=HELD_OUT_SEED + 1, size=cfg.image_size
    )
    held_u8 = torch.from_numpy(np.stack([s.image for s in held_out]))

    torch.manual_seed(cfg.seed)
    gen = torch.Generator(dev).manual_seed(cfg.seed)
    previous: dict[str, Any] | None = None
    inpaint_unet: UNet2DConditionModel | None = None
    if cfg.init_from is not None:
        start = load_pretrained(cfg.init_from, dev, torch.float32, local_files_only=True)
        tokenizer, text_encoder, vae, unet = start.tokenizer, start.text_encoder, start.vae, start.unet
        scheduler, inpaint_unet = start.scheduler, start.inpaint_unet
        previous = _read_json(Path(cfg.init_from) / SUMMARY_FILE)
        log.info("continuing from %s", cfg.init_from)
    else:
        tokenizer, text_encoder, vae, unet, scheduler = build_models(cfg)
    for m in (text_encoder, vae, unet):
        m.to(dev)

    # 2. VAE, then the latent scaling factor (kept when the VAE is not trained in this run)
    with stage_timer("vae", times, dev):
        vae_steps = train_vae(vae, data, cfg.vae, dev, amp, losses, gen) if cfg.vae.steps else 0
        mean, std = encode_dataset(vae, data.images, dev)
        if vae_steps:
            vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        scaling = float(vae.config.scaling_factor)
        psnr = vae_psnr(vae, held_u8, dev)
    log.info("VAE: %d steps, held-out PSNR %.2f dB, scaling_factor %.4f", vae_steps, psnr, scaling)
    latents = (mean * scaling, std * scaling)

    # 3. text encoder + UNet
    ids = token_ids(tokenizer, data.captions).to(dev)
    empty_ids = token_ids(tokenizer, [""]).to(dev)
    alphas = scheduler.alphas_cumprod.to(dev)
    with stage_timer("unet", times, dev):
        unet_steps = 0
        if cfg.unet.steps:
            grounding = None
            if cfg.unet.grounding_weight > 0:
                side = cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
                grounding = (
                    region_fractions(data.labels, side).to(dev, torch.float16),
                    token_targets(tokenizer, ids.cpu()).to(dev),
                )
            t_unet = time.perf_counter()

            def save_checkpoint(done: int) -> None:
                bundle = ModelBundle(tokenizer, text_encoder, vae, unet, scheduler, inpaint_unet, name=cfg.name)
                bundle.defaults = dict(cfg.editor_defaults)
                now = time.perf_counter()
                _write_checkpoint(
                    bundle,
                    out / CHECKPOINT_DIR,
                    cfg,
                    losses,
                    n_scenes=len(data),
                    steps={"vae": vae_steps, "unet": done, "inpaint": 0},
                    times={**times, "unet": now - t_unet, "total": now - t_start},
                    psnr=psnr,
                    device=dev,
                    previous=previous,
                )

            unet_steps = train_unet(
                text_encoder,
                unet,
                latents,
                ids,
                empty_ids,
                alphas,
                cfg.unet,
                dev,
                amp,
                losses,
                gen,
                grounding,
                checkpoint=save_checkpoint,
            )

    # 4. inpainting UNet: from the base UNet with conv_in widened to latents + mask + masked-image latents
    #    (or the earlier run's inpainting UNet, continued)
    if inpaint_unet is None:
        inpaint_unet = widen_to_inpaint(unet, 1 + vae.config.latent_channels)
    inpaint_unet.to(dev)
    with stage_timer("inpaint", times, dev):
        inpaint_steps = 0
        if cfg.inpaint.steps:
            inpaint_steps = train_inpaint(
                inpaint_unet,
                text_encoder,
                vae,
                data,
                latents,
                ids,
                empty_ids,
                alphas,
                cfg.inpaint,
                dev,
                amp,
                losses,
                gen,
            )

    # 5. save the bundle, then samples, probe, losses and the summary
    bundle = ModelBundle(tokenizer, text_encoder, vae, unet, scheduler, inpaint_unet, name=cfg.name, device=dev)
    bundle.defaults = dict(cfg.editor_defaults)
    with stage_timer("save", times, dev):
        _save(bundle, out, cfg.save_dtype)
    from instdiff.editing import generate

    with stage_timer("samples", times, dev):
        grid_scenes = held_out[: cfg.samples.n_grid]
        captions = [s.caption for s in grid_scenes]
        gen_images = generate(
            bundle, captions, steps=cfg.samples.steps, guidance=cfg.samples.guidance, seeds=list(range(len(captions)))
        )
        with torch.no_grad():
            x = to_model_tensor(held_u8[: len(captions)].to(dev))
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        rows = [
            ("held-out scene", [s.image for s in grid_scenes]),
            ("VAE reconstruction", list(from_model_tensor(recon))),
            ("generated", list(from_model_tensor(gen_images))),
        ]
        sample_grid(rows, captions, out / SAMPLE_GRID)
    probe = None
    if cfg.samples.n_probe:
        with stage_timer("probe", times, dev):
            probe = generation_probe(bundle, held_out[: cfg.samples.n_probe], cfg.samples.steps, cfg.samples.guidance)
    earlier_losses = _read_json(Path(cfg.init_from) / LOSSES_FILE) if cfg.init_from else None
    history, resumed_at = merge_losses(earlier_losses, losses.stages)
    plot_losses(history, out / LOSS_PLOT, resumed_at)
    (out / LOSSES_FILE).write_text(json.dumps(history) + "\n")
    times["total"] = time.perf_counter() - t_start
    summary = training_summary(
        cfg,
        out,
        n_scenes=len(data),
        steps={"vae": vae_steps, "unet": unet_steps, "inpaint": inpaint_steps},
        times=times,
        losses=losses,
        psnr=psnr,
        scaling=scaling,
        modules={"text_encoder": text_encoder, "vae": vae, "unet": unet, "inpaint_unet": inpaint_unet},
        probe=probe,
        device=dev,
        previous=previous,
    )
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the finished folder supersedes it
    log.info("done in %.1f s; weights %.2f MB", times["total"], summary["weights_mb"])
    return summary


CHECKPOINT_DIR = "checkpoint"


def _write_checkpoint(
    bundle: ModelBundle,
    folder: Path,
    cfg: TrainConfig,
    losses: LossLog,
    *,
    n_scenes: int,
    steps: dict[str, int],
    times: dict[str, float],
    psnr: float,
    device: torch.device,
    previous: dict[str, Any] | None,
) -> None:
    """Save ``bundle`` with its loss log and summary as ``folder``, replacing an earlier checkpoint whole.

    The folder is written next to ``folder`` first and renamed, so a run killed while saving leaves the previous
    checkpoint intact.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save(bundle, tmp, cfg.save_dtype)
    earlier = _read_json(Path(cfg.init_from) / LOSSES_FILE) if cfg.init_from else None
    history, _ = merge_losses(earlier, losses.stages)
    (tmp / LOSSES_FILE).write_text(json.dumps(history) + "\n")
    modules = {"text_encoder": bundle.text_encoder, "vae": bundle.vae, "unet": bundle.unet}
    if bundle.inpaint_unet is not None:
        modules["inpaint_unet"] = bundle.inpaint_unet
    summary = training_summary(
        cfg,
        tmp,
        n_scenes=n_scenes,
        steps=steps,
        times=times,
        losses=losses,
        psnr=psnr,
        scaling=float(bundle.vae.config.scaling_factor),
        modules=modules,
        probe=None,
        device=device,
        previous=previous,
    )
    summary["checkpoint"] = True
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log.info("checkpoint at unet step %d saved to %s", steps["unet"], folder)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _save(bundle: ModelBundle, out: Path, save_dtype: str) -> None:
    """Save a copy of the bundle's modules in ``save_dtype`` on the CPU (the training copy is untouched)."""
    dtype = torch.float16 if save_dtype == "fp16" else torch.float32
    copy_ = ModelBundle(
        bundle.tokenizer,
        copy.deepcopy(bundle.text_encoder).to("cpu", dtype),
        copy.deepcopy(bundle.vae).to("cpu", dtype),
        copy.deepcopy(bundle.unet).to("cpu", dtype),
        bundle.scheduler,
        copy.deepcopy(bundle.inpaint_unet).to("cpu", dtype) if bundle.inpaint_unet is not None else None,
        name=bundle.name,
        defaults=bundle.defaults,
    )
    save_bundle(copy_, out)


__all__ = ["train_shapes"]
