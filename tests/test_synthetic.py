"""Tests for the synthetic shapes world (instdiff.synthetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instdiff.synthetic import (
    BACKGROUNDS,
    COLORS,
    EDIT_KINDS,
    SHAPES,
    TEXTURES,
    VOCABULARY,
    EditPair,
    Scene,
    ShapeSpec,
    allowed_colors,
    apply_edit,
    background_phrase,
    background_tones,
    caption_for,
    image_to_tensor,
    make_edit_pair,
    make_edit_pairs,
    make_scenes,
    phrase_for,
    random_scene,
    render_scene,
    scene_to_tensor,
    shape_mask,
    shape_polygon,
    tokenize,
)


def _color_pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Boolean mask of the pixels of ``image`` equal to ``rgb``."""
    return (image == np.array(rgb, dtype=np.uint8)).all(axis=-1)


def _background_pixels(scene: Scene) -> np.ndarray:
    """Pixels showing one of the two tones of the scene's background."""
    tones = background_tones(scene.background)
    return _color_pixels(scene.image, tones[0]) | _color_pixels(scene.image, tones[1])


def _assert_scene_invariants(scene: Scene, min_visible: float = 0.6) -> None:
    """Check the structural guarantees of a (non-antialiased) scene."""
    size = scene.size
    k = len(scene.objects)
    assert scene.image.shape == (size, size, 3)
    assert scene.image.dtype == np.uint8
    assert scene.masks.shape == (k, size, size)
    assert scene.masks.dtype == bool
    assert 1 <= k <= 3
    # Visible masks are disjoint and, together with the background, tile the image.
    assert (scene.masks.sum(axis=0) <= 1).all()
    background = _background_pixels(scene)
    assert not (background & scene.masks.any(axis=0)).any()
    assert (background | scene.masks.any(axis=0)).all()
    assert np.array_equal(background, scene.background_mask)
    for obj, mask in zip(scene.objects, scene.masks, strict=True):
        # Every visible pixel shows the object's colour, and only those do.
        assert np.array_equal(_color_pixels(scene.image, COLORS[obj.color]), mask)
        full = shape_mask(obj, size)
        assert not (mask & ~full).any()
        assert full.sum() > 0
        assert mask.sum() >= min_visible * full.sum()
        # Inside the frame: the polygon / circle never leaves the image.
        poly = shape_polygon(obj, size)
        if poly is None:
            r = obj.size * size
            lo = np.array([obj.cx * size - r, obj.cy * size - r])
            hi = np.array([obj.cx * size + r, obj.cy * size + r])
        else:
            lo, hi = poly.min(axis=0), poly.max(axis=0)
        assert (lo >= 0).all() and (hi <= size).all()
        assert obj.color != scene.background
    assert len({obj.color for obj in scene.objects}) == k
    assert scene.caption == caption_for(scene.objects, scene.background, scene.texture)
    words = tokenize(scene.caption)
    assert set(words) <= set(VOCABULARY)
    assert len(words) < 20


def _assert_pair_valid(pair: EditPair) -> None:
    """Check the guarantees of an edit pair."""
    src, tgt, mask = pair.source, pair.target, pair.edit_mask
    assert mask.shape == (src.size, src.size) and mask.dtype == bool
    assert mask.any()
    assert np.array_equal(src.image[~mask], tgt.image[~mask])
    assert (src.image != tgt.image).any(axis=-1)[mask].any()
    assert pair.source_prompt == src.caption
    assert pair.target_prompt == tgt.caption
    assert pair.source_prompt != pair.target_prompt
    assert pair.source_phrase in pair.source_prompt
    assert pair.target_phrase in pair.target_prompt
    assert pair.source_phrase != pair.target_phrase
    for text in (
        pair.source_prompt,
        pair.target_prompt,
        pair.source_phrase,
        pair.target_phrase,
    ):
        assert set(tokenize(text)) <= set(VOCABULARY)
    assert src.texture == tgt.texture
    if pair.kind == "background":
        assert pair.object_index is None
        assert src.background != tgt.background
        assert src.objects == tgt.objects
        assert np.array_equal(mask, ~src.masks.any(axis=0))
        assert all(obj.color != tgt.background for obj in tgt.objects)
    else:
        k = pair.object_index
        assert k is not None
        assert src.background == tgt.background
        assert np.array_equal(mask, src.masks[k] | tgt.masks[k])
        old, new = src.objects[k], tgt.objects[k]
        assert (old.cx, old.cy, old.size, old.angle) == (
            new.cx,
            new.cy,
            new.size,
            new.angle,
        )
        assert [o for j, o in enumerate(src.objects) if j != k] == [o for j, o in enumerate(tgt.objects) if j != k]
        assert new.color != tgt.background
        if pair.kind == "colour":
            assert old.kind == new.kind and old.color != new.color
        else:
            assert old.kind != new.kind
        assert pair.source_phrase == old.phrase
        assert pair.target_phrase == new.phrase


