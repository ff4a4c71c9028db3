"""Mask math on constructed attention maps whose right answer is known."""

import pytest
import torch

from instdiff.errors import ConfigError
from instdiff.masks import (
    MaskConfig,
    Refinement,
    diffedit_mask,
    first_pieces,
    index_token,
    instdiffedit_mask,
    iou,
    mask_area,
    merge_word_pieces,
    position_vector,
    refine,
    resize_mask,
    similarity_vector,
    steps_for_strength,
)

H = W = 16


def _object() -> torch.Tensor:
    m = torch.zeros(H, W)
    m[4:10, 5:12] = 1.0
    return m


def constructed_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens: 0 start (object + haze), 1 'a' (uniform), 2 'red' (object), 3 'circle' (object, dimmer),
    4 'on' (background), 5 end. Returns maps (1, 8, H, W), n_tokens (1,), object mask."""
    obj = _object()
    maps = torch.zeros(1, 8, H, W)
    maps[0, 0] = 0.7 * obj + 0.1
    maps[0, 1] = 1.0 / (H * W)
    maps[0, 2] = obj
    maps[0, 3] = 0.8 * obj + 0.01 * obj.flip(0)
    maps[0, 4] = 1.0 - obj
    maps[0, 5] = 0.5
    return maps, torch.tensor([6]), obj.bool()


def test_index_token_picks_the_object_word():
    maps, n, _ = constructed_maps()
    assert index_token(maps, n).item() in (2, 3)


def test_index_token_never_picks_start_end_or_padding():
    maps, n, _ = constructed_maps()
    maps[0, 6] = maps[0, 0]  # padding identical to the start map must be ignored
    maps[0, 5] = maps[0, 0]  # so must the end token
    assert index_token(maps, n).item() in (2, 3)


def test_position_vector_thresholds_flip_sign():
    sims = torch.tensor([[1.0, 0.95, 0.91, 0.9, 0.75, 0.6, 0.59, 0.1]])
    p = position_vector(sims, torch.tensor([8]), gamma1=0.9, gamma2=0.6)
    assert p.tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0]]  # start and end are never weighted
    # lowering gamma1 below a similarity turns a neutral token positive; raising gamma2 turns it negative
    assert position_vector(sims, torch.tensor([8]), 0.7, 0.6)[0, 4] == 1.0
    assert position_vector(sims, torch.tensor([8]), 0.9, 0.8)[0, 4] == -1.0


def test_token_map_that_is_the_object_comes_back_as_the_mask_exactly():
    maps, n, obj = constructed_maps()
    cfg = MaskConfig(smooth_size=1)  # no smoothing: the answer is exact
    mask, soft, p = instdiffedit_mask(maps, n, (H, W), cfg)
    assert p[0, 2] == 1 and p[0, 3] == 1 and p[0, 4] == -1 and p[0, 1] == -1
    assert torch.equal(mask[0, 0], obj)
    assert soft.min() >= 0 and soft.max() <= 1


def test_smoothed_mask_still_matches_object():
    maps, n, obj = constructed_maps()
    # a symmetric blur puts a step edge at 0.5: φ = 0.5 recovers the object, the paper's φ = 0.2 grows it
    mask, _, _ = instdiffedit_mask(maps, n, (H, W), MaskConfig(phi=0.5))
    assert iou(mask, obj[None, None]).item() > 0.8
    grown, _, _ = instdiffedit_mask(maps, n, (H, W), MaskConfig(phi=0.2))
    assert (grown >= mask).all() and grown.sum() > mask.sum()


def test_mask_on_finer_latent_grid_is_upsampled_object():
    maps, n, obj = constructed_maps()
    mask, _, _ = instdiffedit_mask(maps, n, (2 * H, 2 * W), MaskConfig(smooth_size=1, phi=0.5))
    big = resize_mask(obj[None, None], (2 * H, 2 * W))
    assert iou(mask, big).item() > 0.85


def test_phi_is_monotone():
    maps, n, _ = constructed_maps()
    maps[0, 2] = maps[0, 2] * torch.linspace(0.2, 1.0, W)  # graded object so φ matters
    areas = [
        mask_area(instdiffedit_mask(maps, n, (H, W), MaskConfig(phi=phi))[0]).item()
        for phi in (0.1, 0.3, 0.5, 0.7, 0.9)
    ]
    assert all(a >= b for a, b in zip(areas, areas[1:], strict=False))
    assert areas[0] > areas[-1]


def test_position_from_first_step_is_reused():
    maps, n, obj = constructed_maps()
    _, _, p = instdiffedit_mask(maps, n, (H, W), MaskConfig(smooth_size=1))
    later = maps.clone()
    later[0, 4] = obj.float()  # token 4 changes meaning later; P from the first step still subtracts it
    mask, _, p2 = instdiffedit_mask(later, n, (H, W), MaskConfig(smooth_size=1), position=p)
    assert torch.equal(p, p2)


def test_official_refinement_variant():
    maps, n, obj = constructed_maps()
    idx = index_token(maps, n)
    p = position_vector(similarity_vector(maps, idx), n)
    ref = refine(maps, p, Refinement.OFFICIAL)
    assert ref.min() >= 0
    assert torch.equal(ref[0] > 0.2, obj)
    # with no negative tokens, official == normalised mean of positives
    p_pos = p.clamp_min(0)
    ref_pos = refine(maps, p_pos, Refinement.OFFICIAL)
    expected = maps[0, 2:4].mean(0)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(ref_pos[0], expected, atol=1e-6)


def test_invert_start_variant_changes_reference():
    maps, n, _ = constructed_maps()
    # inverted start map resembles the background token
    assert index_token(maps, n, invert_start=True).item() == 4


def test_merge_word_pieces_averages_pieces():
    maps = torch.rand(1, 5, 4, 4)
    word_ids = torch.tensor([[0, 1, 1, 2, 3]])  # tokens 1 and 2 are pieces of one word
    merged = merge_word_pieces(maps, word_ids)
    assert torch.allclose(merged[0, 1], (maps[0, 1] + maps[0, 2]) / 2)
    assert torch.allclose(merged[0, 1], merged[0, 2])
    assert torch.equal(merged[0, 3], maps[0, 3])


def test_diffedit_mask_is_per_image_not_per_batch():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2 * 3, 4, 8, 8, generator=g)
    tgt = src.clone()
    tgt[:3, :, 2:5, 2:5] += 1.0  # image 0: small change
    tgt[3:, :, :, :4] += 100.0  # image 1: huge change that would dominate a batch-wide threshold
    batch_mask, _ = diffedit_mask(src, tgt, 3)
    alone, _ = diffedit_mask(src[:3], tgt[:3], 3)
    assert torch.equal(batch_mask[:1], alone)
    assert alone[0, 0, 2:5, 2:5].all() and alone.sum() == 9


def test_iou_known_values():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    b = a.clone()
    assert iou(a, b).item() == 1.0  # both empty
    a[..., :2, :] = True
    b[..., 1:3, :] = True
    assert abs(iou(a, b).item() - 4 / 12) < 1e-6
    assert iou(a, ~a).item() == 0.0
    assert iou(a, a).item() == 1.0


def test_resize_mask_roundtrip_and_area():
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[..., 2:6, 1:3] = True
    up = resize_mask(m, (32, 32))
    assert up.sum() == m.sum() * 16
    assert torch.equal(resize_mask(up, (8, 8)), m)


def test_steps_for_strength():
    assert steps_for_strength(50, 0.5) == 25
    assert steps_for_strength(50, 1.0) == 50
    assert steps_for_strength(10, 0.01) == 1


def test_merged_word_pieces_change_the_position_vector_only_at_their_tokens():
    """Tokens 3 and 4 are the two BPE pieces of one word: background and object. Unmerged, Eq. 8 gives them
    opposite signs; merged, both carry their mean (a uniform map) and get the same sign. No other token moves."""
    obj = _object()
    maps = torch.zeros(1, 8, H, W)
    maps[0, 0] = 0.7 * obj + 0.1
    maps[0, 1] = 1.0 / (H * W)
    maps[0, 2] = obj
    maps[0, 3] = 1.0 - obj
    maps[0, 4] = obj
    maps[0, 5] = 0.5
    n = torch.tensor([6])
    word_ids = torch.tensor([[0, 1, 2, 3, 3, 4, 5, 6]])
    cfg = MaskConfig(smooth_size=1)
    _, _, unmerged = instdiffedit_mask(maps, n, (H, W), cfg)
    _, _, merged = instdiffedit_mask(merge_word_pieces(maps, word_ids), n, (H, W), cfg)
    assert unmerged[0].tolist() == [0.0, -1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0]
    assert merged[0].tolist() == [0.0, -1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0]


def _two_piece_word_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1×4 maps. Tokens: 0 start, 1-2 the two BPE pieces of word 1, 3 word 2, 4 word 3, 5 end, 6-7 padding.

    Word 1's pieces [3,1,0,0] and [1,3,0,0] merge to [2,2,0,0]; word 2 [1,1,.2,0] has cosine 4/√(8·2.04)
    ≈ 0.990 > γ1 with it (+1); word 3 [0,0,0,1] has cosine 0 < γ2 (−1). The start map [1,1,0,0] is
    parallel to merged word 1, so Eq. 6 picks word 1.
    """
    maps = torch.zeros(1, 8, 1, 4)
    maps[0, 0, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    maps[0, 1, 0] = torch.tensor([3.0, 1.0, 0.0, 0.0])
    maps[0, 2, 0] = torch.tensor([1.0, 3.0, 0.0, 0.0])
    maps[0, 3, 0] = torch.tensor([1.0, 1.0, 0.2, 0.0])
    maps[0, 4, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    maps[0, 5, 0] = 0.25
    word_ids = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 6]])
    return maps, torch.tensor([6]), word_ids


