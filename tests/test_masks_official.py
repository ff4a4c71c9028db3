"""The official preset (instdiff.masks_official) and the three fixes, on constructed inputs whose right answer is
derived by hand in each test's comments."""

import numpy as np
import pytest
import torch

from instdiff.config import ConfigError, MaskConfig, MaskPreset, Refinement, from_mapping
from instdiff.masks import position_vector, similarity_vector, steps_for_strength
from instdiff.masks_official import (
    binomial_blur,
    cosines,
    minmax_u8,
    official_mask,
    official_word_ids,
    pil_resize,
    position,
    position_from_scores,
    quantize,
    refine,
    unit_images,
    unit_maps,
)
from instdiff.sampling import blend_timestep, ddim_invert, inversion_start_alpha, schedule
from instdiff.tiny import tiny_bundle


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(seed=0)


# ---- step 2: 8-bit images ----------------------------------------------------------------------------------------


def test_quantize_scales_to_255_and_truncates():
    # 255 · m / max m = 63.75, 127.5, 191.25, 255 (all exact in binary) → truncated: 63, 127, 191, 255
    # (rounding would give 64, 128, 191, 255; the paper pipeline keeps the floats)
    m = torch.tensor([[[0.25, 0.5], [0.75, 1.0]]]) * 0.125
    assert quantize(m).tolist() == [[[63, 127], [191, 255]]]
    assert quantize(torch.zeros(1, 2, 2)).tolist() == [[[0, 0], [0, 0]]]


# ---- step 3: PIL bicubic -----------------------------------------------------------------------------------------


def test_pil_resize_is_bicubic_a_minus_half_with_clipped_window():
    # 2 → 4 px, PIL's bicubic (a = −0.5) with the window clipped to the image and the weights renormalised:
    # out[1] samples at 0.75 (input pixel centres 0.5, 1.5): w(0.25) = 0.8671875, w(0.75) = 0.2265625,
    # 255 · 0.2265625 / 1.09375 = 52.82 → 53; out[0] = (255 · w(1.25) = −0.0703125 ...) < 0 → 0; symmetric.
    # (bilinear would give 64, 191; OpenCV's INTER_CUBIC, a = −0.75: 58, 197)
    img = torch.tensor([[[0, 255], [0, 255]]], dtype=torch.uint8)
    assert pil_resize(img, (4, 4))[0].tolist() == [[0, 53, 202, 255]] * 4
    assert pil_resize(img, (2, 2)).tolist() == img.tolist()  # same size: unchanged


# ---- step 4: inversion of the start map, per-unit min-max --------------------------------------------------------


def test_minmax_u8_per_image():
    # b = v/255; (b − 100/255)/(100/255)·255: 150 → 127.5 → 127; 200 → 255; 100 → 0. A constant image → 0.
    img = torch.tensor([[[100, 150], [200, 100]], [[7, 7], [7, 7]]], dtype=torch.uint8)
    assert minmax_u8(img).tolist() == [[[0, 127], [255, 0]], [[0, 0], [0, 0]]]


def test_unit_images_invert_the_start_unit_only():
    # start map peaks at (0, 0): 8-bit [[255, 0], [0, 0]] → inverted [[0, 255], [255, 255]] → min-max the same;
    # a word map with the same peak stays [[255, 0], [0, 0]]
    peak = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = unit_images(torch.stack([peak, peak]), (2, 2))
    assert out[0].tolist() == [[0, 255], [255, 255]]
    assert out[1].tolist() == [[255, 0], [0, 0]]