# --------------------------------------------------------------------------
# Constants and phrases
# --------------------------------------------------------------------------


def test_constants() -> None:
    assert SHAPES == ("circle", "square", "triangle", "star", "diamond", "cross")
    assert TEXTURES == ("plain", "stripes", "dots", "checker")
    assert len(COLORS) >= 6 and len(BACKGROUNDS) >= 4
    for name in (*COLORS, *BACKGROUNDS, *SHAPES):
        assert name.isalpha() and name.islower() and name in VOCABULARY
    assert len(set(COLORS.values())) == len(COLORS)
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    # Object colours never coincide with a background tone, and every
    # background admits enough colours for three objects plus an edit.
    for background in BACKGROUNDS:
        tones = background_tones(background)
        assert tones[0] != tones[1]
        assert not set(tones) & set(COLORS.values())
        assert background not in allowed_colors(background)
        assert len(allowed_colors(background)) >= 5


def test_phrases_and_captions() -> None:
    red = ShapeSpec("circle", "red", 0.3, 0.3, 0.1)
    orange = ShapeSpec("star", "orange", 0.6, 0.6, 0.1)
    blue = ShapeSpec("square", "blue", 0.7, 0.3, 0.1)
    assert phrase_for(red) == red.phrase == "a red circle"
    assert orange.phrase == "an orange star"
    assert caption_for([red], "gray", "plain") == "a red circle on a gray background"
    assert (
        caption_for([red, orange], "beige", "stripes")
        == "a red circle and an orange star on a striped beige background"
    )
    assert (
        caption_for([red, orange, blue], "black", "checker")
        == "a red circle, an orange star and a blue square on a checkered black background"
    )
    assert background_phrase("white", "dots") == "a dotted white background"
    assert tokenize("a red circle, a blue square") == [
        "a",
        "red",
        "circle",
        "a",
        "blue",
        "square",
    ]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        ShapeSpec("hexagon", "red", 0.5, 0.5, 0.1)
    with pytest.raises(ValueError):
        ShapeSpec("circle", "magenta", 0.5, 0.5, 0.1)
    with pytest.raises(ValueError):
        render_scene([], background="plaid")
    with pytest.raises(ValueError):
        render_scene([], texture="waves")
    with pytest.raises(ValueError):
        render_scene([], size=4)
    scene = render_scene([ShapeSpec("circle", "red", 0.5, 0.5, 0.2)])
    with pytest.raises(ValueError):
        apply_edit(scene, None, target_kind="square")
    with pytest.raises(ValueError):
        apply_edit(scene, 3, target_kind="square")
    with pytest.raises(ValueError):
        apply_edit(scene, 0, target_color="blue", target_background="white")
    with pytest.raises(ValueError):
        make_edit_pair(np.random.default_rng(0), kinds=("style",))


