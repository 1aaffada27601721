"""COCO-style metrics (AP@[.5:.95], AP50, AP75, APs, APm, APl) through pycocotools.

Ground truth is built in memory from the dataset's records: internal boxes
``(x1, y1, x2, y2)`` (0-based continuous) become COCO ``[x, y, w, h]`` with
``w = x2 - x1`` (COCO's continuous convention: no +1), difficult objects
(VOC) and crowd regions (COCO, read as ``difficult``) become ``iscrowd = 1``,
so a detection on one is ignored rather than counted as a false positive,
and ``area = w * h`` decides the small / medium / large ranges.  The
detections are handed to pycocotools as an in-memory result set (the same
fields ``COCO.loadRes`` would build), which also works when there are no
detections at all.  pycocotools' prints are captured and sent to this
module's logger at DEBUG level.

pycocotools keeps at most 100 detections per image and class (``maxDets``)
and interpolates precision at 101 recall points; those are COCO's rules, not
the VOC devkit's.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..data.records import Dataset
from .voc import ClassResult, EvalResult, ResultsError

log = logging.getLogger(__name__)

#: pycocotools' summary order (``COCOeval.stats[:6]``) -> our names.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@contextlib.contextmanager
def _quiet_pycocotools(what: str):
    """Capture pycocotools' stdout prints and log them at DEBUG level."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                log.debug("pycocotools %s: %s", what, line)


def _coco(images: list[dict], anns: list[dict], classes: Sequence[str]):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = {"images": images, "annotations": anns,
                 "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)]}
    with _quiet_pycocotools("index"):
        c.createIndex()
    return c


def coco_ground_truth(dataset: Dataset):
    """A pycocotools ``COCO`` object for the dataset's ground truth.

    Image ``i`` of the split (0-based) gets COCO id ``i + 1``; class ``k`` gets
    category id ``k + 1``.  Difficult objects -> ``iscrowd = 1``.
    """
    images, anns = [], []
    for i, r in enumerate(dataset.records, 1):
        images.append({"id": i, "width": int(r.width), "height": int(r.height), "file_name": r.path.name})
        for b, lab, diff in zip(r.boxes.astype(np.float64), r.labels, r.difficult):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(lab) + 1,
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h,
                         "iscrowd": int(bool(diff))})
    return _coco(images, anns, dataset.classes)


def _items(detections: Mapping[str, Any] | Iterable[tuple[str, Any]]):
    return detections.items() if isinstance(detections, Mapping) else detections


def _get(det: Any, key: str) -> np.ndarray:
    return np.asarray(det[key] if isinstance(det, Mapping) else getattr(det, key))