def test_first_pieces_marks_one_token_per_word():
    _, _, word_ids = _two_piece_word_maps()
    assert first_pieces(word_ids)[0].tolist() == [True, True, False, True, True, True, True, True]


def test_merge_bpe_counts_a_two_piece_word_once():
    """Hand-derived: with merge_bpe word 1 weighs as one word in Eq. 9 and in the official refinement means.

    Counted once, P = (0, +1, 0, +1, −1, 0, 0, 0) and Eq. 9's sum is [2,2,0,0] + [1,1,.2,0] − [0,0,0,1]
    = [3, 3, .2, −1]; min-max → [1, 1, .3, 0], so φ = .25 keeps the third cell. Counted per piece (merged maps,
    P on both pieces) the sum is [5, 5, .2, −1] → [1, 1, .2, 0] and the cell drops out.
    """
    maps, n, word_ids = _two_piece_word_maps()
    cfg = MaskConfig(merge_bpe=True, smooth_size=1, phi=0.25)
    mask, soft, p = instdiffedit_mask(maps, n, (1, 4), cfg, words=word_ids)
    assert p[0].tolist() == [0.0, 1.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(soft[0, 0, 0], torch.tensor([1.0, 1.0, 0.3, 0.0]))
    assert mask[0, 0, 0].tolist() == [True, True, True, False]
    merged = merge_word_pieces(maps, word_ids)
    torch.testing.assert_close(refine(merged, p)[0, 0], torch.tensor([3.0, 3.0, 0.2, -1.0]))
    # per piece: the same merged maps, but both pieces carry P (what merging alone did before)
    _, soft_k, p_k = instdiffedit_mask(merged, n, (1, 4), MaskConfig(smooth_size=1, phi=0.25))
    assert p_k[0].tolist() == [0.0, 1.0, 1.0, 1.0, -1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(soft_k[0, 0, 0], torch.tensor([1.0, 1.0, 0.2, 0.0]))
    # the official refinement: mean of the +1 word maps is ([2,2,0,0] + [1,1,.2,0]) / 2, min-max [1, 1, 1/15, 0],
    # minus min-max of the −1 map [0,0,0,1]; per piece the mean is (2·[2,2,0,0] + [1,1,.2,0]) / 3 → 1/25
    torch.testing.assert_close(refine(merged, p, Refinement.OFFICIAL)[0, 0], torch.tensor([1.0, 1.0, 1 / 15, 0.0]))
    torch.testing.assert_close(refine(merged, p_k, Refinement.OFFICIAL)[0, 0], torch.tensor([1.0, 1.0, 1 / 25, 0.0]))
    # the index token is word 1's first piece; the second piece is never a candidate
    assert index_token(merged, n, counted=first_pieces(word_ids)).item() == 1


def test_merge_bpe_needs_word_ids():
    maps, n, _ = _two_piece_word_maps()
    with pytest.raises(ConfigError, match="merge_bpe"):
        instdiffedit_mask(maps, n, (1, 4), MaskConfig(merge_bpe=True))


def test_merge_bpe_with_an_edit_span_counts_the_word_once():
    maps, n, word_ids = _two_piece_word_maps()
    span = torch.zeros(1, 8, dtype=torch.bool)
    span[0, 1:3] = True  # the edit span is the two-piece word
    _, _, p = instdiffedit_mask(maps, n, (1, 4), MaskConfig(merge_bpe=True, smooth_size=1), words=word_ids, span=span)
    assert p[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
