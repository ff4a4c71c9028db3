"""Image decoding and preparation: every odd input gets converted with a note or a clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from instdiff.imageio import (
    ImageInputError,
    decode_image,
    decode_mask,
    encode_png,
    fit_to_multiple,
    from_model_tensor,
    to_model_tensor,
    undo_fit,
)


def _bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_png_roundtrip():
    arr = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    out, notes = decode_image(encode_png(arr))
    assert np.array_equal(out, arr) and notes == []


@pytest.mark.parametrize(
    ("mode", "note"),
    [
        ("L", "converted L"),
        ("RGBA", "alpha onto white"),
        ("CMYK", "converted CMYK"),
        ("P", "converted P"),
        ("I;16", "high bit depth"),
    ],
)
def test_modes_are_converted_with_a_note(mode, note):
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
        fmt = "PNG"
    else:
        img = Image.new("RGB", (8, 8), (200, 10, 10)).convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    out, notes = decode_image(_bytes(img, fmt))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert any(note in n for n in notes)
    if mode == "I;16":
        assert out.max() == 255


def test_rgba_transparent_becomes_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out, _ = decode_image(_bytes(img))
    assert (out == 255).all()


def test_webp_and_jpeg_decode():
    img = Image.new("RGB", (16, 16), (0, 128, 255))
    for fmt in ("JPEG", "WEBP"):
        out, _ = decode_image(_bytes(img, fmt))
        assert out.shape == (16, 16, 3)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_corrupt_bytes_are_refused(data):
    with pytest.raises(ImageInputError, match="empty|cannot decode"):
        decode_image(data)


def test_an_unknown_format_is_named_without_an_object_repr():
    with pytest.raises(ImageInputError, match=r"cannot decode image \(UnidentifiedImageError: not a known") as exc:
        decode_image(b"not an image at all")
    assert "0x" not in str(exc.value) and "<" not in str(exc.value)


def test_missing_file_and_pixel_limit(tmp_path):
    with pytest.raises(ImageInputError, match="does not exist"):
        decode_image(tmp_path / "nope.png")
    big = encode_png(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ImageInputError, match="over the limit"):
        decode_image(big, max_pixels=1000)


def test_fit_resize_pad_and_undo():
    arr = np.random.default_rng(1).integers(0, 255, (30, 45, 3), dtype=np.uint8)
    r = fit_to_multiple(arr, 8, "resize")
    assert r.array.shape == (32, 48, 3) and "resized 45x30 to 48x32" in r.notes[0]
    assert undo_fit(r.array, r).shape == (30, 45, 3)
    p = fit_to_multiple(arr, 8, "pad")
    assert p.array.shape == (32, 48, 3) and p.pad == (3, 2) and "padded" in p.notes[0]
    assert np.array_equal(p.array[:30, :45], arr)
    assert np.array_equal(undo_fit(p.array, p), arr)
    with pytest.raises(ImageInputError, match="not a multiple"):
        fit_to_multiple(arr, 8, "refuse")
    with pytest.raises(ImageInputError, match="at least 8"):
        fit_to_multiple(np.zeros((1, 1, 3), np.uint8), 8, "resize")
    s = fit_to_multiple(arr, 8, "resize", size=64)
    assert max(s.array.shape[:2]) == 64 and s.array.shape[0] % 8 == 0


def test_tensor_conversions():
    arr = np.array([[[0, 127, 255]]], dtype=np.uint8)
    x = to_model_tensor(arr)
    assert x.shape == (1, 3, 1, 1) and x.min() == -1 and x.max() == 1
    assert np.array_equal(from_model_tensor(x)[0], arr)
    with pytest.raises(ImageInputError, match="share a size"):
        to_model_tensor([np.zeros((8, 8, 3), np.uint8), np.zeros((16, 8, 3), np.uint8)])


def test_masks():
    m = np.zeros((8, 12), bool)
    m[2:5, 3:9] = True
    assert np.array_equal(decode_mask(encode_png(m), size=(12, 8)), m)
    with pytest.raises(ImageInputError, match="must match"):
        decode_mask(encode_png(m), size=(8, 8))
    with pytest.raises(ImageInputError, match="cannot decode mask"):
        decode_mask(b"junk")


def test_masks_refuse_bombs_folders_and_empty_files_in_one_line(tmp_path):
    big = _bytes(Image.new("L", (300, 200), 255))
    with pytest.raises(ImageInputError, match="mask is 300x200 = 60000 pixels, over the limit of 1000"):
        decode_mask(big, max_pixels=1000)
    with pytest.raises(ImageInputError, match="is a folder"):
        decode_mask(tmp_path)
    with pytest.raises(ImageInputError, match="mask is empty"):
        decode_mask(b"")


def test_lossy_webp_is_told_from_lossless():
    from instdiff.imagefile import is_lossy

    img = Image.new("RGB", (8, 8), (255, 0, 0))
    lossless = io.BytesIO()
    img.save(lossless, format="WEBP", lossless=True)
    assert is_lossy("WEBP", _bytes(img, "WEBP")) and not is_lossy("WEBP", lossless.getvalue())
    assert is_lossy("JPEG", b"") and not is_lossy("PNG", b"")
