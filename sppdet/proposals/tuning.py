"""A per-run cache for tuning selective-search presets (``sppdet bench proposals --run-cache DIR``).

Tuning compares many presets that share most of their runs (a run is one
``(max_side, colour_space, k, strategy)`` grouping with the preset's
``sigma`` and ``min_segment``).  :class:`RunCache` computes every distinct run
of an image once, stores its raw boxes (original pixels, unordered, before any
filter) with the CPU seconds it took, and gives them back for any preset that
contains it; :func:`selective_search_cached` then filters, merges and ranks
them exactly as :func:`~sppdet.proposals.selective_search.selective_search`
does, so the boxes are identical to an uncached call (tested).

The time of a preset is then *estimated* as the sum of its runs' measured CPU
seconds, each run timed with its own resize and colour conversion (a
real call shares those between runs, so the estimate is slightly high), plus
the measured time of the filter/merge/rank step.  Timing figures to publish
come from the benchmark without the cache (presets interleaved in one run).

Layout: ``DIR/<image key>/<run key>.npz`` with ``boxes`` (float32 [N, 4]) and
``seconds``; written atomically (temporary file + rename), so two processes
filling the same cache for different images (``--shard``) never clash, and an
unreadable file is recomputed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..utils.io import stable_hash
from .presets import ALGORITHM_VERSION, Preset, get_preset
from .selective_search import (combine_runs, convert_colour, grouping_run, opencv_selective_search,
                               rects_to_boxes, resize_for_segmentation)

logger = logging.getLogger(__name__)

#: The run "key" of OpenCV's untouched stock fast mode in the cache.
STOCK_FAST_RUN = "opencv-stock-fast"


def run_key(run: tuple[int, str, float, str] | str, sigma: float, min_segment: int) -> str:
    """Stable key of one run (with the settings that change its boxes and the OpenCV version)."""
    if isinstance(run, str):
        spec = {"run": run}
    else:
        max_side, space, k, strategy = run
        spec = {"max_side": int(max_side), "space": space, "k": float(k), "strategy": strategy,
                "sigma": float(sigma), "min_segment": int(min_segment)}
    spec.update(opencv=cv2.__version__, algorithm_version=ALGORITHM_VERSION)
    return stable_hash(spec)


def compute_run(image: np.ndarray, run: tuple[int, str, float, str], sigma: float,
                min_segment: int) -> np.ndarray:
    """The raw boxes of one run on an RGB image (ndarray[N, 4] float32, original pixels, unordered)."""
    max_side, space, k, strategy = run
    height, width = image.shape[:2]
    small, sx, sy = resize_for_segmentation(image, max_side)
    rects = grouping_run(convert_colour(small, space), k, sigma, min_segment, strategy)
    return rects_to_boxes(rects, sx, sy, width, height)


class RunCache:
    """Raw boxes and CPU seconds of single runs, per image, on disk under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.computed = 0
        self.reused = 0

    def _path(self, image_key: str, key: str) -> Path:
        return self.root / image_key / f"{key}.npz"

    def _load(self, path: Path) -> tuple[np.ndarray, float] | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                boxes = np.asarray(z["boxes"], dtype=np.float32).reshape(-1, 4)
                return boxes, float(z["seconds"])
        except FileNotFoundError:
            return None
        except Exception as e:  # corrupt or truncated: recompute
            logger.warning("run cache %s unreadable (%s); recomputing", path, e)
            return None

    def _save(self, path: Path, boxes: np.ndarray, seconds: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, boxes=np.asarray(boxes, np.float32), seconds=np.float64(seconds))
        os.replace(tmp, path)

    def get(self, image_key: str, image: Callable[[], np.ndarray], run: tuple[int, str, float, str] | str,
            sigma: float = 0.8, min_segment: int = 100) -> tuple[np.ndarray, float]:
        """``(boxes, cpu seconds)`` of ``run`` on the image, computed (``image()`` decodes it) if missing.

        ``run`` is a ``(max_side, colour_space, k, strategy)`` tuple or
        :data:`STOCK_FAST_RUN` (OpenCV's stock fast mode, its boxes in its own order).
        """
        path = self._path(image_key, run_key(run, sigma, min_segment))
        got = self._load(path)
        if got is not None:
            self.reused += 1
            return got
        img = image()
        c0 = time.process_time()
        if isinstance(run, str):
            if run != STOCK_FAST_RUN:
                raise ValueError(f"RunCache.get: unknown run {run!r}")
            boxes = opencv_selective_search(img, "fast")
        else:
            boxes = compute_run(img, run, sigma, min_segment)
        seconds = time.process_time() - c0
        self._save(path, boxes, seconds)
        self.computed += 1
        return boxes, seconds


def selective_search_cached(cache: RunCache, image_key: str, image: Callable[[], np.ndarray],
                            width: int, height: int, preset: str | Preset,
                            max_boxes: int = 2000) -> tuple[np.ndarray, float]:
    """:func:`~sppdet.proposals.selective_search.selective_search` from cached runs.

    Returns:
        ``(boxes, estimated CPU seconds)``: the boxes identical to an uncached
        call; the seconds = the runs' cached CPU times + this call's filter/merge/rank time.
    """
    p = get_preset(preset)
    runs, seconds = [], 0.0
    for run in p.runs():
        if run[0] >= max(width, height):  # segmented at the original size, like max_side 0: share it
            run = (0,) + tuple(run[1:])
        boxes, sec = cache.get(image_key, image, run, p.sigma, p.min_segment)
        runs.append(boxes)
        seconds += sec
    c0 = time.process_time()
    out = combine_runs(runs, p, width, height, max_boxes)
    return out, seconds + (time.process_time() - c0)


__all__ = ["RunCache", "STOCK_FAST_RUN", "run_key", "compute_run", "selective_search_cached"]
