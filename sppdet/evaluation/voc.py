"""PASCAL VOC detection AP, exactly as the official MATLAB devkit computes it.

The reference is the devkit's MATLAB code: ``VOCevaldet.m`` (matching, and
the VOC2007 11-point AP) and ``VOCap.m`` (VOC2010+: area under the monotone
precision envelope).  Where popular Python ports (py-faster-rcnn's
``voc_eval.py`` and its many descendants) differ from it, this module follows
MATLAB:

* **Overlap** is computed on the 1-based inclusive coordinates as written to
  the results file (internal boxes go through
  :func:`sppdet.boxes.internal_to_voc` and the file's number format, see
  below): ``iw = min(x2) - max(x1) + 1``, ``ih`` likewise, only boxes with
  ``iw > 0 and ih > 0`` are considered, ``ua = area(det) + area(gt) - iw*ih``
  with inclusive areas, ``ov = iw*ih / ua``.  (On exact numbers this equals
  the continuous IoU of the internal boxes; the devkit's float operations are
  reproduced anyway.)
* A detection **matches** when ``ov >= 0.5`` (MATLAB ``ovmax >= minoverlap``;
  py-faster-rcnn uses ``ovmax > ovthresh``, so an overlap of exactly 0.5 is a
  TP here and an FP there).
* **Detection order** is MATLAB's ``[~, si] = sort(-confidence)``.  MATLAB's
  sort is stable: equal scores keep the order of the results file.
  ``numpy.argsort`` defaults to an unstable quicksort, so ports that use it
  order ties arbitrarily; here ``kind="stable"``.
* **Assignment**: the ground-truth box of the class with the largest overlap
  decides, difficult boxes included (``if ov > ovmax`` over the boxes in
  annotation order keeps the *first* maximum).  Best box difficult -> the
  detection is neither TP nor FP; best box already detected -> FP
  (duplicate); otherwise TP.  No box with ``ov >= 0.5`` -> FP.
* ``npos`` counts the non-difficult ground truth; ``rec = tp / npos``,
  ``prec = tp ./ (fp + tp)`` with IEEE semantics: ``npos == 0`` gives NaN
  recall, detections that only hit difficult objects give 0/0 = NaN precision,
  and ``max`` ignores NaN (all-NaN -> NaN) as MATLAB's does.
* **VOC2007 AP**: ``for t = 0:0.1:1, p = max(prec(rec >= t)); if isempty(p),
  p = 0; end; ap = ap + p/11; end``, with ``t`` the values MATLAB's colon
  operator produces (:func:`matlab_colon`): ``0.6`` and ``0.7`` are the
  doubles nearest 0.6 and 0.7, whereas ``numpy.arange(0, 1.1, 0.1)`` (the
  ports) has 0.6000000000000001 and 0.7000000000000001, so a recall of
  exactly 3/5 or 7/10 reaches the threshold in MATLAB and not in the ports.
  (``0.3`` is ``3*0.1 = 0.30000000000000004`` in both.)  The sum is
  accumulated in MATLAB's order, so a perfect class scores
  ``1.0000000000000002`` (eleven times ``+ 1/11``), as in MATLAB.
* **VOC2010+ AP** (``VOCap.m``): ``mrec = [0; rec; 1]``, ``mpre = [0; prec; 0]``,
  backwards ``mpre(i) = max(mpre(i), mpre(i+1))`` (NaN-ignoring), then the sum
  of ``(mrec(i) - mrec(i-1)) * mpre(i)`` over the points where recall changes.
* A detection in an image that is not in the split is an error (the devkit's
  ``unrecognized image``).

The mean over classes (``EvalResult.mAP``) leaves out classes that have no
non-difficult ground truth in the split (their devkit AP is computed from NaN
recall, is meaningless, and would make the mean NaN on small splits); their
devkit number stays in ``EvalResult.per_class[c].ap`` and ``EvalResult.ap[c]``
is NaN.  Every class that has such ground truth is in the mean with the devkit's
number, which is NaN in one case: voc07 when every detection of the class hit a
difficult object (all precisions 0/0); the mean is then NaN too, with a warning.
For perfect detections the devkit's 11-point sum ``ap = ap + p/11`` ends at
1.0000000000000002 (eleven additions of the double 1/11), not 1.0; so does this
module, and so does the mean.

Results files (DESIGN §3, the devkit's and evaluation server's format):
``comp4_det_<split>_<class>.txt``, one line per detection,
``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` in 1-based VOC
coordinates.  sppdet writes the score as the shortest decimal that reads back
as the same float64 (Python's ``repr``), so the ranking -- ties included --
survives the file exactly, and the coordinates with two decimals (``%.2f``;
0.01 px is far below anything that matters for a 0.5 overlap).
:class:`VOCEvaluator` scores boxes rounded the same way (:func:`as_written`),
so scoring in memory and scoring the written files give identical AP.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..boxes import internal_to_voc
from ..data.records import Dataset
from ..errors import SppdetError
from ..utils.io import atomic_write_text

log = logging.getLogger(__name__)

#: The VOC metrics: ``voc07`` (VOCevaldet.m of VOC2007, 11-point) and ``voc12`` (VOCap.m, area).
METRICS = ("voc07", "voc12")

#: Decimals of the coordinates in results files written by sppdet.
COORD_DECIMALS = 2


class ResultsError(SppdetError):
    """A results file or folder is missing or malformed (message names the file and line)."""


# ---------------------------------------------------------------------------
# MATLAB arithmetic


def matlab_colon(a: float, d: float, b: float) -> np.ndarray:
    """The row vector MATLAB's colon operator ``a:d:b`` produces, element for element.

    MATLAB does not add ``d`` repeatedly.  Its algorithm (MathWorks technical
    solution 1-4FLI96, "How does the COLON operator work?", and its reference
    M-file ``colonop.m``, which matches the built-in):

    1. ``tol = 2*eps*max(|a|, |b|)``; the number of steps is
       ``n = round((b - a)/d)``, minus one if ``sign(d)*(a + n*d - b) > tol``
       (for integer ``a`` and ``d``: ``floor(b) - a`` when ``d == 1``, else
       ``floor((b - r)/d) - q`` with ``q = floor(a/d)``, ``r = a - q*d``).
    2. The right end is ``c = a + n*d``, replaced by ``b`` itself when
       ``sign(d)*(c - b) > -tol``.
    3. For ``k = 0..floor(n/2)``: ``v(1+k) = a + k*d`` (first half, from the
       left end) and ``v(n+1-k) = c - k*d`` (second half, from the right end).
       When ``n`` is even the middle element is ``(a + c)/2``.

    So ``0:0.1:1`` is ``[0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5,
    1-0.4, 1-0.30000000000000004, 1-0.2, 1-0.1, 1]``, whose elements 7 and 8
    are exactly the doubles nearest 0.6 and 0.7 (``numpy.arange`` gives
    ``6*0.1 = 0.6000000000000001`` and ``7*0.1 = 0.7000000000000001``).

    Returns:
        ndarray[n+1] float64 (empty when the range is empty).
    """
    a, d, b = float(a), float(d), float(b)
    if not (math.isfinite(a) and math.isfinite(d) and math.isfinite(b)):
        return np.array([np.nan])
    if d == 0 or (a < b and d < 0) or (b < a and d > 0):
        return np.zeros(0)
    eps = np.finfo(np.float64).eps
    tol = 2.0 * eps * max(abs(a), abs(b))
    sig = math.copysign(1.0, d)
    if a == math.floor(a) and d == 1:                        # consecutive integers
        n = int(math.floor(b) - a)
    elif a == math.floor(a) and d == math.floor(d):          # integers with spacing > 1
        q = math.floor(a / d)
        n = int(math.floor((b - (a - q * d)) / d) - q)
    else:                                                    # general case
        q = (b - a) / d
        n = int(math.copysign(math.floor(abs(q) + 0.5), q))  # MATLAB round: halves away from zero
        if sig * (a + n * d - b) > tol:
            n -= 1
    c = a + n * d
    if sig * (c - b) > -tol:
        c = b
    v = np.zeros(n + 1)
    for k in range(n // 2 + 1):
        v[k] = a + k * d
        v[n - k] = c - k * d
    if n % 2 == 0:
        v[n // 2] = (a + c) / 2
    return v


#: MATLAB's ``0:0.1:1``: VOCevaldet.m's eleven recall thresholds (VOC2007).
ELEVEN_POINTS = matlab_colon(0.0, 0.1, 1.0)


def _matlab_max(values: np.ndarray) -> float | None:
    """MATLAB ``max`` of a vector: NaNs ignored, NaN when all are NaN, ``None`` for ``[]``."""
    if values.size == 0:
        return None
    if np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmax(values))


def voc_ap(rec: np.ndarray, prec: np.ndarray, metric: str = "voc07") -> float:
    """Average precision from the cumulative recall and precision of one class.

    Args:
        rec (ndarray[D]): recall after each detection, in ranking order (may be NaN).
        prec (ndarray[D]): precision after each detection (may be NaN).
        metric: ``"voc07"``: VOCevaldet.m's 11-point interpolated AP with the
            thresholds of MATLAB's ``0:0.1:1``; ``"voc12"``: VOCap.m, the area
            under the monotone (NaN-ignoring) precision envelope.

    Returns:
        the devkit's AP (NaN where MATLAB's would be NaN).
    """
    rec = np.asarray(rec, dtype=np.float64).reshape(-1)
    prec = np.asarray(prec, dtype=np.float64).reshape(-1)
    if metric == "voc07":
        ap = 0.0
        for t in ELEVEN_POINTS:
            with np.errstate(invalid="ignore"):
                p = _matlab_max(prec[rec >= t])     # NaN recall never passes (IEEE comparison)
            ap = ap + (0.0 if p is None else p) / 11
        return float(ap)
    if metric == "voc12":
        mrec = np.concatenate([[0.0], rec, [1.0]])
        mpre = np.concatenate([[0.0], prec, [0.0]])
        # for i = numel(mpre)-1:-1:1, mpre(i) = max(mpre(i), mpre(i+1)): a sequential backwards
        # NaN-ignoring max, which is exactly fmax.accumulate over the reversed vector.
        mpre = np.fmax.accumulate(mpre[::-1])[::-1]
        i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1      # NaN ~= x is true, as in MATLAB
        terms = (mrec[i] - mrec[i - 1]) * mpre[i]
        # MATLAB's sum adds left to right; np.sum adds pairwise (last-bit differences): cumsum is sequential
        return float(np.cumsum(terms)[-1]) if terms.size else 0.0
    raise ValueError(f"unknown VOC metric {metric!r} (expected one of {METRICS})")


# ---------------------------------------------------------------------------
# Matching one class (VOCevaldet.m)


@dataclass
class ClassResult:
    """The devkit's output for one class.

    Attributes:
        ap: the devkit's AP (NaN/0 when ``npos == 0``, as MATLAB computes it).
        rec, prec (ndarray[D] float64): cumulative recall / precision after each
            detection, in ranking order.
        npos: number of non-difficult ground-truth objects.
        tp, fp (ndarray[D] float64): cumulative true / false positives.
    """

    ap: float
    rec: np.ndarray
    prec: np.ndarray
    npos: int
    tp: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fp: np.ndarray = field(default_factory=lambda: np.zeros(0))


#: Ground truth of one class: image id -> (boxes ndarray[G, 4] VOC 1-based inclusive, difficult ndarray[G] bool).
ClassGT = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _best_overlaps(bb: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VOCevaldet.m's inner loop, vectorised over detections of one image.

    Args:
        bb (ndarray[D, 4]): detections, VOC 1-based inclusive.
        g (ndarray[G, 4]): ground truth of the class in the same image, G >= 1.

    Returns:
        (ovmax ndarray[D], jmax ndarray[D]): best overlap (-inf when no box has
        ``iw > 0 and ih > 0``) and the index of the FIRST box reaching it
        (MATLAB's ``if ov > ovmax`` scan).  Same float operations, in the same
        order, as the MATLAB code, so the overlaps are bit-identical.
    """
    b = bb[:, None, :]
    q = g[None, :, :]
    iw = np.minimum(b[..., 2], q[..., 2]) - np.maximum(b[..., 0], q[..., 0]) + 1
    ih = np.minimum(b[..., 3], q[..., 3]) - np.maximum(b[..., 1], q[..., 1]) + 1
    ok = (iw > 0) & (ih > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ua = ((b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
              + (q[..., 2] - q[..., 0] + 1) * (q[..., 3] - q[..., 1] + 1) - iw * ih)
        ov = iw * ih / ua
    # a NaN overlap never satisfies `ov > ovmax`; -inf never beats the initial ovmax = -inf
    ov = np.where(ok & ~np.isnan(ov), ov, -np.inf)
    jmax = np.argmax(ov, axis=1)                 # first maximum, as the strict `>` scan
    return ov[np.arange(len(bb)), jmax], jmax


def eval_class(image_ids: Sequence[str], scores: np.ndarray, boxes_voc: np.ndarray, gt: ClassGT, *,
               metric: str = "voc07", min_overlap: float = 0.5, source: str = "detections",
               lines: Sequence[int] | None = None) -> ClassResult:
    """VOCevaldet.m for one class (see the module docstring for the rules).

    Args:
        image_ids: the image of each detection, in results-file order.
        scores (ndarray[D]): confidences (finite or +-inf; NaN is rejected).
        boxes_voc (ndarray[D, 4]): detections in 1-based inclusive VOC coordinates,
            as written in the results file.
        gt: image id -> (boxes ndarray[G, 4] in VOC 1-based inclusive coordinates,
            difficult ndarray[G] bool) for EVERY image of the split (empty arrays
            where the class is absent).
        metric: ``"voc07"`` or ``"voc12"``.
        min_overlap: VOCopts.minoverlap (0.5); a match needs ``ov >= min_overlap``.
        source: named in errors (the results file).
        lines: the results-file line of each detection (named in errors).

    Raises:
        ResultsError: a detection in an image that is not in the split, or a NaN score.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes_voc, dtype=np.float64).reshape(-1, 4)
    nd = len(scores)
    if len(image_ids) != nd or len(boxes) != nd:
        raise ValueError(f"{source}: {len(image_ids)} image ids, {nd} scores, {len(boxes)} boxes")
    for j, iid in enumerate(image_ids):
        if iid not in gt:
            where = f"{source}:{lines[j]}" if lines is not None else source
            raise ResultsError(f"{where}: unrecognized image {iid!r} (not in the split)")
    if np.isnan(scores).any():
        j = int(np.flatnonzero(np.isnan(scores))[0])
        where = f"{source}:{lines[j]}" if lines is not None else source
        raise ResultsError(f"{where}: score is NaN")

    npos = 0
    for g_boxes, g_diff in gt.values():
        npos += int(np.count_nonzero(~np.asarray(g_diff, dtype=bool)))

    # [sc, si] = sort(-confidence): MATLAB's sort is stable (ties keep file order)
    order = np.argsort(-scores, kind="stable")
    ids_sorted = [image_ids[j] for j in order]
    bb = boxes[order]

    # Overlaps do not depend on which boxes are already detected: compute them per image at once.
    ovmax = np.full(nd, -np.inf)
    jmax = np.zeros(nd, dtype=np.int64)
    per_image: dict[str, list[int]] = {}
    for d, iid in enumerate(ids_sorted):
        per_image.setdefault(iid, []).append(d)
    for iid, idx in per_image.items():
        g_boxes = np.asarray(gt[iid][0], dtype=np.float64).reshape(-1, 4)
        if len(g_boxes):
            ia = np.asarray(idx)
            ovmax[ia], jmax[ia] = _best_overlaps(bb[ia], g_boxes)

    # The sequential part: true positive / don't care / false positive, in ranking order.
    detected = {iid: [False] * len(gt[iid][0]) for iid in per_image}
    difficult = {iid: np.asarray(gt[iid][1], dtype=bool).tolist() for iid in per_image}
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    hit = (ovmax >= min_overlap).tolist()
    jl = jmax.tolist()
    for d, iid in enumerate(ids_sorted):
        if hit[d]:
            j = jl[d]
            if not difficult[iid][j]:
                if not detected[iid][j]:
                    tp[d] = 1                   # true positive
                    detected[iid][j] = True
                else:
                    fp[d] = 1                   # false positive (multiple detection)
        else:
            fp[d] = 1                           # false positive
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp / np.float64(npos)
        prec = tp / (fp + tp)
    return ClassResult(voc_ap(rec, prec, metric), rec, prec, npos, tp, fp)


# ---------------------------------------------------------------------------
# A split's result


@dataclass
class EvalResult:
    """Scores of a split.

    Attributes:
        metric: ``"voc07"``, ``"voc12"`` or ``"coco"``.
        mAP: mean of ``ap`` over the classes with non-difficult ground truth (NaN if one of
            them has a NaN devkit AP, see ``_mean_ap``).
        ap: class -> AP, in class order (NaN for a class without non-difficult
            ground truth in the split).
        per_class: class -> :class:`ClassResult` (PR curve, npos, devkit AP).
        extra: further figures (COCO: AP50, AP75, APs, APm, APl).
        curve: what ``per_class`` curves are (for plots).
    """

    metric: str
    mAP: float
    ap: dict[str, float]
    per_class: dict[str, ClassResult] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    curve: str = ""

    @property
    def npos(self) -> dict[str, int]:
        """class -> number of non-difficult ground-truth objects."""
        return {c: r.npos for c, r in self.per_class.items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: metric, mAP, ap, npos, extra figures (NaN -> null)."""
        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        out: dict[str, Any] = {"metric": self.metric, "mAP": clean(self.mAP),
                               "ap": {c: clean(a) for c, a in self.ap.items()}}
        if self.per_class:
            out["npos"] = self.npos
        out.update({k: clean(v) for k, v in self.extra.items()})
        return out


def ground_truth(dataset: Dataset, label: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ground truth of one class for every image of the split, in VOC coordinates.

    Args:
        label: the class index in ``dataset.classes`` (``None``: a class with no
            ground truth: every image gets empty arrays).

    Returns:
        image id -> (boxes ndarray[G, 4] float64 VOC 1-based inclusive -- exact
        integers for VOC data, read as ``xmin - 1`` --, difficult ndarray[G] bool),
        objects in annotation order.

    Raises:
        ResultsError: the split lists an image id twice (the devkit's "multiple image").
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for r in dataset.records:
        if r.image_id in out:
            raise ResultsError(f"split {dataset.split!r} of {dataset.root or dataset.name}: "
                               f"image {r.image_id!r} listed twice")
        m = (r.labels == label) if label is not None else np.zeros(len(r.labels), dtype=bool)
        out[r.image_id] = (internal_to_voc(r.boxes[m]), r.difficult[m].astype(bool))
    return out


def _mean_ap(ap: Mapping[str, float], results: Mapping[str, ClassResult]) -> float:
    """Mean AP over the classes with non-difficult ground truth (NaN when there are none).

    Such a class is always in the mean, with the devkit's number.  That number is NaN in one
    case only: voc07 when every detection of the class hit a difficult object (no TP, no FP:
    all precisions are 0/0 and MATLAB's ``max`` of all-NaN is NaN).  The mean is then NaN,
    as MATLAB's ``mean`` of the APs would be; it is not silently taken over fewer classes.
    """
    have = [c for c, r in results.items() if r.npos > 0]
    bad = [c for c in have if math.isnan(ap[c])]
    if bad:
        log.warning("AP of %s is NaN, as the devkit computes it (every detection hit a difficult object); "
                    "the mean AP is NaN", ", ".join(bad))
    return float(np.mean([ap[c] for c in have])) if have else float("nan")






def evaluate_detections(dataset: Dataset, per_class: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]],
                        metric: str = "voc07", *, classes: Sequence[str] | None = None,
                        min_overlap: float = 0.5, sources: Mapping[str, str] | None = None,
                        lines: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
    """AP of every class from detections in VOC coordinates.

    Args:
        dataset: the split (ground truth in internal coordinates).
        per_class: class name -> (image ids, scores ndarray[D], boxes ndarray[D, 4]
            VOC 1-based inclusive, in results-file order).  A class that is
            missing has no detections.
        metric: ``"voc07"`` or ``"voc12"``.
        classes: the classes to score (default ``dataset.classes``); a class not
            in ``dataset.classes`` has no ground truth.
        sources, lines: per class, the file and line numbers (for error messages).

    Returns:
        EvalResult; ``mAP`` averages the classes that have non-difficult ground truth.
    """
    if metric not in METRICS:
        raise SppdetError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    classes = list(classes if classes is not None else dataset.classes)
    results: dict[str, ClassResult] = {}
    for c in classes:
        ids, scores, boxes = per_class.get(c, ([], np.zeros(0), np.zeros((0, 4))))
        label = dataset.classes.index(c) if c in dataset.classes else None
        results[c] = eval_class(list(ids), scores, boxes, ground_truth(dataset, label), metric=metric,
                                min_overlap=min_overlap, source=(sources or {}).get(c, f"detections of {c}"),
                                lines=(lines or {}).get(c))
    ap = {c: (r.ap if r.npos > 0 else float("nan")) for c, r in results.items()}
    curve = {"voc07": f"VOC07 11-point AP, IoU >= {min_overlap:g}",
             "voc12": f"VOC12 area AP, IoU >= {min_overlap:g}"}[metric]
    return EvalResult(metric, _mean_ap(ap, results), ap, results, curve=curve)


# ---------------------------------------------------------------------------
# What a results file holds


def format_score(score: float) -> str:
    """A score as written to a results file: the shortest decimal that reads back as the same float64."""
    return repr(float(score))


def as_written(boxes_voc: np.ndarray) -> np.ndarray:
    """VOC boxes (ndarray[N, 4]) rounded exactly as :func:`write_voc_results` writes them (``%.2f``).

    Uses the same formatting as the writer and parses it back, so the result is
    bit-identical to what :func:`read_voc_results` returns for the written file.
    """
    b = np.asarray(boxes_voc, dtype=np.float64).reshape(-1, 4)
    if b.size == 0:
        return b.copy()
    return np.char.mod(f"%.{COORD_DECIMALS}f", b).astype(np.float64)


def _get(det: Any, key: str) -> np.ndarray:
    return np.asarray(det[key] if isinstance(det, Mapping) else getattr(det, key))


def _check_image_id(image_id: str) -> str:
    image_id = str(image_id)
    if not image_id or any(ch.isspace() for ch in image_id):
        raise ValueError(f"image id {image_id!r} cannot be written to a results file (empty or has whitespace)")
    return image_id


def _unpack(image_id: str, det: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(VOC boxes [N,4], scores [N], labels [N]) of one image's detections, validated."""
    boxes = np.asarray(_get(det, "boxes"), dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(_get(det, "scores"), dtype=np.float64).reshape(-1)
    labels = np.asarray(_get(det, "labels")).reshape(-1).astype(np.int64)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"image {image_id}: label out of range 0..{num_classes - 1}")
    if not np.isfinite(boxes).all() or np.isnan(scores).any():
        raise ValueError(f"image {image_id}: non-finite box or NaN score")
    return internal_to_voc(boxes), scores, labels


class VOCEvaluator:
    """The evaluator protocol (detectron2 style): ``reset()``, ``process(...)`` per image, ``evaluate()``.

    Detections are kept per class in processing order and scored as if they
    had been written to results files by :func:`write_voc_results` in that
    order and read back: same ranking (scores are exact), boxes rounded as
    written (:func:`as_written`).  So ``VOCEvaluator`` and
    :func:`evaluate_voc_results` give identical AP.
    """

    def __init__(self, dataset: Dataset, metric: str = "voc07", iou: float = 0.5) -> None:
        """
        Args:
            dataset: the split to score against (its ``classes`` give the labels' meaning).
            metric: ``"voc07"`` (11-point) or ``"voc12"`` (area).
            iou: minimum overlap for a match (the devkit's 0.5).
        """
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
        self.dataset = dataset
        self.metric = metric
        self.iou = float(iou)
        self._ids = {r.image_id for r in dataset.records}
        self.reset()

    def reset(self) -> None:
        """Forget every processed detection."""
        k = len(self.dataset.classes)
        self._img: list[list[str]] = [[] for _ in range(k)]
        self._scores: list[list[np.ndarray]] = [[] for _ in range(k)]
        self._boxes: list[list[np.ndarray]] = [[] for _ in range(k)]

    def process(self, image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add one image's detections.

        Args:
            image_id: an image of the split.
            boxes (ndarray[N, 4]): ``(x1, y1, x2, y2)`` internal 0-based continuous coordinates.
            scores (ndarray[N]): confidences (higher is better).
            labels (ndarray[N] int): 0-based indices into ``dataset.classes``.

        Raises:
            ResultsError: ``image_id`` is not in the split.
            ValueError: mismatched lengths, a label out of range, a non-finite box or a NaN score.
        """
        image_id = _check_image_id(image_id)
        if image_id not in self._ids:
            raise ResultsError(f"detections: unrecognized image {image_id!r} (not in the split)")
        vb, sc, lab = _unpack(image_id, {"boxes": boxes, "scores": scores, "labels": labels},
                              len(self.dataset.classes))
        vb = as_written(vb)
        for k in np.unique(lab):
            m = lab == k
            self._img[k].extend([image_id] * int(m.sum()))
            self._scores[k].append(sc[m])
            self._boxes[k].append(vb[m])

    def evaluate(self) -> EvalResult:
        """AP of every class of the dataset over everything processed since the last ``reset``."""
        per_class = {}
        for k, c in enumerate(self.dataset.classes):
            sc = np.concatenate(self._scores[k]) if self._scores[k] else np.zeros(0)
            bx = np.concatenate(self._boxes[k]) if self._boxes[k] else np.zeros((0, 4))
            per_class[c] = (self._img[k], sc, bx)
        return evaluate_detections(self.dataset, per_class, self.metric, min_overlap=self.iou)


# ---------------------------------------------------------------------------
# Results files


def results_file(results_dir: str | Path, split: str, cls: str) -> Path:
    """``<results_dir>/comp4_det_<split>_<cls>.txt``."""
    return Path(results_dir) / f"comp4_det_{split}_{cls}.txt"


def write_voc_results(out_dir: str | Path, split: str, classes: Sequence[str],
                      detections: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[Path]:
    """Write ``comp4_det_<split>_<class>.txt`` for every class (empty when none), each atomically.

    Args:
        out_dir: the folder (created if needed).
        split: the split name in the file names.
        classes: class names; label ``k`` goes to the file of ``classes[k]``.
        detections: image id -> detections of that image, or (image id, detections)
            pairs, in image order.  Detections are a mapping or an object with
            ``boxes`` (ndarray[N, 4], internal 0-based continuous ``(x1, y1, x2, y2)``),
            ``scores`` (ndarray[N]) and ``labels`` (ndarray[N] int).

    Lines are ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>``: VOC 1-based
    coordinates (:func:`sppdet.boxes.internal_to_voc`) with two decimals, the score
    as the shortest exact decimal; per image in the given order, by decreasing
    score within an image (stable).

    Returns:
        the files written, in class order.

    Raises:
        ValueError: an image id with whitespace, a label out of range, a
            non-finite box or a NaN score (a detector bug, not user input).
    """
    items = detections.items() if isinstance(detections, Mapping) else detections
    lines: list[list[str]] = [[] for _ in classes]
    fmt = f"{{}} {{}} {{:.{COORD_DECIMALS}f}} {{:.{COORD_DECIMALS}f}} {{:.{COORD_DECIMALS}f}} {{:.{COORD_DECIMALS}f}}"
    for image_id, det in items:
        image_id = _check_image_id(image_id)
        vb, sc, lab = _unpack(image_id, det, len(classes))
        for j in np.argsort(-sc, kind="stable"):
            b = vb[j]
            lines[int(lab[j])].append(fmt.format(image_id, format_score(sc[j]), b[0], b[1], b[2], b[3]))
    out = []
    for k, c in enumerate(classes):
        f = results_file(out_dir, split, c)
        atomic_write_text(f, "".join(line + "\n" for line in lines[k]))
        out.append(f)
    log.debug("wrote %d results files (%d detections) to %s", len(out), sum(map(len, lines)), out_dir)
    return out


def read_results_file(path: str | Path, *, image_ids: Iterable[str] | None = None,
                      with_lines: bool = False):
    """Parse one results file.

    Args:
        path: a ``comp4_det_<split>_<class>.txt`` file.
        image_ids: when given, the split's image ids: an id outside them is an
            error naming the file and line (the devkit's "unrecognized image").
        with_lines: also return the line number of each detection.

    Returns:
        (image ids list[str], scores ndarray[D] float64, boxes ndarray[D, 4] float64
        VOC 1-based as written) [, line numbers list[int]], in file order.

    Raises:
        ResultsError: missing/unreadable file, a line without exactly 6 fields,
            a non-numeric value, a NaN or infinite score, a non-finite coordinate, an unknown image.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")      # a byte-order mark at the start is dropped
    except FileNotFoundError:
        raise ResultsError(f"{path}: results file not found") from None
    except IsADirectoryError:
        raise ResultsError(f"{path}: is a folder, expected a results file") from None
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read results file ({e.strerror or e})") from None
    known = set(image_ids) if image_ids is not None else None
    ids: list[str] = []
    vals: list[list[float]] = []
    nums: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise ResultsError(f"{path}:{n}: expected '<image_id> <score> <xmin> <ymin> <xmax> <ymax>', "
                               f"got {len(parts)} field{'s' if len(parts) != 1 else ''}: {line.strip()[:80]!r}")
        try:
            v = [float(x) for x in parts[1:]]
        except ValueError:
            raise ResultsError(f"{path}:{n}: non-numeric score or coordinate in {line.strip()[:80]!r}") from None
        if math.isnan(v[0]):
            raise ResultsError(f"{path}:{n}: score is NaN")
        if not math.isfinite(v[0]):
            raise ResultsError(f"{path}:{n}: score is infinite ({parts[1]!r}); scores must be finite numbers")
        if not all(math.isfinite(x) for x in v[1:]):
            raise ResultsError(f"{path}:{n}: non-finite coordinate in {line.strip()[:80]!r}")
        if known is not None and parts[0] not in known:
            raise ResultsError(f"{path}:{n}: unrecognized image {parts[0]!r} (not in the split)")
        ids.append(parts[0])
        vals.append(v)
        nums.append(n)
    arr = np.array(vals, dtype=np.float64).reshape(-1, 5)
    out = (ids, arr[:, 0].copy(), arr[:, 1:].copy())
    return (*out, nums) if with_lines else out


def _check_results_dir(results_dir: str | Path) -> Path:
    d = Path(results_dir)
    if not d.exists():
        raise ResultsError(f"{d}: results folder not found")
    if not d.is_dir():
        raise ResultsError(f"{d}: not a folder (--results expects the folder holding comp4_det_*.txt files)")
    return d


def read_voc_results(results_dir: str | Path, split: str, classes: Sequence[str], *,
                     allow_missing: bool = False, image_ids: Iterable[str] | None = None
                     ) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Read the results file of every class.

    Args:
        results_dir: the folder with ``comp4_det_<split>_<class>.txt``.
        split, classes: which files.
        allow_missing: a missing file means no detections (default: an error).
        image_ids: the split's image ids (an unknown id is an error naming file and line).

    Returns:
        class -> (image ids, scores ndarray[D], boxes ndarray[D, 4] VOC 1-based), file order.

    Raises:
        ResultsError: missing folder or file, malformed line, unknown image.
    """
    return {c: v[:3] for c, v in _read_all(results_dir, split, classes, allow_missing, image_ids).items()}


def _read_all(results_dir, split, classes, allow_missing, image_ids):
    d = _check_results_dir(results_dir)
    ids = list(image_ids) if image_ids is not None else None
    missing = [c for c in classes if not results_file(d, split, c).is_file()]
    if missing and not allow_missing:
        if len(missing) == len(classes):
            found = sorted(p.name for p in d.glob("comp4_det_*.txt"))[:3]
            hint = f" (found {', '.join(found)}{' ...' if len(found) == 3 else ''})" if found else ""
            raise ResultsError(f"{d}: no results files comp4_det_{split}_<class>.txt for split {split!r}{hint}")
        names = [results_file(d, split, c).name for c in missing]
        raise ResultsError(f"{d}: missing results file{'s' if len(names) > 1 else ''} {', '.join(names[:3])}"
                           + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    out = {}
    for c in classes:
        if c in missing:
            out[c] = ([], np.zeros(0), np.zeros((0, 4)), [])
        else:
            out[c] = read_results_file(results_file(d, split, c), image_ids=ids, with_lines=True)
    return out


def evaluate_voc_results(dataset: Dataset, results_dir: str | Path, metric: str = "voc07", *,
                         classes: Sequence[str] | None = None, allow_missing: bool = False,
                         min_overlap: float = 0.5) -> EvalResult:
    """Score the results files in ``results_dir`` against ``dataset`` (exactly what the files hold).

    Args:
        dataset: the split (its ``split`` names the files).
        results_dir: the folder with ``comp4_det_<split>_<class>.txt``.
        metric: ``"voc07"`` or ``"voc12"``.
        classes: the classes to score (default ``dataset.classes``).
        allow_missing: a missing class file means no detections.

    Raises:
        ResultsError: one line naming the folder / file (and line): missing
            files, malformed lines, unknown image ids.
    """
    if metric not in METRICS:
        raise SppdetError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    classes = list(classes if classes is not None else dataset.classes)
    raw = _read_all(results_dir, dataset.split, classes, allow_missing,
                    [r.image_id for r in dataset.records])
    per_class = {c: v[:3] for c, v in raw.items()}
    lines = {c: v[3] for c, v in raw.items()}
    sources = {c: str(results_file(results_dir, dataset.split, c)) for c in classes}
    return evaluate_detections(dataset, per_class, metric, classes=classes, sources=sources, lines=lines,
                               min_overlap=min_overlap)


def format_ap_table(result: EvalResult, classes: Sequence[str] | None = None) -> str:
    """A per-class AP table with the mean, as printed by ``sppdet evaluate`` and ``sppdet eval``.

    Args:
        result: the scores.
        classes: the rows, in order (default: ``result.ap``'s classes).

    Returns:
        text without a trailing newline; a class without ground truth shows ``-``, a class
        whose devkit AP is NaN shows ``NaN``.
    """
    classes = list(classes if classes is not None else result.ap.keys())
    width = max([len(c) for c in classes] + [5])
    name = {"voc07": "AP (VOC07 11-point)", "voc12": "AP (VOC12 area)",
            "coco": "AP@[.5:.95] (COCO)"}.get(result.metric, f"AP ({result.metric})")
    npos = result.npos
    head = f"{'class':<{width}}  {name:>20}"
    if npos:
        head += f"  {'objects':>7}"
    lines = [head, "-" * len(head)]
    # '-': no ground truth (not in the mean); 'NaN': ground truth, but the devkit's AP is NaN
    no_gt = nan_ap = False
    for c in classes:
        a = result.ap.get(c, float("nan"))
        if math.isfinite(a):
            shown = f"{a:>20.4f}"
        elif npos.get(c, 0) > 0:
            shown, nan_ap = f"{'NaN':>20}", True
        else:
            shown, no_gt = f"{'-':>20}", True
        row = f"{c:<{width}}  {shown}"
        if npos:
            row += f"  {npos.get(c, 0):>7d}"
        lines.append(row)
    lines.append("-" * len(head))
    shown = f"{result.mAP:>20.4f}" if math.isfinite(result.mAP) else f"{'-' if not nan_ap else 'NaN':>20}"
    lines.append(f"{'mAP':<{width}}  {shown}")
    for k, v in result.extra.items():
        lines.append(f"{k:<{width}}  " + (f"{v:>20.4f}" if math.isfinite(v) else f"{'-':>20}"))
    if no_gt:
        lines.append("(-: no ground-truth objects of that class in the split; left out of the mean)")
    if nan_ap:
        lines.append("(NaN: the devkit's AP is NaN (every detection of the class hit a difficult object), "
                     "so is the mean)")
    return "\n".join(lines)
