"""`instdiff edit` end to end on a shapes scene, and its one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from instdiff.synthetic import make_edit_pairs
from pipelines.cli import main


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    pair = make_edit_pairs(1, seed=2, size=32)[0]
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    Image.fromarray(pair.source.image).save(path)
    return path, pair


@pytest.mark.parametrize("method", ["instdiffedit", "sdedit", "diffedit"])
def test_edit_writes_image_and_mask(scene, tmp_path, capsys, method):
    path, pair = scene
    out, mask = tmp_path / "out.png", tmp_path / "mask.png"
    rc = main(
        [
            "edit",
            str(path),
            "--model",
            "tiny",
            "--method",
            method,
            "--steps",
            "4",
            "--noises",
            "1",
            "--source",
            pair.source_prompt,
            "--target",
            pair.target_prompt,
            "--out",
            str(out),
            "--mask-out",
            str(mask),
        ]
    )
    assert rc == 0
    edited = np.asarray(Image.open(out))
    m = np.asarray(Image.open(mask))
    assert edited.shape == (32, 32, 3) and m.shape == (32, 32)
    assert set(np.unique(m)) <= {0, 255}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == method and summary["unet_calls"] > 0
    assert isinstance(summary["unet_calls"], int) and summary["preset"] == "model"  # the default: the model's
    assert summary["mask_preset"] == ("paper" if method == "instdiffedit" else None)  # only InstDiffEdit masks so


def test_mask_preset_official(scene, tmp_path, capsys):
    path, pair = scene
    out = tmp_path / "out.png"
    args = ["edit", str(path), "--model", "tiny", "--steps", "4", "--noises", "1", "--mask-preset", "official"]
    rc = main(args + ["--source", pair.source_prompt, "--target", pair.target_prompt, "--out", str(out)])
    assert rc == 0 and np.asarray(Image.open(out)).shape == (32, 32, 3)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mask_preset"] == "official" and summary["preset"] == "paper"  # as the batch job records it
    # --preset model contradicts the official recipe's loop: refused in one line, as in the batch config
    rc = main(args + ["--preset", "model", "--target", pair.target_prompt, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--mask-preset official runs on the paper's loop" in err[0]
    rc = main(
        args[:-2]
        + ["--preset", "paper", "--source", pair.source_prompt, "--target", pair.target_prompt, "--out", str(out)]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and (summary["preset"], summary["mask_preset"]) == ("paper", "paper")
    # the preset is InstDiffEdit's: with another editor it is refused in one line, before the model loads
    capsys.readouterr()
    rc = main(args + ["--method", "sdedit", "--target", pair.target_prompt, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--mask-preset official applies to --method instdiffedit only" in err[0]


def test_odd_size_rgba_input_is_converted_and_restored(tmp_path):
    img = Image.new("RGBA", (37, 29), (255, 0, 0, 255))
    src = tmp_path / "odd.png"
    img.save(src)
    out = tmp_path / "o.png"
    assert (
        main(
            [
                "edit",
                str(src),
                "--model",
                "tiny",
                "--steps",
                "2",
                "--method",
                "sdedit",
                "--target",
                "a red square",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (37, 29)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edit", "{bad}", "--target", "a red circle"], "cannot decode image"),
        (["edit", "{missing}", "--target", "a red circle"], "does not exist"),
        (["edit", "{scene}", "--target", "   "], "empty"),
        (["edit", "{scene}", "--target", "x", "--model", "{missing}"], "does not exist"),
        (["edit", "{scene}", "--target", "a red circle", "--size", "-3"], "--size must be at least 16 px"),
        (["edit", "{scene}", "--target", "a red circle", "--method", "diffedit"], "--source is required by diffedit"),
    ],
)
def test_errors_are_one_clear_line(scene, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    subst = {"{bad}": str(bad), "{missing}": str(tmp_path / "missing.png"), "{scene}": str(scene[0])}
    argv = [subst.get(a, a) for a in args] + ["--out", str(tmp_path / "o.png")]
    if "--model" not in argv:
        argv += ["--model", "tiny"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    ("flag", "target", "message"),
    [
        ("--out", "{dir}", "--out {dir} is a folder; expected a file"),
        ("--out", "{file}/x.png", "--out {file}/x.png: {file} is a file, so no folder can be made there"),
        ("--mask-out", "{dir}", "--mask-out {dir} is a folder; expected a file"),
        ("--mask-out", "{file}/a/m.png", "--mask-out {file}/a/m.png: {file} is a file, so no folder can be made there"),
        ("--mask-out", "{tmp}/m.jpg", "--mask-out must be a .png file, got '{tmp}/m.jpg'"),
    ],
)
def test_output_paths_are_checked_before_any_work(tmp_path, capsys, flag, target, message):
    (tmp_path / "taken.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    subst = {"{dir}": str(tmp_path / "folder.png"), "{file}": str(tmp_path / "taken.png"), "{tmp}": str(tmp_path)}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    outputs = {"--out": str(tmp_path / "o.png"), flag: fill(target)}
    argv = ["edit", str(tmp_path / "missing.png"), "--target", "x", "--model", "tiny"]  # the image is never read
    for key, value in outputs.items():
        argv += [key, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"instdiff edit: error: {fill(message)}"]


def test_a_multi_line_error_is_printed_on_one_line(capsys):
    import argparse

    from instdiff.errors import ConfigError
    from pipelines.commands import run_command

    def fail(args: argparse.Namespace) -> int:
        raise ConfigError("invalid YAML in job.yaml: expected ']'\n  in line 1, column 3:\n\n    [1\n      ^")

    assert run_command("instdiff batch", fail, argparse.Namespace()) == 2
    err = capsys.readouterr().err
    assert err == "instdiff batch: error: invalid YAML in job.yaml: expected ']'; in line 1, column 3:; [1; ^\n"