# --------------------------------------------------------------------------
# Exact rasterisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SHAPES)
def test_single_object_pixels_match_mask(kind: str) -> None:
    spec = ShapeSpec(kind, "red", 0.45, 0.55, 0.2, angle=7.0)
    scene = render_scene([spec], background="gray", texture="plain", size=64)
    mask = scene.masks[0]
    red = _color_pixels(scene.image, COLORS["red"])
    assert red.sum() == mask.sum() > 0
    assert np.array_equal(red, mask)
    assert np.array_equal(mask, shape_mask(spec, 64))
    assert _color_pixels(scene.image, BACKGROUNDS["gray"]).sum() == 64 * 64 - mask.sum()


def test_circle_area() -> None:
    size, radius = 256, 0.35
    scene = render_scene([ShapeSpec("circle", "blue", 0.5, 0.5, radius)], size=size)
    expected = math.pi * (radius * size) ** 2
    assert abs(scene.masks[0].sum() - expected) / expected < 0.005


def test_square_exact_geometry() -> None:
    # Half side 0.25 of 64 px = 16 px; edges fall on pixel boundaries.
    scene = render_scene([ShapeSpec("square", "green", 0.5, 0.5, 0.25)], size=64)
    expected = np.zeros((64, 64), dtype=bool)
    expected[16:48, 16:48] = True
    assert scene.masks[0].sum() == 32 * 32
    assert np.array_equal(scene.masks[0], expected)