def test_per_unit_minmax_before_eq_7_changes_p():
    # 4×4 maps (resize is then the identity); blob = the top-left 2×2.
    # start = 1 − blob (its inversion is the blob); w1 = 0.5·blob; w2 = 0.25 + 0.25·blob.
    # Official: w1 → 255 on the blob, 0 elsewhere; w2 → 255 / 127 → min-max → 255 / 0: the same image as w1,
    # so cos(w1, w2) = 1 and P = [0, +1, +1, 0].
    # Raw maps (the paper pipeline): cos(w1, w2) = (4 · 0.5 · 0.5) / (1 · √(4·0.25 + 12·0.0625)) = 1/√1.75
    # = 0.756 — between γ2 and γ1, so w2 would be 0.
    blob = torch.zeros(4, 4)
    blob[:2, :2] = 1.0
    maps = torch.stack([1 - blob, 0.5 * blob, 0.25 + 0.25 * blob, torch.full((4, 4), 0.1)])  # (T=4, 4, 4)
    images = unit_images(maps, (4, 4))
    assert images[1].tolist() == images[2].tolist()
    assert position(images).tolist() == [0.0, 1.0, 1.0, 0.0]
    raw = similarity_vector(maps[None], torch.tensor([1]))[0, 2].item()
    assert raw == pytest.approx(1 / 1.75**0.5, abs=1e-6)


# ---- step 5: Eq. 6–8 ---------------------------------------------------------------------------------------------


def test_inclusive_comparisons_at_gamma1_and_gamma2():
    # official: S ≥ γ1 → +1, S ≤ γ2 → −1; the paper's Eq. 8 is strict, so exactly 0.9 and 0.6 are 0 there
    s = torch.tensor([0.9, 0.6, 0.75, 0.95, 0.5], dtype=torch.float64)
    assert position_from_scores(s, 0.9, 0.6).tolist() == [1.0, -1.0, 0.0, 1.0, -1.0]
    paper = position_vector(torch.cat([torch.zeros(1), s.float(), torch.zeros(1)])[None], torch.tensor([7]))
    assert paper[0, 1:3].tolist() == [0.0, 0.0]


def test_index_is_the_first_maximum_and_scores_its_own_one():
    # start inverted = [[0, 255], [255, 255]]; w1 = w2 = that image (both cos 1): the first (w1) is the index;
    # w3 is orthogonal to it (cos 0 ≤ 0.6) → −1
    start = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    ring = 1 - start
    maps = torch.stack([start, ring, ring, start, torch.ones(2, 2)])
    images = unit_images(maps, (2, 2))
    assert cosines(images[1:4], images[0]).tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert position(images).tolist() == [0.0, 1.0, 1.0, -1.0, 0.0]


# ---- step 1: word units ------------------------------------------------------------------------------------------


def test_bpe_pieces_merge_into_one_unit_counted_once():
    # tokens: start, 'zy' piece a, piece b, 'cat', end → units [0, 1, 1, 2, 3]; unit 1 = (a + b)/2
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 1.0]])
    maps = torch.stack([a, a, b, b, a])  # (5, 1, 3)
    units = unit_maps(maps, torch.tensor([0, 1, 1, 2, 3]), 4)
    assert units.shape == (4, 1, 3)
    assert units[1].tolist() == [[0.5, 0.0, 0.5]]
    # refinement with both words +1: mean of 2 unit images, each word once:
    # ([255, 0, 0] + [0, 255, 0]) / 2 / 255 = [0.5, 0.5, 0] → min-max [1, 1, 0]
    # (a word of 2 pieces counted twice would give (2·[1,0,0] + [0,1,0])/3 → [1, 0.5, 0])
    images = torch.tensor([[[0, 0, 0]], [[255, 0, 0]], [[0, 255, 0]], [[0, 0, 0]]], dtype=torch.uint8)
    assert refine(images, torch.tensor([0.0, 1.0, 1.0, 0.0])).tolist() == [[1.0, 1.0, 0.0]]
    # with a −1 word: min-max(obj) − min-max(back), clamped: [1, 0, 0] − [0, 1, 0] → [1, 0, 0]
    assert refine(images, torch.tensor([0.0, 1.0, -1.0, 0.0])).tolist() == [[1.0, 0.0, 0.0]]


def test_official_word_ids_group_space_separated_words(bundle):
    # the embedded tokenizer splits unknown words into pieces; 'zyx,' keeps its comma in the same unit
    tok = bundle.tokenizer
    ids = official_word_ids(tok, ["a zyx, cat"], 77)[0]
    n = len(tok("a zyx, cat").input_ids)
    pieces = len(tok("zyx,", add_special_tokens=False).input_ids)
    assert pieces >= 2
    expected = [0, 1] + [2] * pieces + [3, 4]
    assert ids[:n].tolist() == expected  # start, 'a', 'zyx,' pieces, 'cat', end
    assert ids[n:].tolist() == list(range(5, 5 + 77 - n))  # padding counts on


