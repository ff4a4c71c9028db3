"""Checking a dataset's images and turning its masks into the input schema's mask PNG.

Images are carried as their original encoded bytes, so only their header is read. Masks are stored as 8-bit
PNG (255 = edit) at the image's size.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from instdiff.errors import ImageInputError


def image_size(data: bytes) -> tuple[int, int]:
    """An encoded image's size from its header, without decoding the pixels.

    Args:
        data: the encoded image (PNG, JPEG, WebP, ...).

    Returns:
        ``(W, H)`` in pixels.

    Raises:
        ImageInputError: PIL cannot read the header.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"not a readable image ({type(exc).__name__})") from None


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
        ImageInputError: the mask cannot be decoded.
    """
    from instdiff.imageio import decode_mask, encode_png, resize_bool

    mask = decode_mask(data)
    note = None
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        note = f"mask resized from {mask.shape[1]}x{mask.shape[0]} to the image's {size[0]}x{size[1]}"
        mask = resize_bool(mask, size)
    return encode_png(mask), note
