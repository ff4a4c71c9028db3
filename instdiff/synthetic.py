"""The "shapes world": a synthetic dataset of captioned scenes with exact masks.

A scene holds one to three flat-coloured shapes drawn over a plain or
textured background at a square resolution (default 64 px; any size
of at least 8 px works, e.g. 32, 128, 256 or 512).  Every scene carries

* an ``(H, W, 3)`` ``uint8`` image,
* the exact visible mask of every object (after occlusion),
* a caption built from the small fixed :data:`VOCABULARY`.

Edit pairs (source scene, target scene, source phrase, target phrase) come
with a ground-truth edit mask that is exact: outside the mask the source
and target images are bit-identical, and inside it they differ.

Geometry
--------
Coordinates of a :class:`ShapeSpec` are image-relative (``cx``, ``cy`` in
``[0, 1]``, ``y`` pointing down).  ``size`` is a radius-like extent relative
to the image side; the concrete shapes are (``s = size``):

========  ===============================================================
circle    radius ``s``
square    axis-aligned square of half side ``s`` (before rotation)
diamond   rhombus (square turned 45 degrees) with half diagonals ``1.25 s``
triangle  equilateral, apex up, circumradius ``1.3 s`` about the centre
star      five-pointed star, apex up, outer radius ``1.3 s``, inner
          radius ``0.55 * 1.3 s``
cross     plus sign, arms reaching ``1.15 s``, arm half width ``0.4 s``
========  ===============================================================

``angle`` rotates polygons (degrees, clockwise on screen); circles ignore it.

Rasterisation
-------------
Without antialiasing (the default) a pixel belongs to a shape iff its centre
``(j + 0.5, i + 0.5)`` (pixel units) lies inside the shape: circles use
``dx**2 + dy**2 <= r**2`` and polygons a vectorised even-odd crossing rule.
Hence the masks are exact and the image is a pure function of the masks.
With ``antialias=True`` the image is rendered on a 4x supersampled grid and
box-filtered; the masks stay the pixel-centre masks.

Captions
--------
Object phrases are ``"<article> <colour> <shape>"`` (``"a red circle"``,
``"an orange star"``).  Objects are listed in drawing order:
``"A"``, ``"A and B"`` or ``"A, B and C"``, followed by
``" on <article> [<texture word> ]<background> background"``, where the
texture word is ``striped``, ``dotted`` or ``checkered`` and is omitted for
the ``plain`` texture, e.g.
``"a red circle, a blue square and a green star on a striped gray background"``.
The only non-word token is the comma; :func:`tokenize` splits a caption into
words, all of which belong to :data:`VOCABULARY`.

Randomness
----------
All random choices go through an explicit :class:`numpy.random.Generator`.
:func:`make_scenes` and :func:`make_edit_pairs` derive the generator of item
``i`` from ``(seed, stream, i)``, so item ``i`` does not depend on ``n``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from instdiff.imageio import to_model_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "EDIT_KINDS",
    "SHAPES",
    "TEXTURES",
    "TEXTURE_WORDS",
    "VOCABULARY",
    "EditPair",
    "Scene",
    "ShapeSpec",
    "allowed_colors",
    "apply_edit",
    "background_phrase",
    "background_tones",
    "caption_for",
    "color_allowed_on",
    "image_to_tensor",
    "make_edit_pair",
    "make_edit_pairs",
    "make_scenes",
    "phrase_for",
    "random_scene",
    "render_scene",
    "scene_to_tensor",
    "shape_mask",
    "shape_polygon",
    "tokenize",
]

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

COLORS: dict[str, RGB] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 40),
    "purple": (135, 55, 175),
    "orange": (245, 135, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

BACKGROUNDS: dict[str, RGB] = {
    "gray": (128, 128, 128),
    "white": (235, 235, 230),
    "black": (35, 35, 35),
    "beige": (225, 205, 165),
    "blue": (95, 135, 195),
    "green": (120, 170, 120),
}

TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker")

TEXTURE_WORDS: dict[str, str] = {
    "plain": "",
    "stripes": "striped",
    "dots": "dotted",
    "checker": "checkered",
}

EDIT_KINDS: tuple[str, ...] = ("object", "colour", "background")

_FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "and", "on", "background")

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(_FUNCTION_WORDS)
        | set(SHAPES)
        | set(COLORS)
        | set(BACKGROUNDS)
        | {word for word in TEXTURE_WORDS.values() if word}
    )
)

# Shape geometry, in units of ShapeSpec.size (see the module docstring).
_DIAMOND_HALF_DIAGONAL = 1.25
_TRIANGLE_RADIUS = 1.3
_STAR_OUTER_RADIUS = 1.3
_STAR_INNER_RATIO = 0.55
_CROSS_ARM = 1.15
_CROSS_HALF_WIDTH = 0.4

# Background textures: cells per image side and dot radius (fraction of a cell).
_TEXTURE_FREQUENCY = 8
_DOT_RADIUS = 0.3
# Luminance above which the second texture tone is darker (else lighter).
_TONE_LUMINANCE_SPLIT = 110.0
_TONE_DARKEN = 0.78
_TONE_LIGHTEN = 0.3
# Minimum Euclidean RGB distance between an object colour and background tones.
_MIN_COLOR_DISTANCE = 80.0

_SUPERSAMPLE = 4
_MIN_IMAGE_SIZE = 8
_MIN_OBJECT_PIXELS = 4
_DEFAULT_SIZE_RANGE = (0.12, 0.26)
_FRAME_MARGIN = 0.02
_MAX_PLACEMENT_TRIES = 60
_MAX_SCENE_TRIES = 200
_MAX_TARGET_TRIES = 30
_SCENE_STREAM = 0
_EDIT_STREAM = 1

_WORD_RE = re.compile(r"[a-z]+")


# --------------------------------------------------------------------------
# Vocabulary, phrases and captions
# --------------------------------------------------------------------------


def _article(word: str) -> str:
    """Return the indefinite article ("a" or "an") for ``word``."""
    return "an" if word[:1] in "aeiou" else "a"


def tokenize(text: str) -> list[str]:
    """Split a caption or prompt into lowercase words (punctuation dropped)."""
    return _WORD_RE.findall(text.lower())


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene.

    Attributes:
        kind: One of :data:`SHAPES`.
        color: A key of :data:`COLORS`.
        cx: Horizontal centre, image-relative in ``[0, 1]``.
        cy: Vertical centre, image-relative in ``[0, 1]`` (``y`` points down).
        size: Radius-like extent relative to the image side (see module doc).
        angle: Rotation in degrees (clockwise on screen); ignored by circles.
    """

    kind: str
    color: str
    cx: float
    cy: float
    size: float
    angle: float = 0.0

    def __post_init__(self) -> None:
        """Validate the fields."""
        if self.kind not in SHAPES:
            raise ValueError(f"unknown shape {self.kind!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {tuple(COLORS)}")
        if not self.size > 0.0:
            raise ValueError(f"shape size must be positive, got {self.size}")

    @property
    def phrase(self) -> str:
        """The noun phrase naming this object, e.g. ``"a red circle"``."""
        return phrase_for(self)


