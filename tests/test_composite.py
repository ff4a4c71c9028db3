"""Local means local, at the input's resolution: outside the feathered mask the output is the input, bit for bit.

Checked on the pure compositing (:func:`instdiff.composite.paste_back`, :func:`feather_alpha`) and end to end on
every path: the library (:func:`instdiff.composite.edit_image`), ``instdiff edit`` and the batch job, for each
editor, at odd sizes and aspect ratios.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy import ndimage

from instdiff.composite import edit_image, feather_alpha, paste_back, restore
from instdiff.config import EditConfig, Method
from instdiff.errors import ConfigError, EditInputError, ImageInputError
from instdiff.imageio import decode_image, decode_mask, fit_to_multiple, from_model_tensor, undo_fit
from instdiff.models import load_bundle
from pipelines import schema as S
from pipelines.batch import run_in_process
from pipelines.cli import main
from pipelines.config import parse_config

SIZES = [(97, 61), (640, 480), (33, 200)]  # (W, H): odd, landscape 4:3, tall
METHODS = ["instdiffedit", "diffedit", "sdedit"]


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 with detail at every scale (noise on a gradient), so any resampling shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 60 + 120 * (xx / max(w - 1, 1)) * (yy / max(h - 1, 1))
    return np.clip(base[..., None] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def disc_footprint(r: int) -> np.ndarray:
    """The offsets within Euclidean distance r, as a boolean structuring element."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r**2


def beyond_feather(mask: np.ndarray, feather: int) -> np.ndarray:
    """Pixels farther than ``feather`` px from the mask: the complement of its dilation by a disc (no EDT)."""
    if feather == 0:
        return ~mask
    return ~ndimage.binary_dilation(mask, structure=disc_footprint(feather))


def assert_local(original: np.ndarray, out: np.ndarray, mask: np.ndarray, feather: int) -> None:
    assert out.shape == original.shape and out.dtype == np.uint8 and mask.shape == original.shape[:2]
    outside = beyond_feather(mask, feather)
    assert np.array_equal(out[outside], original[outside]), "pixels beyond the feathered mask changed"


# ---- the pure compositing -------------------------------------------------------------------------------------
def test_feather_alpha_is_one_inside_a_ramp_outside_and_zero_beyond():
    mask = np.zeros((21, 30), bool)
    mask[8:13, 10:14] = True
    alpha = feather_alpha(mask, 3)
    assert (alpha[mask] == 1.0).all()
    # the ramp, by hand: 1 - d/4 at distance d = 1, 2, 3 to the right of the block's right edge (column 13)
    assert alpha[10, 14:18].tolist() == [0.75, 0.5, 0.25, 0.0]
    # diagonal: distance sqrt(2) from the corner (12, 13) → 1 - sqrt(2)/4
    assert alpha[13, 14] == pytest.approx(1 - 2**0.5 / 4)
    assert np.array_equal(alpha > 0, ~beyond_feather(mask, 3))
    assert ((alpha > 0) & (alpha < 1) & mask).sum() == 0
    assert np.array_equal(feather_alpha(mask, 0), mask.astype(float))


def test_feather_alpha_refuses_bad_widths_and_config_checks_feather():
    mask = np.ones((4, 4), bool)
    for bad in (-1, 2.5, True):
        with pytest.raises(EditInputError, match="feather must be an integer"):
            feather_alpha(mask, bad)
    with pytest.raises(ConfigError, match="feather"):
        EditConfig(feather=-2)


