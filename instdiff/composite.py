"""Local means local, at the input's resolution: paste an edit made at the working size onto the original pixels.

Editors work at a model-ready size (:func:`instdiff.imageio.fit_to_multiple`: the model's resolution, sides
multiples of its step). Their paste-back (``EditConfig.paste_back``) keeps the input outside the edit mask at
that size, but bringing the whole result back up to the input's size would resample every pixel: a 640×480
photo edited at 64×48 changes everywhere. So, as the inpainting front ends users compare us with do (the
"only masked" paste of diffusers' ``VaeImageProcessor.apply_overlay`` and webui's inpaint), the edit is
composited onto the original full-resolution pixels:

1. the edited image is resized to the input's size (Lanczos, :func:`instdiff.imageio.undo_fit`), the edit mask
   with nearest neighbour (:func:`instdiff.imageio.resize_bool`), so both map the working grid onto the input
   grid the same way;
2. a soft edge ``feather`` px wide is laid *outside* the mask (:func:`feather_alpha`: weight 1 inside the mask,
   then 1 − d/(feather + 1) at Euclidean distance d ≤ feather px, 0 beyond);
3. output = alpha · upsampled edit + (1 − alpha) · original, rounded; where alpha is 0 the original pixels are
   copied, where it is 1 the upsampled edit's.

So outside the mask dilated by ``feather`` px the output equals the input bit for bit; inside the mask it is
the upsampled edit. What "the mask" is depends on the editor: InstDiffEdit's final mask, DiffEdit's
thresholded noise difference; SDEdit edits the whole image (its mask is all of it), so for SDEdit the output is
the upsampled edit everywhere. With ``paste_back=False`` the caller asked for the raw decoded result, which is
upsampled everywhere too. Padded inputs (``size_policy: pad``) and inputs already at the working size need no
resampling: the padding is cropped and the editor's own paste-back, exact at that size, stands.

:func:`paste_back` does it for one image (NumPy in, NumPy out); :func:`restore` for every image of an
:class:`~instdiff.types.EditResult` (the CLI, the batch job and the Serve app call it); :func:`edit_image` is
the library's one call from an RGB array of any size to an edit at that size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, SizePolicy
from instdiff.editing.contract import edit, size_multiple
from instdiff.errors import EditInputError, ImageInputError
from instdiff.imageio import Prepared, fit_to_multiple, from_model_tensor, to_model_tensor, undo_fit
from instdiff.types import EditResult

log = logging.getLogger(__name__)


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weights of the edit: 1 inside ``mask``, a linear ramp ``feather`` px wide outside it, 0 beyond.

    The ramp is 1 − d / (feather + 1) at Euclidean distance d (px, between pixel centres) from the nearest mask
    pixel, for 0 < d ≤ feather (SciPy's exact Euclidean distance transform), so it decreases monotonically with
    the distance and is exactly 0 outside the mask dilated by a disc of radius ``feather``.

    Args:
        mask: (H, W) bool, True where the edit applies.
        feather: width of the soft edge in px, >= 0 (0: a hard edge).

    Returns:
        (H, W) float64 in [0, 1]; exactly 1.0 on the mask and exactly 0.0 farther than ``feather`` px from it.

    Raises:
        EditInputError: a mask that is not 2-D, or a negative or non-integer ``feather``.
    """
    if mask.ndim != 2:
        raise EditInputError(f"mask must be (H, W); got shape {mask.shape}")
    if isinstance(feather, bool) or not isinstance(feather, int | np.integer) or feather < 0:
        raise EditInputError(f"feather must be an integer number of pixels >= 0; got {feather!r}")
    mask = mask.astype(bool, copy=False)
    alpha = mask.astype(np.float64)
    if feather == 0 or not mask.any() or mask.all():
        return alpha
    # only pixels within `feather` of the mask can get a weight: work on the mask's bounding box plus a margin
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(0, rows[0] - feather - 1), min(mask.shape[0], rows[-1] + feather + 2)
    c0, c1 = max(0, cols[0] - feather - 1), min(mask.shape[1], cols[-1] + feather + 2)
    dist = ndimage.distance_transform_edt(~mask[r0:r1, c0:c1])  # 0 on the mask, else px to the nearest mask px
    ramp = np.where(dist <= feather, 1.0 - dist / (feather + 1.0), 0.0)
    alpha[r0:r1, c0:c1] = ramp
    return alpha


