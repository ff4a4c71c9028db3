"""Metric inputs: images and masks as the metrics take them, converted to tensors.

Every metric of :mod:`instdiff.metrics` accepts images and masks in the forms below and converts them with
:func:`to_tensor` and :func:`to_mask`. Metric images are in [0, 1]; the models' [-1, 1] tensors come from
:func:`instdiff.imageio.to_model_tensor` instead.

* Images: ``torch.Tensor`` (B, 3, H, W) or (3, H, W), float in [0, 1] or uint8 (divided by 255); NumPy arrays
  (or anything with ``__array__``, e.g. a PIL image) channel-last (H, W, 3) or (B, H, W, 3), uint8 in 0..255 or
  float in [0, 1]; or a sequence of those with one size.
* Masks: (B, 1, H, W), (B, H, W) or (H, W), bool, integer or float; non-bool values are thresholded at 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from instdiff.errors import ImageInputError

ImageInput = torch.Tensor | np.ndarray | Sequence[Any]
"""An image or a batch of images in any form :func:`to_tensor` accepts."""

MaskInput = torch.Tensor | np.ndarray
"""A mask or a batch of masks in any form :func:`to_mask` accepts."""


def to_tensor(
    image: ImageInput, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Convert an image or a batch of images to a float (B, 3, H, W) tensor in [0, 1].

    Accepted inputs:

    * ``torch.Tensor`` (3, H, W) or (B, 3, H, W); uint8 is divided by 255, floating point is taken as already
      in [0, 1].
    * ``np.ndarray`` channel-last (H, W, 3) or (B, H, W, 3); uint8 is divided by 255, floating point is taken
      as already in [0, 1].
    * Anything exposing ``__array__`` (e.g. a PIL image) is treated like a NumPy array.
    * A sequence of the above with equal sizes, stacked along the batch axis.

    Args:
        image: The image(s).
        device: Optional target device.
        dtype: Floating dtype of the result (integer inputs are scaled in this dtype).

    Returns:
        (B, 3, H, W) tensor of the requested dtype, in [0, 1] for uint8 inputs.

    Raises:
        ImageInputError: Unsupported shape, channel count or type, or images of different sizes in a sequence.
    """
    if isinstance(image, torch.Tensor):
        tensor = image
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ImageInputError(f"expected a (B,3,H,W) or (3,H,W) tensor, got {tuple(image.shape)}")
        tensor = tensor.to(dtype) / 255.0 if tensor.dtype == torch.uint8 else tensor.to(dtype)
    elif isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        array = np.asarray(image)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ImageInputError(f"expected a channel-last (H,W,3) or (B,H,W,3) array, got {array.shape}")
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).to(dtype) / scale
    elif isinstance(image, Sequence) and len(image) > 0:
        parts = [to_tensor(item, dtype=dtype) for item in image]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ImageInputError(f"images in a sequence must share one size, got {sorted(shapes)}")
        tensor = torch.cat(parts, dim=0)
    else:
        raise ImageInputError(f"unsupported image input of type {type(image).__name__}")
    return tensor.to(device) if device is not None else tensor


def to_mask(mask: MaskInput, device: torch.device | str | None = None) -> torch.Tensor:
    """Convert a mask or a batch of masks to a bool (B, H, W) tensor.

    Args:
        mask: (B, 1, H, W), (B, H, W) or (H, W); bool, integer or float. Non-bool values are thresholded at
            0.5, so {0, 1} and {0, 255} masks both work.
        device: Optional target device.

    Returns:
        (B, H, W) bool tensor.

    Raises:
        ImageInputError: A 4-D mask with more than one channel, or a mask that is not 2-, 3- or 4-D.
    """
    tensor = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    if tensor.ndim == 4:
        if tensor.shape[1] != 1:
            raise ImageInputError(f"4-D masks must be (B,1,H,W), got {tuple(tensor.shape)}")
        tensor = tensor[:, 0]
    elif tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim != 3:
        raise ImageInputError(f"unsupported mask shape {tuple(tensor.shape)}; accepted: (B,1,H,W), (B,H,W), (H,W)")
    if tensor.dtype != torch.bool:
        tensor = tensor.float() > 0.5
    return tensor.to(device) if device is not None else tensor
