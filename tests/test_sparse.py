"""FISEdit sparse engine: equivalence with the dense UNet, exactness outside the mask, cache accounting,
clean install / removal, mask math on constructed maps, and the APSC block-size heuristic."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from instdiff.errors import ConfigError, EditInputError
from instdiff.models import tiny_bundle
from instdiff.sparse import (
    ActivationCache,
    ConvShape,
    FISEditConfig,
    FISEditSession,
    SparseConfig,
    SparseMode,
    apply_sparse,
    choose_block_size,
    difference_mask,
    dilate,
    fisedit_edit_pairs,
    installed_state,
    opening,
    otsu_threshold,
    pool_any,
    remove_sparse,
    sparse_unet,
    token_alignment,
)

FORCE_ALL = dict(dense_fraction=1.0, min_resolution_ratio=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, especially on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_unet(seed: int = 0) -> UNet2DConditionModel:
    """A UNet with three resolutions (16, 8, 4), cross-attention at the two higher ones and in the middle."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval().requires_grad_(False)


def _inputs(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2, 4, 16, 16, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    return x, torch.tensor(900 - 300 * step), emb


def _record(unet: UNet2DConditionModel, state, steps: int) -> list[torch.Tensor]:
    cache = ActivationCache("cpu")
    state.bind(cache)
    outs = []
    for i in range(steps):
        x, t, emb = _inputs(i)
        with state.run_step(i, record=True):
            outs.append(unet(x, t, encoder_hidden_states=emb).sample.clone())
    return outs


def _sparse_outputs(unet: UNet2DConditionModel, state, mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    state.set_mask(mask)
    outs = []
    for i in range(steps):
        x, t, emb = _inputs(i)
        with state.run_step(i, sparse=True):
            outs.append(unet(x, t, encoder_hidden_states=emb).sample.clone())
    return outs


# ---- equivalence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 2, 4])
def test_all_ones_mask_sparse_equals_dense(block: int) -> None:
    unet = small_unet()
    with torch.inference_mode(), sparse_unet(unet, SparseConfig(force_block=block, **FORCE_ALL)) as st:
        dense = _record(unet, st, steps=2)
        sparse = _sparse_outputs(unet, st, torch.ones(2, 16, 16, dtype=torch.bool), steps=2)
        plans = st.plans()
    assert all(p != "dense" for p in plans.values()), plans  # every wrapped layer really ran sparsely
    assert sum(1 for p in plans.values() if p == "tokens") == 7  # 2 down + 1 mid + 4 up transformers
    for d, s in zip(dense, sparse, strict=True):
        assert (d - s).abs().max().item() <= 1e-4


@pytest.mark.parametrize("block", [1, 2, 4, None])
def test_partial_mask_with_unchanged_inputs_equals_dense(block: int | None) -> None:
    """Same inputs as the cached run: whatever the mask, halo reads from the cache must give the dense result."""
    unet = small_unet()
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(1, 16, 16, generator=g) > 0.75).expand(2, -1, -1).contiguous()
    cfg = SparseConfig(force_block=block, gather_cost=0.0 if block is None else None, **FORCE_ALL)
    with torch.inference_mode(), sparse_unet(unet, cfg) as st:
        dense = _record(unet, st, steps=2)
        sparse = _sparse_outputs(unet, st, mask, steps=2)
        macs = st.macs_summary()
    for d, s in zip(dense, sparse, strict=True):
        assert (d - s).abs().max().item() <= 1e-4
    assert macs["ratio"] > 1.0


def test_sparse_step_restores_the_cache() -> None:
    """In-place writes into cached tensors are undone at the end of the step."""
    unet = small_unet()
    with torch.inference_mode(), sparse_unet(unet, SparseConfig(force_block=2, **FORCE_ALL)) as st:
        _record(unet, st, steps=1)
        before = {(s, n): t.clone() for s, n, t in st.cache.items()}
        x, t, emb = _inputs(0)
        st.set_mask(torch.ones(2, 16, 16, dtype=torch.bool))
        with st.run_step(0, sparse=True):
            unet(x, t, encoder_hidden_states=emb * 3.0)  # a different prompt: different values are written
        for s, n, tensor in st.cache.items():
            assert torch.equal(before[(s, n)], tensor), n


# ---- install / remove -------------------------------------------------------------------------------------
def test_apply_remove_leaves_unet_unchanged() -> None:
    unet = small_unet()
    x, t, emb = _inputs(0)
    with torch.inference_mode():
        ref = unet(x, t, encoder_hidden_states=emb).sample
    types = [(n, type(m)) for n, m in unet.named_modules()]
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    procs = unet.attn_processors
    st = apply_sparse(unet, SparseConfig(mode=SparseMode.PROFILE))
    assert installed_state(unet) is st
    with pytest.raises(RuntimeError, match="already installed"):
        apply_sparse(unet)
    with torch.inference_mode():
        assert torch.equal(unet(x, t, encoder_hidden_states=emb).sample, ref)  # dense steps are the original
    remove_sparse(unet)
    assert installed_state(unet) is None
    assert [(n, type(m)) for n, m in unet.named_modules()] == types
    after = unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in procs.items()}
    assert all(unet.attn_processors[k] is procs[k] for k in procs)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    with torch.inference_mode():
        assert torch.equal(unet(x, t, encoder_hidden_states=emb).sample, ref)
    with pytest.raises(RuntimeError, match="not installed"):
        remove_sparse(unet)


