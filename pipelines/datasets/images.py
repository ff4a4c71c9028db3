"""Checking a dataset's images and turning its masks into the input schema's mask PNG.

Images are carried as their original encoded bytes (EXIF included, so the batch job turns them upright as it
decodes them), and only their header is read here. Masks are decoded as the batch job would read them
(:func:`instdiff.imageio.decode_mask`: upright, non-zero = edit) and stored as 8-bit PNG (255 = edit) at the
image's upright size.
"""

from __future__ import annotations

from instdiff.config import DEFAULT_MAX_PIXELS
from instdiff.imagefile import shown_size


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """An encoded image's size as a viewer shows it (EXIF orientation applied), without decoding the pixels.

    A header that claims more than ``max_pixels`` (a decompression bomb: a few bytes that would decode to
    gigabytes) is refused here, before anything decodes it; the batch job applies its own ``image.max_pixels``.

    Args:
        data: the encoded image (PNG, JPEG, WebP, ...).
        max_pixels: the most pixels accepted (the library's default limit).

    Returns:
        ``(W, H)`` in pixels, upright (:func:`instdiff.imagefile.shown_size`).

    Raises:
        ImageInputError: empty data, PIL cannot read the header, or the image has too many pixels.
    """
    return shown_size(data, max_pixels)


def mask_png(data: bytes, size: tuple[int, int]) -> tuple[bytes, str | None]:
    """A mask file as the input schema's mask: an 8-bit PNG (255 = edit) at the image's size.

    Any mode is read by the one mask rule, non-zero = edit (:func:`instdiff.imageio.decode_mask`: upright after
    EXIF orientation, transparency or any non-zero channel, JPEG masks above 127). A mask of another size is
    resized (nearest) to ``size``.

    Args:
        data: the encoded mask file.
        size: ``(W, H)`` of its image, in pixels.

    Returns:
        ``(png, note)``: the PNG bytes, and what was done to the mask (turned upright, first frame used,
        resized), ``"; "``-joined (``None`` when nothing was).

    Raises:
        ImageInputError: the mask cannot be decoded, its header claims too many pixels, or it has no edit pixel.
    """
    from instdiff.imageio import decode_mask, encode_png, resize_bool

    image_size(data)  # the header first: a decompression bomb is refused before it is decoded
    notes: list[str] = []
    mask = decode_mask(data, notes=notes)
    notes = [f"mask: {n}" for n in notes]
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        notes.append(f"mask resized from {mask.shape[1]}x{mask.shape[0]} to the image's {size[0]}x{size[1]}")
        mask = resize_bool(mask, size)
    return encode_png(mask), "; ".join(notes) or None
