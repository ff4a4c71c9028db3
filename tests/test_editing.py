"""Editors on the tiny bundle: determinism, UNet-call counts, pixels outside the mask, bad input."""

import pytest
import torch

from instdiff.editing import (
    EditConfig,
    EditInputError,
    Inpaint,
    Method,
    PromptMode,
    edit,
    edit_words,
    expected_unet_calls,
    generate,
)
from instdiff.masks import MaskConfig
from instdiff.models import tiny_bundle
from instdiff.synthetic import image_to_tensor, make_edit_pairs

METHODS = [Method.INSTDIFFEDIT, Method.SDEDIT, Method.DIFFEDIT]


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(seed=0, with_inpaint=True)


@pytest.fixture(scope="module")
def pairs():
    ps = make_edit_pairs(2, seed=5, size=32)
    images = torch.stack([image_to_tensor(p.source.image) for p in ps])
    return images, [p.source_prompt for p in ps], [p.target_prompt for p in ps]


def fast(method: Method, **kw) -> EditConfig:
    return EditConfig(method=method, steps=6, strength=0.5, n_noises=2, diffedit_noises=2, **kw)


class HookCounter:
    """Counts UNet batch rows with a forward pre-hook: an independent count of evaluations."""

    def __init__(self, *modules):
        self.rows = 0
        self.handles = [m.register_forward_pre_hook(self, with_kwargs=True) for m in modules]

    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += sample.shape[0]

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("method", METHODS)
def test_editor_runs_deterministic_and_counts(bundle, pairs, method):
    images, src, tgt = pairs
    cfg = fast(method)
    counter = HookCounter(bundle.unet, bundle.inpaint_unet)
    a = edit(bundle, images, src, tgt, cfg)
    counter.close()
    b = edit(bundle, images, src, tgt, cfg)
    c = edit(bundle, images, src, tgt, cfg.with_(seed=1))
    assert a.images.shape == images.shape and a.masks.shape == (2, 1, 32, 32) and a.masks.dtype == torch.bool
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)
    assert a.unet_calls == counter.rows / 2 == expected_unet_calls(cfg)
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert a.timings["total"] >= sum(v for k, v in a.timings.items() if k != "total") * 0.99


def test_instdiffedit_call_count_formula(bundle, pairs):
    images, src, tgt = pairs
    cfg = EditConfig(steps=10, strength=0.5, n_noises=3, inpaint_steps=4)
    r = edit(bundle, images, src, tgt, cfg)
    assert r.unet_calls == 2 * 3 * 5 + 2 * 4


@pytest.mark.parametrize("method", [Method.INSTDIFFEDIT, Method.DIFFEDIT])
def test_pixels_outside_mask_are_kept(bundle, pairs, method):
    images, src, tgt = pairs
    r = edit(bundle, images, src, tgt, fast(method))
    outside = ~r.masks.expand_as(r.images)
    assert outside.any()
    assert torch.equal(r.images[outside], images[outside])
    # without paste-back the output outside the mask is only as close as the VAE reconstructs; measure it
    raw = edit(bundle, images, src, tgt, fast(method, paste_back=False))
    err = (raw.images - images).abs()[outside].mean().item()
    assert 0.0 < err < 2.0


def test_result_of_an_image_does_not_depend_on_batch_mates(bundle, pairs):
    images, src, tgt = pairs
    both = edit(bundle, images, src, tgt, fast(Method.INSTDIFFEDIT), seeds=[3, 4])
    alone = edit(bundle, images[1:], src[1:], tgt[1:], fast(Method.INSTDIFFEDIT), seeds=[4])
    assert torch.equal(both.masks[1:], alone.masks)
    torch.testing.assert_close(both.images[1:], alone.images, atol=1e-4, rtol=0)


def test_diffedit_mask_does_not_depend_on_batch_mates(bundle, pairs):
    images, src, tgt = pairs
    both = edit(bundle, images, src, tgt, fast(Method.DIFFEDIT), seeds=[3, 4])
    alone = edit(bundle, images[:1], src[:1], tgt[:1], fast(Method.DIFFEDIT), seeds=[3])
    assert torch.equal(both.masks[:1], alone.masks)