def _check(name: str, array: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if array.shape != shape:
        raise ImageInputError(f"{name} is {array.shape} but must be {shape} ({what})")


def paste_back(
    original: np.ndarray,
    edited: np.ndarray,
    mask: np.ndarray,
    prepared: Prepared,
    feather: int = 4,
    local: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Bring one working-size edit back to the input's size, keeping the original pixels outside the edit.

    Steps as in the module docstring: upsample the edit (Lanczos) and its mask (nearest), then blend with
    :func:`feather_alpha`. Only an image that :func:`~instdiff.imageio.fit_to_multiple` resized is
    composited; a padded one is cropped, one already at its size returned as it is (the editor's paste-back
    is exact there).

    Args:
        original: (H, W, 3) uint8, the decoded input at its own size (``prepared.original_size``).
        edited: (h, w, 3) uint8, the editor's output at the working size (``prepared.array``'s shape).
        mask: (h, w) bool, the editor's mask at the working size (all True for SDEdit).
        prepared: what :func:`~instdiff.imageio.fit_to_multiple` did to ``original``.
        feather: width in px (at the input's size) of the soft edge outside the mask, >= 0.
        local: composite onto the original (``EditConfig.paste_back``); False returns the upsampled edit
            everywhere.

    Returns:
        ``(image, mask)``: (H, W, 3) uint8 at the input's size, equal to ``original`` bit for bit farther than
        ``feather`` px from the mask; and the (H, W) bool mask at the input's size (without the soft edge).

    Raises:
        ImageInputError: arrays whose shapes do not match ``prepared``.
        EditInputError: a negative or non-integer ``feather``.
    """
    w, h = prepared.original_size
    _check("original", original, (h, w, 3), "the decoded input's size")
    _check("edited", edited, prepared.array.shape, "the working size")
    _check("mask", mask, prepared.array.shape[:2], "the working size")
    mask_full = undo_fit(mask.astype(bool, copy=False), prepared)
    edited_full = undo_fit(edited, prepared)
    fitted = prepared.array.shape[:2]
    pw, ph = prepared.pad
    if not local or (fitted[1] - pw, fitted[0] - ph) == (w, h):
        return np.ascontiguousarray(edited_full), np.ascontiguousarray(mask_full)
    alpha = feather_alpha(mask_full, feather)
    out = original.copy()
    band = alpha > 0
    a = alpha[band][:, None]
    out[band] = np.clip(np.rint(a * edited_full[band] + (1.0 - a) * original[band]), 0, 255).astype(np.uint8)
    return out, np.ascontiguousarray(mask_full)


def restore(
    result: EditResult,
    originals: Sequence[np.ndarray],
    prepared: Sequence[Prepared],
    cfg: EditConfig,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every image of an editor's result at its input's size (:func:`paste_back` with ``cfg``'s options).

    The CLI, the batch job's edit stage and the Serve app call this after :func:`instdiff.editing.edit`.

    Args:
        result: the editor's output for B images of one working size.
        originals: B (H_i, W_i, 3) uint8 decoded inputs.
        prepared: B records of what :func:`~instdiff.imageio.fit_to_multiple` did to each.
        cfg: ``paste_back`` (composite or not) and ``feather`` (soft edge in px).

    Returns:
        B ``(image (H_i, W_i, 3) uint8, mask (H_i, W_i) bool)`` pairs.

    Raises:
        ImageInputError: counts or shapes that do not match ``result``.
    """
    b = result.images.shape[0]
    if len(originals) != b or len(prepared) != b:
        raise ImageInputError(f"got {b} edited images but {len(originals)} originals and {len(prepared)} records")
    edited = from_model_tensor(result.images)  # (B, h, w, 3) uint8
    masks = result.masks[:, 0].cpu().numpy().astype(bool)  # (B, h, w)
    return [paste_back(originals[i], edited[i], masks[i], prepared[i], cfg.feather, cfg.paste_back) for i in range(b)]


@dataclass
class ImageEdit:
    """One image edited at its own size (:func:`edit_image`).

    Attributes:
        image: (H, W, 3) uint8 at the input's size.
        mask: (H, W) bool edit mask at the input's size.
        result: the editor's result at the working size (timings, UNet calls, extras).
        notes: what was done to the input to reach the working size (resized, padded), for the user.
    """

    image: np.ndarray
    mask: np.ndarray
    result: EditResult
    notes: list[str] = field(default_factory=list)


def edit_image(
    bundle: ModelBundle,
    image: np.ndarray,
    target_prompt: str,
    source_prompt: str | None = None,
    cfg: EditConfig = EditConfig(),
    size: int | None = None,
    size_policy: SizePolicy | str = SizePolicy.RESIZE,
) -> ImageEdit:
    """Edit one RGB image of any size and get the edit back at that size, the original kept outside the edit.

    The library's one call for a photo: :func:`~instdiff.imageio.fit_to_multiple` (to ``size`` and the model's
    step), :func:`instdiff.editing.edit` with ``cfg`` and ``cfg.seed``, then :func:`restore`.

    Args:
        bundle: the models.
        image: (H, W, 3) uint8 RGB (as :func:`~instdiff.imageio.decode_image` returns).
        target_prompt: the wanted output.
        source_prompt: a description of the input (needed by DiffEdit; ``None`` uses the target prompt).
        cfg: the method and its options (``paste_back``, ``feather`` among them).
        size: the working size's longer side in px (e.g. ``bundle.resolution``); ``None`` keeps the input's.
        size_policy: sides that are not multiples of the model's step are resized, padded or refused.

    Returns:
        The edit at the input's size, the working-size result and the notes.

    Raises:
        ImageInputError: an array that is not (H, W, 3) uint8, or a size the policy refuses.
        EditInputError: prompts or a config the editor refuses.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageInputError(f"image must be an (H, W, 3) uint8 RGB array; got {got}")
    prepared = fit_to_multiple(image, size_multiple(bundle), size_policy, size)
    source = source_prompt if source_prompt is not None else target_prompt
    result = edit(bundle, to_model_tensor(prepared.array), [source], [target_prompt], cfg)
    (out, mask) = restore(result, [image], [prepared], cfg)[0]
    return ImageEdit(image=out, mask=mask, result=result, notes=list(prepared.notes))
