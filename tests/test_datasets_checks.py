"""import-dataset's flag and content checks: a field mapped twice, a prompt column that holds no text, img2dataset's
--columns/--limit and its key counts, flags a format does not take, and an import that gives no rows."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from instdiff.errors import UsageError
from pipelines import schema as S
from pipelines.cli import main
from pipelines.datasets import DatasetError, read_hf, read_img2dataset
from pipelines.datasets.import_cmd import parse_columns
from pipelines.datasets.records import pick_prompt

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _one_error_line(capsys) -> str:  # noqa: ANN001
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("instdiff import-dataset: error: "), err
    return err[0]


def _img2dataset_parquet(root, n: int = 5):  # noqa: ANN001
    """img2dataset's parquet format: keys 0..n-1; key 1 a failed download, key 3 bytes that are no image."""
    root.mkdir()
    images = [None if i == 1 else b"not an image" if i == 3 else _jpeg(i) for i in range(n)]
    pq.write_table(
        pa.table(
            {
                "key": [str(i) for i in range(n)],
                "jpg": pa.array(images, pa.binary()),
                "caption": [f"a cat {i}" for i in range(n)],
                "status": ["failed_to_download" if i == 1 else "success" for i in range(n)],
                "error_message": ["HTTP 404" if i == 1 else None for i in range(n)],
            }
        ),
        root / "00000.parquet",
    )
    return root


# ---- --columns ---------------------------------------------------------------------------------------------------
def test_a_field_mapped_twice_is_refused_naming_it(tmp_path, capsys):
    assert parse_columns(["image=a", "source_prompt=b"]) == {"image": "a", "source_prompt": "b"}
    for items in (["image=a", "image=b"], ["image=a,image=b"], ["image=a", " image = a "]):
        with pytest.raises(UsageError, match=r"--columns maps field 'image' twice \(image=a and image=") as e:
            parse_columns(items)
        assert "map each field once" in str(e.value)
    rc = main(
        ["import-dataset", "hf", str(tmp_path), "--columns", "image=a", "--columns", "image=b"]
        + ["--out", str(tmp_path / "x.parquet")]
    )
    assert rc == 2 and "maps field 'image' twice" in _one_error_line(capsys)


def test_an_unknown_field_lists_the_accepted_fields_as_words(tmp_path, capsys):
    from pipelines.make_dataset import shapes_table

    pq.write_table(shapes_table(2, seed=0, size=32), tmp_path / "in.parquet")
    argv = ["import-dataset", "hf", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "x.parquet")]
    assert main([*argv, "--columns", "bogus=foo"]) == 2
    line = _one_error_line(capsys)
    assert "unknown field(s) bogus in the column mapping; accepted: id, image, mask, source_prompt" in line


