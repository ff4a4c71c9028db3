"""Reading an image file as a viewer shows it: its first frame, upright, and the one mask rule.

The pieces of :func:`instdiff.imageio.decode_image` and :func:`instdiff.imageio.decode_mask` that deal with
the file rather than with pixels for a model: opening bytes or a path with a clear error, the pixel limit
(decompression bombs), the first frame of an animated or multi-page file (with a note), the EXIF Orientation
tag (applied with :func:`PIL.ImageOps.exif_transpose`, with a note; Pillow's TIFF reader applies it itself),
the size as shown, and "non-zero = edit" for masks (:func:`edit_region`). No torch here.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from instdiff.errors import ImageInputError

log = logging.getLogger(__name__)

ORIENTATION_TAG = ExifTags.Base.Orientation  # 0x0112

TURNS = {
    2: "mirrored left-right",
    3: "rotated 180°",
    4: "mirrored top-bottom",
    5: "mirrored left-right and rotated 90° counter-clockwise",
    6: "rotated 90° clockwise",
    7: "mirrored left-right and rotated 90° clockwise",
    8: "rotated 90° counter-clockwise",
}
"""What EXIF Orientation 2–8 asks a viewer to do to the stored pixels (1: nothing; 5–8 swap width and height)."""

ANIMATED_FORMATS = ("GIF", "WEBP", "PNG")
"""Formats whose extra frames are animation frames (multi-frame TIFF and MPO files hold pages or previews)."""

LOSSY_CUT = 127
"""In lossy files (JPEG, lossy WebP) a mask channel counts as non-zero above this value: compression noise
around black must not become edit pixels."""

ACCEPTED = "PNG, JPEG, WebP, BMP, TIFF"  # named in messages; GIF and the other formats Pillow reads work too


def _read(data: bytes | str | Path, what: str) -> bytes:
    """The encoded bytes of ``data`` (bytes-like, or a path to read)."""
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.exists():
            raise ImageInputError(f"{what} file {str(path)!r} does not exist")
        if path.is_dir():
            raise ImageInputError(f"{what} file {str(path)!r} is a folder; give an image file ({ACCEPTED})")
        raw = path.read_bytes()
    else:
        raw = bytes(data)
    if not raw:
        raise ImageInputError(f"{what} is empty (0 bytes)")
    return raw


def _stored_orientation(img: Image.Image) -> int:
    """The EXIF/XMP Orientation of an opened image (1 when absent or unreadable)."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
        return int(value)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        log.debug("unreadable EXIF ignored (%s)", exc)
        return 1


def frames_note(fmt: str | None, n: int) -> str:
    """The note for a file with ``n`` > 1 frames, of which the first is used.

    Args:
        fmt: Pillow's format name (``"GIF"``, ``"WEBP"``, ``"PNG"``, ``"TIFF"``, ``"MPO"``, ...).
        n: the number of frames.

    Returns:
        ``"animated (N frames): first frame used"`` for GIF, WebP and APNG; else ``"N images in one FMT file:
        the first used"``.
    """
    if fmt in ANIMATED_FORMATS:
        return f"animated ({n} frames): first frame used"
    return f"{n} images in one {fmt or 'image'} file: the first used"


@dataclass(frozen=True)
class Upright:
    """An opened image file, first frame, upright (:func:`open_upright`).

    Attributes:
        image: the loaded PIL image in its own mode, upright.
        format: Pillow's name of the file format (``"JPEG"``, ``"PNG"``, ...).
        lossy: the file stores its pixels lossily (:func:`is_lossy`).
    """

    image: Image.Image
    format: str | None
    lossy: bool


