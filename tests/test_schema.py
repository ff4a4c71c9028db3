"""pipelines.schema (column names, Arrow types, input validation) and the shapes demo set it describes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import schema as S
from pipelines.cli import main
from pipelines.make_dataset import shapes_table


def test_input_schema_accepts_canonical_and_wide_types():
    S.validate_input_schema(S.INPUT_SCHEMA)
    wide = pa.schema(
        [
            ("id", pa.large_string()),
            ("image", pa.large_binary()),
            ("source_prompt", pa.string_view()),
            ("target_prompt", pa.large_string()),
            ("mask", pa.null()),
            ("extra", pa.int64()),
        ]
    )
    S.validate_input_schema(wide)  # optional columns may be missing or all-null; extra columns are ignored


def test_wrong_schema_names_every_problem_and_shows_the_accepted_schema():
    bad = pa.schema(
        [
            ("id", pa.int64()),
            ("image", pa.string()),
            ("target_prompt", pa.string()),
            ("meta", pa.struct([("k", pa.int32())])),
        ]
    )
    with pytest.raises(S.SchemaError) as info:
        S.validate_input_schema(bad, source="input data/x.parquet")
    msg = str(info.value)
    assert "input data/x.parquet does not match" in msg
    assert "column 'id' has type int64, expected string" in msg
    assert "column 'image' has type string, expected binary" in msg
    assert "missing column 'source_prompt' (string)" in msg
    assert "column 'meta' has type struct" in msg
    assert "target_prompt" not in msg.split("accepted schema:")[0]  # a correct column is not reported
    assert "4 problem(s)" in msg and "\n" not in msg  # one line (the CLI rule)
    assert "accepted schema: id: string (required), image: binary (required)" in msg
    assert "mask: binary (optional)" in msg


def test_a_long_schema_problem_list_is_counted_and_cut_short():
    bad = pa.schema([(name, pa.int8()) for name in ("id", "image", "mask", "dataset", "meta")])
    problems = S.input_schema_problems(bad)
    assert len(problems) == 7  # five mistyped columns, two missing ones
    with pytest.raises(S.SchemaError) as info:
        S.validate_input_schema(bad)
    msg = str(info.value)
    assert "7 problem(s): " in msg and "(and 2 more)" in msg and "\n" not in msg
    assert problems[4] in msg and problems[5] not in msg and problems[6] not in msg  # the first five are named


def test_output_table_has_the_output_schema_and_a_doc_for_every_column():
    cols = {f.name: [None] for f in S.OUTPUT_SCHEMA}
    cols.update({S.ID: ["a"], S.STATUS: [S.STATUS_ERROR], S.ERROR: ["why"]})
    t = S.output_table(cols)
    assert t.schema.equals(S.OUTPUT_SCHEMA)
    assert S.output_schema_problems(t.schema) == []
    assert set(S.OUTPUT_DOC) == set(S.OUTPUT_SCHEMA.names)
    with pytest.raises(KeyError, match="edited"):
        S.output_table({k: v for k, v in cols.items() if k != S.EDITED})
    assert S.output_schema_problems(pa.schema([(S.ID, pa.int32())]))[0].startswith("column 'id' has type int32")


def test_shapes_set_is_valid_input_with_exact_masks(tmp_path):
    from instdiff.imageio import decode_image, decode_mask
    from instdiff.synthetic import make_edit_pairs

    t = shapes_table(4, seed=3, size=32)
    assert t.schema.equals(S.INPUT_SCHEMA)
    pairs = make_edit_pairs(4, seed=3, size=32)
    for row, pair in zip(t.to_pylist(), pairs, strict=True):
        assert row[S.ID] == pair.id
        image, notes = decode_image(row[S.IMAGE])
        assert notes == [] and np.array_equal(image, pair.source.image)
        assert np.array_equal(decode_mask(row[S.MASK], size=(32, 32)), pair.edit_mask)
        assert json.loads(row[S.META])["kind"] == pair.kind
    assert len(set(t[S.ID].to_pylist())) == 4


def test_make_dataset_command_writes_readable_parquet(tmp_path, capsys):
    out = tmp_path / "sub" / "shapes.parquet"
    assert main(["make-dataset", "shapes", "--n", "3", "--size", "32", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 3
    t = pq.read_table(out)
    S.validate_input_schema(t.schema)
    assert t.num_rows == 3
    assert main(["make-dataset", "shapes", "--n", "0", "--out", str(out)]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--size", "100001"], "--size must be in [16, 4096] px, got 100001"),
        (["--size", "8"], "--size must be in [16, 4096] px, got 8"),
        (["--out", "{file}/m.parquet"], "--out {file}/m.parquet: {file} is a file, so no folder can be made there"),
        (["--out", "{dir}"], "--out {dir} is a folder; expected a file"),
    ],
)
def test_make_dataset_refuses_bad_flags_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    import pipelines.make_dataset

    (tmp_path / "taken.png").write_bytes(b"x")
    (tmp_path / "d.parquet").mkdir()
    subst = {"{file}": str(tmp_path / "taken.png"), "{dir}": str(tmp_path / "d.parquet")}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dataset was built before the flags were checked")

    monkeypatch.setattr(pipelines.make_dataset, "shapes_table", no_work)
    argv = ["make-dataset", "shapes", "--n", "2", "--out", str(tmp_path / "m.parquet"), *map(fill, flags)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"instdiff make-dataset: error: {fill(message)}"]