@pytest.mark.parametrize(("w", "h"), SIZES)
@pytest.mark.parametrize("feather", [0, 4])
def test_paste_back_keeps_the_input_outside_and_the_upsampled_edit_inside(w, h, feather):
    original = photo(w, h)
    prepared = fit_to_multiple(original, 8, "resize", 64)
    ph, pw = prepared.array.shape[:2]
    assert (pw, ph) != (w, h)
    edited = photo(pw, ph, seed=1)
    mask = np.zeros((ph, pw), bool)
    mask[ph // 4 : ph // 2 + 1, pw // 3 : pw // 3 + max(1, pw // 4)] = True
    out, mask_full = paste_back(original, edited, mask, prepared, feather=feather)
    assert np.array_equal(mask_full, undo_fit(mask, prepared))
    assert 0 < mask_full.mean() < 1
    assert_local(original, out, mask_full, feather)
    upsampled = undo_fit(edited, prepared)
    assert np.array_equal(out[mask_full], upsampled[mask_full])
    band = ~mask_full & ~beyond_feather(mask_full, feather)
    assert band.any() == (feather > 0)
    lo, hi = np.minimum(original, upsampled), np.maximum(original, upsampled)
    assert ((out[band] >= lo[band]) & (out[band] <= hi[band])).all()  # a blend of the two, never beyond


def test_the_feather_blends_monotonically_with_the_distance():
    w, h, feather = 200, 120, 6
    original = np.zeros((h, w, 3), np.uint8)
    prepared = fit_to_multiple(original, 8, "resize", 40)  # 40x24
    edited = np.full((*prepared.array.shape[:2], 3), 255, np.uint8)
    mask = np.zeros(prepared.array.shape[:2], bool)
    mask[8:16, 16:24] = True
    out, mask_full = paste_back(original, edited, mask, prepared, feather=feather)
    row = int(np.flatnonzero(mask_full.any(axis=1)).mean())
    right = int(np.flatnonzero(mask_full[row])[-1])
    profile = out[row, right : right + feather + 3, 0].astype(int).tolist()
    assert profile[0] == 255 and profile[-2:] == [0, 0]
    assert all(a > b for a, b in zip(profile[: feather + 1], profile[1 : feather + 2], strict=True)), profile
    # every channel and row of the band: the value never rises with the distance to the mask
    dist = ndimage.distance_transform_edt(~mask_full)
    order = np.argsort(dist, axis=None, kind="stable")
    vals, ds = out[..., 0].ravel()[order].astype(int), dist.ravel()[order]
    for d0, d1 in zip(np.unique(ds)[:-1], np.unique(ds)[1:], strict=True):
        if d1 > feather + 1:
            break
        assert vals[ds == d0].min() >= vals[ds == d1].max()


def test_padding_is_cropped_and_an_input_at_the_working_size_is_returned_as_edited():
    original = photo(37, 29)
    padded = fit_to_multiple(original, 8, "pad")
    edited = photo(40, 32, seed=2)
    mask = np.zeros((32, 40), bool)
    mask[5:12, 5:12] = True
    out, m = paste_back(original, edited, mask, padded)
    assert np.array_equal(out, edited[:29, :37]) and np.array_equal(m, mask[:29, :37])
    same = fit_to_multiple(photo(40, 32), 8)
    out, m = paste_back(same.array, edited, mask, same)
    assert np.array_equal(out, edited) and np.array_equal(m, mask)


def test_resize_then_pad_comes_back_at_the_input_size():
    original = photo(97, 61)
    prepared = fit_to_multiple(original, 8, "pad", 100)  # 100x63, padded to 104x64
    assert prepared.pad != (0, 0)
    edited = photo(104, 64, seed=3)
    mask = np.zeros((64, 104), bool)
    mask[10:30, 20:50] = True
    assert undo_fit(edited, prepared).shape == (61, 97, 3)
    out, m = paste_back(original, edited, mask, prepared, feather=2)
    assert out.shape == (61, 97, 3) and m.shape == (61, 97)
    assert_local(original, out, m, 2)


def test_no_paste_back_or_a_whole_image_mask_gives_the_upsampled_edit():
    original = photo(97, 61)
    prepared = fit_to_multiple(original, 8, "resize", 64)
    edited = photo(*prepared.array.shape[1::-1], seed=4)
    part = np.zeros(prepared.array.shape[:2], bool)
    part[:8] = True
    raw, _ = paste_back(original, edited, part, prepared, local=False)
    assert np.array_equal(raw, undo_fit(edited, prepared))
    whole, m = paste_back(original, edited, np.ones_like(part), prepared)  # SDEdit's mask
    assert np.array_equal(whole, undo_fit(edited, prepared)) and m.all()


def test_mismatched_shapes_are_refused():
    original = photo(97, 61)
    prepared = fit_to_multiple(original, 8, "resize", 64)
    good = prepared.array
    mask = np.zeros(good.shape[:2], bool)
    with pytest.raises(ImageInputError, match="original is"):
        paste_back(original[:-1], good, mask, prepared)
    with pytest.raises(ImageInputError, match="edited is"):
        paste_back(original, good[:, :-8], mask, prepared)
    with pytest.raises(ImageInputError, match="mask is"):
        paste_back(original, good, mask[:-8], prepared)


# ---- every path, every editor --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return load_bundle("tiny")


def _cfg(method: str, **kw: object) -> EditConfig:
    return EditConfig(method=Method(method), steps=3, n_noises=1, diffedit_noises=2, **kw)


@pytest.mark.parametrize(("w", "h"), SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_library_edit_image_is_local_at_the_input_size(tiny, w, h, method):
    original = photo(w, h)
    res = edit_image(tiny, original, "a blue circle", "a red circle", _cfg(method), size=tiny.resolution)
    assert res.notes and res.result.images.shape[-1] < w
    assert_local(original, res.image, res.mask, EditConfig.feather)
    prepared = fit_to_multiple(original, 8, "resize", tiny.resolution)
    upsampled = undo_fit(from_model_tensor(res.result.images)[0], prepared)
    assert np.array_equal(res.image[res.mask], upsampled[res.mask])
    if method == "sdedit":
        assert res.mask.all()  # SDEdit edits the whole image: local is everything
    else:
        assert 0 < res.mask.mean() < 1


def test_restore_follows_paste_back_and_feather(tiny):
    original = photo(97, 61)
    prepared = fit_to_multiple(original, 8, "resize", tiny.resolution)
    res = edit_image(tiny, original, "a blue circle", "a red circle", _cfg("diffedit", feather=9), size=32)
    assert_local(original, res.image, res.mask, 9)
    assert not np.array_equal(res.image[~res.mask], original[~res.mask])  # the 9 px band blends
    ((hard, _),) = restore(res.result, [original], [prepared], _cfg("diffedit", feather=0))
    assert_local(original, hard, res.mask, 0)
    ((raw, _),) = restore(res.result, [original], [prepared], _cfg("diffedit", paste_back=False))
    assert np.array_equal(raw, undo_fit(from_model_tensor(res.result.images)[0], prepared))
    with pytest.raises(ImageInputError, match="1 edited images but 2 originals"):
        restore(res.result, [original, original], [prepared], _cfg("diffedit"))
    with pytest.raises(ImageInputError, match="uint8 RGB array"):
        edit_image(tiny, original.astype(np.float32), "a blue circle")


@pytest.mark.parametrize(("method", "w", "h"), [("instdiffedit", 97, 61), ("diffedit", 33, 200), ("sdedit", 97, 61)])
def test_cli_edit_is_local_at_the_input_size(tmp_path, capsys, w, h, method):
    original = photo(w, h, seed=5)
    src, out, mask_out = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "mask.png"
    Image.fromarray(original).save(src)
    argv = ["edit", str(src), "--model", "tiny", "--size", "32", "--method", method, "--steps", "3"]
    argv += ["--noises", "1", "--source", "a red circle", "--target", "a blue circle", "--feather", "3"]
    assert main([*argv, "--out", str(out), "--mask-out", str(mask_out)]) == 0
    edited, _ = decode_image(out)
    mask = decode_mask(mask_out, size=(w, h))
    assert_local(original, edited, mask, 3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mask_area"] == pytest.approx(mask.mean())


def test_cli_embedded_model_keeps_a_640x480_photo_outside_the_mask(tmp_path):
    original = photo(640, 480, seed=6)
    src, out, mask_out = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "mask.png"
    Image.fromarray(original).save(src)
    argv = ["edit", str(src), "--source", "a red circle", "--target", "a blue circle", "--steps", "2"]
    assert main([*argv, "--noises", "1", "--out", str(out), "--mask-out", str(mask_out)]) == 0
    edited, _ = decode_image(out)
    mask = decode_mask(mask_out, size=(640, 480))
    assert 0 < mask.mean() < 1
    assert_local(original, edited, mask, EditConfig.feather)


@pytest.mark.parametrize("method", METHODS)
def test_batch_job_is_local_at_the_input_size(method):
    originals = {f"r{w}x{h}": photo(w, h, seed=w) for w, h in SIZES}
    rows = []
    for rid, arr in originals.items():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        rows.append(
            {S.ID: rid, S.IMAGE: buf.getvalue(), S.SOURCE_PROMPT: "a red circle", S.TARGET_PROMPT: "a blue circle"}
        )
    table = pa.Table.from_pylist([{n: r.get(n) for n in S.INPUT_SCHEMA.names} for r in rows], schema=S.INPUT_SCHEMA)
    cfg = parse_config(
        {
            "input": "unused",
            "output": "unused",
            "model": {"spec": "tiny"},
            "method": {"name": method, "steps": 3, "n_noises": 1, "diffedit_noises": 2, "feather": 2},
            "actors": {"batch_size": 4},
        }
    )
    out = run_in_process(cfg, table, threads=None).to_pylist()
    assert len(out) == len(originals)
    for r in out:
        assert r[S.STATUS] == S.STATUS_OK, r[S.ERROR]
        original = originals[r[S.ID]]
        h, w = original.shape[:2]
        assert (r[S.WIDTH], r[S.HEIGHT]) == (w, h)
        edited, _ = decode_image(r[S.EDITED])
        mask = decode_mask(r[S.PRED_MASK], size=(w, h))
        assert_local(original, edited, mask, 2)
