"""The layouts users actually have, each built with its real writer: Hugging Face ``datasets`` Parquet
(InstructPix2Pix, ClassLabel sets, Image structs), img2dataset output (webdataset and parquet), polars and pandas
Parquet flavours (large/view strings, dictionaries), many files with different schemas, carried columns, and
hostile files fed to every adapter and to the batch job (bad rows or one line, never a traceback)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_batch_ray import JOB
from test_batch_stages import MAX_PIXELS, SIZE, job_config

from instdiff.errors import ConfigError
from instdiff.imageio import decode_mask
from pipelines import schema as S
from pipelines.batch import DecodeOptions, plan_input, read_stage, run_job
from pipelines.cli import main
from pipelines.config import parse_config
from pipelines.datasets import DatasetError, read_hf, read_img2dataset
from pipelines.make_dataset import shapes_table
from pipelines.storage import resolve


def _png(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(seed))).save(buf, format="JPEG")
    return buf.getvalue()


def _mask_png(box: tuple[int, int, int, int]) -> bytes:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[box[1] : box[3], box[0] : box[2]] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims ``width`` × ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _one_error_line(capsys, prog: str = "instdiff") -> str:  # noqa: ANN001
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog} ") and ": error: " in lines[0]
    return lines[0]


# ---- Hugging Face datasets ------------------------------------------------------------------------------------


def test_hf_instructpix2pix_parquet_is_recognised_and_imported(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "original_prompt": datasets.Value("string"),
            "original_image": datasets.Image(),
            "edit_prompt": datasets.Value("string"),
            "edited_prompt": datasets.Value("string"),
            "edited_image": datasets.Image(),
        }
    )
    images = [_png(i) for i in range(3)]
    data = {
        "original_prompt": [f"a photo of a cat {i}" for i in range(3)],
        "original_image": [{"bytes": b, "path": None} for b in images],
        "edit_prompt": ["make it a dog"] * 3,
        "edited_prompt": [f"a photo of a dog {i}" for i in range(3)],
        "edited_image": [{"bytes": _png(10 + i), "path": None} for i in range(3)],
    }
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "train-00000.parquet"))
    assert S.is_image_struct(pq.read_schema(tmp_path / "train-00000.parquet").field("original_image").type)

    out = tmp_path / "ip2p.parquet"
    assert main(["import-dataset", "hf", str(tmp_path / "train-00000.parquet"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["with_image"], summary["with_error"]) == (3, 3, 0)
    t = pq.read_table(out)
    assert t.schema.equals(S.INPUT_SCHEMA)
    assert t[S.IMAGE].to_pylist() == images
    assert t[S.SOURCE_PROMPT].to_pylist()[1] == "a photo of a cat 1"
    assert t[S.TARGET_PROMPT].to_pylist()[2] == "a photo of a dog 2"
    meta = json.loads(t[S.META][0].as_py())
    assert meta["edit_phrase"] == "make it a dog" and meta["layout"] == "instructpix2pix"
    assert "edited_image" not in meta  # image bytes never go into meta
    assert t[S.ID].to_pylist() == [f"train-00000-{i:06d}" for i in range(3)]


def test_hf_classlabel_set_with_templates_mapping_and_path_only_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["tench", "goldfish"])})
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": _png(1), "path": None}, {"bytes": _png(2), "path": None}], "label": [0, 1]},
        features=features,
    )
    ds.to_parquet(str(tmp_path / "labels.parquet"))
    # no image column the layouts know: the message lists the image columns there are
    with pytest.raises(DatasetError, match=r"no image column recognised .*--columns image=COLUMN .*\['img'\]"):
        read_hf(str(tmp_path / "labels.parquet"))
    t = read_hf(
        str(tmp_path / "labels.parquet"),
        columns={"image": "img"},
        source_template="a photo of a {label}",
        target_template="a photo of a shark, where a {label} was",
    )
    assert t[S.SOURCE_PROMPT].to_pylist() == ["a photo of a tench", "a photo of a goldfish"]
    assert json.loads(t[S.META][1].as_py())["label_id"] == 1

    # a path-only struct (the Hub's layout for images stored beside the Parquet file) is read from that path
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png(3))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(
        pa.table(
            {
                "key": ["k1", "k2"],
                "image": pa.array(
                    [{"bytes": None, "path": "imgs/a.png"}, {"bytes": None, "path": "imgs/nope.png"}], image_type
                ),
                "caption": ["a red car", "a blue car"],
            }
        ),
        tmp_path / "paths.parquet",
    )
    with pytest.raises(DatasetError, match=r"paths.parquet row 1: .*nope.png does not exist"):
        read_hf(str(tmp_path / "paths.parquet"), target_template="{caption} in the snow")
    t = read_hf(str(tmp_path / "paths.parquet"), target_template="{caption} in the snow", on_bad_row="skip")
    assert t[S.ID].to_pylist() == ["k1"] and t[S.IMAGE][0].as_py() == _png(3)
    assert t[S.TARGET_PROMPT][0].as_py() == "a red car in the snow"


# ---- img2dataset ----------------------------------------------------------------------------------------------


def _img2dataset_webdataset(root: Path) -> dict[str, str]:
    """Two shards as img2dataset writes them (webdataset's TarWriter, pandas metadata); key → expected status."""
    wds = pytest.importorskip("webdataset")
    pd = pytest.importorskip("pandas")
    root.mkdir()
    expected = {}
    for shard in range(2):
        meta = []
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                rec = {"key": key, "url": f"http://example.com/{key}.jpg", "caption": f"a red house {key}"}
                if i == 2:  # a failed download: only in the metadata Parquet
                    meta.append({**rec, "status": "failed_to_download", "error_message": "HTTP 404", "width": None})
                    expected[key] = "error"
                    continue
                info = {**rec, "status": "success", "error_message": None, "width": SIZE, "height": SIZE}
                sink.write({"__key__": key, "jpg": _jpeg(i + 10 * shard), "txt": rec["caption"], "json": info})
                meta.append(info)
                expected[key] = "ok"
        pd.DataFrame(meta).to_parquet(root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    (root / "_stats.json").write_text(json.dumps({"count": 6}))
    return expected


def test_laion_style_webdataset_shards_in_parquet_out_every_key_accounted(ray_local, tmp_path, capsys):
    shards = tmp_path / "laion"
    expected = _img2dataset_webdataset(shards)
    inp = tmp_path / "edits.parquet"
    argv = [
        "import-dataset",
        "img2dataset",
        str(shards),
        "--target-template",
        "{caption}, in winter",
        "--out",
        str(inp),
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["with_image"], summary["with_error"]) == (6, 4, 2)
    t = pq.read_table(inp)
    assert sorted(t[S.ID].to_pylist()) == sorted(expected)
    row = t.filter(pa.compute.equal(t[S.ID], "000010001")).to_pylist()[0]
    assert (row[S.SOURCE_PROMPT], row[S.TARGET_PROMPT]) == ("a red house 000010001", "a red house 000010001, in winter")
    assert json.loads(row[S.META])["url"] == "http://example.com/000010001.jpg"

    summary = run_job(parse_config({**JOB, "input": str(inp), "output": str(tmp_path / "out")}))
    assert (summary.written, summary.ok, summary.error) == (6, 4, 2)
    out = pq.read_table(tmp_path / "out")
    got = dict(zip(out[S.ID].to_pylist(), out[S.STATUS].to_pylist(), strict=True))
    assert got == expected  # every key once, with its status
    failed = out.filter(pa.compute.equal(out[S.STATUS], "error"))
    assert set(failed[S.ERROR].to_pylist()) == {"download failed: HTTP 404"}
    assert {json.loads(m)["url"] for m in out[S.META].to_pylist()} == {f"http://example.com/{k}.jpg" for k in expected}


def test_img2dataset_parquet_format_and_a_joined_prompt_file(tmp_path):
    pd = pytest.importorskip("pandas")
    root = tmp_path / "dl"
    root.mkdir()
    pd.DataFrame(
        {
            "key": ["0", "1", "2"],
            "jpg": [_jpeg(0), None, b"not an image"],
            "caption": ["a cat", "a dog", "a cow"],
            "url": ["u0", "u1", "u2"],
            "status": ["success", "failed_to_resize", "success"],
            "error_message": [None, "image too small", None],
        }
    ).to_parquet(root / "00000.parquet")
    pd.DataFrame({"key": ["0", "1"], "target_prompt": ["a tiger", "a wolf"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DatasetError, match="need target prompts"):
        read_img2dataset(str(root))
    with pytest.raises(DatasetError, match=r"00000.parquet key '2': not a readable image"):
        read_img2dataset(str(root), targets=str(tmp_path / "t.csv"))
    t = read_img2dataset(str(root), targets=str(tmp_path / "t.csv"), on_bad_row="skip")
    rows = {r[S.ID]: r for r in t.to_pylist()}
    assert set(rows) == {"0", "1"}
    assert (rows["0"][S.TARGET_PROMPT], rows["0"][S.ERROR]) == ("a tiger", None)
    assert rows["1"][S.ERROR] == "download failed: image too small" and rows["1"][S.IMAGE] is None


# ---- many files, every flavour, carried columns -------------------------------------------------------------


def _flavour_files(folder: Path) -> dict[str, bool]:
    """Input files written by pyarrow, polars and pandas, with different schemas; id → has a ground-truth mask."""
    pl = pytest.importorskip("polars")
    pd = pytest.importorskip("pandas")
    folder.mkdir()
    rows = shapes_table(6, seed=3, size=SIZE).to_pylist()
    # 1. pyarrow, no mask column at all (first file: its schema must not decide)
    a = rows[:2]
    pq.write_table(
        pa.table(
            {
                "id": pa.array([r["id"] for r in a], pa.large_string()),
                "image": pa.array([r["image"] for r in a], pa.binary_view()),
                "source_prompt": pa.array([r["source_prompt"] for r in a], pa.string_view()),
                "target_prompt": pa.array([r["target_prompt"] for r in a]).dictionary_encode(),
                "label": pa.array([1, 2], pa.int32()),
            }
        ),
        folder / "a.parquet",
    )
    # 2. polars (large strings, binary), with masks and a categorical dataset column
    b = rows[2:4]
    pl.DataFrame(
        {
            "id": [r["id"] for r in b],
            "image": [r["image"] for r in b],
            "source_prompt": [r["source_prompt"] for r in b],
            "target_prompt": [r["target_prompt"] for r in b],
            "mask": [r["mask"] for r in b],
            "dataset": pl.Series(["shapes", "shapes"], dtype=pl.Categorical),
            "label": [3, 4],
        }
    ).write_parquet(folder / "b.parquet")
    # 3. pandas with a category column, a datasets-style Image struct and an int64 label
    c = rows[4:]
    table = pa.Table.from_pandas(
        pd.DataFrame(
            {
                "id": [r["id"] for r in c],
                "source_prompt": [r["source_prompt"] for r in c],
                "target_prompt": pd.Categorical([r["target_prompt"] for r in c]),
                "label": [5, 6],
            }
        ),
        preserve_index=False,
    )
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = table.append_column("image", pa.array([{"bytes": r["image"], "path": None} for r in c], image_type))
    table = table.append_column("mask", pa.array([{"bytes": r["mask"], "path": None} for r in c], image_type))
    pq.write_table(table, folder / "c.parquet")
    return {r["id"]: i >= 2 for i, r in enumerate(rows)}


def test_every_file_and_flavour_is_read_and_unified(tmp_path):
    has_mask = _flavour_files(tmp_path / "in")
    fs, path = resolve(str(tmp_path / "in"))
    plan = plan_input(fs, path, "in", carry=("label",))
    assert S.MASK in plan.columns and plan.rows == 6 and len(plan.groups) == 3
    assert plan.carry.field("label").type == pa.int64()  # int32 and int64 files promote to one type
    opts = DecodeOptions.from_config(job_config())
    for files, read in plan.groups:
        assert not any(pa.types.is_string_view(t) or pa.types.is_binary_view(t) for t in read.types)
        decoded = read_stage(pq.read_table(files[0], schema=read, columns=read.names), opts=opts, carry=plan.carry)
        assert decoded.column_names[-1] == "label" and decoded["label"].type == pa.int64()
        for r in decoded.to_pylist():
            assert r[S.STATUS] == "ok", r[S.ERROR]
            assert (r[S.GT_BITS] is not None) == has_mask[r[S.ID]], r[S.ID]

    # an incompatible type is one error naming the file and the column
    pq.write_table(
        pa.table({"id": ["z"], "image": [1], "source_prompt": ["s"], "target_prompt": ["t"]}),
        tmp_path / "in" / "d.parquet",
    )
    with pytest.raises(S.SchemaError, match=r"d.parquet: column 'image' has type int64, expected binary"):
        plan_input(fs, path, "in")
    (tmp_path / "in" / "d.parquet").unlink()
    pq.write_table(pa.table({"id": ["z"], "label": ["five"]}), tmp_path / "in" / "e.parquet")
    with pytest.raises(S.SchemaError, match=r"carried column 'label' has type string in .*e.parquet"):
        plan_input(fs, path, "in", carry=("label",))
    with pytest.raises(ConfigError, match="carry: column 'nope' is in no file"):
        plan_input(fs, path, "in", carry=("nope",))
    with pytest.raises(ConfigError, match="carry: column 'status' cannot be carried"):
        plan_input(fs, path, "in", carry=("status",))


def test_batch_job_reads_mixed_files_and_carries_columns(ray_local, tmp_path):
    has_mask = _flavour_files(tmp_path / "in")
    cfg = parse_config({**JOB, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "carry": ["label"]})
    summary = run_job(cfg)
    assert (summary.written, summary.ok) == (6, 6)
    out = pq.read_table(tmp_path / "out")
    assert out.schema.names[: len(S.OUTPUT_SCHEMA)] == S.OUTPUT_SCHEMA.names and out.schema.names[-1] == "label"
    rows = {r[S.ID]: r for r in out.to_pylist()}
    assert sorted(r["label"] for r in rows.values()) == [1, 2, 3, 4, 5, 6]
    for rid, r in rows.items():
        assert (r[S.IOU] is not None) == has_mask[rid], rid  # masks of later files are never dropped


def test_path_only_struct_and_input_errors_are_error_rows_in_the_batch_stage():
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    batch = pa.table(
        {
            "id": ["a", "b", "c"],
            "image": pa.array([{"bytes": _png(0), "path": None}, {"bytes": None, "path": "x.png"}, None], image_type),
            "source_prompt": ["s"] * 3,
            "target_prompt": ["t"] * 3,
            "error": [None, None, "download failed: HTTP 500"],
        }
    )
    out = {r[S.ID]: r for r in read_stage(batch, opts=DecodeOptions.from_config(job_config())).to_pylist()}
    assert out["a"][S.STATUS] == "ok"
    assert out["b"][S.STATUS] == "error" and "holds only a path ('x.png')" in out["b"][S.ERROR]
    assert out["c"][S.ERROR] == "download failed: HTTP 500"


# ---- hostile files: bad rows or one line, never a traceback --------------------------------------------------


def _hostile(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    good = _png(0)
    files = {
        "bomb.png": bomb_png(),
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
        "text.png": b"hello, I am not an image",
        "good.png": good,
        "mask.png": _mask_png((2, 2, 10, 10)),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


@pytest.mark.parametrize("bad", ["bomb.png", "empty.png", "text.png"])
@pytest.mark.parametrize("column", ["image_path", "mask_path"])
def test_listing_with_a_hostile_image_or_mask_is_a_bad_row(tmp_path, capsys, bad, column):
    _hostile(tmp_path)
    other = "mask.png" if column == "image_path" else "good.png"
    cells = {column: bad, ("mask_path" if column == "image_path" else "image_path"): other}
    (tmp_path / "l.csv").write_text(
        "image_path,mask_path,source_prompt,target_prompt\n"
        f"good.png,mask.png,a,b\n{cells['image_path']},{cells['mask_path']},a,b\n"
    )
    argv = ["import-dataset", "listing", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o.parquet")]
    assert main(argv) == 2
    assert "row 3:" in _one_error_line(capsys)
    assert main([*argv, "--on-bad-row", "skip"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["skipped"]) == (1, 1)


HUGE = "x" * 200_000  # over the csv module's field size limit


@pytest.mark.parametrize(
    ("fmt", "make", "message"),
    [
        ("listing", lambda p: p.with_suffix(".csv").write_bytes(pq_bytes()), "is not UTF-8 text"),
        (
            "listing",
            lambda p: p.with_suffix(".csv").write_text(f'image_path,source_prompt,target_prompt\n"{HUGE}",a,b\n'),
            "not a readable CSV/TSV (line 1: field larger than field limit",
        ),
        ("listing", lambda p: p.with_suffix(".csv").write_text(""), "header lacks column(s)"),
        ("prompt-pairs", lambda p: p.with_suffix(".csv").write_bytes(pq_bytes()), "is not UTF-8 text"),
        ("hf", lambda p: p.with_suffix(".csv").write_text("a,b\n"), "no Parquet files"),
        ("hf", lambda p: (p.parent / "x.parquet").write_bytes(b"PAR1 garbage PAR1"), "cannot read Parquet file"),
        ("img2dataset", lambda p: p.with_suffix(".csv").write_text("a"), "not img2dataset output"),
        ("editing-mask", lambda p: (p.parent / "list.txt").write_bytes(b"\xff\xfe\x00"), "is not UTF-8 text"),
        (
            "flexit",
            lambda p: (p.parent / "pairs.csv").write_text(f'a.png,x,y\n"{HUGE}",x,y\n'),
            "not a readable pair list",
        ),
        # NUL bytes are legal in Python's CSV: the row names a file that does not exist, a bad row
        (
            "listing",
            lambda p: p.with_suffix(".csv").write_text("image_path,source_prompt,target_prompt\nx\0y,a,b\n"),
            "1 bad row",
        ),
    ],
)
def test_whole_input_problems_are_one_line_exit_2(tmp_path, capsys, fmt, make, message):
    src = tmp_path / "src"
    src.mkdir()
    make(src / "input")
    target = src if fmt in ("hf", "img2dataset", "editing-mask", "flexit") else next(src.iterdir())
    extra = ["--target-template", "{caption}!"] if fmt == "img2dataset" else []
    assert main(["import-dataset", fmt, str(target), *extra, "--out", str(tmp_path / "o.parquet")]) == 2
    assert message in _one_error_line(capsys)


def pq_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2, 3]}), buf)
    return buf.getvalue()


def test_hostile_tar_shards_and_hf_cells_are_bad_rows(tmp_path):
    wds = pytest.importorskip("webdataset")
    root = tmp_path / "dl"
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": _jpeg(0), "txt": "a cat"})
        sink.write({"__key__": "k1", "jpg": bomb_png(), "txt": "a bomb"})
        sink.write({"__key__": "k2", "jpg": _jpeg(2), "txt": "a dog"})
    with wds.TarWriter(str(root / "00001.tar")) as sink:
        sink.write({"__key__": "k3", "jpg": _jpeg(3), "txt": "a cow"})
        sink.write({"__key__": "k4", "jpg": _jpeg(4), "txt": "a pig"})
    data = (root / "00001.tar").read_bytes()
    cut = data.index(b"k4.jpg") + 512 + 100
    (root / "00001.tar").write_bytes(data[:cut])  # truncated inside k4's image
    (root / "00002.tar").write_bytes(b"this is not a tar file at all")
    with pytest.raises(DatasetError) as err:
        read_img2dataset(str(root), target_template="{caption} at night")
    text = str(err.value)
    assert "k1" in text and "decompression bomb" in text and "00002.tar: not a readable tar shard" in text
    t = read_img2dataset(str(root), target_template="{caption} at night", on_bad_row="skip", id_prefix="")
    assert sorted(t[S.ID].to_pylist()) == ["k0", "k2", "k3"]

    # hf cells: an int where an image should be, a bomb, a null
    pq.write_table(
        pa.table({"image": [_png(0), bomb_png(), None], "caption": ["a", "b", "c"], "target_prompt": ["x", "y", "z"]}),
        tmp_path / "h.parquet",
    )
    with pytest.raises(DatasetError, match=r"2 bad row\(s\): h.parquet row 1: image refused as a decompression bomb"):
        read_hf(str(tmp_path / "h.parquet"))
    t = read_hf(str(tmp_path / "h.parquet"), on_bad_row="skip")
    assert (t[S.SOURCE_PROMPT][0].as_py(), t[S.TARGET_PROMPT][0].as_py()) == ("a", "x")


def test_batch_job_hostile_rows_are_error_rows_and_a_hostile_input_is_one_line(tmp_path, capsys):
    rows = shapes_table(1, seed=0, size=SIZE).to_pylist()
    base = rows[0]
    hostile = {"bomb": bomb_png(), "trunc": base["image"][:40], "text": b"GIF89a nope", "empty": b""}
    table = pa.Table.from_pylist(
        [base]
        + [{**base, "id": k, "image": v} for k, v in hostile.items()]
        + [{**base, "id": "badmask", "mask": bomb_png()}],
        schema=S.INPUT_SCHEMA,
    )
    out = {r[S.ID]: r for r in read_stage(table, opts=DecodeOptions.from_config(job_config())).to_pylist()}
    assert out[base["id"]][S.STATUS] == "ok"
    for k in [*hostile, "badmask"]:
        assert out[k][S.STATUS] == "error" and out[k][S.ERROR], k

    # the job given a file that is not Parquet, a Parquet without the schema, or nothing: one line, exit 2
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    for name, message in (
        ("garbage.parquet", "cannot read input"),
        ("other.parquet", "missing column 'id'"),
        ("absent", "no Parquet files"),
    ):
        argv = ["batch", "--input", str(tmp_path / name), "--output", str(tmp_path / "o"), "--model", "tiny"]
        assert main(argv) == 2
        assert message in _one_error_line(capsys), name
    assert decode_mask(base["mask"]).any() and MAX_PIXELS > 0


def test_carry_is_off_by_default_and_set_by_flag_or_key():
    from pipelines.batch import config_from_args
    from pipelines.cli import build_parser
    from pipelines.config import fingerprint

    plain = parse_config({"input": "a", "output": "b"})
    assert plain.carry == () and "carry" not in fingerprint(plain)  # outputs written before carry existed resume
    args = build_parser().parse_args(["batch", "--input", "a", "--output", "b", "--carry", "url", "--carry", "label"])
    cfg = config_from_args(args)
    assert cfg.carry == ("url", "label") and fingerprint(cfg)["carry"] == ["url", "label"]
    assert parse_config({"input": "a", "output": "b", "carry": ["url"]}).carry == ("url",)
