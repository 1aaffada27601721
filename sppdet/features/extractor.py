"""Window features: SPP mode (one conv pass per image and scale) and R-CNN mode (one per window).

SPP mode (the paper's):

1. the image is resized so its shorter side is ``s`` (each of ``scales``), the
   longer side capped at ``max_side`` (so a huge image cannot exhaust memory);
2. the backbone runs once per image and scale; the conv5 map is stored in a
   disk cache (``cache_dtype``, float16 by default) keyed by the backbone
   weights, the image content, the scale, ``max_side`` and the flip;
3. each window (in original-image coordinates) picks the scale that makes its
   area closest to 224^2 (:func:`~sppdet.models.spp.choose_scales`), is scaled,
   projected onto the conv5 cells of that scale and max-pooled into the
   pyramid (:func:`~sppdet.models.spp.spp_pool`).  Pooled features are computed
   on demand from the cached maps and never stored.

R-CNN mode: every window is enlarged so that, once warped to ``rcnn_size``
(224) pixels square, ``rcnn_context`` (16) pixels of image context surround
it (R-CNN's padding; image outside the picture is the normalisation's zero,
i.e. the mean colour), sampled bilinearly from the original image
(``torchvision.ops.roi_align``, one sample per output pixel, ``aligned=True``),
run through the same backbone, and the whole window map is pooled with the
same pyramid -- the features have the same length as in SPP mode, so every
later stage runs on either.

Boxes are float ``(x1, y1, x2, y2)``, 0-based continuous pixels of the
original image (DESIGN §3).  ``flip=True`` means "the horizontally mirrored
image": its conv maps are computed on the mirrored pixels and boxes given in
the original image are mirrored (``x -> W - x``) before pooling, so
``features(img, boxes, flip=True) == features(mirror(img), mirror(boxes))``.

Disk cache files: ``<cache_dir>/<backbone>-<weights_id[:8]>/<kk>/<key>.npz``
with arrays ``fmap`` (``[C, h, w]``, cache dtype), ``factor`` (resize factor),
``size`` (original ``[H, W]``) and ``key`` (the full key string).  They are
written atomically and read with ``allow_pickle=False``; a file that cannot be
read, holds another key, or has the wrong channel count or dtype is logged
and rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torchvision

from ..boxes import flip_boxes
from ..errors import ImageDecodeError
from ..models.backbones import Backbone
from ..models.spp import (DEFAULT_LEVELS, choose_scales, project_windows, resize_factor, spp_pool, spp_pool_whole,
                         window_feature_dim)
from .conv5_cache import CACHE_FORMAT, Conv5Cache
from ..utils import memory
from ..utils.progress import progress

log = logging.getLogger(__name__)

_FLOAT16_MAX = 65504.0


@contextlib.contextmanager
def rank_thread_share() -> Iterator[int]:
    """Torch's intra-op threads capped at this rank's share of the machine while the block runs.

    Under a process group the cap is this machine's cores divided among its ranks
    (:func:`sppdet.utils.dist.per_rank_workers`; 2 cores, 2 ranks: 1 thread each), so
    ranks do not oversubscribe the cores (torchrun sets ``OMP_NUM_THREADS=1`` itself, but
    a process started otherwise gets all the cores).  Without a group nothing changes.
    Yields the thread count in force.
    """
    from ..utils import dist

    threads = torch.get_num_threads()
    share = dist.per_rank_workers(0) if dist.get_world_size() > 1 else threads
    if share >= threads:
        yield threads
        return
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        torch.set_num_threads(threads)



#: Values of ``features.amp`` (:class:`FeatureExtractor`'s ``amp``).
AMP_MODES = ("auto", "off", "fp16", "bf16")


def amp_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the conv5 forward for ``amp`` on ``device``: None (float32) on
    the CPU and for ``off``; float16 for ``auto`` and ``fp16`` on CUDA; bfloat16 for ``bf16``."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if torch.device(device).type != "cuda" or amp == "off":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resize_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize an RGB uint8 image (ndarray[H, W, 3]) by ``factor`` to ``round(H f) x round(W f)``.

    Area interpolation when shrinking (anti-aliased), bilinear when enlarging.
    """
    h, w = image.shape[:2]
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    if (nh, nw) == (h, w):
        return image
    interp = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=interp)


