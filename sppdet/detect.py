"""The detector at test time: proposals -> features -> SVM scores -> box regression -> NMS.

>>> det = Detector.from_checkpoint("sppdet-demo/run/model.pt", device="auto")
>>> out = det("image.jpg")          # or an RGB uint8 array [H, W, 3]
>>> out["boxes"], out["scores"], out["labels"]   # [M,4] original pixels, [M], [M]
>>> for image, out in det.detect_many(["a.jpg", "b.png"]):   # streaming, next images prefetched
...     print(image, len(out["boxes"]))

Scores are SVM margins (0 is the SVMs' decision boundary; higher is more
confident).  Boxes are float (x1, y1, x2, y2), 0-based continuous pixels of
the input image, clipped to it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .boxes import batched_nms, box_iou, clip_boxes, flip_boxes, valid_boxes
from .data.images import load_image
from .data.records import Dataset, ImageRecord
from .errors import ImageDecodeError
from .features import FeatureExtractor
from .models.detector import SPPDetector
from .proposals.presets import Preset
from .utils import memory
from .utils.progress import progress

log = logging.getLogger(__name__)

#: Per class, the best this many windows go into NMS (the rest cannot reach the top 100).
PRE_NMS_TOP = 300

#: Default cap on the threads that decode images and compute their proposals ahead of scoring.
LOADER_THREADS = 8


@dataclass
class Detections:
    """Detections of one image: boxes (ndarray[M,4]), scores (ndarray[M]), labels (ndarray[M] int64)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass
