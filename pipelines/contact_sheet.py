"""The one contact sheet: a PNG grid of image tiles, column headers on top and a text label left of each row.

``instdiff report`` draws one line per output row (input, ground-truth mask, predicted mask, edit);
``instdiff bench`` draws input and ground-truth mask, then mask and edit for each shown run. Both build
:class:`SheetRow` values and call :func:`draw_contact_sheet`; they differ only in the layout arguments.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

TILE = 128  # px per image side in a contact sheet (and in the report page)
PAD = 4  # px between tiles
TILE_BACKGROUND = (200, 200, 200)  # a missing picture
FRAME = (150, 150, 150)  # outline colour of framed tiles


@dataclass(frozen=True)
class Panel:
    """One tile of a contact sheet.

    Args:
        data: an encoded image (PNG, JPEG, ...), or ``None`` for a gray tile.
        mask: draw it as a gray-scale mask (converted to L, then RGB).
    """

    data: bytes | None
    mask: bool = False


@dataclass(frozen=True)
class SheetRow:
    """One line of a contact sheet: a text label (may hold newlines) and its panels, left to right."""

    label: str
    panels: Sequence[Panel]


def tile(data: bytes | None, mask: bool = False) -> np.ndarray:
    """A TILE×TILE RGB tile of an encoded image, scaled nearest-neighbour to fit and letterboxed.

    Args:
        data: an encoded image, or ``None``.
        mask: draw the edit region white on black (masks of any mode, read by the rule of
            :func:`instdiff.imageio.decode_mask`).

    Returns:
        (TILE, TILE, 3) uint8; plain gray when ``data`` is ``None`` or cannot be decoded (logged as a warning).
    """
    from PIL import Image

    from instdiff.imagefile import edit_region, open_upright

    canvas = Image.new("RGB", (TILE, TILE), TILE_BACKGROUND)
    if data is not None:
        try:
            opened = open_upright(data)  # as a viewer shows it: first frame, EXIF orientation applied
            if mask:  # the project's mask rule (non-zero = edit), drawn white on black
                region = edit_region(opened.image, opened.lossy)[0]
                img = Image.fromarray(region.astype(np.uint8) * 255).convert("RGB")
            else:
                img = opened.image.convert("RGB")
            scale = TILE / max(img.size)
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img = img.resize(size, Image.Resampling.NEAREST)
            canvas.paste(img, ((TILE - size[0]) // 2, (TILE - size[1]) // 2))
        except Exception as exc:  # noqa: BLE001 - a broken picture must not break the sheet
            log.warning("cannot render an image (%s)", exc)
    return np.asarray(canvas)


def draw_contact_sheet(
    headers: Sequence[str],
    rows: Sequence[SheetRow],
    *,
    label_width: int,
    header_height: int,
    header_inset: int = 4,
    frame: bool = False,
) -> bytes:
    """Draw a contact sheet: one column per header, one line per row, tiles of :data:`TILE` px.

    Text is drawn with PIL's default font exactly as given (callers shorten it or replace characters the font
    lacks). With no rows the sheet still has the height of one line.

    Args:
        headers: column titles (may hold newlines), drawn ``header_inset`` px right of each column's left edge
            and below the top.
        rows: the lines; each should have one panel per header.
        label_width: px left of the first column, for the row labels.
        header_height: px above the first line, for the headers.
        header_inset: px between a column's corner and its header text.
        frame: outline every tile with a gray rectangle.

    Returns:
        The sheet as PNG bytes, (header_height + max(1, len(rows)) · (TILE + 4)) px high and
        (label_width + len(headers) · (TILE + 4)) px wide.
    """
    from PIL import Image, ImageDraw

    step = TILE + PAD
    sheet = Image.new(
        "RGB", (label_width + len(headers) * step, header_height + max(1, len(rows)) * step), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for k, name in enumerate(headers):
        draw.text((label_width + k * step + header_inset, header_inset), name, fill=(0, 0, 0))
    for n, row in enumerate(rows):
        y = header_height + n * step
        draw.text((4, y + 4), row.label, fill=(0, 0, 0))
        for k, panel in enumerate(row.panels):
            x = label_width + k * step
            sheet.paste(Image.fromarray(tile(panel.data, mask=panel.mask)), (x, y))
            if frame:
                draw.rectangle((x - 1, y - 1, x + TILE, y + TILE), outline=FRAME)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["PAD", "TILE", "Panel", "SheetRow", "draw_contact_sheet", "tile"]
