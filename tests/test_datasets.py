"""Dataset adapters on small fixtures written here in each public format (local files and a moto S3 server)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import datasets, schema
from pipelines.batch import row_seed
from pipelines.cli import main
from pipelines.datasets import DatasetError, replace_phrase


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _image(seed: int, size: tuple[int, int] = (24, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return m


def _decode_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))) > 127


@pytest.fixture()
def editing_mask_root(tmp_path):
    """Two Imagen rows (JPEG image, PNG mask) and one ImageNet row (mask at twice the image size)."""
    root = tmp_path / "Editing-Mask"
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    (root / "Editing-Mask_list.txt").write_text(
        "1 <> An oil painting of a Shiba Inu dog wearing a cowboy hat in a garden. <> Shiba Inu dog <> a raccoon\n"
        "\n"
        "7 <> A photo of a fuzzy panda riding a bike on top of a mountain. <> on top of a mountain <> on a beach\n"
        "ILSVRC2012_val_00028602.JPEG <> beagle <> Afghan hound\n"
    )
    (root / "image" / "1.jpg").write_bytes(_jpeg(_image(1)))
    (root / "image" / "7.png").write_bytes(_png(_image(7)))
    (root / "image" / "ILSVRC2012_val_00028602.JPEG").write_bytes(_jpeg(_image(3)))
    (root / "mask" / "1.png").write_bytes(_png(_mask((24, 16), (2, 2, 10, 8))))
    (root / "mask" / "7.jpg").write_bytes(_jpeg(_mask((24, 16), (0, 8, 24, 16))))
    (root / "mask" / "ILSVRC2012_val_00028602.png").write_bytes(_png(_mask((48, 32), (0, 0, 24, 16))))
    return root


def test_editing_mask_reads_imagen_and_imagenet_rows(editing_mask_root):
    table = datasets.read_editing_mask(str(editing_mask_root))
    schema.validate_input_schema(table.schema)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["1", "7", "ILSVRC2012_val_00028602"]
    one = rows["1"]
    assert one["source_prompt"] == "An oil painting of a Shiba Inu dog wearing a cowboy hat in a garden."
    assert one["target_prompt"] == "An oil painting of a raccoon wearing a cowboy hat in a garden."
    assert one["dataset"] == "editing-mask"
    meta = json.loads(one["meta"])
    assert meta["kind"] == "imagen" and meta["source_phrase"] == "Shiba Inu dog" and meta["line"] == 1
    assert meta["edit_phrase"] == "a raccoon" and meta["notes"] == []
    assert one["image"] == (editing_mask_root / "image" / "1.jpg").read_bytes()  # original bytes carried
    assert np.array_equal(_decode_mask(one["mask"]), _mask((24, 16), (2, 2, 10, 8)) > 0)
    assert rows["7"]["target_prompt"] == "A photo of a fuzzy panda riding a bike on a beach."
    assert _decode_mask(rows["7"]["mask"]).sum() == 24 * 8  # JPEG mask thresholded back to the exact box
    net = rows["ILSVRC2012_val_00028602"]
    assert net["source_prompt"] == "a photo of a beagle" and net["target_prompt"] == "a photo of an Afghan hound"
    net_meta = json.loads(net["meta"])
    assert net_meta["kind"] == "imagenet" and net_meta["target_class"] == "Afghan hound"
    assert "resized from 48x32 to the image's 24x16" in net_meta["notes"][0]
    assert np.array_equal(_decode_mask(net["mask"]), _mask((24, 16), (0, 0, 12, 8)) > 0)
    assert datasets.skipped_rows(table) == 0


def test_editing_mask_bad_rows_error_lists_all_or_skip_counts(editing_mask_root):
    (editing_mask_root / "mask" / "1.png").unlink()
    with open(editing_mask_root / "Editing-Mask_list.txt", "a") as f:
        f.write("99 <> only two fields\n")
        f.write("5 <> A photo of a cat. <> dog <> a raccoon\n")
    with pytest.raises(DatasetError) as err:
        datasets.read_editing_mask(str(editing_mask_root))
    text = str(err.value)
    assert "3 bad row(s)" in text
    assert "line 1: mask '1' not found" in text
    assert "line 5: expected 4 fields" in text
    assert "line 6: source phrase 'dog' is not in the caption" in text
    table = datasets.read_editing_mask(str(editing_mask_root), on_bad_row="skip")
    assert table.column("id").to_pylist() == ["7", "ILSVRC2012_val_00028602"]
    assert datasets.skipped_rows(table) == 3


def test_editing_mask_and_flexit_hostile_files_are_bad_rows(editing_mask_root, tmp_path):
    from test_inputs_layouts import bomb_png

    (editing_mask_root / "mask" / "1.png").write_bytes(bomb_png())  # a mask whose header claims 10^10 pixels
    (editing_mask_root / "image" / "7.png").write_bytes(b"")  # an empty image
    with pytest.raises(DatasetError) as err:
        datasets.read_editing_mask(str(editing_mask_root))
    assert "2 bad row(s)" in str(err.value) and "line 1: image refused as a decompression bomb" in str(err.value)
    assert "line 3: image is empty (0 bytes)" in str(err.value)
    table = datasets.read_editing_mask(str(editing_mask_root), on_bad_row="skip")
    assert table.column("id").to_pylist() == ["ILSVRC2012_val_00028602"]

    (tmp_path / "fx").mkdir()
    (tmp_path / "fx" / "a.png").write_bytes(bomb_png())
    (tmp_path / "fx" / "b.jpg").write_bytes(_jpeg(_image(2)))
    (tmp_path / "fx" / "pairs.txt").write_text("a.png <> cat <> dog\nb.jpg <> cow <> pig\n")
    table = datasets.read_flexit(str(tmp_path / "fx"), on_bad_row="skip")
    assert table.column("id").to_pylist() == ["b"] and datasets.skipped_rows(table) == 1


def test_flexit_finds_images_in_synset_folders_and_reads_csv(tmp_path):
    root = tmp_path / "flexit"
    for synset, name, seed in [
        ("n02088364", "ILSVRC2012_val_00000001.JPEG", 1),
        ("n02088094", "ILSVRC2012_val_00000002.JPEG", 2),
    ]:
        (root / "val" / synset).mkdir(parents=True)
        (root / "val" / synset / name).write_bytes(_jpeg(_image(seed)))
    (root / "ImageNet_list.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG <> beagle <> Afghan hound\n"
        "ILSVRC2012_val_00000002.JPEG <> Afghan hound <> beagle\n"
        "ILSVRC2012_val_00000001.JPEG <> beagle <> basset\n"
    )
    table = datasets.read_flexit(str(root))
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [
        "ILSVRC2012_val_00000001",
        "ILSVRC2012_val_00000002",
        "ILSVRC2012_val_00000001-2",
    ]
    assert rows[0]["target_prompt"] == "a photo of an Afghan hound" and rows[0]["mask"] is None
    assert json.loads(rows[2]["meta"])["target_class"] == "basset"
    assert rows[1]["dataset"] == "imagenet-flexit"
    # the same pairs as a CSV with a header and a class-only prompt template
    (root / "pairs.csv").write_text(
        "image,source,target\nILSVRC2012_val_00000002,Afghan hound,beagle\nILSVRC2012_val_00000404.JPEG,beagle,basset\n"
    )
    with pytest.raises(DatasetError, match="line 3: image 'ILSVRC2012_val_00000404.JPEG' not found"):
        datasets.read_flexit(str(root), pairs_file="pairs.csv")
    table = datasets.read_flexit(str(root), pairs_file="pairs.csv", class_template="{name}", on_bad_row="skip")
    assert table.to_pylist()[0]["target_prompt"] == "beagle" and table.num_rows == 1


def test_prompt_pairs_and_generated_sources(tmp_path):
    from instdiff.models import tiny_bundle

    path = tmp_path / "ip2p.jsonl"
    lines = [
        {
            "input": "a red circle on a gray background",
            "edit": "make it blue",
            "output": "a blue circle on a gray background",
            "url": "http://x/1",
        },
        {"id": "own-id", "input": "a green square", "edit": "turn it into a star", "output": "a green star"},
        {"input": "a cat", "edit": "no output"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DatasetError, match="line 3: missing or empty field"):
        datasets.read_prompt_pairs(str(path))
    table = datasets.read_prompt_pairs(str(path), on_bad_row="skip")
    assert table.column("id").to_pylist() == ["ip2p-000001", "own-id"]
    assert table.column("image").null_count == 2
    meta = json.loads(table.column("meta")[0].as_py())
    assert meta["edit"] == "make it blue" and meta["url"] == "http://x/1" and meta["edit_phrase"] == "make it blue"
    bundle = tiny_bundle()
    filled = datasets.generate_sources(table, bundle, steps=2, guidance=3.0, seed=5)
    assert filled.column("image").null_count == 0 and datasets.skipped_rows(filled) == 1
    img = np.asarray(Image.open(io.BytesIO(filled.column("image")[1].as_py())))
    assert img.shape == (32, 32, 3)
    gen = json.loads(filled.column("meta")[1].as_py())["generated"]
    assert gen == {"model": "tiny", "steps": 2, "guidance": 3.0, "seed": row_seed(5, "own-id")}
    # a row's source depends only on its id and the seed, not on the other rows (up to batched float rounding)
    alone = datasets.generate_sources(table.slice(1, 1), bundle, steps=2, guidance=3.0, seed=5)
    single = np.asarray(Image.open(io.BytesIO(alone.column("image")[0].as_py()))).astype(int)
    assert np.abs(single - img.astype(int)).max() <= 2


def test_listing_csv_local_with_relative_paths_and_masks(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png(_image(1, (16, 16))))
    (tmp_path / "imgs" / "a_mask.png").write_bytes(_png(_mask((16, 16), (4, 4, 8, 8))))
    (tmp_path / "b.jpg").write_bytes(_jpeg(_image(2, (16, 16))))
    listing = tmp_path / "edits.csv"
    listing.write_text(
        "image_path,source_prompt,target_prompt,mask_path,id,quality\n"
        "imgs/a.png,a red circle,a blue circle,imgs/a_mask.png,first,good\n"
        f"{tmp_path / 'b.jpg'},a cat,a dog,,,ok\n"
    )
    table = datasets.read_listing(str(listing))
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["first", "edits-000003"]
    assert rows[0]["dataset"] == "edits"
    assert _decode_mask(rows[0]["mask"]).sum() == 16 and rows[1]["mask"] is None
    assert json.loads(rows[0]["meta"])["quality"] == "good"
    listing.write_text(listing.read_text() + "imgs/missing.png,a,b,,,\n")
    with pytest.raises(DatasetError, match=r"row 4: .*missing.png does not exist"):
        datasets.read_listing(str(listing))
    with pytest.raises(DatasetError, match="header lacks column"):
        (tmp_path / "bad.csv").write_text("image,src,tgt\n")
        datasets.read_listing(str(tmp_path / "bad.csv"))


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server._server.server_address  # bound port (0 = any free port)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_listing_jsonl_on_s3_and_cli_import_to_s3(s3_server, tmp_path, capsys):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="set/img/x.png", Body=_png(_image(4, (16, 16))))
    s3.put_object(Bucket="data", Key="other/y.png", Body=_png(_image(5, (16, 16))))
    s3.put_object(Bucket="data", Key="set/img/x_mask.png", Body=_png(_mask((16, 16), (0, 0, 8, 16))))
    rows = [
        {
            "image_path": "img/x.png",
            "source_prompt": "a red circle",
            "target_prompt": "a blue circle",
            "mask_path": "img/x_mask.png",
            "id": "x",
        },
        {
            "image_path": "s3://data/other/y.png",
            "source_prompt": "a cat",
            "target_prompt": "a dog",
            "id": "y",
            "dataset": "mine",
        },
    ]
    s3.put_object(Bucket="data", Key="set/list.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    table = datasets.read_listing("s3://data/set/list.jsonl")
    assert table.column("id").to_pylist() == ["x", "y"]
    assert table.column("dataset").to_pylist() == ["list", "mine"]
    assert _decode_mask(table.column("mask")[0].as_py()).sum() == 128
    rc = main(["import-dataset", "listing", "s3://data/set/list.jsonl", "--out", "s3://data/out/in.parquet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {
        "format": "listing",
        "rows": 2,
        "skipped": 0,
        "out": "s3://data/out/in.parquet",
        "with_image": 2,
        "with_mask": 1,
        "with_error": 0,
    }
    body = s3.get_object(Bucket="data", Key="out/in.parquet")["Body"].read()
    back = pq.read_table(io.BytesIO(body))
    schema.validate_input_schema(back.schema)
    assert back.column("id").to_pylist() == ["x", "y"]


def test_cli_import_editing_mask_local_and_error_line(editing_mask_root, tmp_path, capsys):
    out = tmp_path / "em.parquet"
    assert main(["import-dataset", "editing-mask", str(editing_mask_root), "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 3
    (editing_mask_root / "image" / "7.png").unlink()
    rc = main(["import-dataset", "editing-mask", str(editing_mask_root), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "line 3: image '7' not found" in err


def test_cli_import_refuses_a_non_parquet_out_before_reading(tmp_path, capsys):
    rc = main(["import-dataset", "listing", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "x.csv")])
    assert rc == 2
    assert "--out must end with .parquet, got" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prompt-pairs", "{pairs}", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["prompt-pairs", "{pairs}", "--limit", "-1"], "--limit must be at least 1, got -1"),
        (["listing", "{dir}"], "{dir} is a folder; expected a file"),
        (["prompt-pairs", "{dir}"], "{dir} is a folder; expected a file"),
        (["prompt-pairs", "{binary}"], "{binary} is not UTF-8 text (byte 0: invalid start byte); expected a text file"),
        (["listing", "{binary}"], "{binary} is not UTF-8 text"),
        (
            ["prompt-pairs", "{pairs}", "--out", "{pairs}/x.parquet"],
            "{pairs} is a file, so no folder can be made there",
        ),
        (["listing", "{pairs}", "--target-template", "{caption}!"], "apply to hf and img2dataset"),
        (["hf", "{dir}", "--columns", "image"], "--columns expects FIELD=COLUMN (e.g. image=original_image)"),
        (["hf", "{dir}"], "no Parquet files at {dir}"),
        (["img2dataset", "{dir}"], "img2dataset rows need target prompts"),
        (["img2dataset", "{dir}", "--target-template", "{caption"], "is not a valid template"),
        (["img2dataset", "{pairs}", "--target-template", "{caption}"], "is not a folder"),
    ],
)
def test_cli_import_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"input": "a", "edit": "b", "output": "c"}) + "\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00bad")
    subst = {
        "{pairs}": str(tmp_path / "pairs.jsonl"),
        "{dir}": str(tmp_path / "folder"),
        "{binary}": str(tmp_path / "binary.jsonl"),
    }

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    out = ["--out", str(tmp_path / "x.parquet")] if "--out" not in argv else []
    assert main(["import-dataset", *map(fill, argv), *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("instdiff import-dataset: error: ") and fill(message) in err[0]
    assert not (tmp_path / "x.parquet").exists()


def test_many_bad_rows_are_counted_and_the_first_five_named_on_one_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(["not json"] * 7 + [json.dumps({"input": "a", "edit": "b", "output": "c"})]) + "\n")
    with pytest.raises(DatasetError) as err:
        datasets.read_prompt_pairs(str(path))
    text = str(err.value)
    assert "\n" not in text and "7 bad row(s): line 1: not JSON" in text
    assert "line 5: not JSON" in text and "line 6" not in text and "(and 2 more)" in text
    assert text.endswith("fix them, or pass on_bad_row='skip' (--on-bad-row skip) to leave them out")


def test_replace_phrase_keeps_grammar():
    got = replace_phrase("A photo of a fuzzy panda.", "fuzzy panda", "an Afghan hound")
    assert got == "A photo of an Afghan hound."
    assert replace_phrase("An image of an owl", "owl", "a cat") == "An image of a cat"
    assert replace_phrase("cat riding a bike", "riding a bike", "skateboarding") == "cat skateboarding"
    with pytest.raises(ValueError, match="not in the caption"):
        replace_phrase("a cat", "dog", "a raccoon")