class Timer:
    """Accumulates seconds per stage."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    images: int = 0

    def add(self, stage: str, t: float) -> None:
        self.seconds[stage] += t

    def per_image(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {k: v / n for k, v in self.seconds.items()}


def postprocess(scores: np.ndarray, boxes: np.ndarray, width: int, height: int, *, nms: float = 0.3,
                max_per_image: int = 100, score_threshold: float | None = None,
                pre_nms_top: int = PRE_NMS_TOP, box_voting: float | None = None) -> Detections:
    """Per-class NMS, optional box voting and the top-``max_per_image`` cut.

    Args:
        scores (ndarray[N, K]): class scores of N windows.
        boxes (ndarray[N, K, 4] or [N, 4]): per-class (regressed) boxes, or one box per window.
        width, height: image size; boxes are clipped to it.
        nms: IoU above which a lower-scoring box of the same class is suppressed (0.3).
        max_per_image: keep at most this many detections over all classes.
        score_threshold: drop detections scoring below it (None: keep all).
        box_voting: None (the paper), or an IoU: every box NMS keeps is replaced by the
            average of the candidate boxes of its class that overlap it at least this much,
            weighted by ``exp(score - kept score)`` (Gidaris & Komodakis 2015); its score
            is unchanged.
    """
    n, k = scores.shape
    if n == 0 or k == 0:
        return Detections.empty()
    if boxes.ndim == 2:
        boxes = np.repeat(boxes[:, None, :], k, axis=1)
    cand_boxes, cand_scores, cand_labels = [], [], []
    for c in range(k):
        s = scores[:, c]
        order = np.argsort(-s, kind="stable")[:pre_nms_top]
        if score_threshold is not None:
            order = order[s[order] >= score_threshold]
        if len(order) == 0:
            continue
        b = clip_boxes(boxes[order, c], width, height)
        ok = valid_boxes(b)
        cand_boxes.append(b[ok])
        cand_scores.append(s[order][ok])
        cand_labels.append(np.full(int(ok.sum()), c, dtype=np.int64))
    if not cand_boxes:
        return Detections.empty()
    b = np.concatenate(cand_boxes).astype(np.float32)
    s = np.concatenate(cand_scores).astype(np.float32)
    lab = np.concatenate(cand_labels)
    keep = batched_nms(b, s, lab, nms)
    keep = keep[np.argsort(-s[keep], kind="stable")][:max_per_image]
    out = b[keep]
    if box_voting is not None and len(keep):
        out = vote_boxes(b, s, lab, keep, box_voting)
    return Detections(out, s[keep], lab[keep])


def postprocess_tensor(scores: torch.Tensor, boxes: torch.Tensor, width: int, height: int, *, nms: float = 0.3,
                       max_per_image: int = 100, score_threshold: float | None = None,
                       pre_nms_top: int = PRE_NMS_TOP, box_voting: float | None = None) -> Detections:
    """:func:`postprocess` on the scores' device, in one pass over all classes.

    The same steps and the same candidate order as :func:`postprocess` (per class the best
    ``pre_nms_top`` windows by a stable sort, the threshold, clipping, the empty-box check;
    the candidates class by class), with ``torchvision.ops.batched_nms``, the top-k cut and box
    voting run on the device: no Python loop over classes, no transfer before the end.  Only
    the final detections (at most ``max_per_image``) cross to the host, in one copy.

    Args:
        scores (Tensor[N, K]), boxes (Tensor[N, K, 4] or Tensor[N, 4]): as :func:`postprocess`,
            on one device.

    Returns:
        :class:`Detections` (numpy), equal to :func:`postprocess` on the same values (the
        tests check it on the CPU; voted boxes up to float rounding).
    """
    import torchvision

    n, k = scores.shape
    if n == 0 or k == 0:
        return Detections.empty()
    dev = scores.device
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.float32)
    # sorted, clipped and checked in the given dtypes and only then made float32, as postprocess does
    if boxes.dim() == 2:
        boxes = boxes[:, None, :].expand(n, k, 4)
    top = min(int(pre_nms_top), n)
    s_sorted, order = torch.sort(scores, dim=0, descending=True, stable=True)     # per class, [N, K]
    order, s_top = order[:top], s_sorted[:top]
    cls = torch.arange(k, device=dev)
    b = boxes[order, cls[None, :]]                                                 # [top, K, 4]
    # class-major, as postprocess concatenates them
    b = b.transpose(0, 1).reshape(-1, 4)
    s = s_top.transpose(0, 1).reshape(-1)
    lab = cls[:, None].expand(k, top).reshape(-1)
    b = torch.stack([b[:, 0].clamp(0, width), b[:, 1].clamp(0, height),
                     b[:, 2].clamp(0, width), b[:, 3].clamp(0, height)], dim=1)
    ok = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
    if score_threshold is not None:
        ok &= s >= score_threshold
    b, s, lab = b[ok].to(torch.float32), s[ok].to(torch.float32), lab[ok]
    if len(s) == 0:
        return Detections.empty()
    keep = torchvision.ops.batched_nms(b, s, lab, float(nms))
    keep = keep[torch.sort(s[keep], descending=True, stable=True)[1]][:max_per_image]
    out = b[keep]
    if box_voting is not None and len(keep):
        out = vote_boxes_tensor(b, s, lab, keep, box_voting)
    # the one transfer of this image: its final detections
    return Detections(out.cpu().numpy(), s[keep].cpu().numpy(), lab[keep].cpu().numpy().astype(np.int64))


def vote_boxes_tensor(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                      iou_threshold: float) -> torch.Tensor:
    """:func:`vote_boxes` in torch on the boxes' device (the same arithmetic: IoU in float64,
    weights in float32, the weighted mean in float64); Tensor[M, 4] float32."""
    import torchvision

    bd = boxes.to(torch.float64)
    iou = torchvision.ops.box_iou(bd[keep], bd)                                   # [M, N]
    member = (iou >= iou_threshold) & (labels[keep][:, None] == labels[None, :])
    member[torch.arange(len(keep), device=keep.device), keep] = True
    diff = torch.clamp(scores[None, :] - scores[keep][:, None], max=30.0)
    w = torch.where(member, torch.exp(diff), torch.zeros((), dtype=scores.dtype, device=scores.device))
    voted = (w.to(torch.float64) @ bd) / w.sum(1, keepdim=True).to(torch.float64)
    return voted.to(torch.float32)


def vote_boxes(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, keep: np.ndarray,
               iou_threshold: float) -> np.ndarray:
    """Box voting: each kept box becomes the score-weighted mean of its same-class neighbours.

    Args:
        boxes (ndarray[N, 4]), scores (ndarray[N]), labels (ndarray[N]): all candidates.
        keep (ndarray[M]): indices of the boxes NMS kept.
        iou_threshold: candidates of the kept box's class overlapping it at least this much vote
            (the kept box itself always does).

    Returns:
        ndarray[M, 4] float32: the voted boxes (inside the image when the candidates are).
    """
    iou = box_iou(boxes[keep], boxes)                             # [M, N]
    same = labels[keep][:, None] == labels[None, :]
    member = (iou >= iou_threshold) & same
    member[np.arange(len(keep)), keep] = True
    # exp(s - s_kept) <= 1 when box_voting >= nms (a better neighbour would have suppressed the kept box);
    # the clamp only guards the overflow a lower voting threshold could bring
    w = np.where(member, np.exp(np.minimum(scores[None, :] - scores[keep][:, None], 30.0)), 0.0)
    voted = (w @ boxes.astype(np.float64)) / w.sum(1, keepdims=True)
    return voted.astype(np.float32)


class Detector:
    """A trained SPPnet detector at test time: proposals -> features -> model -> post-processing.

    Build one with :meth:`from_checkpoint`.  Call it on an image (path or RGB
    uint8 array) for its detections, or use :meth:`detect_dataset` for a whole
    split (proposals and conv5 maps are cached and reused).

    Args:
        model: the trained parts (:class:`~sppdet.models.detector.SPPDetector`).
        extractor: pools window features the way the model was trained (its caches under ``cache_dir``).
        preset, max_boxes, workers: selective search for images without given proposals.
        cache_dir: the cache folder (proposal stores; the extractor's conv5 maps are below it).
        skip_bad_images: skip undecodable images of a split with a warning instead of failing.
        config: the resolved config the checkpoint holds (kept for reports; not read here).
    """

    def __init__(self, model: SPPDetector, extractor: FeatureExtractor, *, preset: Preset, max_boxes: int,
                 workers: int = 0, cache_dir: Path, skip_bad_images: bool = False, config: Any = None) -> None:
        self.model = model
        self.classes = list(model.classes)
        self.extractor = extractor
        self.preset = preset
        self.max_boxes = int(max_boxes)
        self.workers = int(workers)
        self.cache_dir = Path(cache_dir)
        self.skip_bad_images = bool(skip_bad_images)
        self.config = config
        self.device = model.device
        self.use_bbox_reg = model.bbox_reg is not None
        #: score, regress and post-process on the device, one transfer per image (True on a GPU;
        #: on the CPU the numpy path, whose results the tests pin bit for bit)
        self.device_path = self.device.type != "cpu"
        self.timer = Timer()

    # ------------------------------------------------------------------ build
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto",
                        cache_dir: str | Path | None = None,
                        test_overrides: dict[str, Any] | None = None) -> "Detector":
        """Load ``model.pt``; ``test_overrides`` changes test-time settings (``{"nms": 0.2}``).

        Proposals and conv5 maps are cached in ``cache_dir`` (``~`` expanded), else in
        ``$SPPDET_CACHE``, else ``~/.cache/sppdet`` -- never in the cache folder the
        checkpoint's config records (the trainer's).
        """
        from .build import detector_setup

        s = detector_setup(path, device=device, cache=cache_dir, test_overrides=test_overrides)
        return cls(s.model, s.extractor, preset=s.preset, max_boxes=s.max_boxes, workers=s.workers,
                   cache_dir=s.cache_dir, skip_bad_images=s.skip_bad_images, config=s.config)

    # ------------------------------------------------------------- internals
    def window_scores(self, item: Any, windows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """SVM scores (ndarray[N, K]) and per-class boxes (ndarray[N, K, 4], or the windows [N, 4]
        without regression) of the windows of one image.

        With ``test.flip`` the mirrored image is scored too: the scores are averaged, and the
        box predicted from the mirrored features (mapped back) is averaged with the direct one.
        """
        model = self.model
        views = (False, True) if model.test.flip else (False,)
        scores_sum, boxes_sum = None, None
        for flip in views:
            t = time.perf_counter()
            feats = self.extractor.features(item, windows, flip=flip)
            self.timer.add("features", time.perf_counter() - t)
            t = time.perf_counter()
            scores, pooled = model.score(feats)
            if self.use_bbox_reg and model.bbox_reg is not None:
                if flip:
                    boxes = model.regress(pooled, flip_boxes(windows, width))
                    boxes = flip_boxes(boxes.reshape(-1, 4), width).reshape(boxes.shape)
                else:
                    boxes = model.regress(pooled, windows)       # [N, K, 4]
            else:
                boxes = np.asarray(windows, dtype=np.float32)
            scores_sum = scores if scores_sum is None else scores_sum + scores
            boxes_sum = boxes if boxes_sum is None else boxes_sum + boxes
            self.timer.add("classify", time.perf_counter() - t)
        return scores_sum / len(views), boxes_sum / len(views)

    def window_scores_tensor(self, item: Any, windows: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`window_scores` kept on the model's device: Tensor[N, K] scores and Tensor[N, K, 4]
        (or [N, 4]) boxes there.  Windows are pooled, scored (fc7 + all SVMs in one matmul) and
        regressed where the conv5 maps are; the windows go to the device once per image.

        On a GPU the work is queued asynchronously, so the timer's ``features`` / ``classify``
        split is approximate there (the ``nms`` stage then waits for it); the sum is right.
        """
        model = self.model
        dev = model.device
        views = (False, True) if model.test.flip else (False,)
        regress = self.use_bbox_reg and model.bbox_reg is not None
        win = torch.from_numpy(np.ascontiguousarray(np.asarray(windows, dtype=np.float64).reshape(-1, 4))).to(dev)
        scores_sum, boxes_sum = None, None
        for flip in views:
            t = time.perf_counter()
            feats = self.extractor.features(item, windows, flip=flip).to(dev)
            self.timer.add("features", time.perf_counter() - t)
            t = time.perf_counter()
            scores = model.score_tensor(feats)
            if regress:
                if flip:
                    boxes = _flip_tensor(model.regress_tensor(feats, _flip_tensor(win, width)), width)
                else:
                    boxes = model.regress_tensor(feats, win)              # [N, K, 4]
            else:
                boxes = win.to(torch.float32)
            scores_sum = scores if scores_sum is None else scores_sum + scores
            boxes_sum = boxes if boxes_sum is None else boxes_sum + boxes
            self.timer.add("classify", time.perf_counter() - t)
        return scores_sum / len(views), boxes_sum / len(views)

    def detect_item(self, item: Any, windows: np.ndarray, width: int, height: int) -> Detections:
        """Detections of one image (a record or ``(image_id, path_or_array)``) from its windows.

        With :attr:`device_path` (on a GPU) everything after the conv5 maps runs on the device
        (:meth:`window_scores_tensor`, :func:`postprocess_tensor`) and the final detections
        come back in one transfer; otherwise the numpy path (:meth:`window_scores`, :func:`postprocess`).
        """
        test = self.model.test
        kw = dict(nms=test.nms, max_per_image=test.max_per_image, score_threshold=test.score_threshold,
                  box_voting=test.box_voting)
        if self.device_path:
            with torch.no_grad():
                scores_t, boxes_t = self.window_scores_tensor(item, windows, width)
                t = time.perf_counter()
                det = postprocess_tensor(scores_t, boxes_t, width, height, **kw)
            self.timer.add("nms", time.perf_counter() - t)
            return det
        scores, boxes = self.window_scores(item, windows, width)
        t = time.perf_counter()
        det = postprocess(scores, boxes, width, height, **kw)
        self.timer.add("nms", time.perf_counter() - t)
        return det

    def _prepare(self, task: tuple[Any, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """``(image, proposals or None)`` -> ``(RGB array, proposals, seconds per stage)``; thread-safe
        (it touches neither the model nor the timer).  Raises ImageDecodeError."""
        from .proposals import selective_search

        image, proposals = task
        seconds = {}
        t = time.perf_counter()
        array = load_image(image) if not isinstance(image, np.ndarray) else image
        seconds["load"] = time.perf_counter() - t
        if proposals is None:
            t = time.perf_counter()
            proposals = selective_search(array, self.preset, self.max_boxes)
            seconds["proposals"] = time.perf_counter() - t
        return array, proposals, seconds

    def _detect_array(self, image: Any, array: np.ndarray, proposals: np.ndarray,
                      seconds: dict[str, float]) -> dict[str, np.ndarray]:
        for stage, v in seconds.items():
            self.timer.add(stage, v)
        key = None if isinstance(image, np.ndarray) else str(image)
        self.timer.images += 1
        h, w = array.shape[:2]
        return self.detect_item((key, array), proposals, w, h).as_dict()

    def _stream(self, images: Iterable[Any], proposals: Iterable[np.ndarray | None] | None, *,
                threads: int | None, ahead: int | None):
        """``(image, (array, proposals, seconds) | None, error | None)`` in input order, the next
        images decoded (and proposed, when their proposals are not given) in background threads."""
        import itertools
        import os

        from .utils.prefetch import prefetch_map

        if threads:
            n = int(threads)
        else:   # at most LOADER_THREADS by default: each holds a decoded full-size image
            n = min(self.workers if self.workers > 0 else (os.cpu_count() or 1), LOADER_THREADS)
        n = max(1, n)
        props = proposals if proposals is not None else itertools.repeat(None)
        for (image, _), fut in prefetch_map(self._prepare, zip(images, props),
                                            ahead=ahead if ahead else n + 2, threads=n):
            try:
                yield image, fut.result(), None
            except ImageDecodeError as e:
                yield image, None, e

    # ----------------------------------------------------------------- public
    def __call__(self, image: str | Path | np.ndarray, proposals: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Detect objects in one image (a path or an RGB uint8 array [H, W, 3])."""
        return self._detect_array(image, *self._prepare((image, proposals)))

    def detect_many(self, images: Iterable[str | Path | np.ndarray], *,
                    proposals: Iterable[np.ndarray | None] | None = None, skip_bad_images: bool = False,
                    threads: int | None = None, ahead: int | None = None, show_progress: bool = False,
                    total: int | None = None):
        """Detect objects in many images, streaming: a generator of ``(image, detections)`` in input order.

        While one image is scored, the next are decoded and their selective-search proposals
        computed in background threads (OpenCV and decoding release the GIL); at most ``ahead``
        images wait decoded, so memory stays bounded however many images there are (``images``
        is consumed lazily).  The results equal ``[det(im) for im in images]``.

        Args:
            images: paths or RGB uint8 arrays [H, W, 3] (any iterable, also a generator).
            proposals: per image, its windows (ndarray[N, 4]) or None (computed); default: all computed.
            skip_bad_images: an image that cannot be decoded gives ``(image, ImageDecodeError)`` and
                the others go on (nothing is logged: the caller reports it); False: it raises.
            threads: loader threads (default: the detector's ``workers``, 0 there meaning all cores,
                at most :data:`LOADER_THREADS`).
            ahead: images prepared ahead (default ``threads + 2``).
            show_progress: a progress bar with images/s (``total``: its length, when known).

        Yields:
            ``(image, {"boxes", "scores", "labels"})`` as :meth:`__call__` returns, or
            ``(image, ImageDecodeError)`` (with ``skip_bad_images``).
        """
        if total is None and hasattr(images, "__len__"):
            total = len(images)  # type: ignore[arg-type]
        stream = self._stream(images, proposals, threads=threads, ahead=ahead)
        with progress(total=total, desc="detect", unit="img", disable=None if show_progress else True) as bar:
            done = 0
            try:
                for image, prepared, err in stream:
                    if err is not None:
                        if not skip_bad_images:
                            raise err
                        bar.update(1)
                        yield image, err
                        continue
                    out = self._detect_array(image, *prepared)
                    bar.update(1)
                    memory.every(done)
                    done += 1
                    yield image, out
            finally:
                stream.close()      # the images prefetched but not asked for are dropped

    def dataset_proposals(self, dataset: Dataset, *, workers: int | None = None,
                          skip_bad_images: bool | None = None, show_progress: bool = True):
        """The proposal store of a split (computed once, cached under ``cache_dir``; timed as ``proposals``).

        Collective under a process group (:func:`sppdet.proposals.compute_proposals` shards it).
        """
        from .proposals import compute_proposals

        skip = self.skip_bad_images if skip_bad_images is None else skip_bad_images
        t = time.perf_counter()
        store = compute_proposals(dataset, self.preset, self.max_boxes,
                                  workers=self.workers if workers is None else workers,
                                  cache_dir=self.cache_dir, skip_bad_images=skip, progress=show_progress)
        self.timer.add("proposals", time.perf_counter() - t)
        return store

    def detect_dataset(self, dataset: Dataset, *, workers: int | None = None,
                       skip_bad_images: bool | None = None, show_progress: bool = True,
                       proposals: Any = None) -> dict[str, Detections]:
        """Detections for every image of a split (proposals via the proposal store, conv maps cached).

        Args:
            proposals: the split's :class:`~sppdet.proposals.ProposalStore` (default:
                :meth:`dataset_proposals`).

        Returns:
            image id -> detections, in dataset order (images without proposals or that cannot
            be decoded, with ``skip_bad_images``, are left out).

        Under a process group (torchrun) this is collective: every rank calls it with the
        same split.  The proposals and the conv5 maps are computed sharded over the ranks
        (:func:`~sppdet.proposals.compute_proposals`, :meth:`FeatureExtractor.precompute`);
        rank ``r`` of ``W`` then detects on the images at positions ``r, r + W, ...`` of
        the split's images with proposals -- the ones whose maps it computed -- and the
        detections (at most ``test.max_per_image`` per image) are gathered on rank 0, which
        returns all of them, in dataset order, the same as one process returns; the other
        ranks return their own images' detections.  ``self.timer`` on rank 0 then holds
        the seconds and images of every rank.  An error on one rank is raised on all
        (:func:`~sppdet.utils.dist.raise_if_any`).
        """
        from .errors import SppdetError
        from .features.extractor import rank_thread_share
        from .utils import dist

        skip = self.skip_bad_images if skip_bad_images is None else skip_bad_images
        store = proposals if proposals is not None else self.dataset_proposals(
            dataset, workers=workers, skip_bad_images=skip, show_progress=show_progress)
        for rec in dataset.records:
            if rec.image_id not in store:
                # already reported once, as the proposal stage skipped it
                log.debug("%s: skipped (no proposals: the image could not be decoded)", rec.path)
        todo = [r for r in dataset.records if r.image_id in store]
        with rank_thread_share():   # this rank's share of the cores (no-op for one process)
            # conv5 maps of the whole split first: on the CPU several images at a time
            # (FeatureExtractor.precompute); the loop below then reads them from the cache
            t = time.perf_counter()
            for flip in ((False, True) if self.model.test.flip else (False,)):
                self.extractor.precompute(todo, flip=flip, progress=show_progress, skip_bad_images=skip)
            self.timer.add("features", time.perf_counter() - t)
            if dist.get_world_size() <= 1:
                return self._detect_records(todo, store, skip, show_progress)
            mine: dict[str, Detections] = {}
            err: BaseException | None = None
            try:   # the same positions precompute gave this rank: its maps are on its disk
                mine = self._detect_records(dist.shard(todo), store, skip, show_progress)
            except SppdetError as e:
                err = e
            dist.raise_if_any(err)
        return self._gather_detections(todo, mine)

    def _detect_records(self, records: list[ImageRecord], store: Any, skip: bool,
                        show_progress: bool) -> dict[str, Detections]:
        """Detections of ``records`` (all in ``store``), in their order, in this process."""
        out: dict[str, Detections] = {}
        for n, rec in enumerate(progress(records, desc="detect", unit="img",
                                         disable=None if show_progress else True)):
            memory.every(n)
            try:
                out[rec.image_id] = self.detect_item(rec, store[rec.image_id], rec.width, rec.height)
            except ImageDecodeError as e:
                if not skip:
                    raise
                log.warning("%s", e)
                continue
            self.timer.images += 1
        return out

    def _gather_detections(self, records: list[ImageRecord], mine: dict[str, Detections]) -> dict[str, Detections]:
        """Every rank's detections on rank 0, in the order of ``records``; this rank's own elsewhere.

        One ``gather_object`` of plain arrays (the detections themselves, at most
        ``test.max_per_image`` per image, and the ranks' timers); nothing else is kept.
        """
        from .utils import dist

        payload = ([(i, d.boxes, d.scores, d.labels) for i, d in mine.items()],
                   dict(self.timer.seconds), self.timer.images)
        parts = dist.gather_object(payload)
        if parts is None:
            return mine
        found: dict[str, Detections] = {}
        seconds: dict[str, float] = defaultdict(float)
        images = 0
        for items, secs, n in parts:
            found.update((i, Detections(b, s, lab)) for i, b, s, lab in items)
            for k, v in secs.items():
                seconds[k] += v
            images += n
        self.timer = Timer(seconds, images)
        return {r.image_id: found[r.image_id] for r in records if r.image_id in found}


def _flip_tensor(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """:func:`sppdet.boxes.flip_boxes` for a tensor of boxes ``[..., 4]`` (any device)."""
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1)


def detections_to_json(det: Detections | dict[str, Any], classes: list[str]) -> list[dict[str, Any]]:
    """Detections as a JSON-ready list of {"box": [x1, y1, x2, y2], "label", "class", "score"}."""
    d = det.as_dict() if isinstance(det, Detections) else det
    return [
        {"box": [round(float(v), 2) for v in b], "label": int(lab), "class": classes[int(lab)],
         "score": round(float(s), 5)}
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"])
    ]


def iter_image_paths(inputs: Iterable[str]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns into image paths."""
    import glob

    exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in exts and q.is_file())
        elif p.exists() or not glob.has_magic(item):
            out.append(p)       # a missing file is reported (and skipped) by the detection loop
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            out += [m for m in matches if m.is_file()]
    return out


def records_for_images(paths: list[Path]) -> tuple[Dataset, dict[Path, ImageDecodeError]]:
    """A ground-truth-free dataset of image files, and the files whose header cannot be read."""
    from .data.images import image_size

    recs, failed = [], {}
    for p in paths:
        try:
            w, h = image_size(p)
        except ImageDecodeError as e:
            failed[p] = e
            continue
        recs.append(ImageRecord(image_id=str(p.resolve()), path=p, width=w, height=h))
    ds = Dataset(name="images", split="detect", classes=[], records=recs)
    ds.name = "detect-" + ds.fingerprint()[:10]
    return ds, failed


#: The files ``detect --format coco`` writes into its output folder (results, image/category index).
COCO_RESULTS, COCO_INDEX = "coco_det.json", "coco_images.json"


def _cached_proposals(det: Detector, ds: Dataset):
    """The proposal store of a folder of images: its path, settings and the boxes it holds already."""
    from .proposals.store import default_store_path, image_key, load_if_valid, make_settings

    path = default_store_path(det.cache_dir, ds, det.preset.key(), det.max_boxes)
    settings = make_settings(det.preset, det.max_boxes, ds)
    keys = {r.image_id: image_key(r) for r in ds.records}
    store = load_if_valid(path, settings) if ds.records else None
    known = {}
    if store is not None:
        known = {i: store[i] for i in keys if i in store and store.key_of(i) == keys[i]}
    return path, settings, keys, known


def detect_images(det: Detector, paths: list[Path], out_dir: str | Path, *, threshold: float | None = None,
                  draw: bool = True, show_progress: bool = True, coco: bool = False):
    """Detect on image files, streaming; write ``<out>/<stem>.json`` (and ``<stem>.jpg`` drawn) for each.

    Images are decoded and their proposals computed in background threads while the previous
    one is scored (:meth:`Detector.detect_many`); proposals are cached in the proposal store of
    this set of files (reused by a rerun).  Yields ``(path, list_of_detection_dicts)`` per image,
    in input order, or ``(path, ImageDecodeError)`` once for an image that cannot be decoded
    (the rest go on; nothing else reports it).

    With ``coco``: also ``<out>/coco_det.json``, the kept detections as COCO results
    (``image_id`` = the image's 1-based position in ``paths``, ``category_id`` = label + 1,
    ``bbox = [x1, y1, x2 - x1, y2 - y1]``), and ``<out>/coco_images.json``, the index those ids
    refer to (images: id, file_name = the path as given, size; categories: id, name), which
    pycocotools loads as ``COCO`` (``loadRes`` then reads the results).

    Two inputs with the same stem (``a/x.jpg``, ``b/x.png``) get ``x``, ``x_1``, ...
    (never a name another input already has, nor the COCO files' names), each logged with
    the input it came from; every JSON names its input in ``"image"``.

    Raises:
        SppdetError: ``out_dir`` is the folder of one of the inputs (the drawn copies
            could replace them), checked before anything is written.
    """
    import json

    from .proposals.store import ProposalStore
    from .utils.io import atomic_write_text, refuse_output_over_inputs
    from .visualize import draw_detections, save_image

    out = Path(out_dir)
    refuse_output_over_inputs(out, paths)
    out.mkdir(parents=True, exist_ok=True)
    ds, failed = records_for_images(paths)
    store_path, settings, keys, known = _cached_proposals(det, ds)
    computed: dict[str, np.ndarray] = {}
    by_path = {r.path: r for r in ds.records}
    good = [p for p in paths if p not in failed]
    stream = det._stream(good, (known.get(by_path[p].image_id) for p in good), threads=None, ahead=None)
    names = _output_names(paths, reserved=(Path(COCO_RESULTS).stem, Path(COCO_INDEX).stem) if coco else ())
    coco_dets: dict[str, dict[str, np.ndarray]] = {}
    position = {p: n for n, p in reversed(list(enumerate(paths, 1)))}
    bar = progress(total=len(paths), desc="detect", unit="img", disable=None if show_progress else True)
    try:
        for p in paths:
            if p in failed:
                bar.update(1)
                yield p, failed[p]
                continue
            _, prepared, err = next(stream)
            bar.update(1)
            if err is not None:
                yield p, err
                continue
            rec = by_path[p]
            image, props, _ = prepared
            if rec.image_id not in known:
                computed[rec.image_id] = props
            d = det._detect_array(image, *prepared)    # an array: its conv5 maps are not cached
            memory.every(position[p] - 1)          # position: 1-based
            keep = d["scores"] >= threshold if threshold is not None else np.ones(len(d["scores"]), bool)
            d = {k: v[keep] for k, v in d.items()}
            if coco:
                coco_dets.setdefault(rec.image_id, d)
            items = detections_to_json(d, det.classes)
            stem = names[p]
            info = {"image": str(p), "width": int(image.shape[1]), "height": int(image.shape[0])}
            if stem != p.stem:
                info["output_name"] = stem
            head = json.dumps(info)
            body = ",\n  ".join(json.dumps(d) for d in items)
            atomic_write_text(out / f"{stem}.json",
                              head[:-1] + ', "detections": [' + (f"\n  {body}\n" if items else "") + "]}\n")
            if draw:
                save_image(draw_detections(image, d["boxes"], d["labels"], d["scores"], det.classes),
                           out / f"{stem}.jpg")
            yield p, items
        if coco:
            from .evaluation.coco import write_coco_results

            done = [r for r in ds.records if r.image_id in coco_dets]
            index = Dataset(name="images", split="detect", classes=list(det.classes), records=done,
                            coco_category_ids=list(range(1, len(det.classes) + 1)),
                            coco_image_ids={r.image_id: position[r.path] for r in done})
            write_coco_results(out, index, {r.image_id: coco_dets[r.image_id] for r in done},
                               results_name=COCO_RESULTS, index_name=COCO_INDEX, ground_truth=False)
    finally:
        bar.close()
        stream.close()
        if computed:    # what was computed is kept, also when the caller stops early
            ids, boxes, kk, idx, kk_ids = [], [], [], [], set()
            for n, r in enumerate(ds.records):
                b = computed.get(r.image_id, known.get(r.image_id))
                if b is not None and r.image_id not in kk_ids:
                    kk_ids.add(r.image_id)
                    ids.append(r.image_id)
                    boxes.append(b)
                    kk.append(keys[r.image_id])
                    idx.append(n)
            ProposalStore(ids, boxes, settings, image_keys=kk, indices=idx).save(store_path)


def _output_names(paths: list[Path], reserved: tuple[str, ...] = ()) -> dict[Path, str]:
    """Output stem of each input: its own stem, or ``<stem>_<n>`` when an earlier input has it.

    A renamed input is logged with the input that holds the name, and the new name is
    never one that another input's own stem gives (``a.jpg``, ``x/a.png``, ``a_1.jpg``
    become ``a``, ``a_2``, ``a_1``).
    """
    own = {p.stem.lower() for p in paths}
    taken: dict[str, str] = {r.lower(): "the COCO results files" for r in reserved}
    out: dict[Path, str] = {}
    for p in paths:
        if p in out:
            continue
        stem = p.stem
        if stem.lower() in taken:
            n = 1
            while f"{stem}_{n}".lower() in taken or f"{stem}_{n}".lower() in own:
                n += 1
            log.warning("%s: output name %s is taken by %s; writing this one's results as %s_%d",
                        p, stem, taken[stem.lower()], stem, n)
            stem = f"{stem}_{n}"
        taken[stem.lower()] = f"the input {p}"
        out[p] = stem
    return out
