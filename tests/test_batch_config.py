"""Batch job configuration: YAML → typed dataclasses, overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from instdiff.editing import Inpaint, Method
from instdiff.imageio import DEFAULT_MAX_PIXELS
from pipelines.batch import config_from_args
from pipelines.cli import build_parser
from pipelines.config import (
    DEFAULT_MAX_PIXELS as CONFIG_MAX_PIXELS,
)
from pipelines.config import (
    AlphaPolicy,
    ConfigError,
    fingerprint,
    load_config,
    parse_assignment,
    parse_config,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "batch"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.input and cfg.output
    assert isinstance(cfg.method.method, Method)


def test_sections_become_typed_dataclasses():
    cfg = parse_config(
        {
            "input": "s3://b/in/",
            "output": "out/x",
            "seed": 7,
            "model": {"spec": "tiny", "dtype": "fp32"},
            "method": {"name": "diffedit", "steps": 10, "strength": 0.6, "mask": {"phi": 0.3}, "inpaint": "blend"},
            "image": {"size": 64, "alpha": "error", "max_pixels": 1000},
            "actors": {"pool_size": 3, "num_gpus": 0.5, "batch_size": 2},
            "write": {"max_rows_per_file": 10},
            "storage": {"endpoint_url": "http://127.0.0.1:9000"},
        }
    )
    assert cfg.method.method is Method.DIFFEDIT and cfg.method.steps == 10 and cfg.method.strength == 0.6
    assert cfg.method.mask.phi == 0.3 and cfg.method.mask.gamma1 == 0.9  # nested defaults kept
    assert cfg.method.inpaint is Inpaint.BLEND
    assert cfg.method.seed == 7 == cfg.seed
    assert cfg.image.size == 64 and cfg.image.alpha is AlphaPolicy.ERROR
    assert cfg.actors.num_gpus == 0.5 and isinstance(cfg.actors.num_gpus, float)
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert CONFIG_MAX_PIXELS == DEFAULT_MAX_PIXELS  # the config's default mirrors instdiff.imageio's


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"output": "o"}, "input: required key is missing"),
        (
            {"input": "i", "output": "o", "actors": {"pool": 2}},
            "actors.pool: unknown key; accepted keys in actors: pool_size, num_gpus, num_cpus, batch_size",
        ),
        (
            {"input": "i", "output": "o", "method": {"name": "magic"}},
            "method.name: 'magic' is not accepted; accepted: instdiffedit, sdedit, diffedit, fisedit",
        ),
        ({"input": "i", "output": "o", "method": {"seed": 3}}, "method.seed: unknown key (the seed is the top-level"),
        (
            {"input": "i", "output": "o", "method": {"mask": {"refinement": "x"}}},
            "method.mask.refinement: 'x' is not accepted; accepted: weighted, official",
        ),
        ({"input": "i", "output": "o", "actors": {"batch_size": "8"}}, "actors.batch_size: expected an integer"),
        ({"input": "i", "output": "o", "actors": {"pool_size": 0}}, "actors.pool_size: must be >= 1"),
        ({"input": "i", "output": "o", "image": {"size": "huge"}}, "image.size: 'huge' is not accepted; accepted: a"),
        (
            {"input": "i", "output": "o", "image": {"size_policy": "crop"}},
            "image.size_policy: 'crop' is not accepted; accepted: resize, pad, refuse",
        ),
        (
            {"input": "i", "output": "o", "image": {"alpha": "drop"}},
            "image.alpha: 'drop' is not accepted; accepted: convert, error",
        ),
        ({"input": "i", "output": "o", "write": {"compression": "xz"}}, "write.compression: 'xz' is not accepted"),
        ({"input": "i", "output": "o", "resume": "yes"}, "resume: expected true or false"),
        ({"input": "i", "output": "o", "method": {"strength": 1.5}}, "method.strength: must be in (0, 1]"),
        ({"input": "i", "output": "o", "colour": 1}, "colour: unknown key; accepted keys: input, output"),
        ({"input": "i", "output": "o", "ray": {"num_cpus": 0}}, "ray.num_cpus: must be null or >= 1; got 0"),
        (
            {"input": "i", "output": "o", "ray": {"object_store_memory": -5}},
            "ray.object_store_memory: must be null or >= 1 (bytes); got -5",
        ),
        (
            {"input": "i", "output": "o", "image": {"size": True}},
            "image.size: True is not accepted; accepted: a positive integer (longer side in px), 'model', or null",
        ),
        (
            {"input": "i", "output": "o", "image": {"size": [64]}},
            "image.size: [64] is not accepted; accepted: a positive integer (longer side in px), 'model', or null",
        ),
    ],
)
def test_config_errors_name_the_key_and_the_accepted_values(data, message):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_overrides_and_flags_win_over_the_file(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("input: a.parquet\noutput: out/a\nmethod: sdedit\nactors: {batch_size: 4}\n")
    args = build_parser().parse_args(
        [
            "batch",
            "--config",
            str(f),
            "--output",
            "out/b",
            "--steps",
            "3",
            "--set",
            "method.mask.phi=0.4",
            "--set",
            "image.size=null",
            "--actors",
            "2",
            "--model",
            "tiny",
            "--retry-errors",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.input, cfg.output) == ("a.parquet", "out/b")
    assert cfg.method.method is Method.SDEDIT and cfg.method.steps == 3 and cfg.method.mask.phi == 0.4
    assert cfg.image.size is None and cfg.actors.pool_size == 2 and cfg.actors.batch_size == 4
    assert cfg.model.spec == "tiny" and cfg.model.device == "auto"  # unset flags do not override
    assert cfg.retry_errors is True
    with pytest.raises(ConfigError, match="give --config FILE, or both --input and --output"):
        config_from_args(build_parser().parse_args(["batch", "--input", "x.parquet"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("method.steps")
    assert parse_assignment("seed=5") == ("seed", 5)


def test_fingerprint_ignores_resources_and_round_trips_through_to_dict():
    a = parse_config({"input": "i", "output": "o", "actors": {"pool_size": 1}})
    b = parse_config({"input": "i", "output": "o", "actors": {"pool_size": 4}, "write": {"max_rows_per_file": 5}})
    c = parse_config({"input": "i", "output": "o", "method": {"steps": 20}})
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    again = to_dict(a)
    again.pop("method")
    assert parse_config({**again, "method": to_dict(a.method)}) == a
    secret = parse_config({"input": "i", "output": "o", "storage": {"access_key_id": "AK", "secret_access_key": "S"}})
    assert to_dict(secret)["storage"]["secret_access_key"] == "***"


def test_python_m_entry_point_names_itself_in_its_messages(capsys):
    from pipelines.batch.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--steps", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    expected = "python -m pipelines.batch: error: argument --steps: expected an integer (ASCII digits, optional sign)"
    assert f"{expected}; got 'abc'" in err
    assert "pipelines.batch batch" not in err
    assert main(["--input", "x.parquet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "python -m pipelines.batch: error: give --config FILE, or both --input and --output"
    )


def test_mask_preset_official_in_yaml():
    from instdiff.config import MaskConfig, PromptMode

    cfg = parse_config(
        {
            "input": "i",
            "output": "o",
            "method": {"mask": {"preset": "official", "phi": 0.3}, "prompt_mode": "edit_words"},
        }
    )
    assert cfg.method.mask == MaskConfig.official(phi=0.3)
    assert cfg.method.prompt_mode is PromptMode.EDIT_WORDS
    from instdiff.config import from_mapping, to_plain

    assert from_mapping(MaskConfig, to_plain(cfg.method.mask)) == cfg.method.mask  # written, read back
    with pytest.raises(ConfigError, match="method.mask.smooth_iters: fixed by preset 'official'"):
        parse_config({"input": "i", "output": "o", "method": {"mask": {"preset": "official", "smooth_iters": 2}}})


_DEFAULTS = {
    "steps": 40,
    "guidance": 5.0,
    "instdiffedit": {"mask_steps": 1, "mask_prompt": "source", "mask": {"tokens": "edit_span", "phi": 0.1}},
}


def test_method_preset_model_takes_the_models_settings_and_paper_the_papers():
    from instdiff.config import EditConfig, MaskConfig, MaskPrompt, Preset

    job = {"input": "i", "output": "o", "seed": 3}
    model = parse_config({**job, "method": {"name": "instdiffedit", "n_noises": 2}}, _DEFAULTS)
    assert model.preset is Preset.MODEL  # the default, as instdiff edit's --preset
    assert model.method == EditConfig.for_model(_DEFAULTS, "model", n_noises=2, seed=3)
    assert (model.method.steps, model.method.guidance, model.method.mask_steps) == (40, 5.0, 1)
    assert model.method.mask_prompt is MaskPrompt.SOURCE and model.method.mask.phi == 0.1
    # the YAML's keys win over the model's, nested mask keys one by one
    over = parse_config({**job, "method": {"steps": 8, "mask": {"phi": 0.3}}}, _DEFAULTS)
    assert (over.method.steps, over.method.mask.phi, over.method.mask_steps) == (8, 0.3, 1)
    paper = parse_config({**job, "method": {"name": "instdiffedit", "preset": "paper"}}, _DEFAULTS)
    assert paper.preset is Preset.PAPER and paper.method.mask == MaskConfig() and paper.method.mask_steps is None
    assert (paper.method.steps, paper.method.guidance) == (40, 5.0)  # steps and guidance stay the model's
    # other editors read only steps and guidance; no instdiff.json (tiny, SD, hub ids): the paper's settings
    assert parse_config({**job, "method": "sdedit"}, _DEFAULTS).method.mask_steps is None
    assert parse_config({**job, "model": {"spec": "tiny"}}).method == EditConfig(seed=3)
    assert parse_config({**job, "model": {"spec": "org/some-sd-model"}}).method == EditConfig(seed=3)


def test_method_preset_is_recorded_and_reads_back():
    cfg = parse_config({"input": "i", "output": "o", "method": {"preset": "paper", "steps": 9}}, _DEFAULTS)
    written = to_dict(cfg)
    assert "preset" not in written and written["method"]["preset"] == "paper" and written["method"]["steps"] == 9
    assert written["method"]["name"] == "instdiffedit"
    assert parse_config(written, _DEFAULTS) == cfg  # the resolved settings under their preset, read back
    model = parse_config({"input": "i", "output": "o"}, _DEFAULTS)
    assert parse_config(to_dict(model), _DEFAULTS) == model
    assert fingerprint(model)["method"] == to_dict(model.method)  # resumes compare the resolved settings


def test_bad_method_preset_is_one_line_naming_the_accepted_values():
    with pytest.raises(ConfigError) as info:
        parse_config({"input": "i", "output": "o", "method": {"preset": "best"}})
    assert str(info.value) == "method.preset: 'best' is not accepted; accepted: model, paper"
    with pytest.raises(ConfigError, match="method.preset: 'model' cannot be combined with method.mask.preset"):
        parse_config({"input": "i", "output": "o", "method": {"preset": "model", "mask": {"preset": "official"}}})


def test_batch_preset_flag_and_set(tmp_path):
    from instdiff.config import Preset

    base = ["batch", "--input", "a.parquet", "--output", "out/a", "--model", "tiny"]
    assert config_from_args(build_parser().parse_args(base)).preset is Preset.MODEL
    assert config_from_args(build_parser().parse_args([*base, "--preset", "paper"])).preset is Preset.PAPER
    assert config_from_args(build_parser().parse_args([*base, "--set", "method.preset=paper"])).preset is Preset.PAPER
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--preset", "best"])


def test_embedded_model_defaults_are_read_without_loading_it():
    import subprocess
    import sys

    from instdiff.config import EditConfig
    from instdiff.model_defaults import model_defaults
    from instdiff.models import embedded_model_available, load_bundle

    if not embedded_model_available():
        pytest.skip("the embedded model does not ship in this checkout")
    defaults = model_defaults("default")
    assert defaults["instdiffedit"] and "steps" in defaults
    cfg = parse_config({"input": "i", "output": "o", "method": {"steps": 4}})  # model.spec: default
    assert cfg.method == EditConfig.for_model(defaults, "model", steps=4)
    assert load_bundle("default", device="cpu", dtype="fp32").defaults == defaults  # the loader reads the same
    # reading them and parsing a batch config loads no torch (the driver resolves the preset without weights)
    code = (
        "import sys\nfrom pipelines.config import parse_config\n"
        "parse_config({'input': 'i', 'output': 'o'})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_defaults_follow_the_loaders_choice(tmp_path):
    import json

    from instdiff.errors import ModelLoadError
    from instdiff.model_defaults import model_defaults

    assert model_defaults("tiny") == {} == model_defaults("tiny-inpaint")
    assert model_defaults("CompVis/stable-diffusion-v1-4") == {}  # hub ids: the loader reads local folders only
    assert model_defaults(str(tmp_path)) == {}  # a folder without instdiff.json
    (tmp_path / "instdiff.json").write_text(json.dumps(_DEFAULTS))
    assert model_defaults(str(tmp_path)) == _DEFAULTS
    (tmp_path / "instdiff.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="must hold a JSON object"):
        model_defaults(str(tmp_path))
    (tmp_path / "instdiff.json").write_text("{")
    with pytest.raises(ModelLoadError, match="cannot read the model's recommended settings"):
        model_defaults(str(tmp_path))