# ---- step 7: blur and Eq. 9 --------------------------------------------------------------------------------------


def test_binomial_blur_kernel_and_reflect_101_border():
    # impulse at the corner: per axis reflect-101 gives [6, 4, 1]/16 (a reflect-with-edge border would give
    # [10, 5, 1]/16); the 2-D response is the outer product /256
    x = torch.zeros(5, 5)
    x[0, 0] = 1.0
    out = binomial_blur(x, iters=1) * 256
    assert out[:3, :3].tolist() == [[36, 24, 6], [24, 16, 4], [6, 4, 1]]
    # interior impulse, twice: [1, 8, 28, 56, 70, 56, 28, 8, 1]/256 per axis (σ = 1 Gaussian's centre differs)
    y = torch.zeros(11, 11)
    y[5, 5] = 1.0
    row = (binomial_blur(y, iters=2)[5] * 256 * 256 / 70).tolist()
    assert row[1:10] == pytest.approx([1, 8, 28, 56, 70, 56, 28, 8, 1])


def test_binomial_blur_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(64, 48, generator=torch.Generator().manual_seed(0))
    ref = x.numpy()
    for _ in range(2):
        ref = cv2.GaussianBlur(ref, (5, 5), 0)
    assert np.abs(binomial_blur(x).numpy() - ref).max() < 1e-6


def test_official_mask_end_to_end_on_constructed_maps():
    # 4×4 maps on a 4×4 grid, as in test_per_unit_minmax_before_eq_7_changes_p: P = [0, 1, 1, 0] and the
    # refined map is the blob (no −1 word); blurred twice and min-max'ed, the top-left quadrant stays above
    # φ = 0.5 and the opposite corner below.
    blob = torch.zeros(4, 4)
    blob[:2, :2] = 1.0
    maps = torch.stack([1 - blob, 0.5 * blob, 0.25 + 0.25 * blob, torch.full((4, 4), 0.1)])[None]
    words = torch.tensor([[0, 1, 2, 3]])
    mask, soft, p = official_mask(maps, words, torch.tensor([4]), (4, 4), MaskConfig.official(phi=0.5))
    assert p[0].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert mask[0, 0, :2, :2].all() and not mask[0, 0, 3, 3]
    assert soft.shape == (1, 1, 4, 4) and soft.max() == 1.0
    # P is kept on later steps: the same maps with the words swapped keep P
    _, _, p2 = official_mask(maps.flip(1), words, torch.tensor([4]), (4, 4), MaskConfig.official(), p)
    assert p2.tolist() == p.tolist()


def test_one_word_prompt_uses_its_image():
    # start, one word, end: no Eq. 6–8, P = [0, 1, 0] and the mask comes from the word's image
    blob = torch.zeros(6, 6)
    blob[1:4, 1:4] = 1.0
    maps = torch.stack([torch.ones(6, 6), blob, torch.ones(6, 6)])[None]
    mask, _, p = official_mask(maps, torch.tensor([[0, 1, 2]]), torch.tensor([3]), (6, 6), MaskConfig.official())
    assert p[0].tolist() == [0.0, 1.0, 0.0]
    assert mask[0, 0, 2, 2] and not mask[0, 0, 5, 5]


# ---- presets -----------------------------------------------------------------------------------------------------


def test_presets_and_yaml():
    assert MaskConfig.paper() == MaskConfig()
    off = MaskConfig.official()
    assert off.preset is MaskPreset.OFFICIAL and off.uses_running_mean and off.blends_at_current_step
    assert not MaskConfig().uses_running_mean and not MaskConfig().blends_at_current_step
    assert from_mapping(MaskConfig, {"preset": "official", "phi": 0.3}) == MaskConfig.official(phi=0.3)
    with pytest.raises(ConfigError, match="refinement: fixed by preset 'official'"):
        MaskConfig.official(refinement=Refinement.OFFICIAL)
    with pytest.raises(ConfigError, match="preset"):
        from_mapping(MaskConfig, {"preset": "nope"})


