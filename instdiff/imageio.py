"""Image and mask decoding/encoding with clear errors, shared by the CLI, the batch job and the endpoint.

Images and masks are read as a person sees them in a viewer:

* **Orientation**: an EXIF (or XMP) Orientation tag is applied (:func:`PIL.ImageOps.exif_transpose`), so a phone
  JPEG stored 96×48 with Orientation 6 decodes 48×96; sizes reported anywhere are the upright ones, and the
  turn is returned as a note.
* **Several frames** (animated GIF/WebP/PNG, multi-page TIFF, MPO): the first frame is used, with a note.
* **Modes** (images): anything Pillow decodes (PNG, JPEG, WebP, BMP, TIFF, GIF, …) in modes RGB, RGBA/LA
  (alpha composited onto white), L/1/P (converted to RGB), I;16/I (16/32-bit, rescaled to 8 bit), CMYK and
  YCbCr (converted to RGB).
* **Masks**: non-zero = edit, the one rule of :func:`decode_mask` (see there).

Sides that are not multiples of the model's step are resized (default) or padded by edge replication — the
choice is returned as a note so callers can say which.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instdiff import imagefile
from instdiff.config import DEFAULT_MAX_PIXELS, SizePolicy
from instdiff.errors import ImageInputError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """An RGB uint8 image ready for a model, with what was done to it.

    Attributes:
        array: (H, W, 3) uint8, sides multiples of the model's step.
        original_size: (W, H) as decoded.
        notes: what was changed, for the user.
        pad: (right, bottom) padding added, in pixels.
    """

    array: np.ndarray
    original_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)
    pad: tuple[int, int] = (0, 0)


def decode_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Decode bytes or a file into RGB pixels as a viewer shows them (first frame, upright; modes converted as
    the module docstring says).

    Args:
        data: encoded bytes, or a file path.
        max_pixels: refuse images with more pixels than this (decompression bombs).

    Returns:
        ``(array, notes)``: (H, W, 3) uint8, upright (H, W as shown, after EXIF orientation), and what was
        done: the orientation applied, the first of several frames used, the mode converted.

    Raises:
        ImageInputError: a missing file, empty data, an undecodable image, too many pixels.
    """
    notes: list[str] = []
    opened = imagefile.open_upright(data, "image", max_pixels, notes)
    return _to_rgb(opened.image, notes), notes