def phrase_for(spec: ShapeSpec) -> str:
    """Return the noun phrase for a shape, e.g. ``"a red circle"``."""
    return f"{_article(spec.color)} {spec.color} {spec.kind}"


def background_phrase(background: str, texture: str = "plain") -> str:
    """Return the phrase for a background, e.g. ``"a striped gray background"``."""
    _check_background(background, texture)
    words = [TEXTURE_WORDS[texture], background, "background"]
    words = [word for word in words if word]
    return f"{_article(words[0])} {' '.join(words)}"


def caption_for(objects: Sequence[ShapeSpec], background: str, texture: str = "plain") -> str:
    """Build the caption of a scene.

    Format: ``"A on BG"``, ``"A and B on BG"`` or ``"A, B and C on BG"``
    with the objects in drawing order and ``BG`` from :func:`background_phrase`;
    a scene without objects is captioned by the background phrase alone.
    """
    bg = background_phrase(background, texture)
    phrases = [phrase_for(obj) for obj in objects]
    if not phrases:
        return bg
    if len(phrases) == 1:
        listed = phrases[0]
    else:
        listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on {bg}"


# --------------------------------------------------------------------------
# Colours and backgrounds
# --------------------------------------------------------------------------


def _check_background(background: str, texture: str) -> None:
    """Raise ``ValueError`` for an unknown background colour or texture."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def background_tones(background: str) -> tuple[RGB, RGB]:
    """Return the two tones used by textured versions of ``background``.

    The first tone is the background colour itself; the second is a darker
    (for light backgrounds) or lighter (for dark backgrounds) shade of it.
    """
    base = BACKGROUNDS[background]
    luminance = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
    if luminance > _TONE_LUMINANCE_SPLIT:
        second = tuple(round(c * _TONE_DARKEN) for c in base)
    else:
        second = tuple(round(c + (255 - c) * _TONE_LIGHTEN) for c in base)
    return base, (second[0], second[1], second[2])


def _distance(a: RGB, b: RGB) -> float:
    """Euclidean distance between two RGB colours."""
    return math.dist(a, b)


def color_allowed_on(color: str, background: str) -> bool:
    """Whether objects of ``color`` may be drawn on ``background``.

    A colour is allowed if its name differs from the background's and it is
    at least a fixed RGB distance away from both background tones, so that
    objects always stand out (also on textured backgrounds).
    """
    if color == background:
        return False
    rgb = COLORS[color]
    return all(_distance(rgb, tone) >= _MIN_COLOR_DISTANCE for tone in background_tones(background))


def allowed_colors(background: str) -> tuple[str, ...]:
    """Object colours allowed on ``background`` (in :data:`COLORS` order)."""
    return tuple(color for color in COLORS if color_allowed_on(color, background))


# --------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------


def _unit_polygon(kind: str) -> np.ndarray | None:
    """Vertices of ``kind`` for unit size at the origin, or ``None`` for a circle."""
    if kind == "circle":
        return None
    if kind == "square":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if kind == "diamond":
        d = _DIAMOND_HALF_DIAGONAL
        return np.array([[0.0, -d], [d, 0.0], [0.0, d], [-d, 0.0]])
    if kind == "triangle":
        theta = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        return _TRIANGLE_RADIUS * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    if kind == "star":
        theta = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RATIO) * _STAR_OUTER_RADIUS
        return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    if kind == "cross":
        a, w = _CROSS_ARM, _CROSS_HALF_WIDTH
        return np.array(
            [
                [-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w],
                [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w],
            ]
        )  # fmt: skip
    raise ValueError(f"unknown shape {kind!r}")


def shape_polygon(spec: ShapeSpec, size: int) -> np.ndarray | None:
    """Polygon vertices of ``spec`` in pixel units for an image of side ``size``.

    Returns an ``(N, 2)`` array of ``(x, y)`` vertices, or ``None`` for circles.
    """
    unit = _unit_polygon(spec.kind)
    if unit is None:
        return None
    if spec.angle:
        rad = math.radians(spec.angle)
        cos, sin = math.cos(rad), math.sin(rad)
        unit = unit @ np.array([[cos, sin], [-sin, cos]])
    return (unit * spec.size + np.array([spec.cx, spec.cy])) * size


def _extent(spec: ShapeSpec) -> tuple[float, float, float, float]:
    """Bounding box ``(x0, y0, x1, y1)`` of ``spec`` in image-relative units."""
    poly = shape_polygon(spec, 1)
    if poly is None:
        r = spec.size
        return spec.cx - r, spec.cy - r, spec.cx + r, spec.cy + r
    return (
        float(poly[:, 0].min()),
        float(poly[:, 1].min()),
        float(poly[:, 0].max()),
        float(poly[:, 1].max()),
    )


def _inside_frame(spec: ShapeSpec, margin: float = 0.0) -> bool:
    """Whether the whole shape lies inside the image (with a relative margin)."""
    x0, y0, x1, y1 = _extent(spec)
    return x0 >= margin and y0 >= margin and x1 <= 1.0 - margin and y1 <= 1.0 - margin


def _even_odd(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for a grid of points.

    Args:
        xs: ``(1, W)`` x coordinates of the grid columns.
        ys: ``(H, 1)`` y coordinates of the grid rows.
        poly: ``(N, 2)`` polygon vertices.

    Returns:
        ``(H, W)`` boolean array, true where the point is inside.
    """
    inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
    for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        if ya == yb:
            continue  # horizontal edges never cross a horizontal ray
        crosses = (ya > ys) != (yb > ys)
        x_cross = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xs < x_cross)
    return inside