def test_blend_timestep_current_vs_next():
    # after the step from t = 401 the paper blends with q(x_301 | x_0), the official loop with q(x_401 | x_0);
    # after the last step: x_0 (None) vs q(x_1 | x_0)
    ts = torch.tensor([401, 301, 201, 101, 1])
    assert int(blend_timestep(ts, 0, current=True)) == 401
    assert int(blend_timestep(ts, 0, current=False)) == 301
    assert int(blend_timestep(ts, 4, current=True)) == 1
    assert blend_timestep(ts, 4, current=False) is None


# ---- the fixes ---------------------------------------------------------------------------------------------------


def test_steps_for_strength_rounds_down_like_diffusers(bundle):
    # diffusers img2img: init_timestep = int(steps · strength) → 10 steps at 0.55 run 5, from t = 401
    assert steps_for_strength(10, 0.55) == 5
    assert steps_for_strength(8, 0.6) == 4
    assert steps_for_strength(50, 0.58) == int(50 * 0.58) == 28
    assert steps_for_strength(10, 0.05) == 1  # diffusers refuses 0 steps; one runs
    _, ts = schedule(bundle, 10, 0.55)
    assert ts.tolist() == [401, 301, 201, 101, 1]


def test_schedule_equals_diffusers_img2img_timesteps(bundle):
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline

    for steps in (4, 10, 25, 50):
        for strength in (0.05, 0.3, 0.5, 0.55, 0.58, 0.6, 0.75, 1.0):
            sched, ts = schedule(bundle, steps, strength)
            fake = SimpleNamespace(scheduler=sched)
            want, n = StableDiffusionImg2ImgPipeline.get_timesteps(fake, steps, strength, "cpu")
            if n == 0:  # diffusers would refuse; the project runs one step
                assert ts.tolist() == sched.timesteps[-1:].tolist()
            else:
                assert ts.tolist() == want.tolist(), (steps, strength)


def test_ddim_inversion_matches_diffusers_inverse_scheduler(bundle):
    from diffusers import DDIMInverseScheduler

    sched, ts = schedule(bundle, 10, 0.5)
    assert not sched.config.set_alpha_to_one
    assert inversion_start_alpha(sched).item() == pytest.approx(float(sched.alphas_cumprod[0]))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, bundle.latent_channels, 8, 8, generator=g)
    emb = bundle.encode_prompt(["a red circle"])
    trail = ddim_invert(bundle, sched, x0, emb, ts, lambda u, x, t, e: u(x, t, encoder_hidden_states=e).sample)
    inv = DDIMInverseScheduler.from_config(sched.config)
    inv.set_timesteps(10)
    x, expected = x0, [x0]
    with torch.no_grad():
        for t in inv.timesteps[: len(ts)]:
            eps = bundle.unet(x, t, encoder_hidden_states=emb).sample
            x = inv.step(eps, t, x).prev_sample
            expected.append(x)
    for got, want in zip(trail[::-1], expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_recorder_honours_upcast_attention():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from instdiff.attention import AttentionStore, RecordingAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=1, dim_head=8, upcast_attention=True, upcast_softmax=True)
    with torch.no_grad():  # logits of ~1e5: beyond fp16's 65504 unless upcast
        attn.to_q.weight.copy_(torch.eye(8) * 300)
        attn.to_k.weight.copy_(torch.eye(8) * 300)
    attn = attn.half()
    x = torch.randn(1, 4, 8).half()
    ctx = torch.randn(1, 3, 8).half()
    store = AttentionStore()
    out = RecordingAttnProcessor(store, (2, 2))(attn, x, ctx)
    want = AttnProcessor()(attn, x, ctx)  # diffusers' get_attention_scores path, which upcasts
    probs = store.maps[0]  # (1, 4, 3)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(1, 4), atol=1e-3)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), want.float(), atol=1e-2)