def _to_rgb(img: Image.Image, notes: list[str]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded image of any mode; appends what was converted to ``notes``."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"converted {mode} (high bit depth) to 8-bit RGB")
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"composited {mode} alpha onto white")
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    notes.append(f"converted {mode} to RGB")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def fit_to_multiple(
    array: np.ndarray, multiple: int, policy: SizePolicy | str = SizePolicy.RESIZE, size: int | None = None
) -> Prepared:
    """Make both sides multiples of ``multiple`` (Lanczos resize, or edge-replication padding).

    Args:
        array: (H, W, 3) uint8.
        multiple: the step sides must be multiples of, in pixels.
        policy: resize, pad or refuse.
        size: optional target for the longer side (e.g. the model's native resolution), applied first.

    Returns:
        The prepared image with notes on what was done.

    Raises:
        ImageInputError: an image smaller than ``multiple``, or a size that ``refuse`` does not accept.
    """
    h, w = array.shape[:2]
    prepared = Prepared(array=array, original_size=(w, h))
    if min(h, w) < multiple and SizePolicy(policy) is not SizePolicy.PAD and size is None:
        raise ImageInputError(f"image is {w}x{h}; both sides must be at least {multiple} pixels")
    img = Image.fromarray(array)
    if size is not None and max(w, h) != size:
        scale = size / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
        prepared.notes.append(f"resized {prepared.original_size[0]}x{prepared.original_size[1]} to {w}x{h}")
    if w % multiple or h % multiple:
        policy = SizePolicy(policy)
        if policy is SizePolicy.REFUSE:
            raise ImageInputError(f"image size {w}x{h} is not a multiple of {multiple}")
        if policy is SizePolicy.RESIZE:
            nw, nh = max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
            prepared.notes.append(f"resized {w}x{h} to {nw}x{nh} (sides must be multiples of {multiple})")
        else:
            nw, nh = -(-w // multiple) * multiple, -(-h // multiple) * multiple
            arr = np.pad(np.asarray(img), ((0, nh - h), (0, nw - w), (0, 0)), mode="edge")
            prepared.pad = (nw - w, nh - h)
            prepared.notes.append(f"padded {w}x{h} to {nw}x{nh} (sides must be multiples of {multiple})")
            prepared.array = arr
            return prepared
    prepared.array = np.asarray(img, dtype=np.uint8).copy()
    return prepared


def to_model_tensor(arrays: np.ndarray | torch.Tensor | list[np.ndarray]) -> torch.Tensor:
    """Channel-last uint8 pixels → the models' image tensor (the one uint8 → tensor conversion of the project).

    Args:
        arrays: one (H, W, 3) uint8 image, a list of them (same size), or a (B, H, W, 3) uint8 array or tensor.

    Returns:
        (B, 3, H, W) float32 in [-1, 1] (x / 127.5 − 1), on the input tensor's device (CPU for arrays).

    Raises:
        ImageInputError: images of different sizes in one list.
    """
    if isinstance(arrays, torch.Tensor):
        x = arrays if arrays.ndim == 4 else arrays.unsqueeze(0)
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        arrays = [arrays]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ImageInputError(f"images in one batch must share a size; got {sorted(sizes)}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def from_model_tensor(x: torch.Tensor) -> np.ndarray:
    """The models' image tensor → channel-last uint8 pixels (the one tensor → uint8 conversion of the project).

    Args:
        x: (B, 3, H, W) float in [-1, 1] (clamped), any device and dtype.

    Returns:
        (B, H, W, 3) uint8 NumPy array on the CPU, round((x + 1) · 127.5).
    """
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()


def encode_png(array: np.ndarray) -> bytes:
    """Encode pixels as PNG.

    Args:
        array: (H, W, 3) uint8, or an (H, W) bool / uint8 mask (bool masks as 8-bit L with 0/255).

    Returns:
        PNG bytes.
    """
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(
    data: bytes | str | Path,
    size: tuple[int, int] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_empty: bool = False,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Decode a mask image by the project's one rule, **non-zero = edit**, as a viewer shows it.

    Every path that reads a mask uses this: ``instdiff edit --mask``, the batch job's ``mask`` column,
    ``import-dataset`` masks, the benchmark's ground truth and the endpoint. The mask is first turned upright
    (EXIF orientation) and reduced to its first frame, like an image (:func:`decode_image`). Then:

    1. **Transparency decides** when the mask has an alpha band or a PNG transparency key and at least one
       pixel is fully transparent: edit = alpha ≠ 0 (anything opaque or partly opaque is edit, transparent is
       kept; colours are ignored). This is the brush-layer convention; OpenAI's image-edit API uses the
       opposite one (transparent = edit), so such masks must be inverted first.
    2. **Otherwise the colours decide**: edit = any channel ≠ 0. Grey, 1-bit, 16-bit and float masks: the
       value ≠ 0; RGB, CMYK, YCbCr: any of R, G, B ≠ 0 (red on black is the red region); palette masks: the
       index ≠ 0 when palette colour 0 is black (label maps, and files written without a palette), else the
       palette colour ≠ black, so the mask reads as it looks.
    3. **Lossy files** (JPEG, lossy WebP): ≠ 0 becomes > 127 for channels and alpha, so compression noise
       around black does not leak into the region.

    A mask with no edit pixel is refused (``allow_empty=False``): it almost always means a mask that was read
    with another convention, and scoring against it would report a silent IoU of 0.

    Args:
        data: encoded bytes, or a file path.
        size: (W, H) the mask must have, when given (the image's upright size).
        max_pixels: refuse masks with more pixels than this (decompression bombs).
        allow_empty: return an all-False mask instead of refusing it (e.g. to display predicted masks).
        notes: when given, what was done is appended (orientation applied, first of several frames used).

    Returns:
        (H, W) bool, True = edit, upright.

    Raises:
        ImageInputError: an undecodable mask, too many pixels, a size other than ``size``, or (unless
            ``allow_empty``) no edit pixel.
    """
    opened = imagefile.open_upright(data, "mask", max_pixels, notes)
    arr, basis = imagefile.edit_region(opened.image, opened.lossy)
    h, w = arr.shape
    if size is not None and (w, h) != tuple(size):
        hint = ""
        if (h, w) == tuple(size):
            hint = " (turned 90° from each other: masks and images are read upright, after their EXIF orientation)"
        raise ImageInputError(f"mask is {w}x{h} but the image is {size[0]}x{size[1]}; they must match{hint}")
    if not allow_empty and not arr.any():
        rule = {
            "alpha": "it has transparent pixels and no pixel with alpha above "
            + ("127" if opened.lossy else "0")
            + " (transparent = keep)",
            "palette index": "every palette index is 0",
            "value": "every value is " + ("127 or less (JPEG masks: > 127 = edit)" if opened.lossy else "0"),
            "colour": "every pixel is " + ("dark (JPEG masks: a channel > 127 = edit)" if opened.lossy else "black"),
        }[basis]
        raise ImageInputError(f"mask has no edit pixel: {rule}; masks mark the region to edit with non-zero pixels")
    return arr


def resize_bool(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) bool mask to ``size`` (W, H) with nearest neighbour; returns (H', W') bool."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def undo_fit(array: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Bring a model-sized array back to the decoded size: crop the padding, then resize back if it was resized.

    This resamples every pixel of a resized image; to bring an *edit* back, keeping the original pixels
    outside the edit mask, use :func:`instdiff.composite.paste_back`, which calls this for the edited layer.

    Args:
        array: (H, W, 3) uint8 image or (H, W) bool mask at the model's size.
        prepared: what :func:`fit_to_multiple` did.

    Returns:
        The array at ``prepared.original_size`` (Lanczos for images, nearest for masks).
    """
    w, h = prepared.original_size
    if prepared.pad != (0, 0):
        array = array[: array.shape[0] - prepared.pad[1], : array.shape[1] - prepared.pad[0]]
    if (array.shape[1], array.shape[0]) == (w, h):
        return array
    if array.dtype == bool:
        return resize_bool(array, (w, h))
    return np.asarray(Image.fromarray(array).resize((w, h), Image.Resampling.LANCZOS))