def open_upright(
    data: bytes | str | Path, what: str = "image", max_pixels: int | None = None, notes: list[str] | None = None
) -> Upright:
    """Open an image file and return its first frame, upright, fully loaded.

    EXIF (or XMP) Orientation 2–8 is applied with :func:`PIL.ImageOps.exif_transpose` (the library convention;
    Pillow's TIFF reader applies the tag itself when loading, which is then only noted). Other frames of an
    animated GIF/WebP/PNG, a multi-page TIFF or an MPO file are ignored, with a note.

    Args:
        data: encoded bytes, or a file path.
        what: ``"image"`` or ``"mask"``, for the messages.
        max_pixels: refuse files with more pixels than this (``None``: only Pillow's own bomb limit).
        notes: when given, what was done is appended (``"EXIF orientation 6 applied (rotated 90° clockwise):
            stored 96x48, shown 48x96"``, ``"animated (3 frames): first frame used"``).

    Returns:
        The loaded first frame, upright, with its format.

    Raises:
        ImageInputError: a missing file or a folder, empty data, bytes Pillow cannot decode (any exception
            Pillow raises on them), a side of 0 px, more than ``max_pixels`` pixels.
    """
    notes = [] if notes is None else notes
    raw = _read(data, what)
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageInputError(f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
        if w < 1 or h < 1:
            raise ImageInputError(f"{what} has no pixels ({w}x{h})")
        tiff_turn = int(img.tag_v2.get(ORIENTATION_TAG, 1)) if img.format == "TIFF" else 1
        stored = img.size if tiff_turn not in (5, 6, 7, 8) else img.size[::-1]
        n_frames = int(getattr(img, "n_frames", 1))  # before loading: counting frames seeks through the file
        img.load()  # the first frame
        turn = tiff_turn if tiff_turn in TURNS else _stored_orientation(img)
        if turn in TURNS and fmt != "TIFF":
            img = ImageOps.exif_transpose(img)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{what} refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises on hostile bytes is an input problem
        # PIL names the stream it read (an object repr with a memory address): say what the bytes are not
        reason = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ImageInputError(f"cannot decode {what} ({type(exc).__name__}: {reason}); accepted: {ACCEPTED}") from None
    if n_frames > 1:
        notes.append(frames_note(fmt, n_frames))
    if turn in TURNS:
        notes.append(
            f"EXIF orientation {turn} applied ({TURNS[turn]}): stored {stored[0]}x{stored[1]}, "
            f"shown {img.size[0]}x{img.size[1]}"
        )
    return Upright(img, fmt, is_lossy(fmt, raw))


def shown_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """An encoded image's size as a viewer shows it, from its header and EXIF, without decoding the pixels.

    Orientation 5–8 swaps the stored width and height. (A PNG whose EXIF block follows its pixel data is
    decoded to find it: Pillow reads such a block only when loading.)

    Args:
        data: the encoded image.
        max_pixels: refuse files with more pixels than this (``None``: only Pillow's own bomb limit).

    Returns:
        ``(W, H)`` in pixels, upright.

    Raises:
        ImageInputError: empty data, a header Pillow cannot read, more than ``max_pixels`` pixels.
    """
    raw = _read(data, "image")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageInputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            if img.format == "TIFF":  # Pillow's TIFF reader reports the upright size already
                return w, h
            turn = _stored_orientation(img)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"image refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises on hostile bytes is an input problem
        reason = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ImageInputError(f"not a readable image ({type(exc).__name__}: {reason}); accepted: {ACCEPTED}") from None
    return (h, w) if turn in (5, 6, 7, 8) else (w, h)


def is_lossy(fmt: str | None, raw: bytes) -> bool:
    """Whether a file stores its pixels lossily: JPEG/MPO, or WebP whose first image chunk is ``VP8 ``.

    Args:
        fmt: Pillow's format name.
        raw: the encoded bytes (WebP: the RIFF chunks are walked; lossless WebP stores ``VP8L``).

    Returns:
        True for lossy pixels.
    """
    if fmt in ("JPEG", "MPO"):
        return True
    if fmt != "WEBP":
        return False
    pos = 12  # RIFF header: "RIFF", size, "WEBP"
    while pos + 8 <= len(raw):
        fourcc = raw[pos : pos + 4]
        (size,) = struct.unpack("<I", raw[pos + 4 : pos + 8])
        if fourcc in (b"VP8 ", b"VP8L"):
            return fourcc == b"VP8 "
        if fourcc == b"ANMF":  # animation frame: a 16-byte frame header, then the frame's own chunks
            pos += 8 + 16
            continue
        pos += 8 + size + (size & 1)
    return False


def _alpha(img: Image.Image) -> np.ndarray | None:
    """(H, W) uint8 alpha of a mask that has one (an alpha band, or a transparency key), else None."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return np.asarray(img.getchannel("A"))
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        return np.asarray(img.convert("RGBA").getchannel("A"))
    return None


def edit_region(img: Image.Image, lossy: bool = False) -> tuple[np.ndarray, str]:
    """The edit pixels of a decoded mask by the project's one rule, "non-zero = edit".

    The rule's user-facing statement is :func:`instdiff.imageio.decode_mask`'s docstring; in short: alpha
    decides when some pixel is fully transparent (alpha ≠ 0 = edit); otherwise any channel ≠ 0 (palette masks:
    index ≠ 0 when palette colour 0 is black, else the colour); in lossy files ≠ 0 is > :data:`LOSSY_CUT`.

    Args:
        img: a loaded, upright mask image (:func:`open_upright`).
        lossy: the file stores its pixels lossily (:attr:`Upright.lossy`).

    Returns:
        ``(mask, basis)``: (H, W) bool, True = edit; and what decided it, for messages (``"alpha"``,
        ``"value"``, ``"colour"``, ``"palette index"``).
    """
    cut = LOSSY_CUT if lossy else 0
    alpha = _alpha(img)
    if alpha is not None and int(alpha.min()) <= cut:
        return alpha > cut, "alpha"
    mode = img.mode
    if mode in ("P", "PA"):
        band = img if mode == "P" else img.getchannel("P")
        palette = (img.getpalette() or [0, 0, 0])[:3]
        if not any(palette):
            return np.asarray(band) != 0, "palette index"
        values, basis = np.asarray(band.convert("RGB")), "colour"
    elif mode in ("LA", "La"):
        values, basis = np.asarray(img.getchannel("L")), "value"
    elif mode in ("1", "L") or mode.startswith(("I", "F")):
        values, basis = np.asarray(img), "value"
    else:
        values, basis = np.asarray(img.convert("RGB")), "colour"
    region = values > cut if lossy else values != 0
    if region.ndim == 3:
        region = region.any(axis=2)
    return region, basis


__all__ = [
    "ANIMATED_FORMATS",
    "LOSSY_CUT",
    "TURNS",
    "Upright",
    "edit_region",
    "frames_note",
    "is_lossy",
    "open_upright",
    "shown_size",
]
