"""A deterministic synthetic VOC-format detection data set ("sppdet-shapes").

Five object classes, each defined by its SHAPE and its TEXTURE; colours are
drawn at random for every object, so no class can be told by colour:

==============  ============================================  ==================================
class           shape                                         texture
==============  ============================================  ==================================
``checker``     square                                        checkerboard (3-6 cells), two colours
``cross``       plus sign (random arm width)                  diagonal stripes, two colours
``ring``        annulus (random hole size; background shows   solid, radially shaded
                through the hole)
``star``        five-pointed star (random inner radius)       solid, shaded, contrasting outline
``triangle``    triangle (jittered vertices)                  polka dots, two colours
==============  ============================================  ==================================

Every object is drawn in a canonical frame and mapped into the image with a
random scale (small to large, log-uniform, plus a few tiny ones), aspect ratio
(0.65-1.5), rotation and perspective jitter.  Backgrounds are cluttered:
colour gradients, low-frequency colour noise, stripes, soft blobs and
*distractor* shapes (ellipses, irregular blobs, hexagons, rectangles, thick
curves) that carry the same textures as the classes (stripes, dots,
checkerboards, solid) but belong to no class -- so neither a texture nor a
colour alone identifies a class.  Objects occlude each other; each image holds
0-5 objects (some none).

Ground truth follows the VOC guidelines: the box is the tight box of the
object's *visible* pixels (inside the image, not covered by later objects);
``truncated = 1`` when less than 85% of the object lies inside the image;
``difficult = 1`` when the object is tiny (drawn at 9-16 px, or a visible box
side under 20 px) or heavily
occluded (less than half of its in-image area visible).  Images are 320x240
to 480x360, with Gaussian sensor noise, sometimes a slight blur, and JPEG
compression (quality 70-95).

The same settings (and seed) produce byte-identical files: everything is drawn
from ``numpy.random.Generator`` streams seeded from ``(seed, image index)``.
A ``synthetic.json`` manifest (settings + SHA-1 of every file) lets a repeated
call reuse a complete, unmodified set instead of regenerating it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import ConfigError, DatasetError
from .records import ImageRecord
from .voc import voc_xml_string

logger = logging.getLogger(__name__)

#: The class names, in label order (sorted, so class discovery from the XML gives the same order).
SYNTHETIC_CLASSES: tuple[str, ...] = ("checker", "cross", "ring", "star", "triangle")

#: Bump when the drawing code changes, so an old set on disk is regenerated.
GENERATOR_VERSION = 3

#: Objects whose visible box has a side shorter than this are marked difficult.
DIFFICULT_MIN_SIDE = 20

_MANIFEST = "synthetic.json"
_C = 160          # canonical canvas size (pixels)
_MARGIN = 8       # canonical canvas margin (the shape spans [_MARGIN, _C - 1 - _MARGIN])


@dataclass(frozen=True)
class SyntheticSettings:
    """Everything that determines the generated files."""

    num_images: int = 300
    seed: int = 0
    test_fraction: float = 0.5
    min_width: int = 320
    max_width: int = 480
    min_height: int = 240
    max_height: int = 360
    max_objects: int = 5
    #: probability of 0, 1, ..., max_objects objects in an image
    objects_per_image: tuple[float, ...] = (0.08, 0.22, 0.25, 0.2, 0.15, 0.1)
    min_object_size: int = 32       # normal objects: log-uniform in [min, max_object_frac * short side]
    max_object_frac: float = 0.75
    tiny_probability: float = 0.06  # objects drawn at 9-16 px (always difficult)
    border_probability: float = 0.15  # objects placed across the image border (truncated)
    clutter: float = 1.0            # scales the number of distractor shapes and blobs
    jpeg_quality: tuple[int, int] = (70, 95)
    classes: tuple[str, ...] = field(default=SYNTHETIC_CLASSES)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class SyntheticObject:
    """One generated object.

    Attributes:
        label: index into ``SYNTHETIC_CLASSES``.
        box (tuple of 4 float): ``(x1, y1, x2, y2)`` internal (0-based
            continuous) tight box of the visible pixels.
        difficult, truncated: VOC flags (see the module docstring).
        visible_fraction: visible / in-image pixels of the object.
        inside_fraction: in-image / all pixels of the object.
    """

    label: int
    box: tuple[float, float, float, float]
    difficult: bool
    truncated: bool
    visible_fraction: float
    inside_fraction: float


# ---------------------------------------------------------------------------
# Colours and textures (canonical canvas, float32 RGB in 0..255)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.25, 1.0))


def _colour_pair(rng: np.random.Generator, avoid: np.ndarray | None = None,
                 min_contrast: float = 45.0) -> tuple[np.ndarray, np.ndarray]:
    """Two colours with a visible luminance difference; ``c1`` far from ``avoid``."""
    c1 = _random_colour(rng)
    for _ in range(12):
        if avoid is None or np.abs(c1 - avoid).sum() > 110 or abs(_luma(c1) - _luma(avoid)) > 45:
            break
        c1 = _random_colour(rng)
    c2 = _random_colour(rng)
    for _ in range(12):
        if abs(_luma(c1) - _luma(c2)) >= min_contrast:
            break
        c2 = _random_colour(rng)
    if abs(_luma(c1) - _luma(c2)) < min_contrast:  # force it: darken or lighten c2
        c2 = np.clip(c1 * 0.35, 0, 255) if _luma(c1) > 110 else np.clip(c1 * 0.4 + 150, 0, 255)
    return c1.astype(np.float32), c2.astype(np.float32)


_YY, _XX = np.mgrid[0:_C, 0:_C].astype(np.float32)
_UX = (_XX - (_C - 1) / 2) / ((_C - 1) / 2 - _MARGIN)  # canonical coordinates, +-1 at the margin
_UY = (_YY - (_C - 1) / 2) / ((_C - 1) / 2 - _MARGIN)


def _shading(rng: np.random.Generator, strength: float = 0.22) -> np.ndarray:
    """A linear light gradient (multiplier around 1) over the canonical canvas."""
    a = rng.uniform(0, 2 * math.pi)
    g = (np.cos(a) * _UX + np.sin(a) * _UY) * 0.5
    return (1.0 + rng.uniform(0.3, 1.0) * strength * g)[..., None]


def _fill(c: np.ndarray) -> np.ndarray:
    return np.broadcast_to(c, (_C, _C, 3)).astype(np.float32)


def _blend(c1: np.ndarray, c2: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``c1 * (1 - t) + c2 * t`` for colours c1, c2 (ndarray[3]) and weights t (ndarray[H, W])."""
    return c1 + t[..., None] * (c2 - c1)


