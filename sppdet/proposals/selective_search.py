"""Selective search (Uijlings et al., IJCV 2013) through OpenCV contrib, with a deterministic order.

The hierarchical grouping itself is OpenCV's
(``cv2.ximgproc.segmentation.SelectiveSearchSegmentation``); what this module
adds around it:

* **Runs.** A :class:`~sppdet.proposals.presets.Preset` lists segmentation
  sizes (``max_sides``), colour spaces, graph-segmentation thresholds ``k`` and
  similarity strategies.  Every combination is one *run*: the image is resized
  (INTER_AREA) so its longer side is at most ``max_side``, converted to the
  colour space, over-segmented by Felzenszwalb-Huttenlocher (``k``, ``sigma``,
  ``min_segment``) and grouped hierarchically with one strategy (or with each
  of several joined by ``+``, sharing the segmentation).  A run gives the set
  of bounding boxes of all regions of its hierarchy (hierarchies).  ``extra_runs``
  add single runs outside that product (e.g. a colour strategy for two colour
  spaces only).
* **Coordinates.** An OpenCV rect ``(x, y, w, h)`` of the segmentation image
  covers pixel columns ``x .. x+w-1``, i.e. the continuous interval
  ``[x, x+w)``; it is mapped to the original image as
  ``(x*sx, y*sy, (x+w)*sx, (y+h)*sy)`` with ``sx = W / w_seg``,
  ``sy = H / h_seg``, clipped to ``[0, W] x [0, H]`` (so at the original size,
  ``x2 = x + w``).  Boxes are float32 ``(x1, y1, x2, y2)``, 0-based continuous
  pixels of the original image.
* **Filtering.** Boxes narrower or lower than ``min_box_size`` original pixels
  are dropped; exact duplicates (after the mapping, in float32) are merged.
* **Order.** OpenCV ranks regions by ``level * rand()`` (pseudo-random, and
  smallest regions first); here the order is deterministic and puts the most
  useful boxes first:

  1. *score* ``= votes * area ** area_exponent`` (larger first), where *votes*
     is the number of runs whose hierarchy contains exactly this box (boxes
     that many colour spaces / thresholds / strategies agree on are stable
     segments) and *area* is in original pixels; ties: larger area first, then
     ``x1, y1, x2, y2`` ascending;
  2. *near-duplicate demotion*: walking that order, a box whose IoU with an
     earlier kept box exceeds ``demote_iou`` is moved (in order) behind all kept
     boxes, so the first K boxes are diverse while nothing is thrown away;
  3. the list is cut at ``max_boxes``;
  4. with the preset's ``split_below`` (``fast-split``: 48 px), each kept box smaller
     than that (square root of its area) adds its left and right halves after
     the ranked boxes, in their parents' order, as long as there is room under
     ``max_boxes`` (:func:`add_halves`).

  The same image and preset always give the identical array.
* **Never empty.** When nothing survives the filters (e.g. an image smaller
  than ``min_box_size``), :func:`fallback_windows` (the whole image and grid
  windows) are returned instead, so later stages never see an image without
  windows.
"""

from __future__ import annotations

import logging
from typing import Iterable

import cv2
import numpy as np

from .presets import Preset, get_preset

logger = logging.getLogger(__name__)

_SEG = cv2.ximgproc.segmentation
_STRATEGY_FACTORIES = {
    "c": _SEG.createSelectiveSearchSegmentationStrategyColor,
    "f": _SEG.createSelectiveSearchSegmentationStrategyFill,
    "s": _SEG.createSelectiveSearchSegmentationStrategySize,
    "t": _SEG.createSelectiveSearchSegmentationStrategyTexture,
}


# ---------------------------------------------------------------------------
# Pieces