def test_instdiffedit_options(bundle, pairs):
    images, src, tgt = pairs
    base = fast(Method.INSTDIFFEDIT)
    for cfg in (
        base.with_(inpaint=Inpaint.BLEND),
        base.with_(inpaint=Inpaint.NONE),
        base.with_(prompt_mode=PromptMode.EDIT_WORDS),
        base.with_(mask=MaskConfig(running_mean=True, invert_start=True, smooth_iters=2, smooth_resolution=16)),
        base.with_(attention_downsample=1),
        base.with_(mask=MaskConfig(blend_current_step=True)),
        base.with_(mask=MaskConfig.official(), prompt_mode=PromptMode.EDIT_WORDS),
    ):
        r = edit(bundle, images, src, tgt, cfg)
        assert r.masks.shape == (2, 1, 32, 32)
        assert r.unet_calls == expected_unet_calls(cfg)
    r = edit(bundle, images, src, tgt, base.with_(mask=MaskConfig(phi=1.0)))
    assert not r.masks.any() and torch.equal(r.images, images)  # empty mask: nothing changes


def test_merge_bpe_merges_word_pieces_at_every_step(bundle, pairs, monkeypatch):
    from instdiff import masks as module

    images, src, _ = pairs
    tgt = ["a qzx circle", "a qzx square"]  # "qzx" splits into three BPE pieces (positions 2-4)
    calls = []
    real = module.merge_word_pieces

    def spy(maps, word_ids):
        calls.append(word_ids.cpu())
        return real(maps, word_ids)

    monkeypatch.setattr(module, "merge_word_pieces", spy)
    cfg = fast(Method.INSTDIFFEDIT, mask=MaskConfig(merge_bpe=True))
    r = edit(bundle, images, src, tgt, cfg)
    assert r.masks.shape == (2, 1, 32, 32) and torch.isfinite(r.images).all()
    assert len(calls) == 3  # one per denoising step (6 steps at strength 0.5)
    assert all(torch.equal(c, bundle.word_ids(tgt)) for c in calls)
    position = r.extras["position"]
    assert (position[:, 3:5] == 0).all()  # the word counts once: its first piece (2) carries its sign
    calls.clear()
    edit(bundle, images, src, tgt, fast(Method.INSTDIFFEDIT))
    assert not calls  # merge_bpe is off by default


def test_v_prediction_bundle_runs_through_the_same_code(pairs):
    images, src, tgt = pairs
    vb = tiny_bundle(seed=0, prediction_type="v_prediction")
    for method in METHODS:
        r = edit(vb, images, src, tgt, fast(method))
        assert torch.isfinite(r.images).all()


def test_generate_shapes_and_determinism(bundle):
    a = generate(bundle, ["a red circle"], steps=3, seeds=[7])
    b = generate(bundle, ["a red circle"], steps=3, seeds=[7])
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)


def test_edit_words():
    assert edit_words("a red circle on a gray background", "a blue circle on a gray background") == "blue"
    assert edit_words("a cat", "a cat") == "a cat"


def test_bad_inputs_are_refused_clearly(bundle, pairs, caplog):
    images, src, tgt = pairs
    cfg = fast(Method.SDEDIT)
    with pytest.raises(EditInputError, match=r"\(B, 3, H, W\)"):
        edit(bundle, images[:, :1], src, tgt, cfg)
    with pytest.raises(EditInputError, match="not a multiple of 8"):
        edit(bundle, torch.zeros(1, 3, 20, 36), src[:1], tgt[:1], cfg)
    with pytest.raises(EditInputError, match="empty"):
        edit(bundle, images, src, ["", "x"], cfg)
    with pytest.raises(EditInputError, match="one each per image"):
        edit(bundle, images, src[:1], tgt, cfg)
    with pytest.raises(EditInputError, match=r"\[-1, 1\]"):
        edit(bundle, images * 3, src, tgt, cfg)
    with pytest.raises(ValueError, match="strength"):
        edit(bundle, images, src, tgt, cfg.with_(strength=1.5))
    long_prompt = " ".join(["red circle"] * 60)
    r = edit(bundle, images[:1], src[:1], [long_prompt], cfg)
    assert r.images.shape[0] == 1
    assert any("truncated" in rec.message for rec in caplog.records)


@pytest.mark.parametrize("seed", [2**70, -(2**63) - 1, 2**64, "x", 1.5, None, True])
def test_seeds_torch_cannot_take_are_refused(bundle, pairs, seed):
    images, src, tgt = pairs
    with pytest.raises(EditInputError, match="seed #0"):
        edit(bundle, images[:1], src[:1], tgt[:1], fast(Method.SDEDIT), seeds=[seed])
    with pytest.raises(EditInputError, match="seed #0"):
        generate(bundle, ["a red circle"], steps=1, seeds=[seed])