def voc_results_to_detections(per_class: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]],
                              classes: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Detections read from VOC results files -> per-image detections in internal coordinates.

    Args:
        per_class: class name -> (image ids, scores ndarray[D], boxes ndarray[D, 4]
            VOC 1-based), as :func:`sppdet.evaluation.voc.read_voc_results` returns.
        classes: the dataset's classes (label = index); every key of ``per_class``
            must be one of them.

    Returns:
        image id -> {"boxes": ndarray[N, 4] float64 internal 0-based continuous,
        "scores": ndarray[N] float64, "labels": ndarray[N] int64}, images in order
        of first appearance, detections in class then file order.
    """
    from ..boxes import voc_to_internal

    acc: dict[str, tuple[list, list, list]] = {}
    for c, (ids, scores, boxes) in per_class.items():
        k = list(classes).index(c)
        for iid, s, b in zip(ids, np.asarray(scores, dtype=np.float64).tolist(),
                             np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist()):
            d = acc.setdefault(iid, ([], [], []))
            d[0].append(voc_to_internal(*b))
            d[1].append(s)
            d[2].append(k)
    return {iid: {"boxes": np.asarray(b, dtype=np.float64).reshape(-1, 4),
                  "scores": np.asarray(s, dtype=np.float64), "labels": np.asarray(lab, dtype=np.int64)}
            for iid, (b, s, lab) in acc.items()}


def evaluate_coco(dataset: Dataset, detections: Mapping[str, Any] | Iterable[tuple[str, Any]],
                  classes: Sequence[str] | None = None) -> EvalResult:
    """COCO metrics of detections on a split.

    Args:
        dataset: the split (ground truth in internal coordinates).
        detections: image id -> detections of that image (or (image id, detections)
            pairs): a mapping or object with ``boxes`` (ndarray[N, 4] internal
            0-based continuous ``(x1, y1, x2, y2)``), ``scores`` (ndarray[N]) and
            ``labels`` (ndarray[N] int, indices into ``dataset.classes``).
        classes: the classes to report per-class AP for (default ``dataset.classes``).

    Returns:
        EvalResult with ``metric="coco"``; ``mAP`` = AP@[.5:.95] (pycocotools'
        ``stats[0]``, over ``classes``); ``ap`` = per-class AP@[.5:.95] (NaN for a class without
        non-crowd ground truth); ``extra`` = AP50, AP75, APs, APm, APl (pycocotools'
        -1, "no ground truth in that range", becomes NaN); ``per_class`` = each
        class's interpolated precision at IoU 0.5 over the 101 recall points,
        with its AP50 as ``ap`` (for the PR plots), and npos = non-crowd objects.
        ``to_json()`` gives ``{"metric": "coco", "mAP": ..., "ap": {...}, "npos": {...},
        "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ...}``.

    Raises:
        ResultsError: a detection in an image that is not in the split.
        ValueError: a label out of range.
    """
    from pycocotools.cocoeval import COCOeval

    classes = list(classes if classes is not None else dataset.classes)
    unknown = [c for c in classes if c not in dataset.classes]
    if unknown:
        raise ValueError(f"classes {unknown} are not classes of the dataset ({dataset.classes})")
    gt = coco_ground_truth(dataset)
    index = {r.image_id: i for i, r in enumerate(dataset.records, 1)}
    anns: list[dict] = []
    for image_id, det in _items(detections):
        if image_id not in index:
            raise ResultsError(f"detections: unrecognized image {image_id!r} (not in the split)")
        boxes = np.asarray(_get(det, "boxes"), dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(_get(det, "scores"), dtype=np.float64).reshape(-1)
        labels = np.asarray(_get(det, "labels")).reshape(-1).astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(dataset.classes)):
            raise ValueError(f"image {image_id}: label out of range 0..{len(dataset.classes) - 1}")
        for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            # the fields COCO.loadRes adds for a bbox result
            anns.append({"id": len(anns) + 1, "image_id": index[image_id], "category_id": lab + 1,
                         "bbox": [b[0], b[1], w, h], "area": w * h, "score": s, "iscrowd": 0,
                         "segmentation": [[b[0], b[1], b[0], b[3], b[2], b[3], b[2], b[1]]]})
    dt = _coco(gt.dataset["images"], anns, dataset.classes)
    ev = COCOeval(gt, dt, "bbox")
    cat_ids = sorted(dataset.classes.index(c) + 1 for c in classes)   # COCOeval sorts them too
    ev.params.catIds = cat_ids
    with _quiet_pycocotools("evaluate"):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float("nan") if s < 0 else float(s) for s in ev.stats[:6]]

    prec = ev.eval["precision"]                    # [T iou, R recall, K class, A area, M maxDets]
    a_all = list(ev.params.areaRngLbl).index("all")
    m_100 = list(ev.params.maxDets).index(100)
    rec_pts = np.asarray(ev.params.recThrs, dtype=np.float64)
    npos_all = {k: 0 for k in range(len(dataset.classes))}
    for r in dataset.records:
        for lab in r.labels[~r.difficult]:
            npos_all[int(lab)] += 1
    ap: dict[str, float] = {}
    per_class: dict[str, ClassResult] = {}
    for c in classes:
        k = dataset.classes.index(c)
        p = prec[:, :, cat_ids.index(k + 1), a_all, m_100]
        valid = p[p > -1]
        ap[c] = float(valid.mean()) if valid.size else float("nan")
        p50 = p[0].astype(np.float64)
        p50 = np.where(p50 > -1, p50, np.nan)
        ap50 = float(np.mean(p50)) if np.isfinite(p50).all() else float("nan")
        per_class[c] = ClassResult(ap50, rec_pts.copy(), p50, npos_all[k])
    return EvalResult("coco", stats[0], ap, per_class, dict(zip(STAT_NAMES[1:], stats[1:])),
                      curve="COCO interpolated precision at IoU 0.5 (101 recall points); AP shown is AP50")