def test_profile_mode_times_layer_types_and_counts_macs() -> None:
    unet = small_unet()
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:8, 4:8] = True
    with torch.inference_mode(), sparse_unet(unet, SparseConfig(mode=SparseMode.PROFILE)) as st:
        _record(unet, st, steps=1)
        st.reset_counters()
        _sparse_outputs(unet, st, mask, steps=1)
        times, macs = dict(st.times), st.macs_summary()
    assert times["conv"] > 0 and times["norm"] > 0 and times["attention"] > 0 and times["ff"] > 0
    assert times["gather"] > 0
    assert macs["dense"] > 2 * macs["actual"] > 0


# ---- cache ----------------------------------------------------------------------------------------------------
def _held_bytes(cache: ActivationCache) -> int:
    return sum(t.numel() * t.element_size() for _, _, t in cache.items())


def test_cache_accounting_matches_held_tensors() -> None:
    bundle = tiny_bundle()
    session = FISEditSession(bundle, FISEditConfig(num_steps=4, mask_steps=2, mask_from=1))
    _, run = session.generate("a red circle", seed=1)
    cache = run.activations
    assert cache.nbytes() == _held_bytes(cache) > 0
    per_step = cache.bytes_per_step()
    assert sorted(per_step) == [0, 1, 2, 3, 4]  # step 4 holds the final latents only
    assert sum(per_step.values()) == cache.nbytes()
    assert per_step[4] == run.latents(4).numel() * run.latents(4).element_size()
    assert all("latents" in cache.names(s) for s in per_step)
    # a budget: the first entries stay on the "device" tier, the rest spill to the host tier, values intact
    budget = per_step[0] // 2
    spilled = ActivationCache("cpu", budget_bytes=budget)
    for step, name, t in cache.items():
        spilled.put(step, name, t)
    assert 0 < spilled.device_bytes <= budget and spilled.host_bytes > 0
    assert spilled.nbytes() == cache.nbytes() == _held_bytes(spilled)
    assert spilled.device_bytes + spilled.host_bytes == spilled.nbytes()
    for step, name, t in cache.items():
        spilled.prefetch(step)
        assert torch.equal(spilled.get(step, name), t)
    spilled.drop(0, "latents")
    assert spilled.nbytes() == _held_bytes(spilled) == cache.nbytes() - per_step[4]


# ---- editor ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated() -> tuple:
    torch.set_num_threads(1)
    bundle = tiny_bundle()
    session = FISEditSession(bundle, FISEditConfig(num_steps=8, mask_steps=3, mask_from=2))
    image, run = session.generate("a red circle on a blue background", seed=0)
    return bundle, session, image, run


