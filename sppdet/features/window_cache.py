"""Pooled features of the training windows, cached (SPP: in RAM within a budget; R-CNN: on disk)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..utils import memory
from ..utils.io import atomic_save_npy, stable_hash
from ..utils.progress import progress
from .memory import available_memory

log = logging.getLogger(__name__)


class WindowFeatures:
    """Pooled features of training windows, by image index, window indices and flip.

    SPP mode pools from the cached conv5 maps (computed once per image, scale
    and flip); R-CNN mode looks up per-window features computed once per
    image (crop, warp, forward each window) and cached on disk as float16.

    In SPP mode the pooled features of ALL windows of an image are computed in
    one call the first time the image is asked for and kept in RAM, as long as
    the total stays within ``features.pooled_memory_gb``: fine-tuning visits every
    image dozens of times, and pooling all windows at once costs about as much
    as pooling the 64 a mini-batch needs.  Max pooling is exact, so the values
    are the same either way (images beyond the budget are pooled per call).

    Args:
        extractor: the :class:`~sppdet.features.FeatureExtractor` (its mode decides which cache).
        dataset: the training split.
        windows: per image, its training windows (``.record``, ``.boxes``, ``len()``).
        cache_dir: root of the R-CNN window-feature cache (``<cache_dir>/rcnn_windows/``).
        features_key: identifies the features (backbone weights and feature settings); part of
            the R-CNN cache files' keys.
        pooled_memory_gb: RAM for pooled SPP features (0: off; at most half the memory available).
    """

    def __init__(self, extractor, dataset, windows: list, cache_dir: Path, *, features_key: str,
                 pooled_memory_gb: float = 4.0, show_progress: bool = True) -> None:
        self.extractor = extractor
        self.features_key = features_key
        self.dataset = dataset
        self.windows = windows
        self.mode = extractor.mode
        self.cache_dir = Path(cache_dir)
        self.show_progress = show_progress
        self._memo: dict[tuple[int, bool], np.ndarray] = {}
        self.pooled_budget = int(max(0.0, float(pooled_memory_gb)) * 2 ** 30) if self.mode == "spp" else 0
        avail = available_memory() if self.pooled_budget else None
        if avail is not None and self.pooled_budget > avail // 2:
            log.info("features.pooled_memory_gb: using %.2f GiB, half of the memory available now",
                     avail / 2 ** 31)
            self.pooled_budget = avail // 2
        self.pooled_bytes = 0
        self._pooled: dict[tuple[int, bool], torch.Tensor] = {}

    def _rcnn_file(self, i: int, flip: bool) -> Path:
        w = self.windows[i]
        # the image's content hash, not its path: a moved data folder keeps its features and a
        # replaced image does not reuse the old one's
        key = stable_hash([self.features_key, w.record.image_id, self.extractor.cache.image_key(w.record.path),
                           stable_hash(w.boxes.round(2).tolist()), flip])
        return self.cache_dir / "rcnn_windows" / f"{key}.npy"

    def _rcnn_all(self, i: int, flip: bool) -> np.ndarray:
        f = self._rcnn_file(i, flip)
        if f.is_file():
            try:
                arr = np.load(f, allow_pickle=False)
                if arr.shape == (len(self.windows[i]), self.extractor.feature_dim):
                    return arr
            except Exception:
                pass
            log.warning("%s: corrupt R-CNN window-feature cache, rebuilding", f)
        feats = self.extractor.features(self.windows[i].record, self.windows[i].boxes, flip=flip)
        arr = feats.detach().cpu().numpy().astype(np.float16)
        atomic_save_npy(f, arr)
        return arr

    def prepare(self, flips: tuple[bool, ...]) -> None:
        """Compute what every later stage needs, once (conv maps or R-CNN window features)."""
        if self.mode == "spp":
            for flip in flips:
                self.extractor.precompute(self.dataset, flip=flip, progress=self.show_progress)
        else:
            items = [(i, f) for f in flips for i in range(len(self.windows))]
            for i, f in progress(items, desc="R-CNN window features", unit="img",
                                 disable=None if self.show_progress else True):
                self._rcnn_all(i, f)

    def _all_pooled(self, i: int, flip: bool) -> torch.Tensor | None:
        """Pooled features of every window of image ``i`` (CPU, the maps' dtype), kept in RAM;
        ``None`` when they do not fit in what is left of the budget."""
        t = self._pooled.get((i, flip))
        if t is not None:
            return t
        w = self.windows[i]
        itemsize = 2 if self.extractor.cache_dtype == "float16" else 4
        nbytes = len(w) * self.extractor.feature_dim * itemsize
        if self.pooled_bytes + nbytes > self.pooled_budget:
            return None
        rec = w.record
        maps = self.extractor.conv_maps(rec.image_id, rec.path, flip=flip)
        t = self.extractor.pooled(maps, w.boxes, rec.width, flip=flip).to("cpu", maps[0][1].dtype)
        self._pooled[(i, flip)] = t
        self.pooled_bytes += t.numel() * t.element_size()
        return t

    def warm(self, flips: tuple[bool, ...]) -> None:
        """Pool every window of every training image into RAM now (within the budget; none in R-CNN mode)."""
        if self.pooled_budget <= 0:
            return
        t0 = time.perf_counter()
        items = [(i, f) for f in flips for i in range(len(self.windows)) if (i, f) not in self._pooled]
        kept, n_win = 0, 0
        for i, f in progress(items, desc="pooling windows", unit="img",
                             disable=None if self.show_progress else True):
            if self._all_pooled(i, f) is None:
                break
            kept += 1
            memory.every(kept - 1)
            n_win += len(self.windows[i])
        if kept:
            log.info("SPP features of %d windows (%d images%s) pooled into RAM: %.2f GiB, %.1f s%s", n_win, kept,
                     ", mirrored copies included" if len(flips) > 1 else "", self.pooled_bytes / 2 ** 30,
                     time.perf_counter() - t0, "" if kept == len(items) else
                     f"; the other {len(items) - kept} are over features.pooled_memory_gb and pooled per batch")

    def __call__(self, i: int, idx: np.ndarray, flip: bool = False) -> torch.Tensor:
        """Features (Tensor[len(idx), D] float32) of windows ``idx`` of training image ``i``."""
        w = self.windows[i]
        if self.mode == "spp":
            if self.pooled_budget > 0:
                t = self._all_pooled(i, flip)
                if t is not None:
                    return t[torch.as_tensor(np.asarray(idx, dtype=np.int64))].float()
            rec = w.record
            maps = self.extractor.conv_maps(rec.image_id, rec.path, flip=flip)
            return self.extractor.pooled(maps, w.boxes[idx], rec.width, flip=flip).float()
        return torch.from_numpy(self._rcnn_all(i, flip)[idx].astype(np.float32))
