"""COCO-style metrics (AP@[.5:.95], AP50, AP75, APs/APm/APl) through pycocotools.

Ground truth is built in memory from the dataset's records: boxes
``(x1, y1, x2, y2)`` (continuous) become COCO ``[x, y, w, h]``, difficult
objects (VOC) or crowd regions (COCO) become ``iscrowd = 1`` (matched
detections on them are ignored), areas are box areas.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Mapping, Sequence

import numpy as np

from ..data.records import Dataset
from .voc import EvalResult

log = logging.getLogger(__name__)

#: pycocotools' summary order -> our names.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_gt(dataset: Dataset):
    from pycocotools.coco import COCO

    images, anns = [], []
    aid = 1
    for i, r in enumerate(dataset.records, 1):
        images.append({"id": i, "width": int(r.width), "height": int(r.height), "file_name": str(r.path.name)})
        for b, lab, diff in zip(r.boxes.astype(np.float64), r.labels, r.difficult):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": aid, "image_id": i, "category_id": int(lab) + 1, "bbox": [float(b[0]), float(b[1]), w, h],
                         "area": w * h, "iscrowd": int(bool(diff))})
            aid += 1
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": k + 1, "name": c} for k, c in enumerate(dataset.classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def evaluate_coco(dataset: Dataset, detections: Mapping[str, Mapping[str, np.ndarray]] | Sequence,
                  classes: Sequence[str] | None = None) -> EvalResult:
    """COCO metrics of detections.

    Args:
        detections: image id -> {"boxes" ndarray[N, 4] internal coords, "scores" [N], "labels" [N]}
            (or objects with those attributes).
        classes: report per-class AP (AP@[.5:.95]) for these (default: dataset.classes).

    Returns:
        EvalResult with ``metric="coco"``, ``mAP`` = AP@[.5:.95], per-class AP@[.5:.95] in ``ap``
        and AP50, AP75, APs, APm, APl in ``extra`` (-1 from pycocotools becomes NaN).
    """
    from pycocotools.cocoeval import COCOeval

    classes = list(classes or dataset.classes)
    gt = _coco_gt(dataset)
    index = {r.image_id: i for i, r in enumerate(dataset.records, 1)}
    items = detections.items() if isinstance(detections, Mapping) else detections
    results = []
    for image_id, det in items:
        if image_id not in index:
            from .voc import ResultsError

            raise ResultsError(f"detections: unrecognized image {image_id!r} (not in the split)")
        get = (lambda k: det[k]) if isinstance(det, Mapping) else (lambda k: getattr(det, k))
        boxes = np.asarray(get("boxes"), dtype=np.float64).reshape(-1, 4)
        for b, s, lab in zip(boxes, np.asarray(get("scores")).reshape(-1), np.asarray(get("labels")).reshape(-1)):
            results.append({"image_id": index[image_id], "category_id": int(lab) + 1,
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                            "score": float(s)})
    nan = float("nan")
    if not results:
        stats = np.full(12, -1.0)
        per_class = {c: nan for c in classes}
    else:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for line in buf.getvalue().splitlines():
            log.debug("pycocotools: %s", line)
        stats = ev.stats
        prec = ev.eval["precision"]          # [T, R, K, A, M]
        per_class = {}
        for c in classes:
            k = dataset.classes.index(c)
            p = prec[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[c] = float(p.mean()) if p.size else nan
    vals = [nan if s < 0 else float(s) for s in stats[:6]]
    extra = dict(zip(STAT_NAMES[1:], vals[1:]))
    return EvalResult("coco", vals[0], per_class, {}, extra)