def convert_colour(rgb: np.ndarray, space: str) -> np.ndarray:
    """Convert an RGB image to a colour space for segmentation.

    Args:
        rgb (ndarray[H, W, 3] uint8): RGB image.
        space: one of :data:`~sppdet.proposals.presets.COLOUR_SPACES`:
            ``rgb``, ``hsv``, ``lab``, ``ycrcb``, ``luv``, ``hls`` (3 channels,
            OpenCV's 8-bit conversions), ``gray`` (intensity I), ``h`` (the hue
            channel of HSV), ``rgi`` (the R and G channels plus intensity I, the
            "rgI" of Uijlings et al. and of OpenCV's quality mode).

    Returns:
        ndarray[H, W, C] or ndarray[H, W] uint8, C-contiguous.
    """
    if space == "rgb":
        out = rgb
    elif space == "hsv":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    elif space == "lab":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    elif space == "ycrcb":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    elif space == "luv":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2Luv)
    elif space == "hls":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2HLS)
    elif space == "gray":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif space == "h":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 0]
    elif space == "rgi":
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        out = np.dstack([rgb[:, :, 0], rgb[:, :, 1], gray])
    else:
        raise ValueError(f"unknown colour space {space!r}")
    return np.ascontiguousarray(out)


def resize_for_segmentation(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float, float]:
    """Shrink an image so its longer side is at most ``max_side`` (never enlarges).

    Args:
        rgb (ndarray[H, W, 3] uint8): the original image.
        max_side: the longest side allowed; ``0`` keeps the original size.

    Returns:
        ``(image, sx, sy)``: the segmentation image (ndarray[h, w, 3] uint8) and
        the factors mapping its x and y pixel coordinates back to the original
        (``sx = W / w``, ``sy = H / h``).
    """
    h, w = rgb.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return rgb, 1.0, 1.0
    scale = max_side / max(h, w)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    return small, w / nw, h / nh


def grouping_run(image: np.ndarray, k: float, sigma: float, min_segment: int,
                 strategy: str) -> np.ndarray:
    """One OpenCV selective-search run: graph segmentation + hierarchical grouping.

    Args:
        image (ndarray[h, w, C] or ndarray[h, w] uint8): the segmentation image
            (already in its colour space).
        k, sigma, min_segment: Felzenszwalb-Huttenlocher parameters.
        strategy: letters from ``"cfst"`` (colour, fill, size, texture), equal weights;
            several such strings joined by ``+`` group the same segmentation once each.

    Returns:
        ndarray[N, 4] int32: OpenCV rects ``(x, y, w, h)`` of all regions of the
        hierarchy (of all hierarchies, for ``+``), each once, in OpenCV's
        (pseudo-random) order.
    """
    ss = _SEG.createSelectiveSearchSegmentation()
    ss.addImage(image)
    ss.addGraphSegmentation(_SEG.createGraphSegmentation(float(sigma), float(k), int(min_segment)))
    for part in strategy.split("+"):
        ss.addStrategy(_SEG.createSelectiveSearchSegmentationStrategyMultiple(
            *[_STRATEGY_FACTORIES[ch]() for ch in part]))
    rects = ss.process()
    return np.asarray(rects, dtype=np.int32).reshape(-1, 4)


def rects_to_boxes(rects: np.ndarray, sx: float, sy: float, width: int, height: int) -> np.ndarray:
    """OpenCV rects of a segmentation image -> boxes in original-image pixels.

    Args:
        rects (ndarray[N, 4] int): ``(x, y, w, h)`` in the segmentation image.
        sx, sy: original pixels per segmentation pixel along x and y.
        width, height: the original image size (boxes are clipped to it).

    Returns:
        ndarray[N, 4] float32: ``(x1, y1, x2, y2)`` = ``(x*sx, y*sy, (x+w)*sx, (y+h)*sy)``,
        0-based continuous, clipped to ``[0, width] x [0, height]``.
    """
    r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    boxes = np.stack([r[:, 0] * sx, r[:, 1] * sy, (r[:, 0] + r[:, 2]) * sx, (r[:, 1] + r[:, 3]) * sy], axis=1)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, height)
    return boxes.astype(np.float32)


def fallback_windows(width: int, height: int) -> np.ndarray:
    """Windows for an image where selective search left nothing: whole image and grids.

    Args:
        width, height: image size in pixels (>= 1).

    Returns:
        ndarray[N, 4] float32, N >= 1: the whole image first, then the cells of
        a 2x2 and a 3x3 grid and the centred half-size window, row by row;
        exact duplicates removed (a 1x1 image gives one box).
    """
    w, h = float(max(width, 1)), float(max(height, 1))
    boxes = [(0.0, 0.0, w, h)]
    for n in (2, 3):
        xs = np.linspace(0.0, w, n + 1)
        ys = np.linspace(0.0, h, n + 1)
        for j in range(n):
            for i in range(n):
                boxes.append((xs[i], ys[j], xs[i + 1], ys[j + 1]))
    boxes.append((w / 4, h / 4, 3 * w / 4, 3 * h / 4))
    out = np.asarray(boxes, dtype=np.float32)
    return unique_rows_first(out)