def enlarge_boxes(boxes: np.ndarray, factor: float) -> np.ndarray:
    """Boxes (ndarray[N, 4] x1, y1, x2, y2) scaled by ``factor`` about their centres
    (not clipped: :func:`~sppdet.models.spp.project_windows` clamps to the map)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c = 0.5 * (b[:, :2] + b[:, 2:])
    half = 0.5 * factor * (b[:, 2:] - b[:, :2])
    return np.concatenate([c - half, c + half], axis=1)


def context_boxes(boxes: np.ndarray, size: int = 224, context: int = 16) -> np.ndarray:
    """R-CNN's context padding: enlarge boxes so that ``context`` px surround them at ``size`` px.

    Args:
        boxes (ndarray[N, 4]): ``(x1, y1, x2, y2)`` continuous; widths/heights below
            1 px are treated as 1 px.
        size, context: the warp size and the context in warped pixels.

    Returns:
        ndarray[N, 4] float64: boxes ``size / (size - 2 context)`` times larger about
        the same centres (not clipped: the part outside the image is mean-filled).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy = 0.5 * (b[:, 0] + b[:, 2]), 0.5 * (b[:, 1] + b[:, 3])
    w = np.maximum(b[:, 2] - b[:, 0], 1.0)
    h = np.maximum(b[:, 3] - b[:, 1], 1.0)
    s = float(size) / float(size - 2 * context)
    return np.stack([cx - 0.5 * w * s, cy - 0.5 * h * s, cx + 0.5 * w * s, cy + 0.5 * h * s], axis=1)