def test_unchanged_prompt_returns_cached_image(generated: tuple) -> None:
    _, session, image, run = generated
    res = session.edit(run, "a red circle on a blue background")
    assert torch.equal(res.images, image)
    assert not res.masks.any() and res.extras["changed"] is False
    assert res.unet_calls == 2 * 3  # only the detection steps ran


def test_small_edit_keeps_everything_outside_the_mask(generated: tuple) -> None:
    bundle, session, image, run = generated
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:5, 3:6] = True
    res = session.edit(run, "a green star on a blue background", mask=mask)
    lat = res.extras["latents"]
    outside = ~mask.expand_as(lat)
    assert torch.equal(lat[outside], run.latents(8)[outside])  # latent space: exact
    assert not torch.equal(lat[~outside], run.latents(8)[~outside])  # the inside did change
    assert res.images.shape == image.shape and res.masks.shape == (1, 1, 32, 32)
    assert torch.equal(res.images[~res.masks.expand_as(image)], image[~res.masks.expand_as(image)])
    # image space without compositing: outside the mask grown by a margin, the change is small next to inside
    raw = FISEditSession(bundle, FISEditConfig(num_steps=8, mask_steps=3, mask_from=2, composite=False))
    res2 = raw.edit(run, "a green star on a blue background", mask=mask)
    big = dilate(pool_any(mask[:, 0], (32, 32)), 8)[:, None].expand_as(image)
    small = pool_any(mask[:, 0], (32, 32))[:, None].expand_as(image)
    d = (res2.images - image).abs()
    assert d[~big].mean() < 0.25 * d[small].mean()
    assert res.extras["sparse_steps"] == 8 and res.extras["macs"]["ratio"] > 1.0
    assert set(res.extras["active_fraction"]) == {"8x8", "4x4"}


def test_difference_mask_edit_and_pairs(generated: tuple) -> None:
    bundle, session, image, run = generated
    res = session.edit(run, "a green star on a blue background")
    assert res.extras["mask_source"] == "difference"
    assert res.unet_calls == 2 * 8
    assert set(res.timings) >= {"encode", "mask", "denoise", "decode", "total"}
    pairs = fisedit_edit_pairs(
        bundle,
        ["a red circle", "a blue square"],
        ["a red star", "a blue square"],
        FISEditConfig(num_steps=4, mask_steps=2, mask_from=1),
        seeds=[0, 1],
    )
    assert pairs.images.shape == (2, 3, 32, 32) and pairs.masks.shape == (2, 1, 32, 32)
    assert not pairs.masks[1].any()  # unchanged prompt: nothing to edit
    assert pairs.timings["generate"] > 0 and len(pairs.extras["rows"]) == 2


def test_regenerate_is_the_dense_baseline(generated: tuple) -> None:
    _, session, image, run = generated
    same_image, same = session.regenerate(run, "a red circle on a blue background")
    assert torch.equal(same, run.latents(8)) and torch.equal(same_image, image)
    _, other = session.regenerate(run, "a green star on a blue background")
    assert not torch.equal(other, run.latents(8))


@pytest.mark.slow
def test_cross_attention_control_runs(generated: tuple) -> None:
    bundle, _, _, _ = generated
    cfg = FISEditConfig(num_steps=6, mask_steps=3, mask_from=2, cross_attention_control=True)
    session = FISEditSession(bundle, cfg)
    _, run = session.generate("a red circle", seed=2)
    assert any(n.endswith(":probs") for n in run.activations.names(0))
    assert not any(n.endswith(":probs") for n in run.activations.names(4))
    res = session.edit(run, "a red star")
    assert res.images.shape == (1, 3, 32, 32)


