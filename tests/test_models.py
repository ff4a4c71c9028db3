"""Model bundles: tiny from config, offline tokenizer, save/load through from_pretrained, clear errors."""

import json

import pytest
import torch

from instdiff.errors import ConfigError
from instdiff.models import (
    ModelLoadError,
    build_word_tokenizer,
    load_bundle,
    pick_device,
    pick_dtype,
    save_bundle,
    tiny_bundle,
)
from instdiff.synthetic import VOCABULARY


@pytest.fixture(scope="module")
def tiny():
    return tiny_bundle(seed=0, with_inpaint=True)


def test_tiny_geometry(tiny):
    assert tiny.vae_scale_factor == 4 and tiny.latent_channels == 4 and tiny.resolution == 32
    assert tiny.encode_prompt(["a red circle"]).shape == (1, 77, 32)
    z = tiny.encode_images(torch.zeros(2, 3, 32, 32))
    assert z.shape == (2, 4, 8, 8)
    assert tiny.decode_latents(z).shape == (2, 3, 32, 32)
    assert tiny.inpaint_unet.config.in_channels == 9


def test_tokenizer_is_offline_and_one_token_per_word():
    tok = build_word_tokenizer(VOCABULARY)
    for word in VOCABULARY:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # start, word, end
    ids = tok("a zebra-like sign!", truncation=False).input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.model_max_length == 77


def test_save_and_load_roundtrip_through_from_pretrained(tiny, tmp_path):
    tiny.defaults = {"attention_downsample": 1}
    folder = save_bundle(tiny, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = load_bundle(str(folder), device="cpu", dtype="fp32")
    assert loaded.defaults == {"attention_downsample": 1}
    assert loaded.inpaint_unet is not None
    for a, b in zip(tiny.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert tiny.tokenize(["a red circle"]).tolist() == loaded.tokenize(["a red circle"]).tolist()
    tiny.defaults = {}


def test_v_prediction_config_loads_through_same_code(tmp_path):
    b = tiny_bundle(prediction_type="v_prediction")
    folder = save_bundle(b, tmp_path / "sd2like")
    loaded = load_bundle(str(folder), device="cpu")
    assert loaded.prediction_type == "v_prediction"


def test_missing_and_malformed_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_bundle(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_bundle(str(tmp_path / "empty"), device="cpu")
    (tmp_path / "unet_only" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="single component"):
        load_bundle(str(tmp_path / "unet_only"), device="cpu")


def test_inpainting_only_checkpoint_needs_its_base(tmp_path):
    b = tiny_bundle()
    folder = save_bundle(b, tmp_path / "inpaint")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="needs its base model"):
        load_bundle(str(folder), device="cpu")


def test_inpaint_unet_channel_check(tmp_path):
    base = save_bundle(tiny_bundle(), tmp_path / "base")
    wrong = save_bundle(tiny_bundle(), tmp_path / "wrong")  # its UNet has 4 input channels, not 9
    with pytest.raises(ModelLoadError, match="input channels"):
        load_bundle(str(base), device="cpu", inpaint=str(wrong))


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_bundle("CompVis/stable-diffusion-v1-4", device="cpu", local_files_only=True)


def test_device_and_dtype_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("auto", torch.device("cuda")) is torch.float16
    assert pick_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ModelLoadError, match="accepted"):
        pick_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.parametrize("spec", ["nonsense", "meta", "cuda:99", "mps", "cuda"])
def test_unusable_devices_are_config_errors_that_say_what_the_machine_has(spec):
    if spec == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if spec == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match=r"this machine has: cpu") as exc:
        pick_device(spec)
    assert isinstance(exc.value, ModelLoadError)  # callers that catch model-load errors still do
    with pytest.raises(ConfigError, match="this machine has"):
        load_bundle("tiny", device=spec)


def test_unknown_dtypes_are_config_errors():
    with pytest.raises(ConfigError, match="accepted: auto"):
        pick_dtype("int8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="cannot hold model weights"):
        pick_dtype(torch.int8, torch.device("cpu"))
    assert pick_dtype(torch.bfloat16, torch.device("cpu")) is torch.bfloat16


def test_default_spec_loads_something(tiny):
    b = load_bundle("default", device="cpu")
    assert b.name in ("default", "tiny")


def test_word_ids_share_one_id_across_the_bpe_pieces_of_a_word(tiny):
    # "qzx" is not in the tiny vocabulary, so it splits into letters; the last piece ends the word
    pieces = tiny.tokenizer.convert_ids_to_tokens(tiny.tokenize(["a qzx cat"])[0, :7].tolist())
    assert pieces == ["<|startoftext|>", "a</w>", "q", "z", "x</w>", "cat</w>", "<|endoftext|>"]
    ids = tiny.word_ids(["a qzx cat", "a red circle"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :9].tolist() == [0, 1, 2, 2, 2, 3, 4, 5, 6]  # start, a, q z x, cat, end, padding…
    assert ids[0, 6:].tolist() == list(range(4, 75))  # end token and every padding position: their own ids
    assert ids[1].tolist() == list(range(77))  # one piece per word: every position its own id
