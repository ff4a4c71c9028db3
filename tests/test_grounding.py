"""Token grounding loss: caption tokens map to the right regions, the loss measures attention inside them,
the recorders do not change the UNet's output, and a micro run lowers the loss with the text encoder frozen."""

import dataclasses
from pathlib import Path

import pytest
import torch

from instdiff import synthetic
from instdiff.errors import TrainConfigError
from instdiff.training import (
    LossLog,
    TrainConfig,
    build_models,
    encode_dataset,
    token_ids,
    train_unet,
)
from instdiff.training.grounding import (
    BACKGROUND,
    NOT_GROUNDED,
    GroundingAttnProcessor,
    grounding_loss,
    install_grounding,
    region_fractions,
    token_targets,
)

CONFIGS = Path(__file__).parent.parent / "configs" / "train"


@pytest.fixture(scope="module")
def micro():
    cfg = TrainConfig.from_yaml(CONFIGS / "micro.yaml")
    torch.manual_seed(0)
    return cfg, build_models(cfg)


def test_token_targets_follow_the_caption_grammar(micro):
    _, (tokenizer, *_rest) = micro
    objects = [
        synthetic.ShapeSpec("circle", "red", 0.3, 0.3, 0.1),
        synthetic.ShapeSpec("star", "orange", 0.7, 0.7, 0.1),
        synthetic.ShapeSpec("square", "blue", 0.5, 0.2, 0.1),
    ]
    caption = synthetic.caption_for(objects, "gray", "stripes")
    ids = token_ids(tokenizer, [caption, ""])
    words = [w.removesuffix("</w>") for w in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    got = dict(zip(words[: words.index("background") + 1], token_targets(tokenizer, ids)[0].tolist(), strict=False))
    assert got["red"] == got["circle"] == 1
    assert got["orange"] == got["star"] == 2
    assert got["blue"] == got["square"] == 3
    assert got["striped"] == got["gray"] == got["background"] == BACKGROUND
    assert got["a"] == got["and"] == got["on"] == got[","] == NOT_GROUNDED
    assert (token_targets(tokenizer, ids)[1] == NOT_GROUNDED).all()  # the empty prompt grounds nothing
    # a colour word after "on" is the background's, not an object's
    single = token_ids(tokenizer, ["a red circle on a blue background"])
    t = token_targets(tokenizer, single)[0].tolist()
    assert t[1:8] == [NOT_GROUNDED, 1, 1, NOT_GROUNDED, NOT_GROUNDED, BACKGROUND, BACKGROUND]


def test_region_fractions_are_area_shares():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 1
    reg = region_fractions(labels, 2)
    assert reg.shape == (1, 4, 2, 2)
    torch.testing.assert_close(reg.sum(1), torch.ones(1, 2, 2))
    assert reg[0, 1, 0, 0] == 1.0 and reg[0, 1, 1, 1] == 0.0 and reg[0, 0, 1, 1] == 1.0


def test_loss_is_zero_inside_the_region_and_larger_when_spread():
    regions = torch.zeros(1, 4, 2, 2)
    regions[0, 0] = 1.0
    regions[0, 0, 0, 0] = 0.0
    regions[0, 1, 0, 0] = 1.0  # object 1 covers the top-left cell, the background the rest
    targets = torch.tensor([[NOT_GROUNDED, 1, BACKGROUND]])
    inside = torch.zeros(1, 4, 3)
    inside[0, 0, 1] = 1.0  # token 1 attends only to the top-left cell
    inside[0, 1:, 2] = 1.0  # token 2 only to the background cells
    inside[0, :, 0] = 0.5
    rec = GroundingAttnProcessor()
    rec.probs = inside
    assert grounding_loss({"l": rec}, regions, targets).item() == pytest.approx(0.0)
    rec.probs = torch.full((1, 4, 3), 1 / 3, requires_grad=True)
    loss = grounding_loss({"l": rec}, regions, targets)
    # token 1 has a quarter of its attention inside (0.75²), token 2 three quarters (0.25²)
    assert loss.item() == pytest.approx((0.75**2 + 0.25**2) / 2)
    loss.backward()
    assert rec.probs.grad is not None and rec.probs.grad.abs().sum() > 0
    none = torch.full_like(targets, NOT_GROUNDED)
    assert grounding_loss({"l": rec}, regions, none).item() == 0.0


def test_recorders_keep_the_unet_output_and_are_removed(micro):
    cfg, (_tok, _text, _vae, unet, _sched) = micro
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    emb = torch.randn(2, 77, cfg.text.hidden_size)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=emb).sample
    recorders, previous = install_grounding(unet, (1, 2))
    with torch.no_grad():
        during = unet(x, t, encoder_hidden_states=emb).sample
    assert recorders and all(r.probs is not None for r in recorders.values())
    assert {r.probs.shape[1] for r in recorders.values()} == {64, 16}  # 8×8 and 4×4 maps of an 8×8 latent
    unet.set_attn_processor(previous)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(p, GroundingAttnProcessor) for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="no cross-attention layer"):
        install_grounding(unet, (16,))


def test_grounded_micro_training_lowers_the_loss_and_keeps_the_text_encoder(micro_training):
    cfg, (tokenizer, text_encoder, vae, unet, scheduler), data = micro_training
    dev = torch.device("cpu")
    mean, std = encode_dataset(vae, data.images, dev)
    ids = token_ids(tokenizer, data.captions)
    text_before = [p.detach().clone() for p in text_encoder.parameters()]
    losses = LossLog(every=4)
    ucfg = dataclasses.replace(
        cfg.unet,
        steps=24,
        lr=3e-3,
        text_lr=0.0,
        batch_size=16,
        caption_dropout=0.0,
        grounding_weight=5.0,
        grounding_downsample=(1, 2),
    )
    grounding = (region_fractions(data.labels, cfg.image_size // 4), token_targets(tokenizer, ids))
    train_unet(
        text_encoder,
        unet,
        (mean, std),
        ids,
        token_ids(tokenizer, [""]),
        scheduler.alphas_cumprod,
        ucfg,
        dev,
        False,
        losses,
        torch.Generator().manual_seed(0),
        grounding,
    )
    first, last = losses.first_last("ground")
    assert last < first, losses.stages["ground"]
    assert all(torch.equal(a, b) for a, b in zip(text_before, text_encoder.parameters(), strict=True))
    assert not any(isinstance(p, GroundingAttnProcessor) for p in unet.attn_processors.values())


def test_bad_grounding_settings_are_refused():
    with pytest.raises(TrainConfigError, match="grounding_weight must be >= 0"):
        TrainConfig.from_dict({"unet": {"grounding_weight": -0.1}}).validate()
    with pytest.raises(TrainConfigError, match="grounding_downsample needs positive"):
        TrainConfig.from_dict({"unet": {"grounding_weight": 0.1, "grounding_downsample": []}}).validate()