# ---- prompt columns that hold no text ------------------------------------------------------------------------------
def test_an_integer_prompt_column_names_its_type_and_what_is_accepted(tmp_path, capsys):
    path = tmp_path / "labels.parquet"
    pq.write_table(
        pa.table(
            {
                "image": pa.array([{"bytes": _jpeg(0), "path": None}], IMAGE_STRUCT),
                "label": pa.array([3], pa.int64()),
                "caption": ["a dog"],
            }
        ),
        path,
    )
    with pytest.raises(DatasetError) as e:
        read_hf(str(path), columns={"source_prompt": "label"}, target_template="a cat")
    msg = str(e.value)
    assert "column 'label' (source_prompt) holds int64 values, not text" in msg
    assert "--source-template 'a photo of {label}'" in msg and "missing or empty" not in msg
    # the rule is the accepted way: the label's value is formatted into it
    t = read_hf(str(path), source_template="a photo of {label}", target_template="a cat")
    assert t[S.SOURCE_PROMPT].to_pylist() == ["a photo of 3"]
    # the CLI: one line, nothing written
    out = tmp_path / "x.parquet"
    argv = ["import-dataset", "hf", str(path), "--columns", "source_prompt=label", "--target-template", "a cat"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "holds int64 values, not text" in _one_error_line(capsys) and not out.exists()
    # a row-level reason (a joined prompt file leaves the column for the rows it lacks) says the type too
    with pytest.raises(DatasetError, match=r"column 'label' holds 3 \(int\), not text; a prompt column must hold"):
        pick_prompt({"label": 3}, "source_prompt", "label")
    with pytest.raises(DatasetError, match="is null in this row"):
        pick_prompt({"label": None}, "source_prompt", "label")
    with pytest.raises(DatasetError, match="is missing from this row"):
        pick_prompt({}, "source_prompt", "label")


def test_a_dictionary_encoded_text_column_is_text(tmp_path):
    path = tmp_path / "cat.parquet"
    pq.write_table(
        pa.table(
            {
                "image": pa.array([{"bytes": _jpeg(0), "path": None}], IMAGE_STRUCT),
                "caption": pa.array(["a dog"]).dictionary_encode(),
            }
        ),
        path,
    )
    t = read_hf(str(path), target_template="{caption} in snow")
    assert t[S.SOURCE_PROMPT].to_pylist() == ["a dog"]


# ---- img2dataset: --columns, --limit, key counts --------------------------------------------------------------------
def test_img2dataset_refuses_columns_and_honours_limit(tmp_path, capsys):
    root = _img2dataset_parquet(tmp_path / "dl")
    out = tmp_path / "x.parquet"
    base = ["import-dataset", "img2dataset", str(root), "--target-template", "{caption} at night", "--out", str(out)]
    assert main([*base, "--columns", "image=jpg"]) == 2
    line = _one_error_line(capsys)
    assert "--columns applies to hf only" in line and "--source-template" in line and not out.exists()
    # --limit: the first N rows (a failed download is a row; the bad key 3 is not and does not count)
    assert main([*base, "--limit", "3", "--on-bad-row", "skip"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 3 and summary["with_error"] == 1
    assert pq.read_table(out)[S.ID].to_pylist() == ["0", "1", "2"]
    t = read_img2dataset(str(root), target_template="{caption}!", limit=4, on_bad_row="skip")
    assert t[S.ID].to_pylist() == ["0", "1", "2", "4"]  # 3 is bad, so the 4th row is key 4


def test_img2dataset_logs_its_key_counts_before_bad_keys_are_removed(tmp_path, caplog):
    root = _img2dataset_parquet(tmp_path / "dl")
    with caplog.at_level(logging.INFO, logger="pipelines.datasets.img2dataset"):
        t = read_img2dataset(str(root), target_template="{caption}!", on_bad_row="skip")
    assert t.num_rows == 4
    (line,) = [r.getMessage() for r in caplog.records if "keys read" in r.getMessage()]
    assert "5 keys read: 3 downloaded, 1 failed downloads, 1 bad key or shard(s): 00000.parquet key '3':" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.datasets.img2dataset"), pytest.raises(DatasetError):
        read_img2dataset(str(root), target_template="{caption}!")  # policy error: counted first, then refused
    assert any("5 keys read" in r.getMessage() for r in caplog.records)


def test_limit_is_refused_where_a_format_does_not_take_it(tmp_path, capsys):
    (tmp_path / "l.csv").write_text("image_path,source_prompt,target_prompt\n")
    assert (
        main(
            ["import-dataset", "listing", str(tmp_path / "l.csv"), "--limit", "2", "--out", str(tmp_path / "x.parquet")]
        )
        == 2
    )
    assert "--limit applies to prompt-pairs, hf, img2dataset; listing imports every row" in _one_error_line(capsys)


# ---- nothing to import -----------------------------------------------------------------------------------------------
def test_an_import_with_no_rows_is_an_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.parquet"
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["import-dataset", "prompt-pairs", str(tmp_path / "empty.jsonl"), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "nothing to import, it has no rows; nothing written to" in line and not out.exists()
    (tmp_path / "bad.jsonl").write_text("not json\n")
    argv = ["import-dataset", "prompt-pairs", str(tmp_path / "bad.jsonl"), "--on-bad-row", "skip", "--out", str(out)]
    assert main(argv) == 2
    assert "all 1 of its rows were bad and skipped" in _one_error_line(capsys) and not out.exists()
    # an existing output is left as it was
    out.write_bytes(b"earlier")
    assert main(argv) == 2 and out.read_bytes() == b"earlier"


def test_an_overlong_integer_flag_gets_our_message_not_its_digits(tmp_path, capsys):
    huge = "9" * 5000
    for flag in ("--limit", "--seed", "--steps"):
        with pytest.raises(SystemExit) as e:
            main(["import-dataset", "prompt-pairs", "p.jsonl", "--out", str(tmp_path / "x.parquet"), flag, huge])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"argument {flag}: a 5000-digit integer is out of range" in err
        assert huge[:100] not in err and "set_int_max_str_digits" not in err


def test_overlong_integers_in_edit_batch_flags_set_and_yaml_get_one_short_line(tmp_path, capsys):
    huge = "9" * 5000
    for argv in (
        ["edit", "x.png", "--target", "a b", "--out", str(tmp_path / "o.png"), "--seed", huge],
        ["batch", "--input", "in.parquet", "--output", str(tmp_path / "o"), "--steps", huge],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and "a 5000-digit integer is out of range" in err and huge[:100] not in err
    assert main(["batch", "--input", "in.parquet", "--output", str(tmp_path / "o"), "--set", f"seed={huge}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--set seed: a 5000-character number is out of range" in err and huge[:100] not in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: in.parquet\noutput: out\nseed: {huge}\n")
    assert main(["batch", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a number with thousands of digits" in err and huge[:100] not in err and len(err.splitlines()) == 1


def test_integer_flags_take_ascii_digits_only(tmp_path, capsys):
    from pipelines.commands import int_arg

    assert int_arg(" +7 ") == 7 and int_arg("-3") == -3
    for bad in ("²", "٣", "-+5", "1.5", ""):
        with pytest.raises(SystemExit) as e:
            main(["edit", "x.png", "--target", "a b", "--out", str(tmp_path / "o.png"), f"--seed={bad}"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and "expected an integer (ASCII digits, optional sign)" in err and "int_arg" not in err
