"""The config module: every config dataclass refuses wrong types and values with a ConfigError naming the field,
the one parser's type conversion, YAML files and ``--set`` assignments with one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from instdiff.config import (
    EditConfig,
    MaskConfig,
    Method,
    Refinement,
    SizePolicy,
    coerce,
    load_yaml,
    parse_assignment,
)
from instdiff.errors import ConfigError, InputNotFoundError, StorageError, TrainConfigError
from instdiff.sparse import FISEditConfig, SparseConfig, SparseMode
from instdiff.training import TrainConfig, UNetConfig, VaeConfig


# ---- types refused in Python as in YAML (D18, D18b) ---------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": "4"}, "steps: expected an integer; got '4'"),
        ({"steps": None}, "steps: expected an integer; got None"),
        ({"steps": 1.5}, "steps: expected an integer; got 1.5"),
        ({"steps": True}, "steps: expected an integer; got True"),
        ({"strength": "0.5"}, "strength: expected a number"),
        ({"guidance": "7"}, "guidance: expected a number"),
        ({"guidance": None}, "guidance: expected a number; got None"),
        ({"guidance": 1e308}, "guidance: accepted 0 to 100"),
        ({"guidance": -1.0}, "guidance: accepted 0 to 100"),
        ({"n_noises": 2.5}, "n_noises: expected an integer"),
        ({"seed": "x"}, "seed: expected an integer"),
        ({"seed": 2**70}, r"seed: must be in \[-9223372036854775808, 18446744073709551615\]"),
        ({"paste_back": "no"}, "paste_back: expected true or false"),
        ({"method": "magic"}, "method: 'magic' is not accepted; accepted: instdiffedit, sdedit, diffedit, fisedit"),
        ({"mask": None}, "mask: expected a MaskConfig"),
        ({"mask": 3}, "mask: expected a mapping with keys gamma1"),
        ({"mask": {"phi": "high"}}, "mask.phi: expected a number"),
        ({"inpaint_steps": "3"}, "inpaint_steps: got '3'; accepted: int or null"),
    ],
)
def test_edit_config_refuses_wrong_types(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EditConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"phi": "high"}, "phi: expected a number"),
        ({"phi": None}, "phi: expected a number; got None"),
        ({"smooth_size": None}, "smooth_size: expected an integer; got None"),
        ({"smooth_size": 3.0}, "smooth_size: expected an integer; got 3.0"),
        ({"refinement": "x"}, "refinement: 'x' is not accepted; accepted: weighted, official"),
        ({"invert_start": 1}, "invert_start: expected true or false"),
    ],
)
def test_mask_config_refuses_wrong_types(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MaskConfig(**kwargs)


def test_configs_convert_values_like_the_yaml_parser():
    cfg = EditConfig(method="sdedit", strength=1, guidance=np.float32(5), steps=np.int64(4), mask={"phi": 0.3})
    assert cfg.method is Method.SDEDIT and cfg.strength == 1.0 and isinstance(cfg.strength, float)
    assert type(cfg.guidance) is float and type(cfg.steps) is int and cfg.steps == 4
    assert cfg.mask == MaskConfig(phi=0.3) and MaskConfig(refinement="official").refinement is Refinement.OFFICIAL
    mask = MaskConfig(phi=0.4)
    assert EditConfig(mask=mask).mask is mask  # an instance passes unchanged
    assert EditConfig(seed=-1).seed == -1  # torch takes negative seeds
    assert cfg.with_(steps=7).steps == 7


# ---- the sparse engine and FISEdit session (D18, D20, D21) ---------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "x"}, "mode: 'x' is not accepted; accepted: dense, sparse, profile"),
        ({"block_sizes": ("a",)}, r"block_sizes\[0\]: expected an integer; got 'a'"),
        ({"block_sizes": 4}, "block_sizes: expected a list"),
        ({"block_sizes": ()}, "block_sizes must be positive integers"),
        ({"block_sizes": (0, 2)}, "block_sizes must be positive integers"),
        ({"dense_fraction": "half"}, "dense_fraction: expected a number"),
        ({"force_block": 0}, "force_block must be a positive block size"),
        ({"gather_cost": float("nan")}, "gather_cost must be >= 0"),
        ({"block_overhead": -1.0}, "block_overhead must be a finite number >= 0"),
        ({"sparse_conv": "yes"}, "sparse_conv: expected true or false"),
    ],
)
def test_sparse_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SparseConfig(**kwargs)


def test_sparse_config_converts_mode_and_lists():
    cfg = SparseConfig(mode="dense", block_sizes=[1, 2])
    assert cfg.mode is SparseMode.DENSE and cfg.block_sizes == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": "4"}, "num_steps: expected an integer; got '4'"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"threshold": 5}, r"threshold must be null \(Otsu\) or a fraction in \(0, 1\], got 5.0"),
        ({"threshold": -1}, "threshold must be null"),
        ({"threshold": 0}, "threshold must be null"),
        ({"threshold": "otsu"}, "threshold: got 'otsu'; accepted: float or null"),
        ({"open_radius": -1}, "open_radius must be >= 0, got -1"),
        ({"margin": -3}, "margin must be >= 0, got -3"),
        ({"composite_margin": -1}, "composite_margin must be >= 0"),
        ({"image_size": 0}, r"image_size must be null \(the model's size\) or >= 1 pixel, got 0"),
        ({"image_size": -8}, "image_size must be null"),
        ({"guidance_scale": float("nan")}, "guidance_scale: accepted 0 to 100; got nan"),
        ({"guidance_scale": 1e308}, "guidance_scale: accepted 0 to 100; got 1e"),
        ({"guidance_scale": None}, "guidance_scale: expected a number; got None"),
        ({"cache_budget_bytes": -1}, "cache_budget_bytes must be >= 0, got -1"),
        ({"min_difference": float("inf")}, "min_difference must be a finite number >= 0"),
        ({"sparse": {"mode": "x"}}, "sparse.mode: 'x' is not accepted"),
        ({"sparse": None}, "sparse: expected a SparseConfig"),
        ({"mask_steps": 60}, r"mask_steps must lie in \[1, num_steps=50\]"),
    ],
)
def test_fisedit_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FISEditConfig(**kwargs)


def test_fisedit_config_accepts_its_ranges():
    cfg = FISEditConfig(threshold=1, open_radius=0, margin=0, image_size=64, cache_budget_bytes=0, sparse={})
    assert cfg.threshold == 1.0 and cfg.sparse == SparseConfig()


def test_training_configs_check_types_with_their_error():
    with pytest.raises(TrainConfigError, match="steps: expected an integer; got 'x'"):
        VaeConfig(steps="x")
    with pytest.raises(TrainConfigError, match=r"grounding_downsample\[0\]: expected an integer"):
        UNetConfig(grounding_downsample=("a",))
    with pytest.raises(TrainConfigError, match="vae: expected a VaeConfig"):
        TrainConfig(vae=None)
    assert TrainConfig(vae={"steps": 3}).vae.steps == 3


# ---- coerce (D23) -------------------------------------------------------------------------------------------
def test_coerce_checks_the_length_of_fixed_tuples():
    assert coerce(tuple[int, int], [1, 2], "k") == (1, 2)
    with pytest.raises(ConfigError, match=r"k: expected a list of 2 items; got 3: \[1, 2, 3\]"):
        coerce(tuple[int, int], [1, 2, 3], "k")
    with pytest.raises(ConfigError, match="k: expected a list of 2 items; got 1"):
        coerce(tuple[int, int], [1], "k")
    with pytest.raises(ConfigError, match=r"k\[1\]: expected a string"):
        coerce(tuple[int, str], [1, 2], "k")
    assert coerce(tuple[int, ...], [1, 2, 3], "k") == (1, 2, 3)
    assert coerce(list[float], [1, 2], "k") == [1.0, 2.0]


def test_coerce_passes_a_dataclass_instance_and_builds_one_from_a_mapping():
    mask = MaskConfig(phi=0.5)
    assert coerce(MaskConfig, mask, "mask") is mask
    assert coerce(MaskConfig, {"phi": 0.5}, "mask") == mask
    assert coerce(SizePolicy | None, "pad", "p") is SizePolicy.PAD


# ---- YAML files and --set (M2, D7, D8, M3) ------------------------------------------------------------------
def test_load_yaml_on_a_folder_says_it_is_a_folder(tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(StorageError, match="is a folder"):
        load_yaml(folder)
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_load_yaml_refuses_bytes_that_are_not_text(tmp_path):
    path = tmp_path / "binaryfile.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_yaml(path)


def test_yaml_syntax_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\ninput: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 3, column 1: expected ',' or '\]'") as exc:
        load_yaml(path)
    assert "\n" not in str(exc.value) and "^" not in str(exc.value)
    with pytest.raises(ConfigError, match="cannot read the value") as exc:
        parse_assignment("method.steps=[1")
    assert "\n" not in str(exc.value)


def test_load_yaml_reads_utf8_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffsteps: 4\nnote: é\n".encode())
    assert load_yaml(path) == {"steps": 4, "note": "é"}


@pytest.mark.parametrize("text", ["..=4", "a..b=1", ".a=1", "a.=1"])
def test_parse_assignment_refuses_empty_key_parts(text):
    with pytest.raises(ConfigError, match="has an empty part"):
        parse_assignment(text)


def test_parse_assignment_reads_values_as_yaml():
    assert parse_assignment("method.steps=4") == ("method.steps", 4)
    assert parse_assignment("image.size=null") == ("image.size", None)