def _texture(kind: str, rng: np.random.Generator, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """A [C, C, 3] texture: solid | stripes | dots | checker | noise."""
    if kind == "solid":
        tex = _fill(c1)
    elif kind == "stripes":
        period = rng.uniform(0.22, 0.45)  # in canonical units (the object spans 2)
        a = rng.uniform(0, math.pi)
        s = np.sin(2 * math.pi * (np.cos(a) * _UX + np.sin(a) * _UY) / period)
        tex = _blend(c1, c2, np.clip(0.5 + 2.0 * s, 0, 1))
    elif kind == "dots":
        g = rng.uniform(0.28, 0.45)
        r = g * rng.uniform(0.22, 0.32)
        ox, oy = rng.uniform(0, g, size=2)
        dx = np.mod(_UX + ox, g) - g / 2
        dy = np.mod(_UY + oy, g) - g / 2
        d = np.sqrt(dx * dx + dy * dy)
        tex = _blend(c1, c2, np.clip((r - d) / 0.02 + 0.5, 0, 1))
    elif kind == "checker":
        n = int(rng.integers(3, 7))
        cx = np.floor((_UX + 1) / 2 * n)
        cy = np.floor((_UY + 1) / 2 * n)
        tex = _blend(c1, c2, (np.mod(cx + cy, 2)).astype(np.float32))
    elif kind == "noise":
        small = rng.normal(0, 1, size=(6, 6)).astype(np.float32)
        n = cv2.resize(small, (_C, _C), interpolation=cv2.INTER_CUBIC)
        tex = _blend(c1, c2, np.clip(0.5 + 0.35 * n, 0, 1))
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    return tex * _shading(rng)


# ---------------------------------------------------------------------------
# Shapes (canonical masks, float32 0..1)


def _to_canvas(pts: np.ndarray) -> np.ndarray:
    """Canonical points (+-1 at the margin) -> canvas pixel coordinates (fixed point, shift 4)."""
    half = (_C - 1) / 2
    px = pts * (half - _MARGIN) + half
    return np.round(px * 16).astype(np.int32)


def _poly_mask(*polys: np.ndarray) -> np.ndarray:
    m = np.zeros((_C, _C), np.uint8)
    cv2.fillPoly(m, [_to_canvas(p) for p in polys], 255, lineType=cv2.LINE_AA, shift=4)
    return m.astype(np.float32) / 255.0


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _star_points(rng: np.random.Generator) -> np.ndarray:
    inner = rng.uniform(0.38, 0.52)
    a = -math.pi / 2 + np.arange(10) * math.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _class_object(label: int, rng: np.random.Generator,
                  avoid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(mask [C, C] float32 0..1, texture [C, C, 3] float32) of a class object."""
    name = SYNTHETIC_CLASSES[label]
    c1, c2 = _colour_pair(rng, avoid)
    if name == "star":
        pts = _star_points(rng)
        mask = _poly_mask(pts)
        tex = _texture("solid", rng, c1, c2)
        tex = np.ascontiguousarray(tex)
        thick = int(rng.integers(2, 5))
        cv2.polylines(tex, [_to_canvas(pts)], True, tuple(float(v) for v in c2), thick,
                      lineType=cv2.LINE_AA, shift=4)
    elif name == "ring":
        inner = rng.uniform(0.42, 0.65)
        circ = _regular(64)
        m = np.zeros((_C, _C), np.uint8)
        cv2.fillPoly(m, [_to_canvas(circ)], 255, lineType=cv2.LINE_AA, shift=4)
        cv2.fillPoly(m, [_to_canvas(circ * inner)], 0, lineType=cv2.LINE_AA, shift=4)
        mask = m.astype(np.float32) / 255.0
        rr = np.sqrt(_UX ** 2 + _UY ** 2)
        radial = 1.0 - 0.25 * np.abs(rr - (1 + inner) / 2) / ((1 - inner) / 2 + 1e-6)
        tex = _texture("solid", rng, c1, c2) * radial[..., None]
    elif name == "cross":
        w = rng.uniform(0.28, 0.42)
        pts = np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                        [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=np.float64)
        mask = _poly_mask(pts)
        tex = _texture("stripes", rng, c1, c2)
    elif name == "triangle":
        pts = _regular(3, 1.0, -math.pi / 2) * rng.uniform(0.88, 1.0, size=(3, 1))
        pts = pts + rng.uniform(-0.08, 0.08, size=(3, 2))
        pts[:, 1] += 0.25  # centre the triangle's extent vertically
        mask = _poly_mask(pts)
        tex = _texture("dots", rng, c1, c2)
    elif name == "checker":
        mask = _poly_mask(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64))
        tex = _texture("checker", rng, c1, c2)
    else:  # pragma: no cover - internal
        raise ValueError(name)
    return mask, np.ascontiguousarray(tex, dtype=np.float32)


_DISTRACTOR_SHAPES = ("ellipse", "blob", "hexagon", "rectangle", "curve")


def _distractor(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mask, texture) of a shape that belongs to no class (textures shared with the classes)."""
    shape = _DISTRACTOR_SHAPES[int(rng.integers(len(_DISTRACTOR_SHAPES)))]
    if shape == "ellipse":
        mask = _poly_mask(_regular(48))
    elif shape == "blob":
        n = int(rng.integers(7, 12))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.45, 1.0, n)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
        mask = cv2.GaussianBlur(_poly_mask(pts), (0, 0), 5.0)
        mask = np.clip((mask - 0.5) * 4 + 0.5, 0, 1)
    elif shape == "hexagon":
        mask = _poly_mask(_regular(int(rng.integers(6, 9)), 1.0, rng.uniform(0, 1)))
    elif shape == "rectangle":
        h = rng.uniform(0.25, 0.6)
        mask = _poly_mask(np.array([[-1, -h], [1, -h], [1, h], [-1, h]], dtype=np.float64))
    else:  # a thick curve
        m = np.zeros((_C, _C), np.uint8)
        t = np.linspace(-1, 1, 24)
        bend = rng.uniform(-0.8, 0.8)
        pts = np.stack([t, bend * (t ** 2 - 0.5)], axis=1)
        cv2.polylines(m, [_to_canvas(pts)], False, 255, int(rng.integers(8, 20)),
                      lineType=cv2.LINE_AA, shift=4)
        mask = m.astype(np.float32) / 255.0
    kinds = ["solid", "stripes", "dots", "noise"] + (["checker"] if shape != "rectangle" else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    c1, c2 = _colour_pair(rng)
    return mask, np.ascontiguousarray(_texture(kind, rng, c1, c2), dtype=np.float32)


# ---------------------------------------------------------------------------
# Placement


def _homography(rng: np.random.Generator, cx: float, cy: float, size: float, aspect: float,
                angle: float, persp: float) -> np.ndarray:
    """Canonical canvas -> image homography (3x3): scale, aspect, rotation, perspective jitter."""
    half = (_C - 1) / 2
    src = np.array([[0, 0], [_C - 1, 0], [_C - 1, _C - 1], [0, _C - 1]], dtype=np.float32)
    u = (src - half) / (half - _MARGIN)
    sx, sy = size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)
    ca, sa = math.cos(angle), math.sin(angle)
    x = u[:, 0] * sx
    y = u[:, 1] * sy
    dst = np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)
    dst = dst + rng.uniform(-persp, persp, size=(4, 2)) * size
    return cv2.getPerspectiveTransform(src, dst.astype(np.float32))


