"""Images and masks read as a person sees them (issue 12, items 4, 5, 6, 9).

EXIF orientation in every decoder (edit CLI, batch job, import, the shared decoders), the one mask rule
"non-zero = edit", animated files (first frame, with a note), and truncated prompts noted on the batch row
with the row named by id in log lines. Every input is built here with Pillow (EXIF via ``Image.Exif``).
"""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, PngImagePlugin

from instdiff.errors import EditInputError, ImageInputError
from instdiff.imagefile import shown_size
from instdiff.imageio import decode_image, decode_mask
from instdiff.inputs import check_prompts, prompt_labels, truncation
from instdiff.tiny import build_word_tokenizer
from pipelines import datasets
from pipelines import schema as S
from pipelines.batch import EditStage, run_in_process
from pipelines.cli import main
from pipelines.config import parse_config
from pipelines.datasets import DatasetError

ORIENTATION = 0x0112


def _encode(img: Image.Image, fmt: str = "PNG", orientation: int | None = None, **kw: object) -> bytes:
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _stored(w: int = 96, h: int = 48) -> np.ndarray:
    """(h, w, 3) uint8 with four flat quadrants of distinct colours (survives JPEG), as stored in the file."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (250, 0, 0)
    a[: h // 2, w // 2 :] = (0, 250, 0)
    a[h // 2 :, : w // 2] = (0, 0, 250)
    a[h // 2 :, w // 2 :] = (250, 250, 250)
    return a


# What a viewer shows for EXIF Orientation 1-8, in the standard's words (exiftool's names), as NumPy ops.
SHOWN = {
    1: lambda a: a,  # horizontal (normal)
    2: np.fliplr,  # mirror horizontal
    3: lambda a: np.rot90(a, 2),  # rotate 180
    4: np.flipud,  # mirror vertical
    5: lambda a: np.rot90(np.fliplr(a), 1),  # mirror horizontal and rotate 270 CW
    6: lambda a: np.rot90(a, -1),  # rotate 90 CW
    7: lambda a: np.rot90(np.fliplr(a), -1),  # mirror horizontal and rotate 90 CW
    8: lambda a: np.rot90(a, 1),  # rotate 270 CW
}


# ---- item 4: orientation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_of_a_png_with_exif_decodes_as_shown(orientation):
    stored = _stored()
    array, notes = decode_image(_encode(Image.fromarray(stored), "PNG", orientation))
    assert np.array_equal(array, SHOWN[orientation](stored))
    if orientation == 1:
        assert notes == []
    else:
        assert any(f"EXIF orientation {orientation} applied" in n and "stored 96x48" in n for n in notes), notes


def test_phone_jpeg_stored_96x48_with_orientation_6_is_48x96_with_a_note():
    data = _encode(Image.fromarray(_stored()), "JPEG", 6, quality=95)
    array, notes = decode_image(data)
    assert array.shape == (96, 48, 3)
    expected = SHOWN[6](_stored())
    assert np.abs(array.astype(int) - expected).mean() < 4  # JPEG noise only
    assert notes == ["EXIF orientation 6 applied (rotated 90° clockwise): stored 96x48, shown 48x96"]
    assert shown_size(data) == (48, 96) and datasets.image_size(data) == (48, 96)


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
def test_orientation_in_webp_and_tiff(fmt):
    stored = _stored()
    data = _encode(Image.fromarray(stored), fmt, 8, **({"lossless": True} if fmt == "WEBP" else {}))
    array, notes = decode_image(data)
    assert np.array_equal(array, SHOWN[8](stored))  # Pillow turns TIFFs itself; never twice
    assert any("EXIF orientation 8 applied" in n for n in notes)
    assert shown_size(data) == (48, 96)


def test_xmp_orientation_counts_too():
    stored = _stored()
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="3"/>')
    array, notes = decode_image(_encode(Image.fromarray(stored), "PNG", pnginfo=info))
    assert np.array_equal(array, SHOWN[3](stored)) and "orientation 3" in notes[0]


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_masks_are_turned_like_images(orientation):
    m = np.zeros((48, 96), np.uint8)
    m[4:20, 10:30] = 255
    notes: list[str] = []
    got = decode_mask(_encode(Image.fromarray(m), "PNG", orientation), notes=notes)
    assert np.array_equal(got, SHOWN[orientation](m) > 0)
    assert any(f"orientation {orientation}" in n for n in notes)


def test_a_mask_turned_against_its_image_says_so():
    m = np.full((48, 96), 255, np.uint8)
    with pytest.raises(ImageInputError, match="turned 90° from each other"):
        decode_mask(_encode(Image.fromarray(m)), size=(48, 96))


# ---- item 5: the mask rule ----------------------------------------------------------------------------------
def _region() -> np.ndarray:
    r = np.zeros((32, 32), bool)
    r[8:20, 4:28] = True
    return r


def _mask_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    r = _region()
    red = np.zeros((32, 32, 3), np.uint8)
    red[r] = (255, 0, 0)
    dark_blue = np.zeros((32, 32, 3), np.uint8)
    dark_blue[r] = (0, 0, 40)
    opaque = np.dstack([np.where(r, 255, 0).astype(np.uint8)] * 3 + [np.full((32, 32), 255, np.uint8)])
    black_brush = np.zeros((32, 32, 4), np.uint8)
    black_brush[r, 3] = 255  # black strokes on a transparent layer
    white_under_clear = np.full((32, 32, 4), 255, np.uint8)
    white_under_clear[~r, 3] = 0  # transparent pixels whose colour is white
    grey_levels = np.where(r, 3, 0).astype(np.uint8)  # label map with class 3 in L mode
    sixteen = Image.fromarray(np.where(r, 1000, 0).astype(np.uint16))
    labels = Image.new("P", (32, 32))
    labels.putdata(np.where(r, 2, 0).astype(np.uint8).ravel().tolist())  # no palette: every colour black
    white_first = Image.fromarray(np.where(r, 0, 1).astype(np.uint8), mode="L").convert("P")
    white_first.putpalette([255, 255, 255, 0, 0, 0])  # index 0 white (the edit), index 1 black
    la = Image.fromarray(np.dstack([np.where(r, 200, 0), np.full((32, 32), 255)]).astype(np.uint8), "LA")
    return {
        "red on black RGB": (_encode(Image.fromarray(red)), r),
        "dark blue on black RGB": (_encode(Image.fromarray(dark_blue)), r),
        "opaque RGBA white on black": (_encode(Image.fromarray(opaque)), r),
        "black brush on transparent": (_encode(Image.fromarray(black_brush)), r),
        "white under transparent": (_encode(Image.fromarray(white_under_clear)), r),
        "L label map (class 3)": (_encode(Image.fromarray(grey_levels)), r),
        "16-bit": (_encode(sixteen), r),
        "1-bit": (_encode(Image.fromarray(r)), r),
        "palette without colours": (_encode(labels), r),
        "palette with white index 0": (_encode(white_first), r),
        "LA opaque": (_encode(la), r),
        "red JPEG": (_encode(Image.fromarray(red), "JPEG", quality=70), r),
        "red GIF": (_encode(Image.fromarray(red), "GIF"), r),
    }


@pytest.mark.parametrize("case", list(_mask_cases()))
def test_non_zero_is_edit_in_every_mode(case):
    data, expected = _mask_cases()[case]
    got = decode_mask(data)
    if "JPEG" in case:  # compression noise is not an edit; block edges may move by a pixel at most
        assert (got != expected).mean() < 0.03 and got[10:18, 6:26].all() and not got[24:, :].any()
    else:
        assert np.array_equal(got, expected), case


def test_a_mask_with_no_edit_pixel_is_refused_with_the_rule_unless_allowed():
    black = _encode(Image.new("RGB", (8, 8)))
    with pytest.raises(ImageInputError, match="mask has no edit pixel: every pixel is black"):
        decode_mask(black)
    clear = _encode(Image.new("RGBA", (8, 8), (255, 255, 255, 0)))
    with pytest.raises(ImageInputError, match="alpha above 0 .transparent = keep"):
        decode_mask(clear)
    noisy = np.zeros((16, 16, 3), np.uint8)
    noisy[4:8, 4:8] = 60  # dark: JPEG masks count channels above 127
    with pytest.raises(ImageInputError, match="JPEG masks"):
        decode_mask(_encode(Image.fromarray(noisy), "JPEG"))
    assert not decode_mask(black, allow_empty=True).any()


# ---- item 6: animated files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_files_use_the_first_frame_with_a_note(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    array, notes = decode_image(data)
    assert "animated (3 frames): first frame used" in notes
    assert np.abs(array.astype(int) - (200, 0, 0)).max() <= 2
    mask_notes: list[str] = []
    assert decode_mask(data, notes=mask_notes).all() and "animated (3 frames): first frame used" in mask_notes


def test_multi_page_tiff_is_not_called_animated():
    pages = [Image.new("L", (8, 8), v) for v in (255, 0)]
    _, notes = decode_image(_encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert "2 images in one TIFF file: the first used" in notes


# ---- item 9: truncated prompts -------------------------------------------------------------------------------
WORDS = [f"w{a}{b}" for a in "abcdefghij" for b in "abcdefghi"]  # 90 one-token words (digits split in CLIP)


def _tok_bundle() -> SimpleNamespace:
    tok = build_word_tokenizer(WORDS)
    return SimpleNamespace(tokenizer=tok, token_count=lambda p: len(tok(p, truncation=False).input_ids))


def test_truncation_names_the_words_cut():
    bundle = _tok_bundle()
    assert truncation(bundle, " ".join(WORDS[:75])) is None  # start + 75 + end = 77
    n, cut = truncation(bundle, " ".join(WORDS[:80]))
    assert n == 82 and cut == " ".join(WORDS[75:80])
    n, cut = truncation(bundle, " ".join(WORDS[:75] + ["x" * 400]))
    assert cut.startswith("xxx") and cut.endswith("…") and len(cut) == 160


def test_prompt_labels_name_prompts_in_messages_and_warnings(caplog):
    bundle = _tok_bundle()
    with caplog.at_level(logging.WARNING, logger="instdiff.inputs"), prompt_labels(["row-a", "row-b"]):
        check_prompts(bundle, ["w1", " ".join(WORDS[:80])], "target")
    assert "target prompt of 'row-b' has 82 tokens" in caplog.text
    assert f"{' '.join(WORDS[75:80])!r} not read" in caplog.text
    with pytest.raises(EditInputError, match="target prompt #1 is empty"):  # labels are gone after the block
        check_prompts(bundle, ["w1", " "], "target")


# ---- end to end: batch job, edit CLI, import --------------------------------------------------------------------
def _job():
    return parse_config(
        {
            "input": "unused",
            "output": "unused",
            "model": {"spec": "tiny"},
            "method": {"name": "instdiffedit", "steps": 2, "n_noises": 1},
            "actors": {"batch_size": 4},
        }
    )


@pytest.fixture(scope="module")
def stage() -> EditStage:
    cfg = _job()
    return EditStage(cfg.model, cfg.method, cfg.image, threads=2)


def test_batch_job_reads_rows_as_a_person_sees_them(stage, caplog):
    phone = _encode(Image.fromarray(_stored()), "JPEG", 6, quality=95)
    upright_mask = np.zeros((96, 48), np.uint8)
    upright_mask[0:48, 24:48] = 255  # the red quadrant, where a viewer shows it
    red = np.zeros((96, 48, 3), np.uint8)
    red[upright_mask > 0] = (255, 0, 0)
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0))]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    long_target = "a red circle " + " ".join(["big"] * 80)
    base = {S.SOURCE_PROMPT: "a square", S.TARGET_PROMPT: "a red circle", S.DATASET: "t", S.META: None}
    rows = [
        {**base, S.ID: "phone", S.IMAGE: phone, S.MASK: _encode(Image.fromarray(upright_mask))},
        {**base, S.ID: "red-mask", S.IMAGE: phone, S.MASK: _encode(Image.fromarray(red))},
        {**base, S.ID: "empty-mask", S.IMAGE: phone, S.MASK: _encode(Image.new("L", (48, 96)))},
        {**base, S.ID: "animated", S.IMAGE: gif, S.MASK: None},
        {**base, S.ID: "long", S.IMAGE: gif, S.MASK: None, S.TARGET_PROMPT: long_target},
    ]
    table = pa.Table.from_pylist(rows, schema=S.INPUT_SCHEMA)
    with caplog.at_level(logging.WARNING):
        out = {r[S.ID]: r for r in run_in_process(_job(), table, stage=stage, run_id="px").to_pylist()}
    for rid in ("phone", "red-mask"):
        r = out[rid]
        assert r[S.STATUS] == S.STATUS_OK, r[S.ERROR]
        assert (r[S.WIDTH], r[S.HEIGHT]) == (48, 96)
        assert "EXIF orientation 6 applied (rotated 90° clockwise): stored 96x48, shown 48x96" in r[S.NOTES]
        assert Image.open(io.BytesIO(r[S.EDITED])).size == (48, 96)
        pred = decode_mask(r[S.PRED_MASK], allow_empty=True)
        gt = upright_mask > 0  # the red mask is read as this region too, upright
        assert r[S.IOU] == pytest.approx((pred & gt).sum() / (pred | gt).sum()), rid
    empty = out["empty-mask"]
    assert empty[S.STATUS] == S.STATUS_ERROR and "mask has no edit pixel" in empty[S.ERROR]
    assert empty[S.IOU] is None
    assert "animated (2 frames): first frame used" in out["animated"][S.NOTES]
    n, cut = truncation(stage.bundle, long_target)
    assert f"target_prompt truncated: {n} tokens, CLIP reads 77; not read: {cut!r}" in out["long"][S.NOTES]
    assert cut.startswith("big") and n > 77
    assert f"target prompt of 'long' has {n} tokens" in caplog.text and "prompt #" not in caplog.text


def test_edit_cli_turns_a_phone_jpeg_upright_and_scores_a_red_mask(tmp_path, capsys):
    src = tmp_path / "phone.jpg"
    src.write_bytes(_encode(Image.fromarray(_stored()), "JPEG", 6, quality=95))
    red = np.zeros((96, 48, 3), np.uint8)
    red[:48, 24:] = (255, 0, 0)
    (tmp_path / "m.png").write_bytes(_encode(Image.fromarray(red)))
    out = tmp_path / "o.png"
    argv = ["edit", str(src), "--model", "tiny", "--steps", "2", "--noises", "1", "--target", "a red circle"]
    assert main([*argv, "--out", str(out), "--mask", str(tmp_path / "m.png")]) == 0
    assert Image.open(out).size == (48, 96)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["width"], summary["height"]) == (48, 96)
    assert any("EXIF orientation 6" in n for n in summary["notes"])
    assert 0.0 <= summary["iou"] <= 1.0 and summary["c_m"] is not None
    (tmp_path / "empty.png").write_bytes(_encode(Image.new("RGB", (48, 96))))
    assert main([*argv, "--out", str(out), "--mask", str(tmp_path / "empty.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mask has no edit pixel: every pixel is black" in err


def test_import_reads_masks_upright_by_the_rule_and_refuses_empty_ones(tmp_path):
    (tmp_path / "phone.jpg").write_bytes(_encode(Image.fromarray(_stored()), "JPEG", 6, quality=95))
    red = np.zeros((96, 48, 3), np.uint8)
    red[:48, 24:] = (255, 0, 0)
    (tmp_path / "upright.png").write_bytes(_encode(Image.fromarray(red)))
    turned = np.ascontiguousarray(np.rot90(red, 1))  # stored 96x48, shown upright through its own EXIF
    (tmp_path / "turned.png").write_bytes(_encode(Image.fromarray(turned), "PNG", 6))
    (tmp_path / "empty.png").write_bytes(_encode(Image.new("RGB", (48, 96))))
    listing = tmp_path / "edits.csv"
    listing.write_text(
        "image_path,source_prompt,target_prompt,mask_path,id\n"
        "phone.jpg,a,b,upright.png,upright\n"
        "phone.jpg,a,b,turned.png,turned\n"
    )
    rows = {r["id"]: r for r in datasets.read_listing(str(listing)).to_pylist()}
    for rid in ("upright", "turned"):
        mask = decode_mask(rows[rid]["mask"])
        assert mask.shape == (96, 48) and mask[:48, 24:].all() and mask.sum() == 48 * 24, rid
    assert json.loads(rows["upright"]["meta"])["notes"] == []  # same upright size: no resize
    assert "mask: EXIF orientation 6 applied" in json.loads(rows["turned"]["meta"])["notes"][0]
    listing.write_text(listing.read_text() + "phone.jpg,a,b,empty.png,empty\n")
    with pytest.raises(DatasetError, match="row 4: .*mask has no edit pixel"):
        datasets.read_listing(str(listing))