def unique_rows_first(boxes: np.ndarray) -> np.ndarray:
    """Exact-duplicate removal keeping the first occurrence and the order (ndarray[N, 4] -> [M, 4])."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def rank_boxes(boxes: np.ndarray, votes: np.ndarray, area_exponent: float,
               demote_iou: float) -> np.ndarray:
    """The deterministic proposal order (see the module docstring).

    Args:
        boxes (ndarray[N, 4] float32): unique boxes ``(x1, y1, x2, y2)``, positive size.
        votes (ndarray[N] int): number of runs that produced each box (>= 1).
        area_exponent: score = ``votes * area ** area_exponent``.
        demote_iou: near-duplicate demotion threshold (``>= 1``: none).

    Returns:
        ndarray[N] int64: indices of ``boxes`` in rank order.
    """
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.int64)
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    score = np.log(np.asarray(votes, dtype=np.float64)) + area_exponent * np.log(area)
    # np.lexsort: the last key is the primary one.
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], -area, -score))
    if demote_iou < 1.0 and len(order) > 1:
        import torch
        import torchvision

        ranked = torch.from_numpy(b[order])
        rank_score = torch.arange(len(order), 0, -1, dtype=torch.float64)
        keep = torchvision.ops.nms(ranked, rank_score, float(demote_iou)).numpy()
        kept = np.zeros(len(order), dtype=bool)
        kept[keep] = True
        order = np.concatenate([order[kept], order[~kept]])
    return order.astype(np.int64)


# ---------------------------------------------------------------------------
# The public entry points


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape[:2]:
        raise ValueError(f"selective_search: expected an RGB image ndarray[H, W, 3] uint8, "
                         f"got {image.dtype} array of shape {image.shape}")
    return np.ascontiguousarray(image)


def raw_runs(image: np.ndarray, preset: Preset) -> Iterable[np.ndarray]:
    """Yield the boxes of every run of ``preset`` (ndarray[N_r, 4] float32, original pixels, unordered)."""
    height, width = image.shape[:2]
    resized: dict[int, tuple[np.ndarray, float, float]] = {}
    converted: dict[tuple[int, str], np.ndarray] = {}
    for max_side, space, k, strategy in preset.runs():
        if max_side not in resized:
            resized[max_side] = resize_for_segmentation(image, max_side)
        small, sx, sy = resized[max_side]
        if (max_side, space) not in converted:
            converted[(max_side, space)] = convert_colour(small, space)
        rects = grouping_run(converted[(max_side, space)], k, preset.sigma, preset.min_segment, strategy)
        yield rects_to_boxes(rects, sx, sy, width, height)


def selective_search(image: np.ndarray, preset: str | Preset = "fast", max_boxes: int = 2000) -> np.ndarray:
    """Selective-search proposals of one image, in a deterministic, best-first order.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image.
        preset: a preset name (:data:`~sppdet.proposals.presets.PRESETS`) or a
            :class:`~sppdet.proposals.presets.Preset`.
        max_boxes: keep at most this many boxes (the first in rank order);
            ``<= 0``: no limit.

    Returns:
        ndarray[N, 4] float32, ``1 <= N <= max_boxes``: ``(x1, y1, x2, y2)``,
        0-based continuous pixels of ``image`` with ``0 <= x1 < x2 <= W`` and
        ``0 <= y1 < y2 <= H``, unique rows, ranked as the module docstring
        describes (never empty: see :func:`fallback_windows`).
    """
    image = _check_image(image)
    p = get_preset(preset)
    height, width = image.shape[:2]
    return combine_runs(list(raw_runs(image, p)), p, width, height, max_boxes)


def combine_runs(runs: list[np.ndarray], preset: str | Preset, width: int, height: int,
                 max_boxes: int = 2000) -> np.ndarray:
    """Filter, merge and rank the boxes of a preset's runs (the second half of :func:`selective_search`).

    Args:
        runs: one ndarray[N_r, 4] float32 per run of ``preset`` (original pixels,
            as :func:`raw_runs` yields them, each box at most once per run).
        preset: the preset (its filters and order settings are used).
        width, height: the original image size.
        max_boxes: cap (``<= 0``: none).

    Returns:
        ndarray[N, 4] float32, as :func:`selective_search`.
    """
    p = get_preset(preset)
    boxes = np.concatenate(runs) if runs else np.zeros((0, 4), np.float32)
    wh = boxes[:, 2:] - boxes[:, :2]
    ok = (wh[:, 0] > 0) & (wh[:, 1] > 0) & (wh[:, 0] >= p.min_box_size) & (wh[:, 1] >= p.min_box_size)
    boxes = boxes[ok]
    if len(boxes) == 0:
        logger.debug("selective search left no boxes on a %dx%d image; using fallback windows", width, height)
        out = fallback_windows(width, height)
    else:
        # Each run lists a box at most once, so the count of a box is its number of runs.
        uniq, votes = np.unique(boxes, axis=0, return_counts=True)
        order = rank_boxes(uniq, votes, p.area_exponent, p.demote_iou)
        out = uniq[order]
        if p.split_below > 0:  # halves of the kept boxes only, in the room the cap leaves
            out = add_halves(out[:max_boxes] if max_boxes and max_boxes > 0 else out, p.split_below,
                             p.min_box_size)
    if max_boxes and max_boxes > 0:
        out = out[:max_boxes]
    return np.ascontiguousarray(out, dtype=np.float32)


def add_halves(boxes: np.ndarray, split_below: float, min_box_size: float = 0.0) -> np.ndarray:
    """``boxes`` followed by the left and right halves of its small boxes (preset ``split_below``).

    Args:
        boxes (ndarray[N, 4] float32): ranked, unique boxes.
        split_below: a box whose ``sqrt(width * height)`` is below this is split.
        min_box_size: halves narrower or lower than this are left out.

    Returns:
        ndarray[N + M, 4] float32: ``boxes`` unchanged, then each small box's left
        half and right half in the small boxes' order, leaving out every half equal
        to an earlier box.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    wh = b[:, 2:] - b[:, :2]
    small = b[np.sqrt(wh[:, 0] * wh[:, 1]) < split_below]
    if len(small) == 0:
        return b
    xm = (small[:, 0] + small[:, 2]) / np.float32(2)
    left = np.stack([small[:, 0], small[:, 1], xm, small[:, 3]], 1)
    right = np.stack([xm, small[:, 1], small[:, 2], small[:, 3]], 1)
    halves = np.stack([left, right], 1).reshape(-1, 4).astype(np.float32)  # parent order, left first
    hw = halves[:, 2:] - halves[:, :2]
    halves = halves[(hw[:, 0] > 0) & (hw[:, 0] >= min_box_size) & (hw[:, 1] >= min_box_size)]
    if len(halves) == 0:
        return b
    both = np.concatenate([b, halves])
    _, first = np.unique(both, axis=0, return_index=True)
    new = np.sort(first[first >= len(b)])  # first occurrences that are not already among ``boxes``
    return np.concatenate([b, both[new]])


def opencv_selective_search(image: np.ndarray, mode: str = "fast") -> np.ndarray:
    """OpenCV's stock selective search, untouched (for benchmarks and comparison).

    Args:
        image (ndarray[H, W, 3] uint8): RGB image.
        mode: ``"fast"`` (``switchToSelectiveSearchFast``) or ``"quality"``.

    Returns:
        ndarray[N, 4] float32 ``(x1, y1, x2, y2)`` with ``x2 = x + w``, in OpenCV's
        own pseudo-random order (it depends on the C library's ``rand()`` state,
        so it is NOT reproducible), no filtering, no cap.
    """
    image = _check_image(image)
    ss = _SEG.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV expects BGR
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality()
    else:
        raise ValueError(f"opencv_selective_search: mode must be 'fast' or 'quality', got {mode!r}")
    rects = np.asarray(ss.process(), dtype=np.int32).reshape(-1, 4)
    h, w = image.shape[:2]
    return rects_to_boxes(rects, 1.0, 1.0, w, h)