def shape_mask(spec: ShapeSpec, size: int) -> np.ndarray:
    """Full (unoccluded) pixel-centre coverage of ``spec`` as an ``(H, W)`` bool mask."""
    mask = np.zeros((size, size), dtype=bool)
    x0, y0, x1, y1 = (v * size for v in _extent(spec))
    cols = slice(max(0, math.floor(x0) - 1), min(size, math.ceil(x1) + 1))
    rows = slice(max(0, math.floor(y0) - 1), min(size, math.ceil(y1) + 1))
    if cols.start >= cols.stop or rows.start >= rows.stop:
        return mask
    xs = (np.arange(cols.start, cols.stop, dtype=np.float64) + 0.5)[None, :]
    ys = (np.arange(rows.start, rows.stop, dtype=np.float64) + 0.5)[:, None]
    poly = shape_polygon(spec, size)
    if poly is None:
        cx, cy, r = spec.cx * size, spec.cy * size, spec.size * size
        mask[rows, cols] = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    else:
        mask[rows, cols] = _even_odd(xs, ys, poly)
    return mask


def _background_image(background: str, texture: str, size: int) -> np.ndarray:
    """Render the (possibly textured) background as an ``(H, W, 3)`` uint8 array."""
    _check_background(background, texture)
    base, second = background_tones(background)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = base
    if texture == "plain":
        return image
    u = (np.arange(size, dtype=np.float64) + 0.5) / size * _TEXTURE_FREQUENCY
    x, y = u[None, :], u[:, None]
    if texture == "stripes":
        alt = np.floor(x + y) % 2 == 1
    elif texture == "checker":
        alt = (np.floor(x) + np.floor(y)) % 2 == 1
    else:  # dots
        fx = x - np.floor(x) - 0.5
        fy = y - np.floor(y) - 0.5
        alt = fx**2 + fy**2 <= _DOT_RADIUS**2
    image[alt] = second
    return image