def test_polygon_areas_close_to_geometry() -> None:
    size = 256
    for kind in ("triangle", "star", "diamond", "cross"):
        spec = ShapeSpec(kind, "red", 0.5, 0.5, 0.3, angle=20.0)
        poly = shape_polygon(spec, size)
        assert poly is not None
        x, y = poly[:, 0], poly[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        assert abs(shape_mask(spec, size).sum() - area) / area < 0.02


def test_occlusion_masks() -> None:
    bottom = ShapeSpec("square", "red", 0.4, 0.4, 0.2)
    top = ShapeSpec("circle", "blue", 0.6, 0.6, 0.2)
    scene = render_scene([bottom, top], background="white", texture="checker", size=64)
    full_bottom, full_top = shape_mask(bottom, 64), shape_mask(top, 64)
    overlap = full_bottom & full_top
    assert overlap.any()
    assert not (scene.masks[0] & full_top).any()
    assert np.array_equal(scene.masks[0], full_bottom & ~full_top)
    assert np.array_equal(scene.masks[1], full_top)
    assert (_color_pixels(scene.image, COLORS["blue"]) == scene.masks[1]).all()
    _assert_scene_invariants(scene, min_visible=0.0)


def test_textures_use_two_tones() -> None:
    for texture in TEXTURES:
        scene = render_scene([], background="beige", texture=texture, size=64)
        tones = background_tones("beige")
        first = _color_pixels(scene.image, tones[0])
        second = _color_pixels(scene.image, tones[1])
        assert (first | second).all()
        assert second.any() == (texture != "plain")


def test_antialias_keeps_masks_and_interior() -> None:
    objects = [ShapeSpec("star", "red", 0.5, 0.5, 0.3, angle=10.0)]
    sharp = render_scene(objects, "gray", "plain", 64)
    smooth = render_scene(objects, "gray", "plain", 64, antialias=True)
    assert smooth.antialias and np.array_equal(sharp.masks, smooth.masks)
    changed = (sharp.image != smooth.image).any(axis=-1)
    assert changed.any()
    # Only pixels next to the shape boundary change.
    mask = sharp.masks[0]
    edge = np.zeros_like(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            edge |= np.roll(mask, (dy, dx), axis=(0, 1)) != mask
    assert not (changed & ~edge).any()


# --------------------------------------------------------------------------
# Random scenes and determinism
# --------------------------------------------------------------------------


def _scenes_equal(a: Scene, b: Scene) -> bool:
    return (
        np.array_equal(a.image, b.image)
        and np.array_equal(a.masks, b.masks)
        and a.caption == b.caption
        and a.objects == b.objects
        and (a.background, a.texture) == (b.background, b.texture)
    )


def test_make_scenes_deterministic() -> None:
    first = make_scenes(5, seed=3)
    again = make_scenes(5, seed=3)
    longer = make_scenes(10, seed=3)
    other = make_scenes(5, seed=4)
    assert all(_scenes_equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(_scenes_equal(a, b) for a, b in zip(first, longer[:5], strict=True))
    assert not any(_scenes_equal(a, b) for a, b in zip(first, other, strict=True))
    assert len({scene.caption for scene in longer}) > 1


def test_random_scene_invariants() -> None:
    scenes = make_scenes(40, seed=11)
    for scene in scenes:
        _assert_scene_invariants(scene)
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3}
    assert len({scene.texture for scene in scenes}) > 1
    assert all(s.texture == "plain" for s in make_scenes(5, seed=1, textured=False))
    rng = np.random.default_rng(0)
    assert len(random_scene(rng, n_objects=3).objects) == 3


def test_make_edit_pairs_deterministic() -> None:
    first = make_edit_pairs(4, seed=7)
    longer = make_edit_pairs(8, seed=7)
    other = make_edit_pairs(4, seed=8)
    for a, b in zip(first, longer[:4], strict=True):
        assert a.id == b.id
        assert _scenes_equal(a.source, b.source) and _scenes_equal(a.target, b.target)
        assert np.array_equal(a.edit_mask, b.edit_mask)
    assert [p.id for p in first] == [f"shapes-7-{i:06d}" for i in range(4)]
    assert not any(_scenes_equal(a.source, b.source) for a, b in zip(first, other, strict=True))


def test_edit_pairs_exact() -> None:
    pairs = make_edit_pairs(50, seed=0, size=64)
    assert {p.kind for p in pairs} == set(EDIT_KINDS)
    for pair in pairs:
        _assert_pair_valid(pair)
        _assert_scene_invariants(pair.source)
        _assert_scene_invariants(pair.target)


def test_edit_kind_selection() -> None:
    pairs = make_edit_pairs(4, seed=2, kinds=("colour",))
    assert all(p.kind == "colour" for p in pairs)
    pair = make_edit_pair(np.random.default_rng(5), index=2, kinds=("object", "background"))
    assert pair.kind == "object" and pair.id == "shapes-000002"


def test_apply_edit_roundtrip() -> None:
    scene = render_scene(
        [
            ShapeSpec("circle", "red", 0.4, 0.4, 0.2),
            ShapeSpec("star", "blue", 0.6, 0.6, 0.15),
        ],
        background="gray",
        texture="stripes",
    )
    edited = apply_edit(scene, 0, target_kind="square", target_color="yellow")
    assert edited.objects[0] == ShapeSpec("square", "yellow", 0.4, 0.4, 0.2)
    assert edited.caption.startswith("a yellow square and a blue star on a striped gray")
    restored = apply_edit(edited, 0, target_kind="circle", target_color="red")
    assert _scenes_equal(scene, restored)
    recoloured = apply_edit(scene, None, target_background="beige")
    assert recoloured.texture == "stripes" and recoloured.background == "beige"


@pytest.mark.parametrize("size", [32, 256])
def test_other_sizes(size: int) -> None:
    for scene in make_scenes(3, seed=5, size=size):
        assert scene.size == size
        _assert_scene_invariants(scene)
    for pair in make_edit_pairs(3, seed=5, size=size):
        assert pair.source.size == size
        _assert_pair_valid(pair)


@pytest.mark.parametrize("size", [128, 512])
def test_large_render(size: int) -> None:
    scene = random_scene(np.random.default_rng(1), size=size)
    _assert_scene_invariants(scene)


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------


def test_tensor_conversion() -> None:
    scene = make_scenes(1, seed=0, size=32)[0]
    tensor = scene_to_tensor(scene)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[0, 0] = (255, 0, 128)
    converted = image_to_tensor(image)
    assert converted[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1.0], abs=1e-6)
    assert converted[:, 1, 1].tolist() == [-1.0, -1.0, -1.0]
    restored = ((tensor + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(restored, scene.image)
