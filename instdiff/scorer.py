"""Attribute scorer for the shapes world: is "a blue square" in this image, and where?

The stand-in for CLIPScore on the embedded model. An analytic detector, no learned weights:

1. **background**: every pixel is compared with the tones of every background (:data:`synthetic.BACKGROUNDS`,
   base and texture tone) and with the object colours; the background whose tones explain most pixels wins;
   the texture is the rendered texture pattern that best matches where the second tone lies (or plain).
2. **object pixels**: pixels nearest (RGB distance) to an object colour allowed on that background, within
   ``color_tolerance``, are that colour's pixels; connected components (8-neighbourhood) of at least
   ``min_area`` of the image are candidate objects.
3. **shape**: each candidate is fitted with every shape of :data:`synthetic.SHAPES` (centre and size, by a
   pattern search from moment- and box-based starts). The fit score is an IoU in which template pixels
   covered by other objects do not count against it (they may be occluded). The best shape wins if its
   score reaches ``min_fit``; otherwise the candidate has no shape (``kind=None``).

Images are ``(H, W, 3)`` uint8 arrays (any square size of at least 16 px).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from instdiff import synthetic
from instdiff.errors import ImageInputError, PhraseError
from instdiff.masks import iou

log = logging.getLogger(__name__)

_STRUCT8 = np.ones((3, 3), dtype=bool)
# shape constants, in units of ShapeSpec.size: visible area, bbox half-width, bbox half-height and the
# offset of the bbox centre below the shape centre (see synthetic's geometry table).
_AREA = {
    "circle": np.pi,
    "square": 4.0,
    "diamond": 2 * 1.25**2,
    "triangle": 3 * np.sqrt(3) / 4 * 1.3**2,
    "star": 5 * 1.3 * 0.55 * 1.3 * np.sin(np.deg2rad(36)),
    "cross": 8 * 1.15 * 0.4 - 4 * 0.4**2,
}
_HALF_W = {
    "circle": 1.0,
    "square": 1.0,
    "diamond": 1.25,
    "triangle": 1.3 * np.sin(np.deg2rad(60)),
    "star": 1.3 * np.sin(np.deg2rad(72)),
    "cross": 1.15,
}
_HALF_H = {
    "circle": 1.0,
    "square": 1.0,
    "diamond": 1.25,
    "triangle": 1.3 * 0.75,
    "star": 1.3 * (1 + np.cos(np.deg2rad(36))) / 2,
    "cross": 1.15,
}
_BOX_OFFSET = {
    "circle": 0.0,
    "square": 0.0,
    "diamond": 0.0,
    "triangle": -0.325,
    "star": 1.3 * (np.cos(np.deg2rad(36)) - 1) / 2,
    "cross": 0.0,
}


@dataclass(frozen=True)
class ScorerConfig:
    """Detector thresholds. Distances are Euclidean in 0..255 RGB; areas are fractions of the image."""

    color_tolerance: float = 90.0
    background_tolerance: float = 45.0
    min_area: float = 0.004
    min_fit: float = 0.55
    plain_fraction: float = 0.08
    region_overlap: float = 0.5


@dataclass(frozen=True)
class Phrase:
    """A parsed phrase: an object (``color`` + ``shape``) or a background (``color`` + optional texture)."""

    color: str
    shape: str | None = None  # None for a background phrase
    texture: str | None = None  # synthetic.TEXTURES name; None when the phrase names none

    @property
    def is_background(self) -> bool:
        """True for a background phrase (no shape)."""
        return self.shape is None


@dataclass
class Detection:
    """One object found in an image."""

    color: str
    kind: str | None  # a synthetic.SHAPES name, or None when no shape fits well enough
    mask: np.ndarray  # (H, W) bool, the object's pixels
    score: float  # fit score of ``kind`` in [0, 1]
    center: tuple[float, float]  # fitted centre (x, y) in pixels
    size: float  # fitted ShapeSpec.size in pixels

    @property
    def phrase(self) -> str:
        """The detection as a phrase, e.g. ``"a red circle"``."""
        return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.color} {self.kind}"


@dataclass(frozen=True)
class BackgroundEstimate:
    """The background colour name, its texture and the mask of pixels explained by its tones."""

    color: str
    texture: str
    mask: np.ndarray


_TEXTURE_BY_WORD = {w: t for t, w in synthetic.TEXTURE_WORDS.items() if w}
_WORD_RE = re.compile(r"[a-z]+")


def parse_phrase(phrase: str) -> Phrase:
    """Read a shapes-world phrase: ``"a blue square"`` → ``Phrase("blue", "square")``; ``"a striped gray
    background"`` → a background phrase.

    Args:
        phrase: ``[a|an] <colour> <shape>`` or ``[a|an] [striped|dotted|checkered] <colour> background``.

    Returns:
        The parsed :class:`Phrase`.

    Raises:
        PhraseError: any other text (the message lists the accepted colours and shapes).
    """
    words = [w for w in _WORD_RE.findall(phrase.lower()) if w not in ("a", "an", "the")]
    if len(words) >= 2 and words[-1] == "background":
        texture = None
        rest = words[:-1]
        if len(rest) == 2 and rest[0] in _TEXTURE_BY_WORD:
            texture = _TEXTURE_BY_WORD[rest[0]]
            rest = rest[1:]
        if len(rest) == 1 and rest[0] in synthetic.BACKGROUNDS:
            return Phrase(rest[0], None, texture)
    elif len(words) == 2 and words[0] in synthetic.COLORS and words[1] in synthetic.SHAPES:
        return Phrase(words[0], words[1])
    raise PhraseError(
        f"cannot read phrase {phrase!r}; accepted: 'a <colour> <shape>' with colour in {sorted(synthetic.COLORS)} "
        f"and shape in {list(synthetic.SHAPES)}, or 'a [striped|dotted|checkered] <colour> background' with "
        f"colour in {sorted(synthetic.BACKGROUNDS)}"
    )


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        shape = getattr(image, "shape", type(image).__name__)
        raise ImageInputError(f"expected a square (H, W, 3) uint8 image, got {shape}")
    if image.shape[0] < 16:
        raise ImageInputError(f"image side must be at least 16 px, got {image.shape[0]}")
    return image.astype(np.float32)


def _distances(pixels: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """(..., 3) pixels, (R, 3) references → (..., R) Euclidean distances."""
    return np.sqrt(((pixels[..., None, :] - refs) ** 2).sum(axis=-1))


@lru_cache(maxsize=32)
def _texture_pattern(texture: str, size: int) -> np.ndarray:
    """(H, W) bool: where a rendered background of ``texture`` shows its second tone."""
    scene = synthetic.render_scene([], "gray", texture, size)
    base = np.array(synthetic.background_tones("gray")[0], dtype=np.uint8)
    return (scene.image != base).any(axis=-1)


def estimate_background(
    image: np.ndarray, region: np.ndarray | None = None, cfg: ScorerConfig = ScorerConfig()
) -> BackgroundEstimate:
    """The background colour and texture of ``image`` (read inside ``region`` when given).

    Args:
        image: (H, W, 3) uint8, square, side at least 16 px.
        region: optional (H, W) bool mask of the pixels to read.
        cfg: detector thresholds.

    Returns:
        The :class:`BackgroundEstimate` (colour name, texture name, (H, W) bool mask of background pixels).

    Raises:
        ImageInputError: an image that is not square (H, W, 3) or smaller than 16 px.
    """
    img = _check_image(image)
    sel = np.ones(img.shape[:2], dtype=bool) if region is None else np.asarray(region, dtype=bool)
    pix = img[sel]  # (P, 3)
    names = list(synthetic.BACKGROUNDS)
    tone_refs = np.array([t for n in names for t in synthetic.background_tones(n)], dtype=np.float32)  # (2N, 3)
    obj_refs = np.array(list(synthetic.COLORS.values()), dtype=np.float32)
    d_tone = _distances(pix, tone_refs)
    nearest = d_tone.argmin(axis=-1)  # (P,) index 2·bg + tone
    ok = (d_tone.min(axis=-1) <= cfg.background_tolerance) & (d_tone.min(axis=-1) < _distances(pix, obj_refs).min(-1))
    votes = np.bincount(nearest[ok], minlength=len(tone_refs)).astype(np.float64)
    scores = votes[0::2] + 0.5 * votes[1::2]  # base tone counts fully, texture tone half
    best = names[int(scores.argmax())]
    tones = np.array(synthetic.background_tones(best), dtype=np.float32)
    d_full = _distances(img, tones)  # (H, W, 2)
    d_obj_full = _distances(img, obj_refs).min(axis=-1)
    explained = (d_full.min(axis=-1) <= cfg.background_tolerance) & (d_full.min(axis=-1) < d_obj_full)
    second = explained & (d_full[..., 1] < d_full[..., 0])
    area = explained & sel
    texture = "plain"
    if area.sum() and second[area].mean() >= cfg.plain_fraction:
        agreement = {
            t: float((_texture_pattern(t, img.shape[0])[area] == second[area]).mean())
            for t in synthetic.TEXTURES
            if t != "plain"
        }
        texture = max(agreement, key=agreement.__getitem__)
    return BackgroundEstimate(best, texture, explained)


def _fit_score(kind: str, cx: float, cy: float, s: float, visible: np.ndarray, free: np.ndarray, size: int) -> float:
    if s <= 0.5:
        return 0.0
    spec = synthetic.ShapeSpec(kind, "red", cx / size, cy / size, s / size)
    t = synthetic.shape_mask(spec, size)
    tp = np.count_nonzero(t & visible)
    fn = np.count_nonzero(visible) - tp
    fp = np.count_nonzero(t & ~visible & ~free)
    return tp / max(1, tp + fn + fp)


def _starts(kind: str, visible: np.ndarray) -> list[tuple[float, float, float]]:
    ys, xs = np.nonzero(visible)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    bx, by = (x0 + x1) / 2, (y0 + y1) / 2
    s_box = max((x1 - x0) / (2 * _HALF_W[kind]), (y1 - y0) / (2 * _HALF_H[kind]))
    s_area = float(np.sqrt(len(xs) / _AREA[kind]))
    out = []
    for s in {round(s_box, 2), round(s_area, 2)}:
        out.append((float(bx), float(by - _BOX_OFFSET[kind] * s), float(s)))
    return out


def fit_shape(
    visible: np.ndarray, free: np.ndarray, kinds: Sequence[str] = synthetic.SHAPES
) -> tuple[str, float, tuple[float, float, float]]:
    """The shape that best explains a visible mask; ``free`` pixels may hide part of it (occlusion).

    Args:
        visible: (H, W) bool, the object's visible pixels.
        free: (H, W) bool, pixels covered by other objects (not counted against a template).
        kinds: candidate shape names (:data:`instdiff.synthetic.SHAPES`).

    Returns:
        ``(kind, score, (cx, cy, size))``: the best shape, its occlusion-aware IoU in [0, 1], and its centre and
        :class:`~instdiff.synthetic.ShapeSpec` size in pixels.
    """
    size = visible.shape[0]
    results = []
    for kind in kinds:
        best = max(((_fit_score(kind, *p, visible, free, size), p) for p in _starts(kind, visible)), key=lambda r: r[0])
        results.append((kind, *_refine(kind, best, visible, free, size, steps=(2.0,))))
    results.sort(key=lambda r: -r[1])
    finals = [(k, *_refine(k, (sc, p), visible, free, size, steps=(1.0, 0.5))) for k, sc, p in results[:2]]
    return max(finals, key=lambda r: r[1])


def _refine(
    kind: str,
    start: tuple[float, tuple[float, float, float]],
    visible: np.ndarray,
    free: np.ndarray,
    size: int,
    steps: Iterable[float],
) -> tuple[float, tuple[float, float, float]]:
    """Pattern search over (cx, cy, size) with the given step sizes in pixels."""
    score, p = start
    for step in steps:
        for _ in range(12):
            moves = [(step, 0, 0), (-step, 0, 0), (0, step, 0), (0, -step, 0), (0, 0, step / 2), (0, 0, -step / 2)]
            cands = [(p[0] + a, p[1] + b, p[2] + c) for a, b, c in moves]
            scored = [(_fit_score(kind, *q, visible, free, size), q) for q in cands]
            top = max(scored, key=lambda r: r[0])
            if top[0] <= score:
                break
            score, p = top
    return score, p


def find_objects(
    image: np.ndarray, cfg: ScorerConfig = ScorerConfig(), background: BackgroundEstimate | None = None
) -> list[Detection]:
    """All objects in ``image``: one detection per colour component of at least ``min_area`` of the image.

    Args:
        image: (H, W, 3) uint8, square, side at least 16 px.
        cfg: detector thresholds.
        background: the image's background when already estimated (else estimated here).

    Returns:
        One :class:`Detection` per object found (colour, fitted shape or ``None``, (H, W) bool mask, fit score).

    Raises:
        ImageInputError: an image that is not square (H, W, 3) or smaller than 16 px.
    """
    img = _check_image(image)
    size = img.shape[0]
    bg = background or estimate_background(image, cfg=cfg)
    colors = list(synthetic.allowed_colors(bg.color))
    refs = np.array(
        [synthetic.COLORS[c] for c in colors] + list(synthetic.background_tones(bg.color)), dtype=np.float32
    )
    d = _distances(img, refs)  # (H, W, R)
    nearest = d.argmin(axis=-1)
    ok = d.min(axis=-1) <= cfg.color_tolerance
    min_px = max(4, int(cfg.min_area * size * size))
    candidates: list[tuple[str, np.ndarray]] = []
    for ci, color in enumerate(colors):
        pix = (nearest == ci) & ok
        if np.count_nonzero(pix) < min_px:
            continue
        labels, n = ndimage.label(pix, structure=_STRUCT8)
        comps = [labels == j for j in range(1, n + 1)]
        comps = [c for c in comps if np.count_nonzero(c) >= min_px]
        candidates += [(color, c) for c in comps]
    object_px = np.zeros(img.shape[:2], dtype=bool)
    for _, m in candidates:
        object_px |= m
    unexplained = ~ok | ~(bg.mask | object_px)
    detections = []
    for color, m in candidates:
        free = (object_px & ~m) | unexplained
        kind, score, (cx, cy, s) = fit_shape(m, free)
        detections.append(Detection(color, kind if score >= cfg.min_fit else None, m, float(score), (cx, cy), s))
    return _merge_split(detections, cfg, bg, object_px, unexplained)


def _merge_split(
    dets: list[Detection], cfg: ScorerConfig, bg: BackgroundEstimate, object_px: np.ndarray, unexplained: np.ndarray
) -> list[Detection]:
    """A colour seen as several components (an object cut in two by an occluder) is refitted as one when the
    union fits better than its best part."""
    by_color: dict[str, list[Detection]] = {}
    for d in dets:
        by_color.setdefault(d.color, []).append(d)
    out = []
    for color, parts in by_color.items():
        if len(parts) == 1:
            out += parts
            continue
        union = np.logical_or.reduce([p.mask for p in parts])
        kind, score, (cx, cy, s) = fit_shape(union, (object_px & ~union) | unexplained)
        if score > max(p.score for p in parts):
            out.append(Detection(color, kind if score >= cfg.min_fit else None, union, float(score), (cx, cy), s))
        else:
            out += parts
    return out


def phrase_present(
    image: np.ndarray,
    phrase: str | Phrase,
    region: np.ndarray | None = None,
    cfg: ScorerConfig = ScorerConfig(),
    detections: list[Detection] | None = None,
) -> bool:
    """Whether ``phrase`` is visible in ``image`` (inside ``region`` when given).

    An object phrase needs a detection of that colour and shape with at least ``region_overlap`` of its pixels
    inside the region. A background phrase needs the background read inside the region (outside the detected
    objects) to have that colour, and that texture when the phrase names one.

    Args:
        image: (H, W, 3) uint8, square, side at least 16 px.
        phrase: a phrase text (see :func:`parse_phrase`) or a parsed :class:`Phrase`.
        region: optional (H, W) bool mask; an empty region holds no phrase.
        cfg: detector thresholds.

    Returns:
        True when the phrase is seen.

    Raises:
        PhraseError: an unreadable phrase. ImageInputError: a wrong image shape.
    """
    p = parse_phrase(phrase) if isinstance(phrase, str) else phrase
    if p.is_background:
        sel = None if region is None else np.asarray(region, dtype=bool)
        if sel is not None and not sel.any():
            return False
        bg = estimate_background(image, sel, cfg)
        return bg.color == p.color and (p.texture is None or bg.texture == p.texture)
    dets = detections if detections is not None else find_objects(image, cfg)
    for d in dets:
        if d.color != p.color or d.kind != p.shape:
            continue
        if region is None:
            return True
        inside = np.count_nonzero(d.mask & np.asarray(region, dtype=bool))
        if inside >= cfg.region_overlap * np.count_nonzero(d.mask):
            return True
    return False


def objects_found(
    image: np.ndarray, objects: Sequence[synthetic.ShapeSpec], cfg: ScorerConfig = ScorerConfig()
) -> bool:
    """Whether every object (colour and shape) of ``objects`` is detected in ``image``.

    Args:
        image: (H, W, 3) uint8, square, side at least 16 px.
        objects: the shapes that should be there.
        cfg: detector thresholds.

    Returns:
        True when each object's (colour, shape) is among the detections.
    """
    dets = find_objects(image, cfg)
    found = {(d.color, d.kind) for d in dets}
    return all((o.color, o.kind) in found for o in objects)


def match_objects(scene: synthetic.Scene, detections: Sequence[Detection], min_iou: float = 0.5) -> list[bool]:
    """Per ground-truth object of ``scene``: is there a detection of its colour and shape whose mask has IoU
    ≥ ``min_iou`` with the object's visible mask?

    Args:
        scene: the rendered scene (its ``objects`` and visible ``masks``, (H, W) bool each).
        detections: what :func:`find_objects` found in an image of the scene.
        min_iou: the IoU (:func:`instdiff.masks.iou`) a detection needs, in [0, 1].

    Returns:
        One bool per object of the scene, in its order.
    """
    out = []
    for obj, m in zip(scene.objects, scene.masks, strict=True):
        gt = torch.from_numpy(np.asarray(m, dtype=bool))[None]
        ok = any(
            float(iou(torch.from_numpy(np.asarray(d.mask, dtype=bool))[None], gt)[0]) >= min_iou
            for d in detections
            if d.color == obj.color and d.kind == obj.kind
        )
        out.append(ok)
    return out


def scorer_accuracy(
    scenes: Sequence[synthetic.Scene], images: Sequence[np.ndarray] | None = None, cfg: ScorerConfig = ScorerConfig()
) -> dict[str, float]:
    """Accuracy of the scorer on rendered scenes (or on ``images`` of them, e.g. VAE reconstructions).

    Args:
        scenes: ground-truth scenes.
        images: optional (H, W, 3) uint8 images to score instead of the scenes' own renderings.
        cfg: detector thresholds.

    Returns:
        ``object_accuracy`` (share of ground-truth objects detected with the right colour, shape and location,
        mask IoU ≥ 0.5), ``background_accuracy`` / ``texture_accuracy`` (share of scenes whose background colour /
        texture is read correctly), ``spurious_per_scene`` (detections matching no object), and the counts.
    """
    hit = total = bg_ok = tex_ok = spurious = 0
    for i, scene in enumerate(scenes):
        image = scene.image if images is None else images[i]
        bg = estimate_background(image, cfg=cfg)
        dets = find_objects(image, cfg, bg)
        matches = match_objects(scene, dets)
        hit += sum(matches)
        total += len(matches)
        bg_ok += int(bg.color == scene.background)
        tex_ok += int(bg.texture == scene.texture)
        gt = {(o.color, o.kind) for o in scene.objects}
        spurious += sum(1 for d in dets if (d.color, d.kind) not in gt)
    n = max(1, len(scenes))
    return {
        "objects": total,
        "scenes": len(scenes),
        "object_accuracy": float(hit) / max(1, total),
        "background_accuracy": bg_ok / n,
        "texture_accuracy": tex_ok / n,
        "spurious_per_scene": spurious / n,
    }
