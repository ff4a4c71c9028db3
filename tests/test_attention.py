"""The recording processor records the expected layers and leaves the UNet's output unchanged."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from instdiff.attention import (
    AttentionSelection,
    AttentionStore,
    RecordingAttnProcessor,
    capture_attention,
    default_downsample,
    install_attention_capture,
    layer_downsample,
    recorded_paths,
    remove_attention_capture,
    select_layers,
)
from instdiff.models import tiny_bundle


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(seed=0)


def _inputs(bundle, batch=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    emb = bundle.encode_prompt(["", "", "a red circle", "a blue square"][:batch])
    return x, torch.tensor(500), emb


def test_selection_by_resolution_and_path(bundle):
    unet = bundle.unet
    assert default_downsample(unet) == 2  # tiny: cross-attention at 1 and 2 only; closest to SD's 4 is 2
    by_res = select_layers(unet, AttentionSelection(downsample=2))
    assert by_res == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor",
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
    ]
    assert all(layer_downsample(unet, p) == 2 for p in by_res)
    by_path = select_layers(unet, AttentionSelection(downsample=None, paths=("up_blocks.1.*",)))
    assert by_path and all(p.startswith("up_blocks.1.") and p.endswith("attn2.processor") for p in by_path)
    with pytest.raises(ValueError, match="downsample factors"):
        select_layers(unet, AttentionSelection(downsample=8))


def test_records_conditional_half_with_expected_shape(bundle):
    x, t, emb = _inputs(bundle)
    store = AttentionStore(cond_rows=slice(2, 4))
    with torch.no_grad(), capture_attention(bundle.unet, store, AttentionSelection(downsample=2)):
        bundle.unet(x, t, encoder_hidden_states=emb)
    assert store.counts[0] == 4  # four layers at 4×4 (down 1, up 0 ×2, mid)
    maps = store.mean(0)
    assert maps.shape == (2, 77, 4, 4)
    # probabilities over tokens sum to one at every position (head/layer means keep that)
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 4, 4), atol=1e-5)


def test_output_unchanged_against_sdpa(bundle):
    x, t, emb = _inputs(bundle)
    with torch.no_grad():
        ref = bundle.unet(x, t, encoder_hidden_states=emb).sample
        store = AttentionStore(cond_rows=slice(2, 4), enabled=False)  # all layers, recording switched off
        with capture_attention(bundle.unet, store, AttentionSelection(downsample=None)):
            out_all = bundle.unet(x, t, encoder_hidden_states=emb).sample
        store = AttentionStore(cond_rows=slice(2, 4))
        with capture_attention(bundle.unet, store, AttentionSelection(downsample=2)):
            out = bundle.unet(x, t, encoder_hidden_states=emb).sample
    assert store.counts[0] == 4
    torch.testing.assert_close(out_all, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_other_layers_keep_sdpa_and_removal_restores(bundle):
    unet = bundle.unet
    before = dict(unet.attn_processors)
    prev = install_attention_capture(unet, AttentionStore(), AttentionSelection(downsample=2))
    now = unet.attn_processors
    recorded = set(recorded_paths(unet))
    assert recorded == set(select_layers(unet, AttentionSelection(downsample=2)))
    for path, proc in now.items():
        if path not in recorded:
            assert proc is before[path]
            assert isinstance(proc, AttnProcessor2_0)
        else:
            assert isinstance(proc, RecordingAttnProcessor)
    remove_attention_capture(unet, prev)
    after = unet.attn_processors
    assert all(after[p] is before[p] for p in before)


def test_step_filter_and_reset(bundle):
    x, t, emb = _inputs(bundle)
    store = AttentionStore(cond_rows=slice(2, 4), record_steps={1})
    with torch.no_grad(), capture_attention(bundle.unet, store, AttentionSelection(downsample=2)):
        for step in range(3):
            store.step = step
            bundle.unet(x, t, encoder_hidden_states=emb)
    assert set(store.maps) == {1}
    store.reset()
    assert not store.maps and store.step == 0


def test_mixed_resolutions_in_one_step_are_refused(bundle):
    x, t, emb = _inputs(bundle)
    store = AttentionStore(cond_rows=slice(2, 4))
    with torch.no_grad(), capture_attention(bundle.unet, store, AttentionSelection(downsample=None)):
        with pytest.raises(ValueError, match="select one resolution"):
            bundle.unet(x, t, encoder_hidden_states=emb)
