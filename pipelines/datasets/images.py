"""Checking a dataset's images and turning its masks into the input schema's mask PNG.

Images are carried as their original encoded bytes, so only their header is read. Masks are stored as 8-bit
PNG (255 = edit) at the image's size.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from instdiff.config import DEFAULT_MAX_PIXELS
from instdiff.errors import ImageInputError


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """An encoded image's size from its header, without decoding the pixels.

    A header that claims more than ``max_pixels`` (a decompression bomb: a few bytes that would decode to
    gigabytes) is refused here, before anything decodes it; the batch job applies its own ``image.max_pixels``.

    Args:
        data: the encoded image (PNG, JPEG, WebP, ...).
        max_pixels: the most pixels accepted (the library's default limit).

    Returns:
        ``(W, H)`` in pixels.

    Raises:
        ImageInputError: empty data, PIL cannot read the header, or the image has too many pixels.
    """
    if not data:
        raise ImageInputError("not a readable image (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"image refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"not a readable image ({type(exc).__name__})") from None
    if w * h > max_pixels:
        raise ImageInputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    return w, h


def mask_png(data: bytes, size: tuple[int, int]) -> tuple[bytes, str | None]:
    """A mask file as the input schema's mask: an 8-bit PNG (255 = edit) at the image's size.

    Any mode is read (non-zero / alpha > 127 = edit, see :func:`instdiff.imageio.decode_mask`); JPEG masks
    are thresholded at 127, so compression noise does not leak in. A mask of another size is resized
    (nearest) to ``size``.

    Args:
        data: the encoded mask file.
        size: ``(W, H)`` of its image, in pixels.

    Returns:
        ``(png, note)``: the PNG bytes, and a note saying the mask was resized (``None`` when it was not).

    Raises:
        ImageInputError: the mask cannot be decoded, or its header claims too many pixels.
    """
    from instdiff.imageio import decode_mask, encode_png, resize_bool

    image_size(data)  # the header first: a decompression bomb is refused before it is decoded
    mask = decode_mask(data)
    note = None
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        note = f"mask resized from {mask.shape[1]}x{mask.shape[0]} to the image's {size[0]}x{size[1]}"
        mask = resize_bool(mask, size)
    return encode_png(mask), note