@dataclass
class _Warped:
    x0: int
    y0: int
    alpha: np.ndarray    # [h, w] float32: the whole object (may extend beyond the image)
    tex: np.ndarray      # [h, w, 3] float32


def _warp(mask: np.ndarray, tex: np.ndarray, H: np.ndarray) -> _Warped | None:
    """Warp a canonical (mask, texture) by homography H into its own bounding window."""
    corners = cv2.perspectiveTransform(
        np.array([[[0, 0], [_C - 1, 0], [_C - 1, _C - 1], [0, _C - 1]]], np.float32), H)[0]
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 2
    w, h = int(x1 - x0), int(y1 - y0)
    if w <= 1 or h <= 1 or w > 4000 or h > 4000:
        return None
    T = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], dtype=np.float64) @ H
    alpha = cv2.warpPerspective(mask, T, (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    t = cv2.warpPerspective(tex, T, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return _Warped(int(x0), int(y0), alpha, t)


def _clip_window(wp: _Warped, W: int, H: int):
    """(image slice, local slice) of the part of ``wp`` inside a WxH image, or None."""
    h, w = wp.alpha.shape
    ix0, iy0 = max(wp.x0, 0), max(wp.y0, 0)
    ix1, iy1 = min(wp.x0 + w, W), min(wp.y0 + h, H)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    img_sl = (slice(iy0, iy1), slice(ix0, ix1))
    loc_sl = (slice(iy0 - wp.y0, iy1 - wp.y0), slice(ix0 - wp.x0, ix1 - wp.x0))
    return img_sl, loc_sl


def _composite(img: np.ndarray, wp: _Warped) -> None:
    win = _clip_window(wp, img.shape[1], img.shape[0])
    if win is None:
        return
    img_sl, loc_sl = win
    a = wp.alpha[loc_sl][..., None]
    img[img_sl] = img[img_sl] * (1 - a) + wp.tex[loc_sl] * a


# ---------------------------------------------------------------------------
# Backgrounds


def _background(rng: np.random.Generator, W: int, H: int, clutter: float) -> np.ndarray:
    """A cluttered [H, W, 3] float32 background: gradient, colour noise, soft blobs, stripes.

    The smooth parts are drawn at quarter resolution and upsampled (they have
    no fine detail); stripes are drawn at full resolution.
    """
    w4, h4 = (W + 3) // 4, (H + 3) // 4
    yy, xx = np.mgrid[0:h4, 0:w4].astype(np.float32)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    a = rng.uniform(0, 2 * math.pi)
    t = (np.cos(a) * xx + np.sin(a) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    small = _blend(c1, c2, t.astype(np.float32))
    # low-frequency colour noise
    gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    grid = rng.standard_normal(size=(gh, gw, 3), dtype=np.float32)
    small += cv2.resize(grid, (w4, h4), interpolation=cv2.INTER_CUBIC) * rng.uniform(15, 45)
    # soft blobs
    for _ in range(int(round(rng.integers(1, 6) * clutter))):
        m = np.zeros((h4, w4), np.float32)
        cv2.ellipse(m, (int(rng.integers(0, w4)), int(rng.integers(0, h4))),
                    (int(rng.integers(3, max(w4 // 3, 4))), int(rng.integers(3, max(h4 // 3, 4)))),
                    float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        m = cv2.GaussianBlur(m, (0, 0), rng.uniform(1, 4)) * rng.uniform(0.3, 0.8)
        small = small * (1 - m[..., None]) + _random_colour(rng) * m[..., None]
    img = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
    # stripes over the whole image or a band
    if rng.random() < 0.5:
        Y, X = np.mgrid[0:H, 0:W].astype(np.float32)
        period = rng.uniform(5, 30)
        b = rng.uniform(0, math.pi)
        s = np.sin((2 * math.pi / period) * (np.float32(np.cos(b)) * X + np.float32(np.sin(b)) * Y))
        amp = rng.uniform(8, 30)
        if rng.random() < 0.5:
            band = np.abs((np.float32(np.cos(b + 1.3)) * X + np.float32(np.sin(b + 1.3)) * Y)
                          - rng.uniform(0, max(W, H)))
            s = s * (band < rng.uniform(30, 120))
        img += (s * np.float32(amp))[..., None] * rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    return img


# ---------------------------------------------------------------------------
# One image


def render_image(settings: SyntheticSettings, index: int,
                 labels: list[int]) -> tuple[np.ndarray, list[SyntheticObject]]:
    """Draw image ``index`` with objects of the given ``labels`` (in drawing order).

    Returns:
        ``(image ndarray[H, W, 3] uint8 RGB, objects)``; an object that could
        not be placed visibly (after retries) is left out, so ``len(objects)``
        may be smaller than ``len(labels)``.
    """
    rng = np.random.default_rng([settings.seed, index, 1])
    W = int(rng.integers(settings.min_width // 8, settings.max_width // 8 + 1)) * 8
    H = int(rng.integers(settings.min_height // 8, settings.max_height // 8 + 1)) * 8
    img = _background(rng, W, H, settings.clutter)
    short = min(W, H)

    # distractors (behind the objects)
    n_dis = int(round(rng.integers(2, 9) * settings.clutter))
    for _ in range(n_dis):
        mask, tex = _distractor(rng)
        size = math.exp(rng.uniform(math.log(14), math.log(0.55 * short)))
        Hm = _homography(rng, rng.uniform(0, W), rng.uniform(0, H), size,
                         math.exp(rng.uniform(-0.5, 0.5)), rng.uniform(-math.pi, math.pi), 0.06)
        wp = _warp(mask, tex, Hm)
        if wp is not None:
            wp.alpha *= rng.uniform(0.7, 1.0)
            _composite(img, wp)

    owner = np.full((H, W), -1, dtype=np.int32)
    placed: list[tuple[int, _Warped, int, bool]] = []   # (label, warped, total pixels, tiny)
    for label in labels:
        for _attempt in range(15):
            tiny = bool(rng.random() < settings.tiny_probability)
            if tiny:
                size = rng.uniform(9, 16)
            else:
                size = math.exp(rng.uniform(math.log(settings.min_object_size),
                                            math.log(settings.max_object_frac * short)))
            if rng.random() < settings.border_probability:
                side = int(rng.integers(4))
                off = rng.uniform(-0.3, 0.15) * size
                cx = [off, W - off, rng.uniform(0, W), rng.uniform(0, W)][side]
                cy = [rng.uniform(0, H), rng.uniform(0, H), off, H - off][side]
            else:
                m = 0.35 * size
                cx, cy = rng.uniform(m, W - m), rng.uniform(m, H - m)
            Hm = _homography(rng, cx, cy, size, math.exp(rng.uniform(-0.43, 0.4)),
                             rng.uniform(-math.pi, math.pi), rng.uniform(0.0, 0.08))
            # background colour under the object, to keep the object visible against it
            bx0, by0 = int(np.clip(cx - size / 2, 0, W - 1)), int(np.clip(cy - size / 2, 0, H - 1))
            bx1, by1 = int(np.clip(cx + size / 2, bx0 + 1, W)), int(np.clip(cy + size / 2, by0 + 1, H))
            avoid = img[by0:by1, bx0:bx1].reshape(-1, 3).mean(axis=0)
            mask, tex = _class_object(label, rng, avoid)
            wp = _warp(mask, tex, Hm)
            if wp is None:
                continue
            full = wp.alpha > 0.5
            total = int(full.sum())
            win = _clip_window(wp, W, H)
            if total == 0 or win is None:
                continue
            img_sl, loc_sl = win
            if full[loc_sl].sum() < 0.45 * total:
                continue  # mostly outside the image
            trial = owner.copy()
            trial[img_sl][full[loc_sl]] = len(placed)
            ok = True
            for k, (_, wk, _tk, _ti) in enumerate(placed):
                wk_win = _clip_window(wk, W, H)
                inside = int((wk.alpha[wk_win[1]] > 0.5).sum())
                if int((trial == k).sum()) < 0.3 * inside:
                    ok = False  # would hide an earlier object almost completely
                    break
            if not ok:
                continue
            owner = trial
            _composite(img, wp)
            placed.append((label, wp, total, tiny))
            break

    objects: list[SyntheticObject] = []
    for k, (label, wp, total, tiny) in enumerate(placed):
        vis = owner == k
        ys, xs = np.nonzero(vis)
        if len(xs) == 0:
            continue
        win = _clip_window(wp, W, H)
        inside = int((wp.alpha[win[1]] > 0.5).sum())
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        vis_frac = len(xs) / max(inside, 1)
        in_frac = inside / max(total, 1)
        small = tiny or min(box[2] - box[0], box[3] - box[1]) < DIFFICULT_MIN_SIDE
        objects.append(SyntheticObject(label=label, box=box, difficult=bool(small or vis_frac < 0.5),
                                       truncated=bool(in_frac < 0.85), visible_fraction=vis_frac,
                                       inside_fraction=in_frac))

    # global light gradient, sensor noise, occasional blur
    a = rng.uniform(0, 2 * math.pi)
    gx = (np.cos(a) * np.arange(W, dtype=np.float32) / W)[None, :]
    gy = (np.sin(a) * np.arange(H, dtype=np.float32) / H)[:, None]
    light = 1.0 + np.float32(rng.uniform(0, 0.25)) * (gx + gy - np.float32(0.5))
    img *= light[..., None]
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.0))
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


# ---------------------------------------------------------------------------
# The data set


def _plan(settings: SyntheticSettings) -> tuple[list[list[int]], list[bool], list[int]]:
    """Per image: the object labels, whether it is a test image, the JPEG quality."""
    rng = np.random.default_rng([settings.seed, 0xC1A55])
    p = np.asarray(settings.objects_per_image[: settings.max_objects + 1], dtype=np.float64)
    p = p / p.sum()
    counts = rng.choice(len(p), size=settings.num_images, p=p)
    # labels drawn from shuffled blocks of all classes, so every class is frequent everywhere
    k = len(settings.classes)
    pool: list[int] = []
    labels: list[list[int]] = []
    for c in counts:
        cur = []
        for _ in range(int(c)):
            if not pool:
                pool = list(rng.permutation(k))
            cur.append(int(pool.pop()))
        labels.append(cur)
    n_test = int(round(settings.num_images * settings.test_fraction))
    test_idx = set(rng.permutation(settings.num_images)[:n_test].tolist())
    is_test = [i in test_idx for i in range(settings.num_images)]
    q0, q1 = settings.jpeg_quality
    quality = [int(q) for q in rng.integers(q0, q1 + 1, size=settings.num_images)]
    return labels, is_test, quality


def _validate(s: SyntheticSettings) -> None:
    if s.num_images < 2:
        raise ConfigError(f"--images: need at least 2 images (one per split), got {s.num_images}")
    if not 0.0 < s.test_fraction < 1.0:
        raise ConfigError(f"--test-fraction: must be between 0 and 1 (exclusive), got {s.test_fraction}")
    n_test = int(round(s.num_images * s.test_fraction))
    if n_test < 1 or n_test > s.num_images - 1:
        raise ConfigError(f"--test-fraction: {s.test_fraction} of {s.num_images} images leaves a split "
                          f"empty; use more images or another fraction")
    if s.seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {s.seed}")
    if not 0 <= s.clutter <= 4:
        raise ConfigError(f"clutter: must be in [0, 4], got {s.clutter}")
    if s.max_objects < 0 or len(s.objects_per_image) < s.max_objects + 1:
        raise ConfigError("max_objects: objects_per_image needs a probability for 0..max_objects")
    if not (1 <= s.jpeg_quality[0] <= s.jpeg_quality[1] <= 100):
        raise ConfigError(f"jpeg_quality: expected 1 <= lo <= hi <= 100, got {s.jpeg_quality}")


def _readme(s: SyntheticSettings, n_trainval: int, n_test: int, counts: dict[str, int],
            n_empty: int, n_difficult: int, n_truncated: int) -> str:
    lines = [
        "sppdet-shapes: a synthetic VOC-format object detection data set",
        "",
        "Made by `sppdet make-synthetic` (sppdet.data.synthetic, generator version "
        f"{GENERATOR_VERSION}); the same settings give byte-identical files.",
        "",
        "Layout: Annotations/<id>.xml (VOC XML, 1-based inclusive pixel coordinates),",
        "JPEGImages/<id>.jpg, ImageSets/Main/{trainval,test}.txt.",
        "",
        f"Images: {s.num_images} (trainval {n_trainval}, test {n_test}); {n_empty} without objects.",
        f"Objects: {sum(counts.values())} ({n_difficult} difficult, {n_truncated} truncated).",
        "",
        "Classes (label order), each defined by shape and texture; colours are random:",
        "  checker   square, two-colour checkerboard",
        "  cross     plus sign, diagonal two-colour stripes",
        "  ring      annulus (the background shows through the hole), solid shaded fill",
        "  star      five-pointed star, solid shaded fill with a contrasting outline",
        "  triangle  triangle, two-colour polka dots",
        "Objects per class: " + ", ".join(f"{c} {counts[c]}" for c in s.classes),
        "",
        "Distractors (ellipses, irregular blobs, hexagons, rectangles, thick curves) carry the",
        "same textures but belong to no class. difficult = tiny (drawn at 9-16 px or a visible",
        f"box side under {DIFFICULT_MIN_SIDE} px) or less than half visible; truncated = less than",
        "85% inside the image.",
        "",
        "Settings:",
    ]
    for k, v in s.to_dict().items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines) + "\n"


def _manifest_matches(out: Path, settings: SyntheticSettings) -> bool:
    """True when ``out`` holds a complete, unmodified set made with ``settings``."""
    from ..utils.io import file_sha1

    try:
        man = json.loads((out / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(man, dict) or man.get("version") != GENERATOR_VERSION \
            or man.get("settings") != settings.to_dict() or not isinstance(man.get("files"), dict):
        return False
    try:
        return all(file_sha1(out / rel) == sha for rel, sha in man["files"].items())
    except OSError:
        return False


def make_synthetic(out_dir: str | Path, num_images: int = 300, seed: int = 0, *,
                   test_fraction: float = 0.5, clutter: float = 1.0,
                   settings: SyntheticSettings | None = None, force: bool = False) -> Path:
    """Generate the synthetic VOC-format data set into ``out_dir``.

    Args:
        out_dir: the VOC root to create (``Annotations/``, ``JPEGImages/``,
            ``ImageSets/Main/{trainval,test}.txt``, ``README.txt``,
            ``synthetic.json``).  An existing folder is only replaced when it is
            empty or an earlier synthetic set.
        num_images, seed, test_fraction, clutter: see :class:`SyntheticSettings`
            (ignored when ``settings`` is given).
        settings: all settings at once.
        force: regenerate even when ``out_dir`` already holds the same set.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: a bad setting (names the option).
        DatasetError: ``out_dir`` exists and is not a synthetic set made by sppdet.
    """
    from ..utils.io import file_sha1
    from ..utils.progress import progress

    s = settings or SyntheticSettings(num_images=int(num_images), seed=int(seed),
                                      test_fraction=float(test_fraction), clutter=float(clutter))
    _validate(s)
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise DatasetError(f"{out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not (out / _MANIFEST).is_file():
            raise DatasetError(f"{out}: folder exists, is not empty and is not a synthetic data set "
                               f"made by sppdet; choose another --out")
        if not force and _manifest_matches(out, s):
            logger.info("%s: synthetic data set already there (same settings, files intact)", out)
            return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        labels, is_test, quality = _plan(s)
        trainval_ids, test_ids = [], []
        counts = {c: 0 for c in s.classes}
        n_empty = n_diff = n_trunc = 0
        for i in progress(range(s.num_images), desc="synthetic images", unit="img"):
            image_id = f"{i + 1:06d}"
            arr, objs = render_image(s, i, labels[i])
            jpg = tmp / "JPEGImages" / f"{image_id}.jpg"
            Image.fromarray(arr).save(jpg, format="JPEG", quality=quality[i], optimize=False)
            rec = ImageRecord(
                image_id=image_id, path=jpg, width=arr.shape[1], height=arr.shape[0],
                boxes=np.array([o.box for o in objs], dtype=np.float32).reshape(-1, 4),
                labels=np.array([o.label for o in objs], dtype=np.int64),
                difficult=np.array([o.difficult for o in objs], dtype=bool),
                truncated=np.array([o.truncated for o in objs], dtype=bool),
            )
            (tmp / "Annotations" / f"{image_id}.xml").write_text(
                voc_xml_string(rec, s.classes, folder="sppdet-shapes", database="sppdet-shapes"),
                encoding="utf-8")
            (test_ids if is_test[i] else trainval_ids).append(image_id)
            n_empty += not objs
            for o in objs:
                counts[s.classes[o.label]] += 1
                n_diff += o.difficult
                n_trunc += o.truncated
        (tmp / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in trainval_ids))
        (tmp / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in test_ids))
        (tmp / "README.txt").write_text(_readme(s, len(trainval_ids), len(test_ids), counts,
                                                n_empty, n_diff, n_trunc), encoding="utf-8")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"version": GENERATOR_VERSION, "settings": s.to_dict(), "classes": list(s.classes),
                    "files": {p.relative_to(tmp).as_posix(): file_sha1(p) for p in files}}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                     encoding="utf-8")
        # swap the finished set into place
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s: %d synthetic images (%d trainval, %d test), %d objects", out, s.num_images,
                len(trainval_ids), len(test_ids), sum(counts.values()))
    return out
