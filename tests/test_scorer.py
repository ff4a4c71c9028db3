"""The shapes-world attribute scorer: phrases, detection on rendered scenes, regions, accuracy."""

import numpy as np
import pytest

from instdiff import synthetic
from instdiff.scorer import (
    Phrase,
    PhraseError,
    estimate_background,
    find_objects,
    fit_shape,
    objects_found,
    parse_phrase,
    phrase_present,
    scorer_accuracy,
)


def test_parse_phrase_objects_and_backgrounds():
    assert parse_phrase("a blue square") == Phrase("blue", "square")
    assert parse_phrase("An orange star") == Phrase("orange", "star")
    assert parse_phrase("a blue background") == Phrase("blue", None, None)
    p = parse_phrase("a striped gray background")
    assert p == Phrase("gray", None, "stripes") and p.is_background
    for bad in ("a square", "a blue dog", "a purple background", "blue"):
        with pytest.raises(PhraseError):
            parse_phrase(bad)


@pytest.mark.parametrize("kind", synthetic.SHAPES)
def test_fit_shape_recovers_every_shape(kind):
    spec = synthetic.ShapeSpec(kind, "red", 0.47, 0.53, 0.2)
    mask = synthetic.shape_mask(spec, 64)
    found, score, (cx, cy, s) = fit_shape(mask, np.zeros_like(mask))
    assert found == kind
    assert score > 0.9
    assert abs(cx - 0.47 * 64) < 1.5 and abs(cy - 0.53 * 64) < 1.5 and abs(s - 0.2 * 64) < 1.5


def test_occluded_object_is_still_recognised():
    star = synthetic.ShapeSpec("star", "red", 0.45, 0.5, 0.22)
    square = synthetic.ShapeSpec("square", "blue", 0.62, 0.5, 0.13)  # drawn on top, hides part of the star
    scene = synthetic.render_scene([star, square], "white", "plain", 64)
    assert scene.masks[0].sum() < synthetic.shape_mask(star, 64).sum()
    dets = {(d.color, d.kind) for d in find_objects(scene.image)}
    assert dets == {("red", "star"), ("blue", "square")}


def test_background_and_texture_are_read():
    for bg in synthetic.BACKGROUNDS:
        for texture in synthetic.TEXTURES:
            scene = synthetic.render_scene([], bg, texture, 64)
            est = estimate_background(scene.image)
            assert (est.color, est.texture) == (bg, texture)


def test_phrase_present_respects_the_region():
    pair = synthetic.make_edit_pairs(1, seed=10_000)[0]  # an object edit
    assert pair.kind == "object"
    assert phrase_present(pair.target.image, pair.target_phrase, region=pair.edit_mask)
    assert not phrase_present(pair.source.image, pair.target_phrase, region=pair.edit_mask)
    assert phrase_present(pair.source.image, pair.source_phrase, region=pair.edit_mask)
    outside = ~pair.edit_mask
    assert not phrase_present(pair.target.image, pair.target_phrase, region=outside)


def test_background_phrase_in_region():
    pair = synthetic.make_edit_pairs(3, seed=10_000)[2]
    assert pair.kind == "background"
    assert phrase_present(pair.target.image, pair.target_phrase, region=pair.edit_mask)
    assert not phrase_present(pair.source.image, pair.target_phrase, region=pair.edit_mask)


def test_objects_found_on_captions():
    scene = synthetic.make_scenes(1, seed=10_002)[0]
    assert objects_found(scene.image, scene.objects)
    other = synthetic.ShapeSpec(
        "cross" if scene.objects[0].kind != "cross" else "circle", scene.objects[0].color, 0.5, 0.5, 0.2
    )
    assert not objects_found(scene.image, [other])


def test_accuracy_on_held_out_scenes_meets_the_goal():
    scenes = synthetic.make_scenes(40, seed=10_002)
    acc = scorer_accuracy(scenes)
    assert acc["objects"] >= 60
    assert acc["object_accuracy"] >= 0.95
    assert acc["background_accuracy"] >= 0.95 and acc["texture_accuracy"] >= 0.95


def test_bad_image_is_refused():
    with pytest.raises(ValueError, match="square"):
        find_objects(np.zeros((32, 48, 3), dtype=np.uint8))
