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

**Ids** (:func:`coco_ids`, the same for the ground truth scored here and for the
results files other tools read): data read from a COCO instances file keeps
that file's own image ids and category ids; any other data (VOC, synthetic, a
folder of images) numbers its images 1, 2, ... in split order and its classes
``label + 1``.  :func:`write_coco_results` writes the results
(``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, what
``COCO.loadRes`` reads) and an index beside them: a COCO instances file with
the ``images`` (id, ``file_name``, size, and sppdet's own id as
``sppdet_image_id``), the ``categories`` (id, name) and, where there is ground
truth, the ``annotations`` scored here, so other tools can join the ids back
to files and class names and evaluate with pycocotools directly.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
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


def _coco(images: list[dict], anns: list[dict], categories: list[dict]):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = {"images": images, "annotations": anns, "categories": categories}
    with _quiet_pycocotools("index"):
        c.createIndex()
    return c


def coco_ids(dataset: Dataset) -> tuple[dict[str, Any], list[Any]]:
    """The COCO ids of a split: ``(record image id -> COCO image id, category id of each class)``.

    Data read by :func:`sppdet.data.coco.load_coco` keeps its instances file's ids (a class
    the file has no category for got the next free id there).  Any other data: image ``i``
    of the split (0-based) is ``i + 1``, class ``k`` is ``k + 1``.
    """
    img, cat = dataset.coco_image_ids, dataset.coco_category_ids
    if img is not None and cat is not None and len(cat) == len(dataset.classes) \
            and all(r.image_id in img for r in dataset.records):
        return {r.image_id: img[r.image_id] for r in dataset.records}, list(cat)
    return ({r.image_id: i for i, r in enumerate(dataset.records, 1)},
            list(range(1, len(dataset.classes) + 1)))


def _file_name(path: Path, root: Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def coco_index(dataset: Dataset, *, ground_truth: bool = True) -> dict[str, Any]:
    """The split as a COCO instances dict with :func:`coco_ids`' ids.

    ``images``: ``id``, ``file_name`` (relative to ``dataset.root``; the path as given when the
    dataset has no root), ``width``, ``height``, ``sppdet_image_id``; ``categories``: ``id``,
    ``name``; ``annotations``: the ground truth (``bbox = [x1, y1, x2 - x1, y2 - y1]`` of the
    internal boxes, ``area = w * h``, difficult -> ``iscrowd = 1``), or ``[]`` with
    ``ground_truth=False``.
    """
    ids, cats = coco_ids(dataset)
    images, anns = [], []
    for r in dataset.records:
        i = ids[r.image_id]
        images.append({"id": i, "width": int(r.width), "height": int(r.height),
                       "file_name": _file_name(r.path, dataset.root), "sppdet_image_id": r.image_id})
        if not ground_truth:
            continue
        for b, lab, diff in zip(r.boxes.astype(np.float64), r.labels, r.difficult):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cats[int(lab)],
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h,
                         "iscrowd": int(bool(diff))})
    return {"info": {"description": f"{dataset.name} {dataset.split} (written by sppdet)",
                     "bbox": "[x, y, w, h] = [x1, y1, x2 - x1, y2 - y1] of sppdet's 0-based continuous "
                             "pixel boxes (COCO's convention, no +1)"},
            "images": images, "annotations": anns,
            "categories": [{"id": cats[k], "name": name} for k, name in enumerate(dataset.classes)]}


def coco_ground_truth(dataset: Dataset):
    """A pycocotools ``COCO`` object for the dataset's ground truth (:func:`coco_index`).

    Ids: :func:`coco_ids`.  Difficult objects -> ``iscrowd = 1``.
    """
    d = coco_index(dataset)
    return _coco(d["images"], d["annotations"], d["categories"])


def coco_results(dataset: Dataset, detections: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[dict]:
    """Detections as a COCO results list (what ``COCO.loadRes`` reads), ids by :func:`coco_ids`.

    Args:
        dataset: the images the detections belong to (ids, classes).
        detections: image id -> detections (or pairs, in image order): ``boxes`` (ndarray[N, 4]
            internal 0-based continuous), ``scores``, ``labels`` (indices into ``dataset.classes``).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` per image in the given
        order, by decreasing score within an image.  The boxes are the very values the VOC
        results files hold (:func:`sppdet.evaluation.voc.write_voc_results`: two decimals),
        converted back: ``[x1, y1, x2 - x1, y2 - y1]``; the score is the same float.

    Raises:
        ResultsError: a detection in an image that is not in ``dataset``.
        ValueError: a label out of range, a non-finite box or a NaN score.
    """
    from .voc import _unpack, as_written

    ids, cats = coco_ids(dataset)
    out: list[dict] = []
    for image_id, det in _items(detections):
        if image_id not in ids:
            raise ResultsError(f"detections: unrecognized image {image_id!r} (not in the split)")
        vb, sc, lab = _unpack(image_id, det, len(dataset.classes))
        vb = as_written(vb)
        for j in np.argsort(-sc, kind="stable"):
            x1, y1, x2, y2 = float(vb[j, 0]) - 1.0, float(vb[j, 1]) - 1.0, float(vb[j, 2]), float(vb[j, 3])
            out.append({"image_id": ids[image_id], "category_id": cats[int(lab[j])],
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": float(sc[j])})
    return out


def write_coco_results(out_dir: str | Path, dataset: Dataset,
                       detections: Mapping[str, Any] | Iterable[tuple[str, Any]], *,
                       results_name: str, index_name: str, ground_truth: bool = True) -> tuple[Path, Path]:
    """Write :func:`coco_results` and :func:`coco_index` as two JSON files in ``out_dir`` (atomically).

    Load them with ``gt = COCO(index); dt = gt.loadRes(results)``.

    Returns:
        ``(results file, index file)``.
    """
    import json

    from ..utils.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = coco_results(dataset, detections)
    res_path, idx_path = out / results_name, out / index_name
    body = ",\n ".join(json.dumps(d) for d in results)
    atomic_write_text(res_path, "[" + body + "]\n")
    atomic_write_text(idx_path, json.dumps(coco_index(dataset, ground_truth=ground_truth)) + "\n")
    log.debug("wrote %d COCO results to %s (index %s)", len(results), res_path, idx_path)
    return res_path, idx_path


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
    index, cats = coco_ids(dataset)
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
            anns.append({"id": len(anns) + 1, "image_id": index[image_id], "category_id": cats[lab],
                         "bbox": [b[0], b[1], w, h], "area": w * h, "score": s, "iscrowd": 0,
                         "segmentation": [[b[0], b[1], b[0], b[3], b[2], b[3], b[2], b[1]]]})
    dt = _coco(gt.dataset["images"], anns, gt.dataset["categories"])
    ev = COCOeval(gt, dt, "bbox")
    cat_ids = sorted(cats[dataset.classes.index(c)] for c in classes)   # COCOeval sorts them too
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
        p = prec[:, :, cat_ids.index(cats[k]), a_all, m_100]
        valid = p[p > -1]
        ap[c] = float(valid.mean()) if valid.size else float("nan")
        p50 = p[0].astype(np.float64)
        p50 = np.where(p50 > -1, p50, np.nan)
        ap50 = float(np.mean(p50)) if np.isfinite(p50).all() else float("nan")
        per_class[c] = ClassResult(ap50, rec_pts.copy(), p50, npos_all[k])
    return EvalResult("coco", stats[0], ap, per_class, dict(zip(STAT_NAMES[1:], stats[1:])),
                      curve="COCO interpolated precision at IoU 0.5 (101 recall points); AP shown is AP50")