def test_negative_and_largest_seeds_are_accepted(bundle):
    low = generate(bundle, ["a red circle"], steps=1, seeds=[-1])
    high = generate(bundle, ["a red circle"], steps=1, seeds=[2**64 - 1])
    assert torch.equal(low, high)  # torch uses a negative seed modulo 2^64
    assert generate(bundle, ["a red circle"], steps=1, seeds=[-(2**63)]).shape == (1, 3, 32, 32)


def test_images_that_are_not_numbers_or_no_images_are_refused(bundle, pairs):
    images, src, tgt = pairs
    cfg = fast(Method.SDEDIT)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(EditInputError, match="finite"):
            edit(bundle, torch.full((1, 3, 32, 32), bad), src[:1], tgt[:1], cfg)
    with pytest.raises(EditInputError, match="empty batch"):
        edit(bundle, torch.zeros(0, 3, 32, 32), [], [], cfg)


def test_prompts_that_are_not_strings_are_named_as_such(bundle, pairs):
    images, src, tgt = pairs
    with pytest.raises(EditInputError, match="target prompt #0 must be a string; got int 5"):
        edit(bundle, images[:1], src[:1], [5], fast(Method.SDEDIT))
    with pytest.raises(EditInputError, match="target prompts must be a list of strings"):
        edit(bundle, images[:1], src[:1], "x", fast(Method.SDEDIT))
    with pytest.raises(EditInputError, match="generation prompt #0 must be a string"):
        generate(bundle, [None], steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1; got 0"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"guidance": float("nan")}, "guidance must be a finite number; got nan"),
        ({"guidance": "7"}, "guidance must be a finite number"),
        ({"seeds": [1, 2]}, "got 2 seeds for 1 prompts"),
    ],
)
def test_generate_refuses_bad_settings(bundle, kwargs, message):
    with pytest.raises(EditInputError, match=message):
        generate(bundle, ["a red circle"], **kwargs)


def test_generate_refuses_no_prompts_and_empty_ones(bundle):
    with pytest.raises(EditInputError, match="no prompts given"):
        generate(bundle, [], steps=1)
    with pytest.raises(EditInputError, match="generation prompt #0 is empty"):
        generate(bundle, [" "], steps=1)


def test_fisedit_through_the_contract_matches_generated_sources(bundle):
    src, tgt = ["a red circle on a gray background"], ["a blue circle on a gray background"]
    sources = generate(bundle, src, steps=4, guidance=7.5, seeds=[3])
    r = edit(bundle, sources, src, tgt, EditConfig(method=Method.FISEDIT, steps=4), seeds=[3])
    assert r.images.shape == sources.shape and r.masks.shape == (1, 1, 32, 32)
    torch.testing.assert_close(r.extras["source_images"].float().cpu(), sources, atol=1e-4, rtol=0)
    assert r.unet_calls > 0


def test_steps_past_the_training_schedule_are_refused():
    """1000 DDIM steps of a 1000-step schedule with steps_offset 1 reach t = 1000: a clear error, not IndexError."""
    from instdiff.errors import EditInputError
    from instdiff.sampling import make_scheduler
    from instdiff.tiny import tiny_bundle

    bundle = tiny_bundle()
    train = int(bundle.fresh_scheduler().config.num_train_timesteps)
    assert int(make_scheduler(bundle, train - 1).timesteps.max()) < train
    for steps in (train, train + 5):
        with pytest.raises(EditInputError, match="steps"):
            make_scheduler(bundle, steps)


def test_source_advice_when_settings_read_a_source_prompt_that_is_missing():
    """The embedded default reads the source prompt; without one the CLI and the app warn (instdiff.inputs)."""
    from instdiff.config import EditConfig, MaskConfig, Method
    from instdiff.inputs import source_advice

    reads = EditConfig(method=Method.INSTDIFFEDIT, mask_prompt="source")
    assert "give a source prompt" in source_advice(reads, None)
    assert "give a source prompt" in source_advice(reads, "   ")
    assert source_advice(reads, "a red square") is None
    span = EditConfig(method=Method.INSTDIFFEDIT, mask=MaskConfig(tokens="edit_span"))
    assert source_advice(span, None) is not None
    assert source_advice(EditConfig(method=Method.INSTDIFFEDIT), None) is None  # the paper reads the target only
    assert source_advice(EditConfig(method=Method.SDEDIT, mask_prompt="source"), None) is None
