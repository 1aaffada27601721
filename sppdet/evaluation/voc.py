"""PASCAL VOC detection AP, exactly as the official MATLAB devkit computes it.

The reference is the devkit's MATLAB code: ``VOCevaldet.m`` (matching and the
VOC2007 11-point AP) and ``VOCap.m`` (VOC2010+: area under the monotone
precision envelope).  Where popular Python ports differ from it, this module
follows MATLAB, and says so:

* Overlap is computed on the 1-based inclusive coordinates of the results
  file, ``iw = min(x2) - max(x1) + 1`` (so is the union), and a detection
  matches when ``ov >= 0.5`` (MATLAB ``>=``; py-faster-rcnn's ``voc_eval.py``
  uses ``>``).
* Detections are ordered by MATLAB's ``sort(-confidence)``, which is stable:
  detections with equal scores keep the order of the results file (numpy's
  default ``argsort`` is not stable).
* The ground-truth box with the largest overlap decides, difficult ones
  included (``ov > ovmax`` keeps the first maximum): a detection whose best
  box is difficult is neither TP nor FP even if another box also overlaps.
  Already detected -> FP (duplicate).  No box with ``iw > 0 and ih > 0`` ->
  FP.
* ``rec = tp / npos`` and ``prec = tp / (tp + fp)`` with IEEE semantics
  (``npos == 0`` gives NaN/Inf recall; detections on difficult objects alone
  give 0/0 = NaN precision), and ``max`` ignores NaN as MATLAB's does.
* The eleven recall thresholds are the values of MATLAB's ``0:0.1:1``.
  MATLAB builds a colon vector ``a:d:b`` with ``n = 10`` steps symmetrically:
  elements ``k <= n/2`` are ``a + k*d`` and the others ``b' - (n-k)*d`` with
  ``b' = a + n*d``.  That gives 0.6 and 0.7 as ``1 - 0.4`` and ``1 - 0.3*``
  (the nearest doubles to 0.6 and 0.7), where ``numpy.arange(0, 1.1, 0.1)``
  gives 0.6000000000000001 and 0.7000000000000001: a recall of exactly 3/5
  or 7/10 counts at those thresholds in MATLAB and not in the numpy ports.
* A detection in an image that is not in the split is an error (the devkit's
  ``unrecognized image``).

Results files (DESIGN §3, the devkit's and evaluation server's format):
``comp4_det_<split>_<class>.txt``, one line per detection,
``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` in 1-based VOC
coordinates.  sppdet writes scores with ``%.6f`` and coordinates with
``%.2f``; :func:`evaluate_voc_results` scores exactly what is in the files,
so ``sppdet eval`` (which writes then reads them) and ``sppdet evaluate``
give identical numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..boxes import internal_to_voc
from ..data.records import Dataset
from ..errors import SppdetError
from ..utils.io import atomic_write_text

log = logging.getLogger(__name__)

METRICS = ("voc07", "voc12")


class ResultsError(SppdetError):
    """A results file or folder is missing or malformed (message names the file and line)."""


def matlab_colon(a: float, d: float, b: float) -> np.ndarray:
    """The vector MATLAB's ``a:d:b`` produces (for d > 0), element for element.

    MATLAB computes ``n = floor((b - a) / d)`` (with a relative tolerance so
    that ``0:0.1:1`` has 11 elements), then the first half of the elements as
    ``a + k*d`` and the second half as ``(a + n*d) - (n - k)*d``, so the
    vector is symmetric about its middle and ends exactly at ``a + n*d``.
    """
    q = (b - a) / d
    n = int(math.floor(q + 3 * np.finfo(float).eps * max(abs(q), 1.0)))
    k = np.arange(n + 1, dtype=np.float64)
    end = a + n * d
    first = a + k * d
    second = end - (n - k) * d
    return np.where(k <= n / 2, first, second)


#: MATLAB's ``0:0.1:1`` (VOCevaldet.m's eleven recall thresholds).
ELEVEN_POINTS = matlab_colon(0.0, 0.1, 1.0)


def _matlab_max(values: np.ndarray) -> float:
    """MATLAB ``max`` of a vector: NaNs ignored, NaN if all are NaN, [] -> None."""
    if values.size == 0:
        return None  # type: ignore[return-value]
    if np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmax(values))


def voc_ap(rec: np.ndarray, prec: np.ndarray, metric: str = "voc07") -> float:
    """Average precision from cumulative recall/precision (ndarray[D] each, detection order).

    ``voc07``: VOCevaldet.m's 11-point interpolated AP (thresholds from MATLAB's
    ``0:0.1:1``).  ``voc12``: VOCap.m's area under the monotone precision envelope.
    """
    rec = np.asarray(rec, dtype=np.float64).reshape(-1)
    prec = np.asarray(prec, dtype=np.float64).reshape(-1)
    if metric == "voc07":
        ap = 0.0
        for t in ELEVEN_POINTS:
            p = _matlab_max(prec[rec >= t])
            if p is None:
                p = 0.0
            ap = ap + p / 11
        return float(ap)
    if metric == "voc12":
        mrec = np.concatenate([[0.0], rec, [1.0]])
        mpre = np.concatenate([[0.0], prec, [0.0]])
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = np.fmax(mpre[i], mpre[i + 1])     # MATLAB max(a, b) ignores a NaN operand
        i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
        return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))
    raise ValueError(f"unknown VOC metric {metric!r} (expected one of {METRICS})")


@dataclass
class ClassResult:
    """AP of one class with its PR curve (cumulative, in detection order)."""

    ap: float
    rec: np.ndarray
    prec: np.ndarray
    npos: int
    tp: np.ndarray
    fp: np.ndarray


def eval_class(image_ids: Sequence[str], scores: np.ndarray, boxes_voc: np.ndarray,
               gt: Mapping[str, tuple[np.ndarray, np.ndarray]], *, metric: str = "voc07",
               min_overlap: float = 0.5, source: str = "detections") -> ClassResult:
    """VOCevaldet.m for one class.

    Args:
        image_ids: image of each detection, in results-file order.
        scores (ndarray[D]): confidences.
        boxes_voc (ndarray[D, 4]): detections in 1-based inclusive VOC coordinates
            (as written in the results file).
        gt: image id -> (boxes ndarray[G, 4] in 1-based inclusive VOC coordinates,
            difficult ndarray[G] bool) for EVERY image of the split (empty arrays
            where the class is absent).
        metric: ``voc07`` or ``voc12``.
        min_overlap: VOCopts.minoverlap (0.5).
        source: named in the error for an unknown image id.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    bb_all = np.asarray(boxes_voc, dtype=np.float64).reshape(-1, 4)
    nd = len(scores)
    npos = int(sum(int((~np.asarray(d, bool)).sum()) for _, d in gt.values()))
    order = np.argsort(-scores, kind="stable")     # MATLAB's sort is stable
    detected = {k: np.zeros(len(v[0]), dtype=bool) for k, v in gt.items()}
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d, j in enumerate(order):
        iid = image_ids[j]
        if iid not in gt:
            raise ResultsError(f"{source}: unrecognized image {iid!r} (not in the split)")
        g_boxes, g_diff = gt[iid]
        bb = bb_all[j]
        if len(g_boxes):
            g = np.asarray(g_boxes, dtype=np.float64)
            iw = np.minimum(bb[2], g[:, 2]) - np.maximum(bb[0], g[:, 0]) + 1
            ih = np.minimum(bb[3], g[:, 3]) - np.maximum(bb[1], g[:, 1]) + 1
            ok = (iw > 0) & (ih > 0)
            ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                  + (g[:, 2] - g[:, 0] + 1) * (g[:, 3] - g[:, 1] + 1) - iw * ih)
            with np.errstate(divide="ignore", invalid="ignore"):
                ov = np.where(ok, iw * ih / ua, -np.inf)
            # MATLAB: `if ov > ovmax` over j = 1..G from ovmax = -inf keeps the first maximum;
            # a NaN overlap (0/0 on degenerate boxes) never beats ovmax.
            ovmax, jmax = -np.inf, -1
            for k in np.flatnonzero(ok):
                if ov[k] > ovmax:
                    ovmax, jmax = ov[k], k
        else:
            ovmax, jmax = -np.inf, -1
        if ovmax >= min_overlap:
            if not g_diff[jmax]:
                if not detected[iid][jmax]:
                    tp[d] = 1
                    detected[iid][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp / npos if npos else tp / np.float64(0.0)
        prec = tp / (fp + tp)
    return ClassResult(voc_ap(rec, prec, metric), rec, prec, npos, tp, fp)


@dataclass
class EvalResult:
    """Scores of a split: mAP and per-class AP (ordered as the classes)."""

    metric: str
    mAP: float
    ap: dict[str, float]
    per_class: dict[str, ClassResult] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def npos(self) -> dict[str, int]:
        return {c: r.npos for c, r in self.per_class.items()}

    def to_json(self) -> dict:
        def clean(v: float):
            return None if v is None or not math.isfinite(v) else float(v)

        out = {"metric": self.metric, "mAP": clean(self.mAP), "ap": {c: clean(a) for c, a in self.ap.items()}}
        if self.per_class:
            out["npos"] = self.npos
        out.update({k: clean(v) for k, v in self.extra.items()})
        return out


def ground_truth(dataset: Dataset, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ground truth of class ``k`` per image in VOC 1-based inclusive coordinates (exact integers
    for VOC data, since boxes were read as ``xmin - 1``)."""
    out = {}
    for r in dataset.records:
        m = r.labels == k
        out[r.image_id] = (internal_to_voc(r.boxes[m].astype(np.float64)), r.difficult[m].copy())
    return out


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return float(np.mean(vals)) if vals else float("nan")


def evaluate_detections(dataset: Dataset, per_class: Mapping[str, tuple[list[str], np.ndarray, np.ndarray]],
                        metric: str = "voc07", *, classes: Sequence[str] | None = None,
                        min_overlap: float = 0.5, sources: Mapping[str, str] | None = None) -> EvalResult:
    """AP of every class from detections in VOC coordinates.

    Args:
        per_class: class name -> (image ids, scores ndarray[D], boxes ndarray[D, 4] VOC 1-based).
        classes: the classes to score (default: ``dataset.classes``); mAP is their mean.
    """
    if metric not in METRICS:
        raise SppdetError(f"--metric {metric}: expected one of {', '.join(METRICS)} (or coco)")
    classes = list(classes or dataset.classes)
    results: dict[str, ClassResult] = {}
    for k, c in enumerate(classes):
        ids, scores, boxes = per_class.get(c, ([], np.zeros(0), np.zeros((0, 4))))
        gt = ground_truth(dataset, dataset.classes.index(c) if c in dataset.classes else k)
        results[c] = eval_class(ids, scores, boxes, gt, metric=metric, min_overlap=min_overlap,
                                source=(sources or {}).get(c, f"detections of {c}"))
    # Classes without (non-difficult) ground truth in the split have no defined AP (the devkit's
    # number is then computed from NaN/Inf recall; it stays in per_class[c].ap): they are
    # reported as NaN and left out of the mean, as COCO does for absent categories.
    ap = {c: (r.ap if r.npos > 0 else float("nan")) for c, r in results.items()}
    return EvalResult(metric, _mean(a for c, a in ap.items() if results[c].npos > 0), ap, results)


class VOCEvaluator:
    """The evaluator protocol (detectron2 style): ``reset`` / ``process`` / ``evaluate``.

    Detections are converted to VOC coordinates as they would be written to
    a results file (no rounding), and kept per class in processing order.
    """

    def __init__(self, dataset: Dataset, metric: str = "voc07", iou: float = 0.5) -> None:
        self.dataset = dataset
        self.metric = metric
        self.iou = iou
        self.reset()

    def reset(self) -> None:
        self._dets: dict[int, list[tuple[str, float, np.ndarray]]] = {k: [] for k in range(len(self.dataset.classes))}

    def process(self, image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add one image's detections: boxes (ndarray[N, 4], internal coords), scores [N], labels [N]."""
        vb = internal_to_voc(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
        for b, s, lab in zip(vb, np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)):
            self._dets[int(lab)].append((image_id, float(s), b))

    def evaluate(self) -> EvalResult:
        per_class = {}
        for k, c in enumerate(self.dataset.classes):
            d = self._dets[k]
            per_class[c] = ([x[0] for x in d], np.array([x[1] for x in d], dtype=np.float64),
                            np.array([x[2] for x in d], dtype=np.float64).reshape(-1, 4))
        return evaluate_detections(self.dataset, per_class, self.metric, min_overlap=self.iou)


# ---------------------------------------------------------------------------
# Results files


def results_file(results_dir: str | Path, split: str, cls: str) -> Path:
    return Path(results_dir) / f"comp4_det_{split}_{cls}.txt"


def write_voc_results(out_dir: str | Path, split: str, classes: Sequence[str],
                      detections: Mapping[str, Mapping[str, np.ndarray]] | Iterable) -> list[Path]:
    """Write ``comp4_det_<split>_<class>.txt`` for every class (empty files included), atomically.

    Args:
        detections: image id -> {"boxes": ndarray[N, 4] internal coords, "scores": [N],
            "labels": [N]} (or an object with those attributes), in image order.
            Lines are written per image in that order, by decreasing score within an image.

    Returns:
        the files written, in class order.
    """
    items = detections.items() if isinstance(detections, Mapping) else detections
    lines: dict[int, list[str]] = {k: [] for k in range(len(classes))}
    for image_id, det in items:
        get = (lambda key: det[key]) if isinstance(det, Mapping) else (lambda key: getattr(det, key))
        boxes = internal_to_voc(np.asarray(get("boxes"), dtype=np.float64).reshape(-1, 4))
        scores = np.asarray(get("scores"), dtype=np.float64).reshape(-1)
        labels = np.asarray(get("labels")).reshape(-1)
        for j in np.argsort(-scores, kind="stable"):
            b = boxes[j]
            lines[int(labels[j])].append(
                f"{image_id} {scores[j]:.6f} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}")
    out = []
    for k, c in enumerate(classes):
        f = results_file(out_dir, split, c)
        atomic_write_text(f, "".join(line + "\n" for line in lines[k]))
        out.append(f)
    return out


def read_results_file(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Parse one results file -> (image ids, scores ndarray[D], boxes ndarray[D, 4] VOC coords)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{path}: results file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: cannot read results file ({e})") from None
    ids: list[str] = []
    vals: list[list[float]] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise ResultsError(f"{path}:{n}: expected '<image_id> <score> <xmin> <ymin> <xmax> <ymax>', "
                               f"got {len(parts)} fields")
        try:
            v = [float(x) for x in parts[1:]]
        except ValueError:
            raise ResultsError(f"{path}:{n}: non-numeric score or coordinate in {line.strip()!r}") from None
        if not all(math.isfinite(x) for x in v[1:]):
            raise ResultsError(f"{path}:{n}: non-finite coordinate in {line.strip()!r}")
        ids.append(parts[0])
        vals.append(v)
    arr = np.array(vals, dtype=np.float64).reshape(-1, 5)
    return ids, arr[:, 0].copy(), arr[:, 1:].copy()


def read_voc_results(results_dir: str | Path, split: str, classes: Sequence[str], *,
                     allow_missing: bool = False) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Read every class's results file -> class -> (ids, scores, VOC boxes)."""
    d = Path(results_dir)
    if not d.is_dir():
        raise ResultsError(f"{d}: results folder not found")
    out = {}
    missing = []
    for c in classes:
        f = results_file(d, split, c)
        if not f.is_file():
            missing.append(f.name)
            out[c] = ([], np.zeros(0), np.zeros((0, 4)))
            continue
        out[c] = read_results_file(f)
    if missing and not allow_missing:
        if len(missing) == len(classes):
            raise ResultsError(f"{d}: no results files comp4_det_{split}_<class>.txt for split {split!r}")
        raise ResultsError(f"{d}: missing results file(s) {', '.join(missing[:3])}"
                           + (" ..." if len(missing) > 3 else ""))
    return out


def evaluate_voc_results(dataset: Dataset, results_dir: str | Path, metric: str = "voc07", *,
                         classes: Sequence[str] | None = None, allow_missing: bool = False) -> EvalResult:
    """Score the results files in ``results_dir`` against ``dataset`` (voc07 / voc12)."""
    classes = list(classes or dataset.classes)
    dets = read_voc_results(results_dir, dataset.split, classes, allow_missing=allow_missing)
    sources = {c: str(results_file(results_dir, dataset.split, c)) for c in classes}
    return evaluate_detections(dataset, dets, metric, classes=classes, sources=sources)


def format_ap_table(result: EvalResult, classes: Sequence[str] | None = None) -> str:
    """A per-class AP table with the mean, as printed by ``sppdet evaluate`` / ``sppdet eval``."""
    classes = list(classes or result.ap.keys())
    width = max([len(c) for c in classes] + [5])
    name = {"voc07": "AP (VOC07 11-point)", "voc12": "AP (VOC12 area)"}.get(result.metric, f"AP ({result.metric})")
    lines = [f"{'class':<{width}}  {name:>20}  {'objects':>7}"]
    lines.append("-" * len(lines[0]))
    npos = result.npos
    for c in classes:
        a = result.ap.get(c, float("nan"))
        shown = f"{a:>20.4f}" if math.isfinite(a) else f"{'-':>20}"
        lines.append(f"{c:<{width}}  {shown}  {npos.get(c, ''):>7}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'mAP':<{width}}  {result.mAP:>20.4f}")
    if any(not math.isfinite(result.ap.get(c, float("nan"))) for c in classes):
        lines.append("(-: no ground-truth objects of that class in the split; not in the mean)")
    for k, v in result.extra.items():
        lines.append(f"{k:<{width}}  {v:>20.4f}")
    return "\n".join(lines)