def test_a_cache_from_another_model_or_size_is_refused(generated: tuple) -> None:
    bundle, _, _, run = generated
    settings = dict(num_steps=8, mask_steps=3, mask_from=2)
    other = tiny_bundle(seed=1)
    other.name = "another-model"
    with pytest.raises(EditInputError, match=r"made by model 'tiny'.*this session's model is 'another-model'"):
        FISEditSession(other, FISEditConfig(**settings)).edit(run, "a green star on a blue background")
    bigger = FISEditSession(bundle, FISEditConfig(**settings, image_size=64))
    with pytest.raises(EditInputError, match=r"cache holds 8x8 latents \(32x32 px\); this session makes 16x16"):
        bigger.edit(run, "a green star on a blue background")
    with pytest.raises(EditInputError, match="16x16"):
        bigger.regenerate(run, "a green star on a blue background")
    controlled = FISEditSession(bundle, FISEditConfig(**settings, cross_attention_control=True))
    with pytest.raises(EditInputError, match="cross-attention maps of its first 0 steps; .* needs the first 3"):
        controlled.edit(run, "a green star on a blue background")
    with pytest.raises(EditInputError, match="8 steps and guidance 7.5; this session uses 6"):
        FISEditSession(bundle, FISEditConfig(num_steps=6, mask_steps=3, mask_from=2)).edit(run, "a green star")


def test_a_cache_from_another_sparse_mode_is_edited(generated: tuple) -> None:
    """Every mode records the same activations, so the engine's mode need not match the generation's: the dense
    baseline edits a cache recorded by the sparse engine (same latents outside the mask)."""
    bundle, _, _, run = generated
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:5, 3:6] = True
    dense = FISEditSession(bundle, FISEditConfig(num_steps=8, mask_steps=3, mask_from=2, sparse={"mode": "dense"}))
    lat = dense.edit(run, "a green star on a blue background", mask=mask).extras["latents"]
    outside = ~mask.expand_as(lat)
    assert torch.equal(lat[outside], run.latents(8)[outside]) and not torch.equal(lat, run.latents(8))


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(5, 5), r"at the image's 32x32 or the latents' 8x8; got shape \(5, 5\)"),
        (torch.ones(3, 32, 32), r"got shape \(3, 32, 32\)"),
        (torch.ones(1, 2, 8, 8), r"got shape \(1, 2, 8, 8\)"),
        (torch.ones(8), r"got shape \(8,\)"),
        (torch.full((8, 8), float("nan")), "mask values must be finite"),
        ([[1.0]], "mask must be a tensor"),
    ],
)
def test_a_mask_of_another_shape_or_not_finite_is_refused(generated: tuple, mask, message) -> None:
    _, session, _, run = generated
    with pytest.raises(EditInputError, match=message):
        session.edit(run, "a green star on a blue background", mask=mask)


def test_masks_at_image_and_latent_size_give_the_same_edit(generated: tuple) -> None:
    _, session, _, run = generated
    small = torch.zeros(8, 8, dtype=torch.bool)
    small[2:5, 3:6] = True
    big = small.repeat_interleave(4, 0).repeat_interleave(4, 1)[None].float()
    a = session.edit(run, "a green star on a blue background", mask=small)
    b = session.edit(run, "a green star on a blue background", mask=big)
    assert torch.equal(a.extras["mask_latent"], b.extras["mask_latent"])


def test_session_prompts_and_seeds_are_checked(generated: tuple) -> None:
    bundle, session, _, run = generated
    with pytest.raises(EditInputError, match="target prompt #0 is empty"):
        session.edit(run, "")
    with pytest.raises(EditInputError, match="target prompt #0 must be a string"):
        session.edit(run, 5)
    with pytest.raises(EditInputError, match="generation prompt #0 is empty"):
        session.generate("", 0)
    with pytest.raises(EditInputError, match="seed 1180591620717411303424 is out of range"):
        session.generate("a red circle", 2**70)
    with pytest.raises(EditInputError, match="seed must be an integer"):
        session.generate("a red circle", "0")
    with pytest.raises(EditInputError, match="source prompt #1 is empty"):
        fisedit_edit_pairs(
            bundle, ["a red circle", ""], ["a red star", "x"], FISEditConfig(num_steps=2, mask_steps=1, mask_from=1)
        )
    with pytest.raises(EditInputError, match="seed #0 must be an integer"):
        fisedit_edit_pairs(bundle, ["a"], ["b"], FISEditConfig(num_steps=2, mask_steps=1, mask_from=1), seeds=["x"])
    with pytest.raises(ConfigError, match="expected a FISEditConfig"):
        FISEditSession(bundle, {"num_steps": 4})


