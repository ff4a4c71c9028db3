"""InstDiffEdit on models whose attention is not SD's: sink reference, edit span, model presets, cheap mask phase."""

from __future__ import annotations

import pytest
import torch

from instdiff.config import EditConfig, MaskConfig, MaskPrompt, Reference, TokenChoice
from instdiff.errors import ConfigError
from instdiff.masks import index_token, position_vector, positions, similarity_vector, sink_token


@pytest.fixture(scope="module")
def embedded():  # type: ignore[no-untyped-def]
    from instdiff.models import load_bundle

    return load_bundle("default", device="cpu", dtype="fp32")


T = 8  # tokens: start, 3 words (n_tokens = 5 → words 1..3), end at 4, padding 5..7


def _maps(mass: dict[int, float]) -> torch.Tensor:
    """(1, T, 4, 4) maps: token k is a blob of total mass ``mass[k]`` at its own place (others 0.01)."""
    m = torch.full((1, T, 4, 4), 0.01)
    for k, v in mass.items():
        m[0, k] = 0.0
        m[0, k, k % 4, (k // 4) % 4] = v
    return m


def test_sink_is_the_non_word_token_with_the_most_mass():
    n = torch.tensor([5])
    # a word (2) holds the most mass overall, but words are not candidates; padding 6 is the sink
    maps = _maps({0: 1.0, 2: 9.0, 4: 2.0, 6: 3.0})
    assert sink_token(maps, n).tolist() == [6]
    # SD-like: the start token holds the most mass, so the sink is the start token and Eq. 6 is unchanged
    sd = _maps({0: 5.0, 4: 1.0, 6: 1.0})
    assert sink_token(sd, n).tolist() == [0]
    assert torch.equal(index_token(sd, n, reference=Reference.SINK), index_token(sd, n, reference=Reference.START))


def test_sink_reference_picks_the_word_whose_map_matches_the_sink():
    n = torch.tensor([5])
    maps = torch.zeros(1, T, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # start: top-left
    maps[0, 6] = torch.tensor([[0.0, 0.0], [0.0, 5.0]])  # padding sink: bottom-right, most mass
    maps[0, 1] = torch.tensor([[0.9, 0.1], [0.0, 0.0]])  # like the start token
    maps[0, 2] = torch.tensor([[0.0, 0.0], [0.1, 0.9]])  # like the sink
    maps[0, 3] = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert index_token(maps, n).tolist() == [1]  # paper Eq. 6
    assert index_token(maps, n, reference="sink").tolist() == [2]


def test_positions_use_the_span_where_there_is_one_and_eq8_elsewhere():
    maps = torch.rand(2, T, 4, 4)
    n = torch.tensor([5, 5])
    span = torch.zeros(2, T, dtype=torch.bool)
    span[0, 2] = True
    span[0, 6] = True  # padding is never a word: ignored
    p = positions(maps, n, MaskConfig(), span)
    assert p[0].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    eq8 = position_vector(similarity_vector(maps, index_token(maps, n)), n, 0.9, 0.6)
    assert torch.equal(p[1], eq8[1])
    assert torch.equal(positions(maps, n, MaskConfig()), eq8)


def test_for_model_layers_the_model_section_and_overrides():
    defaults = {
        "steps": 40,
        "guidance": 5.0,
        "instdiffedit": {"mask_steps": 1, "mask_prompt": "source", "mask": {"tokens": "edit_span", "phi": 0.1}},
    }
    cfg = EditConfig.for_model(defaults)
    assert (cfg.steps, cfg.guidance, cfg.mask_steps, cfg.mask_prompt) == (40, 5.0, 1, MaskPrompt.SOURCE)
    assert (cfg.mask.tokens, cfg.mask.phi, cfg.mask.gamma1) == (TokenChoice.EDIT_SPAN, 0.1, 0.9)
    over = EditConfig.for_model(defaults, steps=10, mask={"phi": 0.3})
    assert (over.steps, over.mask.phi, over.mask.tokens) == (10, 0.3, TokenChoice.EDIT_SPAN)
    paper = EditConfig.for_model(defaults, "paper")
    assert paper.mask == MaskConfig() and paper.mask_steps is None and paper.steps == 40
    assert EditConfig.for_model(defaults, method="sdedit").mask_steps is None  # only InstDiffEdit reads the section
    assert EditConfig.for_model({}) == EditConfig()
    with pytest.raises(ConfigError, match="preset"):
        EditConfig.for_model(defaults, "best")
    with pytest.raises(ConfigError, match="unknown key"):
        EditConfig.for_model({"instdiffedit": {"mask_stepz": 1}})
    with pytest.raises(ConfigError, match="mask_prompt"):
        EditConfig(mask_prompt="source", inpaint="none")


def test_edit_span_marks_the_words_the_prompts_differ_in(embedded):
    from instdiff.editing.instdiffedit import edit_span, prompt_words

    src = "a red circle and a blue star on a white background"
    tgt = "a red circle and a green square on a white background"
    words = prompt_words(embedded, tgt)
    span = edit_span(embedded, [src, tgt, ""], [tgt, tgt, tgt])
    marked = [w for w, pos in words if span[0, pos].all()]
    assert marked == ["green", "square"]
    assert not span[1].any()  # identical prompts: no span (Eq. 6-8 are used)
    assert [w for w, pos in words if span[2, pos].all()] == [w for w, _ in words if w not in ("a", "and", "on")]


def test_unknown_words_are_named(embedded):
    assert embedded.unknown_words(["a giraffe on a red circle", "a giraffe"]) == ["giraffe"]
    assert embedded.unknown_words(["a red circle on a white background"]) == []


def test_cheap_mask_phase_costs_what_the_config_says(embedded):
    from instdiff import synthetic
    from instdiff.editing import edit, expected_unet_calls

    pairs = synthetic.make_edit_pairs(2, seed=10_001, size=embedded.resolution)
    images = torch.stack([synthetic.scene_to_tensor(p.source) for p in pairs])
    src, tgt = [p.source_prompt for p in pairs], [p.target_prompt for p in pairs]
    cheap = EditConfig.for_model(embedded.defaults, steps=4)
    res = edit(embedded, images, src, tgt, cheap, seeds=[0, 1])
    k = 2  # ⌈0.5 · 4⌉
    assert res.extras["mask_steps"] == 1
    assert res.unet_calls == expected_unet_calls(cheap) == cheap.n_noises * 1 + 2 * k
    paper = EditConfig.for_model(embedded.defaults, "paper", steps=4)
    assert expected_unet_calls(paper) == 2 * 3 * k + 2 * 4
    blend = paper.with_(inpaint="none", mask_steps=1)  # after the phase the first noise goes on alone
    res = edit(embedded, images, src, tgt, blend, seeds=[0, 1])
    assert res.unet_calls == expected_unet_calls(blend) == 2 * 3 * 1 + 2 * (k - 1)
    assert res.masks.shape == (2, 1, embedded.resolution, embedded.resolution)


@pytest.mark.slow
def test_mask_stable_ends_the_phase_early(embedded):
    from instdiff import synthetic
    from instdiff.editing import edit

    p = synthetic.make_edit_pairs(1, seed=10_001, size=embedded.resolution)[0]
    cfg = EditConfig.for_model(embedded.defaults, "paper", steps=8, mask_stable=0.01, inpaint="none")
    res = edit(embedded, synthetic.scene_to_tensor(p.source)[None], [p.source_prompt], [p.target_prompt], cfg)
    assert res.extras["mask_steps"] == 2  # the second step's mask overlaps the first's