class FeatureExtractor:
    """Per-window features from a backbone, in SPP mode or R-CNN mode.

    Args:
        backbone: a :class:`~sppdet.models.backbones.Backbone` (moved to ``device``).
        scales: shorter-side sizes (``(688,)`` single scale; the paper's multi-scale
            set is ``(480, 576, 688, 864, 1200)``).
        max_side: cap on the longer side after resizing.
        pyramid: SPP levels (bins per axis), e.g. ``(4, 2, 1)``.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a ``torch.device``.
        cache_dir: folder of the conv5 disk cache; ``None`` keeps maps in memory only.
        cache_dtype: ``float16`` (default) or ``float32`` storage of conv5 maps.
        mode: ``spp`` or ``rcnn``.
        rcnn_size, rcnn_context: R-CNN warp size and context padding (pixels at that size).
        rcnn_batch: windows per backbone batch in R-CNN mode.
        memory_cache: conv maps (image x scale x flip) kept in an in-memory LRU.
        context: beyond the paper, 0 (off) or a factor > 1: each window's feature also
            gets the SPP of the window enlarged by this factor about its centre (same
            scale as the window), pooled with ``context_pyramid`` and appended.  It
            tells the classifier and the box regressor whether the object goes on past
            the window's edges (SPP mode only).
        context_pyramid: pyramid levels of the enlarged window.
        amp: mixed precision of the backbone forward that computes the cached conv5 maps,
            on CUDA only: ``auto`` (float16 autocast on CUDA), ``off``, ``fp16``, ``bf16``.
            On the CPU every value means off (the maps are bit for bit those of ``off``).
            The maps are stored in ``cache_dtype`` (float16 by default) anyway, so fp16
            autocast changes them at about the float16 cache's own rounding noise; bf16 has
            fewer mantissa bits (8 against float16's 11) and changes them more.  A map with an
            overflow (inf/NaN) under autocast is computed again in float32.  Live maps (end-to-end
            fine-tuning, with autograd) and R-CNN mode never use it.
    """

    def __init__(self, backbone: Backbone, *, scales: Sequence[int] = (688,), max_side: int = 2000,
                 pyramid: Sequence[int] = DEFAULT_LEVELS, device: str | torch.device = "cpu",
                 cache_dir: str | Path | None = None, cache_dtype: str = "float16", mode: str = "spp",
                 rcnn_size: int = 224, rcnn_context: int = 16, rcnn_batch: int = 32,
                 memory_cache: int = 16, context: float = 0.0,
                 context_pyramid: Sequence[int] = (2, 1), amp: str = "auto") -> None:
        if mode not in ("spp", "rcnn"):
            raise ValueError(f"mode must be spp or rcnn, got {mode!r}")
        if context and (context <= 1 or mode != "spp"):
            raise ValueError(f"context must be 0 or a factor > 1 (SPP mode only), got {context!r} in {mode} mode")
        if cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be float16 or float32, got {cache_dtype!r}")
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
        if not scales or any(int(s) <= 0 for s in scales):
            raise ValueError(f"scales must be positive sizes, got {scales!r}")
        if 2 * rcnn_context >= rcnn_size:
            raise ValueError(f"rcnn_context {rcnn_context} leaves nothing of a {rcnn_size}-px warp")
        if isinstance(device, str) and device == "auto":
            from ..utils.device import resolve_device

            device = resolve_device("auto")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device)
        self.scales = tuple(int(s) for s in scales)
        self.max_side = int(max_side)
        self.pyramid = tuple(int(n) for n in pyramid)
        self.context = float(context or 0.0)
        self.context_pyramid = tuple(int(n) for n in context_pyramid)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_dtype = cache_dtype
        self.mode = mode
        self.rcnn_size = int(rcnn_size)
        self.rcnn_context = int(rcnn_context)
        self.rcnn_batch = int(rcnn_batch)
        self._torch_dtype = torch.float16 if cache_dtype == "float16" else torch.float32
        self.amp = amp
        self._amp_dtype = amp_dtype(amp, self.device)
        self.stats = {"hits_memory": 0, "hits_disk": 0, "computed": 0, "rebuilt": 0}
        self.cache = Conv5Cache(self.cache_dir, self.backbone, max_side=self.max_side, cache_dtype=cache_dtype,
                                memory=memory_cache, stats=self.stats)

    # ------------------------------------------------------------------ info
    @property
    def feature_dim(self) -> int:
        """Length ``D`` of a window feature: ``out_channels * sum(n * n)`` (plus the
        context region's ``out_channels * sum(m * m)`` when ``context``)."""
        return window_feature_dim(self.backbone.out_channels, self.pyramid, self.context, self.context_pyramid)

    def __repr__(self) -> str:
        return (f"FeatureExtractor(backbone={self.backbone.name}, mode={self.mode}, scales={self.scales}, "
                f"max_side={self.max_side}, pyramid={self.pyramid}, dim={self.feature_dim}, device={self.device})")

    # -------------------------------------------------------------- compute
    @staticmethod
    def _load_image(src: Any) -> np.ndarray:
        if isinstance(src, np.ndarray):
            arr = src
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {arr.dtype} {arr.shape}")
            return arr
        from ..data.images import load_image

        return load_image(src)

    def _forward_scales(self, image: np.ndarray, *, grad: bool) -> list[tuple[float, torch.Tensor]]:
        """Backbone maps of ``image`` at every scale (Tensor[C, h, w] float32 on the device)."""
        H, W = image.shape[:2]
        out: list[tuple[float, torch.Tensor]] = []
        by_size: dict[tuple[int, int], torch.Tensor] = {}
        for s in self.scales:
            f = resize_factor(H, W, s, self.max_side)
            resized = resize_image(image, f)
            sz = resized.shape[:2]
            if sz not in by_size:
                x = self.backbone.preprocess(resized)[None].to(self.device)
                if x.device.type == "cpu":
                    # oneDNN's convolutions run ~25% faster on NHWC input (measured on Lite0)
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.set_grad_enabled(grad):
                    if self._amp_dtype is not None and not grad:
                        by_size[sz] = self._forward_amp(x)
                    else:
                        by_size[sz] = self.backbone(x)[0].contiguous()
            out.append((f, by_size[sz]))
        return out

    def _forward_amp(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone under CUDA autocast (``self._amp_dtype``); float32 again on an overflow."""
        with torch.autocast(device_type=self.device.type, dtype=self._amp_dtype):
            y = self.backbone(x)[0]
        if not bool(torch.isfinite(y).all()):       # one check per map (a sync per image and scale)
            log.warning("conv5 map not finite under %s autocast; computed in float32 (set features.amp off "
                        "for this backbone)", self.amp)
            y = self.backbone(x)[0]
        return y.contiguous()

    def _to_storage(self, fmap: torch.Tensor) -> torch.Tensor:
        """The map in the cache dtype, on the host.  The range check, clamp and cast run where the
        map is, so from an accelerator only the stored-dtype map crosses (float16: half the
        bytes); the same values as casting on the host (IEEE round-to-nearest both ways)."""
        t = fmap.detach().to(torch.float32)
        if self._torch_dtype == torch.float16:
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > _FLOAT16_MAX:
                log.warning("conv5 values up to %.3g exceed float16's range; clipped in the cache "
                            "(use cache_dtype float32 for this backbone)", peak)
                t = t.clamp(-_FLOAT16_MAX, _FLOAT16_MAX)
        return t.to(self._torch_dtype).cpu().contiguous()

    def _maps(self, image_id: str | None, src: Any, flip: bool) -> tuple[list[tuple[float, torch.Tensor]],
                                                                        tuple[int, int]]:
        """Stored (cache-dtype, CPU) maps of every scale and the original (H, W)."""
        cache = self.cache
        ikey = cache.image_key(src) if (image_id is not None or not isinstance(src, np.ndarray)) else None
        keys = [cache.map_key(ikey, s, flip) if ikey else None for s in self.scales]
        entries: list[tuple[float, torch.Tensor, tuple[int, int]] | None] = []
        for k, s in zip(keys, self.scales):
            entries.append(cache.get(k, s) if k is not None else None)
        if any(e is None for e in entries):
            self._store_computed(keys, entries, *self._compute_maps(src, flip))
        size = entries[0][2]
        return [(e[0], e[1]) for e in entries], size

    def _compute_maps(self, src: Any, flip: bool) -> tuple[list[tuple[float, torch.Tensor]], tuple[int, int]]:
        """Stored-dtype maps of every scale and the original (H, W): no cache, no shared state."""
        image = self._load_image(src)
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
        size = (int(image.shape[0]), int(image.shape[1]))
        return [(f, self._to_storage(fmap)) for f, fmap in self._forward_scales(image, grad=False)], size

    def _store_computed(self, keys: Sequence[str | None], entries: list, computed: list[tuple[float, torch.Tensor]],
                        size: tuple[int, int]) -> None:
        """Fill the missing ``entries`` from ``computed`` and write them to the caches."""
        for i, (k, (f, stored)) in enumerate(zip(keys, computed)):
            if entries[i] is not None:
                continue
            entries[i] = (f, stored, size)
            self.stats["computed"] += 1
            if k is not None:
                self.cache.put(k, entries[i])

    # ---------------------------------------------------------------- public
    def conv_maps(self, image_id: str | None, path_or_array: Any, flip: bool = False
                  ) -> list[tuple[float, torch.Tensor]]:
        """Conv5 maps of an image at every scale, computed once and cached.

        Args:
            image_id: the dataset's id (only for messages; the cache key is the image
                content), or ``None`` with an array to skip the caches.
            path_or_array: an image file or an RGB uint8 ndarray[H, W, 3].
            flip: maps of the horizontally mirrored image.

        Returns:
            ``[(factor, Tensor[C, h, w]), ...]`` per scale, in ``cache_dtype`` on the
            extractor's device (values exactly as stored, so cached and fresh maps agree).

        Raises:
            ImageDecodeError: from :func:`sppdet.data.images.load_image`.
        """
        maps, _ = self._maps(image_id, path_or_array, flip)
        return [(f, m.to(self.device)) for f, m in maps]

    def conv_maps_live(self, image_array: np.ndarray, flip: bool = False) -> list[tuple[float, torch.Tensor]]:
        """Maps with autograd (end-to-end fine-tuning): no cache, float32, current backbone mode.

        Returns:
            ``[(factor, Tensor[C, h, w]), ...]`` per scale; gradients flow to the backbone.
        """
        image = self._load_image(image_array)
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
        return self._forward_scales(image, grad=True)

    def pooled(self, maps: list[tuple[float, torch.Tensor]], boxes_orig: np.ndarray, image_width: int,
               flip: bool = False) -> torch.Tensor:
        """SPP features of windows from conv maps.

        Args:
            maps: from :meth:`conv_maps` or :meth:`conv_maps_live` (same ``flip``).
            boxes_orig (ndarray[N, 4]): ``(x1, y1, x2, y2)`` in the ORIGINAL (unflipped)
                image, 0-based continuous.
            image_width: width of the original image (for mirroring).
            flip: the maps are of the mirrored image; boxes are mirrored to match.

        Returns:
            Tensor[N, D] float32 on the maps' device (differentiable for live maps).
        """
        boxes = np.asarray(boxes_orig, dtype=np.float64).reshape(-1, 4)
        if flip:
            boxes = flip_boxes(boxes, image_width)
        dev = maps[0][1].device
        N = len(boxes)
        if N == 0:
            return torch.zeros((0, self.feature_dim), dtype=torch.float32, device=dev)
        which = choose_scales(boxes, [f for f, _ in maps]) if len(maps) > 1 else torch.zeros(N, dtype=torch.int64)
        bb = self.backbone
        parts, order = [], []
        for s, (f, fmap) in enumerate(maps):
            idx = torch.nonzero(which == s).flatten()
            if len(idx) == 0:
                continue
            b = boxes[idx.numpy()] * f
            cells = project_windows(b, bb.stride, fmap.shape[1], fmap.shape[2], bb.center_offset)
            m = fmap.float() if (fmap.is_cuda and fmap.dtype == torch.float16) else fmap
            feat = spp_pool(m, cells, self.pyramid).to(torch.float32)
            if self.context:
                big = enlarge_boxes(b, self.context)
                ctx = project_windows(big, bb.stride, fmap.shape[1], fmap.shape[2], bb.center_offset)
                feat = torch.cat([feat, spp_pool(m, ctx, self.context_pyramid).to(torch.float32)], dim=1)
            parts.append(feat)
            order.append(idx)
        out = torch.cat(parts)
        perm = torch.cat(order)
        if len(parts) == 1:
            return out
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(N)
        return out.index_select(0, inv.to(out.device))

    def features(self, item: Any, boxes_orig: np.ndarray, flip: bool = False) -> torch.Tensor:
        """Features of the windows of one image, in this extractor's mode.

        Args:
            item: an :class:`~sppdet.data.records.ImageRecord` or ``(image_id, path_or_array)``
                (``image_id`` may be ``None`` for an array: nothing is cached then).
            boxes_orig (ndarray[N, 4]): windows in original-image coordinates.
            flip: features of the mirrored image (boxes are given unmirrored).

        Returns:
            Tensor[N, D] float32 (``D = feature_dim`` in both modes).
        """
        if isinstance(item, tuple):
            image_id, src = item
        else:
            image_id, src = item.image_id, item.path
        if self.mode == "rcnn":
            return self._rcnn_features(src, boxes_orig, flip)
        maps, size = self._maps(image_id, src, flip)
        maps = [(f, m.to(self.device)) for f, m in maps]
        with torch.no_grad():
            return self.pooled(maps, boxes_orig, size[1], flip=flip)

    # ---------------------------------------------------------------- R-CNN
    def warp_windows(self, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """R-CNN crops: windows with context, warped to ``rcnn_size`` squares.

        Args:
            image (ndarray[H, W, 3] uint8): RGB (already mirrored if wanted).
            boxes (ndarray[N, 4]): windows in that image's coordinates.

        Returns:
            Tensor[N, 3, size, size]: normalised crops on the extractor's device.
        """
        x = self.backbone.preprocess(image)[None].to(self.device)
        big = torch.as_tensor(context_boxes(boxes, self.rcnn_size, self.rcnn_context), dtype=torch.float32,
                              device=self.device)
        return torchvision.ops.roi_align(x, [big], output_size=(self.rcnn_size, self.rcnn_size),
                                         spatial_scale=1.0, sampling_ratio=1, aligned=True)

    def _rcnn_features(self, src: Any, boxes_orig: np.ndarray, flip: bool) -> torch.Tensor:
        image = self._load_image(src)
        boxes = np.asarray(boxes_orig, dtype=np.float64).reshape(-1, 4)
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
            boxes = flip_boxes(boxes, image.shape[1])
        outs = []
        batches = range(0, len(boxes), self.rcnn_batch)
        with torch.no_grad():
            for b0 in progress(batches, desc="R-CNN windows", unit="batch", disable=None if len(boxes) > 256 else True):
                crops = self.warp_windows(image, boxes[b0:b0 + self.rcnn_batch])
                outs.append(spp_pool_whole(self.backbone(crops), self.pyramid).float())
        if not outs:
            return torch.zeros((0, self.feature_dim), dtype=torch.float32, device=self.device)
        return torch.cat(outs)

    # ------------------------------------------------------------ whole splits
    def is_cached(self, image_id: str | None, path: str | Path, flip: bool = False) -> bool:
        """Whether every scale's map of this image has a cache file (not validated)."""
        if self.cache_dir is None:
            return False
        ikey = self.cache.image_key(path)
        return all(self.cache.has_file(self.cache.map_key(ikey, s, flip)) for s in self.scales)

    def precompute(self, dataset: Iterable[Any], flip: bool = False, progress: bool = True,
                   workers: int | None = None, skip_bad_images: bool = False) -> dict[str, int]:
        """Compute (or find) the conv5 maps of every image of a split; resumable.

        Images whose maps are already on disk are skipped, so an interrupted run
        continues where it stopped.  Nothing to do in R-CNN mode.  On the CPU,
        ``workers`` images (default: torch's intra-op thread count) are computed at
        once, one thread each.

        Under a process group (torchrun, :mod:`sppdet.utils.dist`) this is collective:
        every rank calls it with the same records.  Rank ``r`` of ``W`` computes the
        records at positions ``r, r + W, ...`` (:func:`~sppdet.utils.dist.shard`) into
        the one cache, with this machine's cores divided among its ranks
        (:func:`rank_thread_share`); the call returns on every rank once every rank has
        written its maps, with the counts summed over the ranks.  The files are the
        ones a single process writes (same keys, same bits: each is computed by one
        rank, and the maps do not depend on the thread count).  An error on one rank
        is raised on all of them (:func:`~sppdet.utils.dist.raise_if_any`); what the
        ranks wrote before it stays in the cache.

        Args:
            skip_bad_images: an image that cannot be decoded is skipped (counted in
                ``"failed"``) instead of raising :class:`~sppdet.errors.ImageDecodeError`.

        Returns:
            ``{"images", "computed", "cached"}`` counts, and ``"failed"`` with ``skip_bad_images``.
        """
        from ..utils import dist

        records = list(dataset)
        if self.mode == "spp" and dist.get_world_size() > 1:
            return self._precompute_ranked(records, flip, progress, workers, skip_bad_images)
        return self._precompute_here(records, flip, progress, workers, skip_bad_images)

    def _precompute_ranked(self, records: list[Any], flip: bool, progress: bool, workers: int | None,
                           skip_bad_images: bool) -> dict[str, int]:
        """:meth:`precompute` on every rank of a process group: shard, compute, wait for all."""
        from ..errors import SppdetError
        from ..utils import dist

        mine = dist.shard(records)
        err: BaseException | None = None
        stats: dict[str, int] = {}
        counts = ("computed", "cached", "failed") if skip_bad_images else ("computed", "cached")
        try:
            with rank_thread_share():
                stats = self._precompute_here(mine, flip, progress, workers, skip_bad_images)
        except SppdetError as e:
            err = e
        # the collective check is also the barrier: once it returns, every rank's maps are on disk
        dist.raise_if_any(err)
        probe = None
        if mine and self.cache_dir is not None:
            f = self.cache.cache_file(self.cache.map_key(self.cache.image_key(mine[0].path), self.scales[0], flip))
            probe = str(f) if f is not None and f.is_file() else None
        every = dist.all_gather_object((stats, probe))
        unseen = [r for r, (_, f) in enumerate(every) if f is not None and not Path(f).is_file()]
        if unseen:
            log.warning("conv5 cache %s: the maps rank(s) %s wrote are not visible here; put the cache (--cache / "
                        "$SPPDET_CACHE) on a filesystem every node sees, or they are computed again where needed",
                        self.cache_dir, ", ".join(map(str, unseen)))
        total = {k: sum(int(s[k]) for s, _ in every) for k in counts}
        return {"images": len(records), **total}

    def _precompute_here(self, records: list[Any], flip: bool, progress: bool, workers: int | None,
                         skip_bad_images: bool) -> dict[str, int]:
        """:meth:`precompute` in this process only."""
        from ..utils.progress import progress as bar

        stats = {"images": len(records), "computed": 0, "cached": 0}
        if skip_bad_images:
            stats["failed"] = 0
        if self.mode != "spp":
            return stats
        todo = [r for r in records if not self.is_cached(r.image_id, r.path, flip)]
        stats["cached"] = len(records) - len(todo)
        threads = torch.get_num_threads()
        workers = max(1, min(threads if workers is None else workers, threads, len(todo)))
        pbar = bar(total=len(todo), desc="conv5 maps" + (" (flipped)" if flip else ""), unit="img",
                   disable=None if progress else True)
        try:
            if workers == 1 or self.device.type != "cpu":
                for n, rec in enumerate(todo):
                    memory.every(n)
                    try:
                        self._maps(rec.image_id, rec.path, flip)
                        stats["computed"] += 1
                    except ImageDecodeError as e:
                        if not skip_bad_images:
                            raise
                        log.debug("conv5 maps: %s", e)
                        stats["failed"] += 1
                    pbar.update(1)
            else:
                done, failed = self._precompute_threads(todo, flip, workers, pbar, skip_bad_images)
                stats["computed"] = done
                if skip_bad_images:
                    stats["failed"] = failed
        finally:
            pbar.close()
        return stats

    def _precompute_threads(self, todo: Sequence[Any], flip: bool, workers: int, pbar: Any,
                            skip_bad_images: bool = False) -> tuple[int, int]:
        """CPU: ``workers`` images at a time, each with one intra-op thread; ``(computed, failed)``.

        On a CPU, intra-op threads scale poorly on these small convolutions and collapse
        when other processes compete for the cores (measured on Lite0 at 480x640 with
        the machine loaded: 8.5 s/image with 2 intra-op threads, 0.78 s/image with two
        images at once on one thread each).  Only the forward passes run in the pool;
        cache writes stay in this thread, in dataset order, so an interrupted run keeps
        every map written so far.  The maps are the same bits as the serial path's
        (the backbones give the same bits for any thread count; tests/test_determinism.py).
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        done = failed = 0

        def finish(item: tuple[Any, Any]) -> None:
            nonlocal done, failed
            try:
                done += self._finish_precompute(item, flip, pbar)
                memory.every(done + failed - 1)
            except ImageDecodeError as e:
                if not skip_bad_images:
                    raise
                log.debug("conv5 maps: %s", e)
                failed += 1
                pbar.update(1)

        try:
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                pending: deque = deque()
                it = iter(todo)
                try:
                    for rec in it:
                        pending.append((rec, pool.submit(self._compute_maps, rec.path, flip)))
                        if len(pending) >= 2 * workers:
                            finish(pending.popleft())
                    while pending:
                        finish(pending.popleft())
                except BaseException:
                    for _, fut in pending:
                        fut.cancel()
                    raise
        finally:
            torch.set_num_threads(threads)   # the pool's initializer changes torch's global count
        return done, failed

    def _finish_precompute(self, item: tuple[Any, Any], flip: bool, pbar: Any) -> int:
        rec, fut = item
        computed, size = fut.result()
        ikey = self.cache.image_key(rec.path)
        keys = [self.cache.map_key(ikey, s, flip) for s in self.scales]
        self._store_computed(keys, [None] * len(keys), computed, size)
        pbar.update(1)
        return 1

    def disk_report(self, dataset: Iterable[Any], num_windows: int | Sequence[int],
                    flips: Sequence[bool] = (False,)) -> dict[str, Any]:
        """Disk use of a split's conv5 cache against caching one feature per window.

        Args:
            dataset: the split's records (their maps should be precomputed).
            num_windows: windows per image (one number, or one per record).
            flips: which flips count (``(False, True)`` when training with mirrors).

        Returns:
            dict with ``images``, ``windows``, ``conv5_cache_bytes`` (files on disk),
            ``missing_maps``, ``per_window_bytes`` (``windows x D x 4`` bytes of
            float32 features, per flip) and ``ratio`` (per-window / conv5).
        """
        records = list(dataset)
        nw = [int(num_windows)] * len(records) if np.isscalar(num_windows) else [int(v) for v in num_windows]
        if len(nw) != len(records):
            raise ValueError("num_windows: one count per record expected")
        total, missing = 0, 0
        for rec in records:
            ikey = self.cache.image_key(rec.path)
            for flip in flips:
                for s in self.scales:
                    f = self.cache.cache_file(self.cache.map_key(ikey, s, flip)) if self.cache_dir else None
                    if f is not None and f.is_file():
                        total += os.path.getsize(f)
                    else:
                        missing += 1
        windows = int(sum(nw)) * len(flips)
        per_window = windows * self.feature_dim * 4
        return {"images": len(records), "windows": windows, "feature_dim": self.feature_dim,
                "conv5_cache_bytes": int(total), "missing_maps": int(missing),
                "per_window_bytes": int(per_window),
                "ratio": (per_window / total) if total else float("nan")}


__all__ = ["FeatureExtractor", "AMP_MODES", "amp_dtype", "resize_image", "context_boxes", "enlarge_boxes", "rank_thread_share",
           "CACHE_FORMAT"]
