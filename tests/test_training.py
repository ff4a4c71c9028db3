"""Training recipe: configs parse, masks and the widened UNet are right, a micro run learns and saves."""

import dataclasses
from pathlib import Path

import pytest
import torch

from instdiff.errors import TrainConfigError
from instdiff.models import load_bundle
from instdiff.training import (
    MASK_KINDS,
    LossLog,
    TrainConfig,
    UNetConfig,
    build_models,
    encode_dataset,
    merge_losses,
    random_inpaint_masks,
    token_ids,
    train_shapes,
    train_unet,
    train_vae,
    widen_to_inpaint,
)

CONFIGS = Path(__file__).parent.parent / "configs" / "train"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path):
    cfg = TrainConfig.from_yaml(path)
    cfg.validate()
    assert isinstance(cfg.unet, UNetConfig) and isinstance(cfg.unet.block_out_channels, tuple)


def test_unknown_keys_and_bad_values_are_refused():
    with pytest.raises(TrainConfigError, match=r"unet\.stepz: unknown key; accepted keys in unet: .*\bsteps\b"):
        TrainConfig.from_dict({"unet": {"stepz": 3}})
    with pytest.raises(TrainConfigError, match="held out"):
        TrainConfig.from_dict({"data_seed": 9_999, "n_scenes": 1000}).validate()
    with pytest.raises(TrainConfigError, match="init_from"):
        TrainConfig.from_dict({"vae": {"steps": 0}}).validate()


def test_inpaint_masks_follow_the_latent_grid_and_kinds():
    labels = torch.zeros(len(MASK_KINDS) * 4, 32, 32, dtype=torch.uint8)
    labels[:, 4:12, 4:12] = 1
    labels[:, 20:28, 18:30] = 2
    gen = torch.Generator().manual_seed(0)
    masks = random_inpaint_masks(labels, (1, 1, 1, 1, 1), factor=4, generator=gen)
    assert masks.shape == (labels.shape[0], 1, 32, 32)
    blocks = masks.view(-1, 1, 8, 4, 8, 4)
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))  # constant on every 4×4 cell
    only_bg = random_inpaint_masks(labels, (0, 0, 0, 1, 0), factor=4, generator=gen)
    assert only_bg[:, 0, 0, 0].all() and not only_bg[:, 0, 6, 6].any()  # background only, objects kept
    only_obj = random_inpaint_masks(labels, (1, 0, 0, 0, 0), factor=4, generator=gen)
    covered = only_obj[:, 0].flatten(1).sum(1)
    # object 1 (8×8 px, on the 4-px grid) or object 2 (8×12 px at columns 18..29 → cells covering 16 columns)
    assert set(covered.tolist()) <= {64.0, 128.0}


def test_widened_unet_equals_the_base_on_zero_extra_channels():
    cfg = TrainConfig.from_yaml(CONFIGS / "micro.yaml")
    _, _, _, unet, _ = build_models(cfg)
    wide = widen_to_inpaint(unet, 5)
    assert wide.config.in_channels == 9
    x = torch.randn(2, 4, 8, 8)
    emb = torch.randn(2, 77, cfg.text.hidden_size)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=emb).sample
        out = wide(torch.cat([x, torch.randn(2, 5, 8, 8)], dim=1), t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(out, base)


def test_merge_losses_shifts_the_continued_run():
    merged, resumed = merge_losses({"unet": [[9, 1.0]]}, {"unet": [(4, 0.5)], "vae": [(1, 2.0)]})
    assert merged == {"unet": [[9, 1.0], [14, 0.5]], "vae": [[1, 2.0]]}
    assert resumed == {"unet": 10}


def test_training_loops_reduce_the_loss_on_a_micro_config(micro_training):
    cfg, (tokenizer, text_encoder, vae, unet, scheduler), data = micro_training
    dev = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    losses = LossLog(every=4)
    train_vae(vae, data, dataclasses.replace(cfg.vae, steps=12, lr=3e-3), dev, False, losses, gen)
    mean, std = encode_dataset(vae, data.images, dev)
    ids = token_ids(tokenizer, data.captions)
    unet_cfg = dataclasses.replace(cfg.unet, steps=16, lr=2e-3, batch_size=16)
    train_unet(
        text_encoder,
        unet,
        (mean, std),
        ids,
        token_ids(tokenizer, [""]),
        scheduler.alphas_cumprod,
        unet_cfg,
        dev,
        False,
        losses,
        gen,
    )
    for stage in ("vae", "unet"):
        first, last = losses.first_last(stage)
        assert last < first, (stage, losses.stages[stage])


@pytest.mark.slow
def test_micro_training_run_learns_and_saves_a_loadable_model(tmp_path):
    cfg = TrainConfig.from_yaml(CONFIGS / "micro.yaml")
    cfg = dataclasses.replace(
        cfg,
        n_scenes=32,
        vae=dataclasses.replace(cfg.vae, steps=8, lr=3e-3),
        unet=dataclasses.replace(cfg.unet, steps=8, lr=2e-3),
        inpaint=dataclasses.replace(cfg.inpaint, steps=2),
        samples=dataclasses.replace(cfg.samples, n_grid=2, steps=2, n_probe=0),
    )
    summary = train_shapes(cfg, tmp_path / "model", device="cpu")
    assert summary["steps"] == {"vae": 8, "unet": 8, "inpaint": 2}
    first, last = summary["loss_first_last"]["vae"]
    assert last < first
    first, last = summary["loss_first_last"]["unet"]
    assert last < first
    out = tmp_path / "model"
    for name in (
        "model_index.json",
        "loss.png",
        "samples.png",
        "losses.json",
        "training_summary.json",
        "inpaint_unet/config.json",
        "instdiff.json",
    ):
        assert (out / name).exists(), name
    bundle = load_bundle(str(out), device="cpu", dtype="fp32")
    assert bundle.inpaint_unet is not None and bundle.inpaint_unet.config.in_channels == 9
    assert bundle.defaults["attention_downsample"] == 1
    assert bundle.vae.config.scaling_factor == pytest.approx(summary["vae_scaling_factor"])


def test_checkpoints_hold_the_ema_weights_and_training_goes_on(micro_training):
    from instdiff.training.stages import Ema

    p = torch.nn.Parameter(torch.ones(3))
    ema = Ema([p], decay=0.5)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update()  # warm-up decay min(0.5, 2/11): shadow = 1 + (1 - 2/11) * 2
    with ema.swapped():
        torch.testing.assert_close(p.detach(), torch.full((3,), 1.0 + 2.0 * 9 / 11))
    assert torch.equal(p.detach(), torch.full((3,), 3.0))

    cfg, (tokenizer, text_encoder, vae, unet, scheduler), data = micro_training
    dev = torch.device("cpu")
    mean, std = encode_dataset(vae, data.images, dev)
    ids = token_ids(tokenizer, data.captions)
    unet_cfg = dataclasses.replace(cfg.unet, steps=4, batch_size=4, checkpoint_every=2)
    seen = []
    weight = next(unet.parameters())
    train_unet(
        text_encoder,
        unet,
        (mean, std),
        ids,
        token_ids(tokenizer, [""]),
        scheduler.alphas_cumprod,
        unet_cfg,
        dev,
        False,
        LossLog(every=2),
        torch.Generator().manual_seed(0),
        checkpoint=lambda done: seen.append((done, weight.detach().clone())),
    )
    assert [d for d, _ in seen] == [2, 4]
    torch.testing.assert_close(seen[-1][1], weight.detach())  # the last checkpoint = the EMA the stage ends with