def _compose(
    objects: Sequence[ShapeSpec], background: str, texture: str, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise a scene without antialiasing.

    Returns:
        ``(image, full, visible)`` with ``full`` and ``visible`` of shape
        ``(K, H, W)``: the unoccluded and the visible coverage of each object.
    """
    image = _background_image(background, texture, size)
    full = np.zeros((len(objects), size, size), dtype=bool)
    for k, obj in enumerate(objects):
        full[k] = shape_mask(obj, size)
        image[full[k]] = COLORS[obj.color]
    return image, full, _visible(full)


def _visible(full: np.ndarray) -> np.ndarray:
    """Visible masks from full masks, later objects occluding earlier ones."""
    visible = np.zeros_like(full)
    covered = np.zeros(full.shape[1:], dtype=bool)
    for k in range(full.shape[0] - 1, -1, -1):
        visible[k] = full[k] & ~covered
        covered |= full[k]
    return visible


@dataclass(eq=False)
class Scene:
    """A rendered scene.

    Attributes:
        image: ``(H, W, 3)`` uint8 image.
        objects: Shapes in drawing order (later ones occlude earlier ones).
        masks: ``(K, H, W)`` bool, the visible pixels of each object.
        background: Key of :data:`BACKGROUNDS`.
        texture: One of :data:`TEXTURES`.
        caption: Caption in the format of :func:`caption_for`.
        antialias: Whether the image was rendered with antialiasing.
    """

    image: np.ndarray
    objects: list[ShapeSpec]
    masks: np.ndarray
    background: str
    texture: str
    caption: str
    antialias: bool = field(default=False)

    @property
    def size(self) -> int:
        """Side length of the (square) image in pixels."""
        return int(self.image.shape[0])

    @property
    def background_mask(self) -> np.ndarray:
        """``(H, W)`` bool mask of pixels not covered by any object."""
        return ~self.masks.any(axis=0)


def render_scene(
    objects: Sequence[ShapeSpec],
    background: str = "gray",
    texture: str = "plain",
    size: int = 64,
    antialias: bool = False,
) -> Scene:
    """Render ``objects`` (in drawing order) over a background.

    Args:
        objects: Shapes to draw; later shapes occlude earlier ones.
        background: Key of :data:`BACKGROUNDS`.
        texture: One of :data:`TEXTURES`.
        size: Side of the square image in pixels (at least 8).
        antialias: Box-filter a 4x supersampled rendering. Masks always use
            the exact pixel-centre rule.

    Returns:
        The rendered :class:`Scene`.
    """
    if int(size) != size or size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be an integer >= {_MIN_IMAGE_SIZE}, got {size}")
    size = int(size)
    _check_background(background, texture)
    objects = list(objects)
    image, _, visible = _compose(objects, background, texture, size)
    if antialias:
        big, _, _ = _compose(objects, background, texture, size * _SUPERSAMPLE)
        blocks = big.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).astype(np.float64)
        image = np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)
    return Scene(
        image=image,
        objects=objects,
        masks=visible,
        background=background,
        texture=texture,
        caption=caption_for(objects, background, texture),
        antialias=antialias,
    )


# --------------------------------------------------------------------------
# Random scenes
# --------------------------------------------------------------------------


def _random_shape(
    rng: np.random.Generator,
    kind: str,
    color: str,
    size_range: tuple[float, float],
    max_angle: float,
) -> ShapeSpec | None:
    """Sample the geometry of one shape fully inside the frame (``None`` if it cannot fit)."""
    extent = float(rng.uniform(*size_range))
    angle = float(rng.uniform(-max_angle, max_angle)) if max_angle > 0 and kind != "circle" else 0.0
    probe = ShapeSpec(kind, color, 0.0, 0.0, extent, angle)
    x0, y0, x1, y1 = _extent(probe)
    lo_x, hi_x = _FRAME_MARGIN - x0, 1.0 - _FRAME_MARGIN - x1
    lo_y, hi_y = _FRAME_MARGIN - y0, 1.0 - _FRAME_MARGIN - y1
    if lo_x > hi_x or lo_y > hi_y:
        return None
    cx = float(rng.uniform(lo_x, hi_x))
    cy = float(rng.uniform(lo_y, hi_y))
    return ShapeSpec(kind, color, cx, cy, extent, angle)


def _visibility_ok(full: np.ndarray, min_visible: float) -> bool:
    """Whether every object keeps at least ``min_visible`` of its area visible."""
    areas = full.reshape(full.shape[0], -1).sum(axis=1)
    if (areas < _MIN_OBJECT_PIXELS).any():
        return False
    seen = _visible(full).reshape(full.shape[0], -1).sum(axis=1)
    return bool((seen >= min_visible * areas).all())


def random_scene(
    rng: np.random.Generator,
    size: int = 64,
    n_objects: int | None = None,
    textured: bool = True,
    *,
    size_range: tuple[float, float] = _DEFAULT_SIZE_RANGE,
    min_visible: float = 0.6,
    max_angle: float = 0.0,
    antialias: bool = False,
) -> Scene:
    """Sample a random scene.

    The background colour is uniform over :data:`BACKGROUNDS`, the texture
    uniform over :data:`TEXTURES` (``"plain"`` if ``textured`` is false).
    Objects get distinct colours allowed on the background
    (:func:`color_allowed_on`), lie fully inside the frame, and each keeps at
    least ``min_visible`` of its pixels visible after occlusion.

    Args:
        rng: Source of randomness.
        size: Image side in pixels.
        n_objects: Number of objects (1..3); uniform in 1..3 if ``None``.
        textured: Allow textured backgrounds.
        size_range: Range of :attr:`ShapeSpec.size` values.
        min_visible: Minimum visible fraction of every object.
        max_angle: Polygons are rotated uniformly in ``[-max_angle, max_angle]``.
        antialias: Render the image with antialiasing.

    Returns:
        The sampled :class:`Scene`.
    """
    if n_objects is None:
        n_objects = int(rng.integers(1, 4))
    if not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be in 1..3, got {n_objects}")
    for attempt in range(_MAX_SCENE_TRIES):
        background = str(rng.choice(list(BACKGROUNDS)))
        texture = str(rng.choice(list(TEXTURES))) if textured else "plain"
        palette = allowed_colors(background)
        colors = [str(c) for c in rng.choice(palette, size=n_objects, replace=False)]
        objects: list[ShapeSpec] = []
        full = np.zeros((0, size, size), dtype=bool)
        for color in colors:
            kind = str(rng.choice(SHAPES))
            for _ in range(_MAX_PLACEMENT_TRIES):
                spec = _random_shape(rng, kind, color, size_range, max_angle)
                if spec is None:
                    continue
                candidate = np.concatenate([full, shape_mask(spec, size)[None]], axis=0)
                if _visibility_ok(candidate, min_visible):
                    objects.append(spec)
                    full = candidate
                    break
            else:
                break
        if len(objects) == n_objects:
            return render_scene(objects, background, texture, size, antialias)
        logger.debug("random_scene: placement failed, resampling (attempt %d)", attempt + 1)
    raise RuntimeError(f"could not place {n_objects} objects at size {size} with min_visible={min_visible}")


def _index_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Generator for item ``index`` of ``stream``, independent of the item count."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def make_scenes(n: int, seed: int = 0, size: int = 64, **kw: Any) -> list[Scene]:
    """Sample ``n`` scenes deterministically.

    Scene ``i`` is drawn by :func:`random_scene` from a generator derived from
    ``(seed, i)``, so it is the same for any ``n > i``.  Extra keyword
    arguments are passed to :func:`random_scene`.
    """
    return [random_scene(_index_rng(seed, _SCENE_STREAM, i), size, **kw) for i in range(n)]


# --------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------


@dataclass(eq=False)
class EditPair:
    """A source scene, its edited version and the exact edit region.

    Attributes:
        id: Identifier, e.g. ``"shapes-0-000012"``.
        source: The input scene.
        target: The ground-truth edited scene.
        source_prompt: ``source.caption``.
        target_prompt: ``target.caption``.
        source_phrase: Phrase of the edited entity in the source prompt.
        target_phrase: Phrase replacing it in the target prompt.
        kind: ``"object"``, ``"colour"`` or ``"background"``.
        edit_mask: ``(H, W)`` bool; outside it source and target are identical.
        object_index: Index of the edited object (``None`` for background edits).
    """

    id: str
    source: Scene
    target: Scene
    source_prompt: str
    target_prompt: str
    source_phrase: str
    target_phrase: str
    kind: str
    edit_mask: np.ndarray
    object_index: int | None


def apply_edit(
    scene: Scene,
    object_index: int | None,
    target_kind: str | None = None,
    target_color: str | None = None,
    target_background: str | None = None,
) -> Scene:
    """Re-render ``scene`` with one edit applied.

    With ``object_index`` set, object ``object_index`` takes ``target_kind``
    and/or ``target_color`` (``None`` keeps the current value) and keeps its
    centre, size, angle and drawing order.  With ``object_index=None``, the
    background colour becomes ``target_background`` and the texture is kept.
    Size and antialiasing follow ``scene``.

    Raises:
        ValueError: If the arguments do not describe exactly one kind of edit.
    """
    objects = list(scene.objects)
    background = scene.background
    if object_index is None:
        if target_background is None or target_kind is not None or target_color is not None:
            raise ValueError("a background edit needs target_background and no object targets")
        background = target_background
    else:
        if target_background is not None:
            raise ValueError("an object edit cannot also change the background")
        if not 0 <= object_index < len(objects):
            raise ValueError(f"object_index {object_index} out of range for {len(objects)} objects")
        old = objects[object_index]
        objects[object_index] = ShapeSpec(
            kind=old.kind if target_kind is None else target_kind,
            color=old.color if target_color is None else target_color,
            cx=old.cx,
            cy=old.cy,
            size=old.size,
            angle=old.angle,
        )
    return render_scene(objects, background, scene.texture, scene.size, scene.antialias)


def _propose_target(
    rng: np.random.Generator, scene: Scene, kind: str
) -> tuple[int | None, str | None, str | None, str | None]:
    """Sample ``(object_index, target_kind, target_color, target_background)``.

    Returns all ``None`` if the scene admits no edit of this kind.
    """
    if kind == "background":
        options = [
            bg
            for bg in BACKGROUNDS
            if bg != scene.background and all(color_allowed_on(o.color, bg) for o in scene.objects)
        ]
        if not options:
            return None, None, None, None
        return None, None, None, str(rng.choice(options))
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    others = {o.color for j, o in enumerate(scene.objects) if j != index}
    colors = [c for c in allowed_colors(scene.background) if c != obj.color and c not in others]
    if kind == "colour":
        if not colors:
            return None, None, None, None
        return index, None, str(rng.choice(colors)), None
    if kind == "object":
        new_kind = str(rng.choice([s for s in SHAPES if s != obj.kind]))
        new_color = str(rng.choice(colors)) if colors and rng.random() < 0.5 else None
        return index, new_kind, new_color, None
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def make_edit_pair(
    rng: np.random.Generator,
    size: int = 64,
    index: int = 0,
    kinds: Sequence[str] = EDIT_KINDS,
    *,
    pair_id: str | None = None,
    textured: bool = True,
    min_visible: float = 0.6,
) -> EditPair:
    """Sample a random scene and a valid edit of it.

    The edit kind is ``kinds[index % len(kinds)]`` so that consecutive
    indices cycle through the kinds:

    * ``"object"``: the shape changes (and, half of the time, the colour too);
    * ``"colour"``: only the colour changes;
    * ``"background"``: the background colour changes, the texture is kept.

    New colours differ from the object's colour, from the other objects'
    colours and are allowed on the background; a new background keeps every
    object colour allowed.  The edited target keeps every object at least
    ``min_visible`` visible, its images differ from the source inside the
    edit mask and are identical outside.  Edited objects stay inside the frame.

    Args:
        rng: Source of randomness.
        size: Image side in pixels.
        index: Item index, selects the edit kind and the default id.
        kinds: Edit kinds to cycle through.
        pair_id: Identifier; defaults to ``f"shapes-{index:06d}"``.
        textured: Allow textured backgrounds.
        min_visible: Minimum visible fraction of every object (source and target).

    Returns:
        The :class:`EditPair`.
    """
    if not kinds:
        raise ValueError("kinds must not be empty")
    kind = kinds[index % len(kinds)]
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    for _ in range(_MAX_SCENE_TRIES):
        source = random_scene(rng, size, textured=textured, min_visible=min_visible)
        for _ in range(_MAX_TARGET_TRIES):
            obj_index, new_kind, new_color, new_bg = _propose_target(rng, source, kind)
            if obj_index is None and new_bg is None:
                break
            target = apply_edit(source, obj_index, new_kind, new_color, new_bg)
            if obj_index is None:
                mask = source.background_mask
                source_phrase = background_phrase(source.background, source.texture)
                target_phrase = background_phrase(target.background, target.texture)
            else:
                mask = source.masks[obj_index] | target.masks[obj_index]
                source_phrase = source.objects[obj_index].phrase
                target_phrase = target.objects[obj_index].phrase
                if not _inside_frame(target.objects[obj_index]):
                    continue
                full = np.stack([shape_mask(o, size) for o in target.objects])
                if not _visibility_ok(full, min_visible):
                    continue
            if not (source.image != target.image).any(axis=-1)[mask].any():
                continue
            return EditPair(
                id=f"shapes-{index:06d}" if pair_id is None else pair_id,
                source=source,
                target=target,
                source_prompt=source.caption,
                target_prompt=target.caption,
                source_phrase=source_phrase,
                target_phrase=target_phrase,
                kind=kind,
                edit_mask=mask,
                object_index=obj_index,
            )
        logger.debug("make_edit_pair: no valid %s edit for this scene, resampling", kind)
    raise RuntimeError(f"could not build a {kind!r} edit pair at size {size}")


def make_edit_pairs(
    n: int,
    seed: int = 0,
    size: int = 64,
    kinds: Sequence[str] = EDIT_KINDS,
    **kw: Any,
) -> list[EditPair]:
    """Sample ``n`` edit pairs deterministically.

    Pair ``i`` is drawn by :func:`make_edit_pair` with ``index=i`` from a
    generator derived from ``(seed, i)`` (so it does not depend on ``n``) and
    gets the id ``f"shapes-{seed}-{i:06d}"``.  Extra keyword arguments are
    passed to :func:`make_edit_pair`.
    """
    return [
        make_edit_pair(
            _index_rng(seed, _EDIT_STREAM, i),
            size,
            index=i,
            kinds=kinds,
            pair_id=f"shapes-{seed}-{i:06d}",
            **kw,
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """One image as the models' tensor, through :func:`instdiff.imageio.to_model_tensor`.

    Args:
        image: (H, W, 3) uint8.

    Returns:
        (3, H, W) float32 in [-1, 1], contiguous.

    Raises:
        ValueError: another shape.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    return to_model_tensor(image)[0].contiguous()


def scene_to_tensor(scene: Scene) -> torch.Tensor:
    """The image of ``scene`` as a (3, H, W) float32 tensor in [-1, 1] (:func:`image_to_tensor`)."""
    return image_to_tensor(scene.image)
