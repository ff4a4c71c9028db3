"""The embedded shapes-world model: loads offline like a hub folder, reconstructs, edits in seconds."""

import json
import time

import numpy as np
import pytest
import torch

from instdiff.editing import EditConfig, Method, edit
from instdiff.models import EMBEDDED_MODEL_DIR, embedded_model_available, load_bundle, load_pretrained
from instdiff.synthetic import make_edit_pairs, make_scenes, scene_to_tensor

pytestmark = pytest.mark.skipif(not embedded_model_available(), reason="embedded model not shipped")


@pytest.fixture(scope="module")
def bundle():
    return load_bundle("default", device="cpu", dtype="fp32")


def test_folder_is_a_standard_diffusers_folder_within_budget():
    index = json.loads((EMBEDDED_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    weights = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.rglob("*.safetensors"))
    assert weights <= 25e6


def test_default_loads_through_from_pretrained_with_sd_geometry(bundle):
    assert bundle.name == "default"
    assert bundle.resolution == 64 and bundle.latent_channels == 4 and bundle.vae_scale_factor == 4
    assert bundle.inpaint_unet is not None and bundle.inpaint_unet.config.in_channels == 9
    assert bundle.prediction_type == "epsilon"
    assert bundle.scheduler.config.beta_schedule == "scaled_linear"
    assert all(next(m.parameters()).dtype == torch.float32 for m in bundle.modules())
    assert bundle.defaults["attention_downsample"] in (1, 2)
    same = load_pretrained(str(EMBEDDED_MODEL_DIR), torch.device("cpu"), torch.float32, local_files_only=True)
    p, q = next(bundle.unet.parameters()), next(same.unet.parameters())
    assert torch.equal(p, q)


def test_every_shapes_word_is_one_token(bundle):
    scene = make_scenes(1, seed=10_002)[0]
    words = scene.caption.replace(",", " ,").split()
    assert bundle.token_count(scene.caption) == len(words) + 2


def test_vae_reconstructs_held_out_scenes(bundle):
    scenes = make_scenes(4, seed=10_002)
    x = torch.stack([scene_to_tensor(s) for s in scenes])
    rec = bundle.decode_latents(bundle.encode_images(x))
    mse = ((rec - x) * 127.5).pow(2).mean().item()
    assert 10 * np.log10(255**2 / mse) > 25.0


def test_two_step_edit_runs_in_seconds(bundle):
    pair = make_edit_pairs(1, seed=10_000)[0]
    x = scene_to_tensor(pair.source)[None]
    t0 = time.perf_counter()
    res = edit(
        bundle,
        x,
        [pair.source_prompt],
        [pair.target_prompt],
        EditConfig(method=Method.INSTDIFFEDIT, steps=2, guidance=5.0),
        seeds=[0],
    )
    assert time.perf_counter() - t0 < 60.0  # about a second on an idle 2-core CPU
    assert res.images.shape == (1, 3, 64, 64) and res.masks.shape == (1, 1, 64, 64)
    assert res.extras["attention_downsample"] == bundle.defaults["attention_downsample"]
    outside = ~res.masks[0, 0]
    torch.testing.assert_close(res.images[0][:, outside], x[0][:, outside])  # pasted back outside the mask