def test_token_alignment() -> None:
    src, dst = token_alignment([0, 5, 6, 7, 1], [0, 5, 9, 7, 1])
    assert list(zip(src, dst, strict=True)) == [(0, 0), (1, 1), (3, 3), (4, 4)]


# ---- mask math -------------------------------------------------------------------------------------------------
def test_otsu_splits_a_bimodal_map() -> None:
    g = torch.Generator().manual_seed(0)
    low = 0.2 + 0.05 * torch.randn(300, generator=g)
    high = 0.8 + 0.05 * torch.randn(100, generator=g)
    values = torch.cat([low, high])[torch.randperm(400, generator=g)].view(1, 20, 20)
    thr = otsu_threshold(values)
    assert low.max() < thr.item() < high.min()
    assert int((values > thr[:, None, None]).sum()) == 100


def test_opening_removes_isolated_pixels_and_keeps_regions() -> None:
    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, 4:10, 4:10] = True
    m[0, 1, 14] = True
    m[0, 13, 2] = True
    out = opening(m, 1)
    square = torch.zeros_like(m)
    square[0, 4:10, 4:10] = True
    assert torch.equal(out, square)  # specks gone, the 6×6 region intact


def test_dilation_grows_by_the_margin() -> None:
    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, 7, 7] = True
    for r in (1, 2, 3):
        out = dilate(m, r)
        assert int(out.sum()) == (2 * r + 1) ** 2
        assert out[0, 7 - r, 7 - r] and not out[0, 7 - r - 1, 7]


def test_difference_mask_from_constructed_steps() -> None:
    diffs = []
    for s in range(3):
        d = torch.full((1, 16, 16), 0.01 * (s + 1))
        d[0, 5:11, 3:9] = 1.0 + s
        d[0, 0, 15] = 5.0 * (s + 1)  # a one-pixel outlier
        diffs.append(d)
    m = difference_mask(diffs, open_radius=1, margin=0)
    expected = torch.zeros(1, 16, 16, dtype=torch.bool)
    expected[0, 5:11, 3:9] = True
    assert torch.equal(m, expected)
    assert int(difference_mask(diffs, open_radius=1, margin=1).sum()) == 8 * 8
    assert not difference_mask([torch.zeros(1, 16, 16)]).any()
    specks = torch.zeros(1, 16, 16)
    specks[0, 3, 3] = specks[0, 9, 12] = 1.0
    assert int(difference_mask([specks], open_radius=1, margin=0).sum()) == 2  # not opened away


def test_pool_any_any_active_pixel_activates() -> None:
    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, 5, 9] = True
    assert pool_any(m, (8, 8)).nonzero().tolist() == [[0, 2, 4]]
    assert pool_any(m, (4, 4)).nonzero().tolist() == [[0, 1, 2]]
    assert pool_any(m, (2, 2)).nonzero().tolist() == [[0, 0, 1]]


# ---- APSC block-size heuristic ---------------------------------------------------------------------------------------
def test_block_size_heuristic_scattered_vs_compact() -> None:
    convs = [ConvShape(320, 320, 3, 1, 1), ConvShape(320, 320, 3, 1, 1)]
    scattered = torch.zeros(1, 64, 64, dtype=torch.bool)
    scattered[0, 3::16, 5::16] = True  # 16 isolated pixels, one per 16×16 tile
    compact = torch.zeros(1, 64, 64, dtype=torch.bool)
    compact[0, 16:48, 16:48] = True  # one aligned 32×32 square
    small, costs_s = choose_block_size(scattered, convs, (1, 2, 4, 8, 16), gather_cost=32.0)
    large, costs_c = choose_block_size(compact, convs, (1, 2, 4, 8, 16), gather_cost=32.0)
    assert small == 1 and large == 16
    assert costs_s[1] < costs_s[16] and costs_c[16] < costs_c[1]
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    assert choose_block_size(full, convs, (1, 2, 4, 8, 16), gather_cost=32.0)[0] is None  # dense is cheaper
