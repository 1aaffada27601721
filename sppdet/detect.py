"""The detector at test time: proposals -> features -> SVM scores -> box regression -> NMS.

>>> det = Detector.from_checkpoint("sppdet-demo/run/model.pt", device="auto")
>>> out = det("image.jpg")          # or an RGB uint8 array [H, W, 3]
>>> out["boxes"], out["scores"], out["labels"]   # [M,4] original pixels, [M], [M]

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

from .boxes import batched_nms, box_iou, clip_boxes, flip_boxes, valid_boxes
from .data.images import load_image
from .data.records import Dataset, ImageRecord
from .errors import ImageDecodeError
from .features import FeatureExtractor
from .models.detector import SPPDetector
from .proposals.presets import Preset
from .utils.progress import progress

log = logging.getLogger(__name__)

#: Per class, the best this many windows go into NMS (the rest cannot reach the top 100).
PRE_NMS_TOP = 300


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

    def detect_item(self, item: Any, windows: np.ndarray, width: int, height: int) -> Detections:
        """Detections of one image (a record or ``(image_id, path_or_array)``) from its windows."""
        scores, boxes = self.window_scores(item, windows, width)
        t = time.perf_counter()
        test = self.model.test
        det = postprocess(scores, boxes, width, height, nms=test.nms, max_per_image=test.max_per_image,
                          score_threshold=test.score_threshold, box_voting=test.box_voting)
        self.timer.add("nms", time.perf_counter() - t)
        return det

    # ----------------------------------------------------------------- public
    def __call__(self, image: str | Path | np.ndarray, proposals: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Detect objects in one image (a path or an RGB uint8 array [H, W, 3])."""
        from .proposals import selective_search

        t = time.perf_counter()
        array = load_image(image) if not isinstance(image, np.ndarray) else image
        h, w = array.shape[:2]
        self.timer.add("load", time.perf_counter() - t)
        if proposals is None:
            t = time.perf_counter()
            proposals = selective_search(array, self.preset, self.max_boxes)
            self.timer.add("proposals", time.perf_counter() - t)
        key = None if isinstance(image, np.ndarray) else str(image)
        self.timer.images += 1
        return self.detect_item((key, array), proposals, w, h).as_dict()

    def detect_dataset(self, dataset: Dataset, *, workers: int | None = None,
                       skip_bad_images: bool | None = None, show_progress: bool = True) -> dict[str, Detections]:
        """Detections for every image of a split (proposals via the proposal store, conv maps cached)."""
        from .proposals import compute_proposals

        skip = self.skip_bad_images if skip_bad_images is None else skip_bad_images
        t = time.perf_counter()
        store = compute_proposals(dataset, self.preset, self.max_boxes,
                                  workers=self.workers if workers is None else workers,
                                  cache_dir=self.cache_dir, skip_bad_images=skip, progress=show_progress)
        self.timer.add("proposals", time.perf_counter() - t)
        # conv5 maps of the whole split first: on the CPU several images at a time
        # (FeatureExtractor.precompute); the loop below then reads them from the cache
        t = time.perf_counter()
        todo = [r for r in dataset.records if r.image_id in store]
        try:
            for flip in ((False, True) if self.model.test.flip else (False,)):
                self.extractor.precompute(todo, flip=flip, progress=show_progress)
        except ImageDecodeError as e:
            if not skip:
                raise
            log.debug("conv5 precompute stopped at %s; the rest is computed image by image", e)
        self.timer.add("features", time.perf_counter() - t)
        out: dict[str, Detections] = {}
        for rec in progress(dataset.records, desc="detect", unit="img", disable=None if show_progress else True):
            if rec.image_id not in store:
                # already reported once, as the proposal stage skipped it
                log.debug("%s: skipped (no proposals: the image could not be decoded)", rec.path)
                continue
            boxes = store[rec.image_id]
            try:
                out[rec.image_id] = self.detect_item(rec, boxes, rec.width, rec.height)
            except ImageDecodeError as e:
                if not skip:
                    raise
                log.warning("%s", e)
                continue
            self.timer.images += 1
        return out


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


def detect_images(det: Detector, paths: list[Path], out_dir: str | Path, *, threshold: float | None = None,
                  draw: bool = True, show_progress: bool = True):
    """Detect on image files; write ``<out>/<stem>.json`` (and ``<stem>.jpg`` drawn) for each.

    Proposals for all images are computed first, in parallel, through the proposal
    store.  Yields ``(path, list_of_detection_dicts)`` per image, in input order, or
    ``(path, ImageDecodeError)`` for an image that cannot be decoded (the rest go on;
    each such image is reported once, by that error).

    Two inputs with the same stem (``a/x.jpg``, ``b/x.png``) get ``x``, ``x_1``, ...
    (never a name another input already has), each logged with the input it came
    from; every JSON names its input in ``"image"``.

    Raises:
        SppdetError: ``out_dir`` is the folder of one of the inputs (the drawn copies
            could replace them), checked before anything is written.
    """
    import json

    from .proposals import compute_proposals
    from .utils.io import atomic_write_text, refuse_output_over_inputs
    from .visualize import draw_detections, save_image

    out = Path(out_dir)
    refuse_output_over_inputs(out, paths)
    out.mkdir(parents=True, exist_ok=True)
    ds, failed = records_for_images(paths)
    by_path = {r.path: r for r in ds.records}
    store = None
    if ds.records:
        by_id = {r.image_id: r.path for r in ds.records}
        store = compute_proposals(ds, det.preset, det.max_boxes, workers=det.workers,
                                  cache_dir=det.cache_dir, skip_bad_images=True, progress=show_progress,
                                  on_skip=lambda image_id, msg: failed.__setitem__(by_id[image_id],
                                                                                   ImageDecodeError(msg)))
    names = _output_names(paths)
    for p in paths:
        if p in failed:
            yield p, failed[p]
            continue
        rec = by_path[p]
        try:
            image = load_image(p)
        except ImageDecodeError as e:
            yield p, e
            continue
        props = store[rec.image_id] if store is not None and rec.image_id in store else None
        d = det(image, proposals=props)
        keep = d["scores"] >= threshold if threshold is not None else np.ones(len(d["scores"]), bool)
        d = {k: v[keep] for k, v in d.items()}
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


def _output_names(paths: list[Path]) -> dict[Path, str]:
    """Output stem of each input: its own stem, or ``<stem>_<n>`` when an earlier input has it.

    A renamed input is logged with the input that holds the name, and the new name is
    never one that another input's own stem gives (``a.jpg``, ``x/a.png``, ``a_1.jpg``
    become ``a``, ``a_2``, ``a_1``).
    """
    own = {p.stem.lower() for p in paths}
    taken: dict[str, Path] = {}
    out: dict[Path, str] = {}
    for p in paths:
        if p in out:
            continue
        stem = p.stem
        if stem.lower() in taken:
            n = 1
            while f"{stem}_{n}".lower() in taken or f"{stem}_{n}".lower() in own:
                n += 1
            log.warning("%s: output name %s is taken by the input %s; writing this one's results as %s_%d",
                        p, stem, taken[stem.lower()], stem, n)
            stem = f"{stem}_{n}"
        taken[stem.lower()] = p
        out[p] = stem
    return out
