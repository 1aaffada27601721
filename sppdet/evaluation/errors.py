"""Where the false positives come from: an error breakdown in the spirit of Hoiem, Chodpathumwan
and Dai, "Diagnosing Error in Object Detectors" (ECCV 2012).

For every class, the detections are ranked and matched exactly as the VOC devkit does
(:func:`sppdet.evaluation.voc.eval_class`: stable ranking by score, overlaps on the 1-based
inclusive boxes as written to a results file, the first best-overlapping object of the class
decides, a match needs ``ov >= 0.5``, a detection matching a difficult object is neither a true
nor a false positive, a second detection of a matched object is a false positive).  The false
positives among the class's **top N** detections, N = its number of non-difficult objects (the
rank at which a perfect detector would have found everything), are then given one type each, in
this order of precedence:

``localisation``
    overlap in ``[0.1, 0.5)`` with an object of the same class, or a duplicate detection of an
    object already matched by a higher-ranked detection;
``similar``
    overlap ``>= 0.1`` with an object of a similar class: one in the same VOC group (animals
    {bird, cat, cow, dog, horse, sheep}, vehicles {aeroplane, bicycle, boat, bus, car, motorbike,
    train}, furniture {chair, diningtable, sofa}); class names outside those groups (other data
    sets' classes, and person, bottle, pottedplant, tvmonitor) have no similar classes;
``other``
    overlap ``>= 0.1`` with an object of any other class;
``background``
    everything else.

Overlaps for the types are with every object of the image, difficult ones included (a box at
IoU 0.3 on a difficult cat is still a badly localised cat); whether a detection is a false
positive at all is the devkit's decision, so the counts add up to the false positives the
devkit counts among the top N (:attr:`ClassResult.fp` at rank N).  The overall breakdown adds
up the classes' top-N counts.

``ap_loc_fixed`` is each class's AP (same metric) had its localisation errors been fixed, over
all its detections: a detection overlapping an object of its class by ``>= 0.1`` that is not
yet detected becomes a true positive of it (the first best-overlapping one), a duplicate or a
detection of an object already taken is removed (neither TP nor FP), one on a difficult object
is ignored, and the rest stay false positives.

Public API::

    error_breakdown(dataset, per_class, *, metric="voc07", top="npos") -> ErrorBreakdown
    error_breakdown_from_detections(dataset, detections, classes=None, **kw) -> ErrorBreakdown
    error_breakdown_from_results(dataset, results_dir, **kw) -> ErrorBreakdown
    similar_classes(classes, groups=VOC_GROUPS) -> {class: frozenset of similar classes}
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
from .voc import METRICS, ResultsError, _check_image_id, _unpack, as_written, ground_truth, read_voc_results, voc_ap

log = logging.getLogger(__name__)

#: The error types, in order of precedence.
ERROR_TYPES = ("localisation", "similar", "other", "background")

#: Human-readable names of :data:`ERROR_TYPES` (figures and tables).
ERROR_NAMES = {"localisation": "localisation", "similar": "similar class", "other": "other class",
               "background": "background"}

#: Hoiem et al.'s groups of similar VOC classes.
VOC_GROUPS: dict[str, tuple[str, ...]] = {
    "animals": ("bird", "cat", "cow", "dog", "horse", "sheep"),
    "vehicles": ("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"),
    "furniture": ("chair", "diningtable", "sofa"),
}

#: Overlap with an object of the class below which a false positive is not a localisation error,
#: and with another class's object below which it is not a confusion (Hoiem et al.: 0.1).
MIN_ERROR_OVERLAP = 0.1


def similar_classes(classes: Iterable[str], groups: Mapping[str, Sequence[str]] | None = None
                    ) -> dict[str, frozenset[str]]:
    """class -> the other classes of ``classes`` that share a group with it (empty when none).

    Args:
        classes: class names.
        groups: group name -> class names (default :data:`VOC_GROUPS`; ``{}``: no groups).
    """
    groups = VOC_GROUPS if groups is None else groups
    classes = list(classes)
    out = {}
    for c in classes:
        sim = set()
        for members in groups.values():
            if c in members:
                sim.update(m for m in members if m != c and m in classes)
        out[c] = frozenset(sim)
    return out


def devkit_overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """VOCevaldet.m's overlap of every box of ``a`` with every box of ``b``.

    Args:
        a (ndarray[A, 4]), b (ndarray[B, 4]): VOC 1-based inclusive boxes.

    Returns:
        ndarray[A, B] float64: ``iw*ih / ua`` with ``iw = min(x2) - max(x1) + 1`` (``ih`` likewise)
        and inclusive areas; ``-inf`` where the devkit does not consider the pair
        (``iw <= 0`` or ``ih <= 0``, or a NaN overlap).  The same operations, in the same order,
        as :func:`sppdet.evaluation.voc._best_overlaps`, so the values are bit-identical.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    ok = (iw > 0) & (ih > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ua = ((a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
              + (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1) - iw * ih)
        ov = iw * ih / ua
    return np.where(ok & ~np.isnan(ov), ov, -np.inf)


class _Shares:
    """:attr:`fp` and :attr:`fractions` of a breakdown's ``counts`` (error type -> false positives)."""

    counts: dict[str, int]

    @property
    def fp(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def fractions(self) -> dict[str, float]:
        """error type -> share of :attr:`fp` (NaN when there is no false positive)."""
        fp = self.fp
        return {k: (v / fp if fp else float("nan")) for k, v in self.counts.items()}


@dataclass
class ClassErrors(_Shares):
    """The breakdown of one class.

    Attributes:
        name: the class.
        npos: non-difficult objects of the class in the split (N).
        considered: detections looked at (the top ``min(N, D)`` of the class's D, or all D).
        tp, ignored: true positives and detections of difficult objects among them.
        counts: error type -> false positives of that type among them (sum: :attr:`fp`).
        duplicates: of ``counts["localisation"]``, the duplicate detections.
        ap: the devkit's AP over all detections (NaN when ``npos == 0``).
        ap_loc_fixed: the AP had the localisation errors been fixed (module docstring).
        ranked: the kind of every detection in ranking order (``"tp"``, ``"ignored"`` or an
            error type), all D of them.
    """

    name: str
    npos: int
    considered: int
    tp: int
    ignored: int
    counts: dict[str, int]
    duplicates: int = 0
    ap: float = float("nan")
    ap_loc_fixed: float = float("nan")
    ranked: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"npos": self.npos, "considered": self.considered, "tp": self.tp, "ignored": self.ignored,
                "fp": self.fp, "counts": dict(self.counts), "fractions": _clean(self.fractions),
                "duplicates": self.duplicates, "ap": _clean(self.ap), "ap_loc_fixed": _clean(self.ap_loc_fixed)}


@dataclass
class ErrorBreakdown(_Shares):
    """The breakdown of a split: per class and overall (the sum of the classes' counts).

    Attributes:
        per_class: class -> :class:`ClassErrors`, in class order.
        metric: the AP metric of ``ap`` / ``ap_loc_fixed``.
        top: ``"npos"`` (each class's top N detections) or ``"all"`` (every detection).
        groups: class -> its similar classes (only classes that have some).
    """

    per_class: dict[str, ClassErrors]
    metric: str = "voc07"
    top: str = "npos"
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """error type -> false positives of that type over all classes."""
        return {k: int(sum(r.counts[k] for r in self.per_class.values())) for k in ERROR_TYPES}

    def _mean(self, attr: str) -> float:
        vals = [getattr(r, attr) for r in self.per_class.values() if r.npos > 0]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def mAP(self) -> float:
        """Mean of ``ap`` over the classes with non-difficult objects."""
        return self._mean("ap")

    @property
    def mAP_loc_fixed(self) -> float:
        """Mean of ``ap_loc_fixed`` over the classes with non-difficult objects."""
        return self._mean("ap_loc_fixed")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN -> null)."""
        rows = self.per_class.values()
        overall = {"considered": int(sum(r.considered for r in rows)), "tp": int(sum(r.tp for r in rows)),
                   "ignored": int(sum(r.ignored for r in rows)), "fp": self.fp, "counts": self.counts,
                   "fractions": _clean(self.fractions), "duplicates": int(sum(r.duplicates for r in rows)),
                   "mAP": _clean(self.mAP), "mAP_loc_fixed": _clean(self.mAP_loc_fixed)}
        return {"metric": self.metric, "top": self.top, "types": list(ERROR_TYPES),
                "min_error_overlap": MIN_ERROR_OVERLAP, "groups": self.groups, "overall": overall,
                "per_class": {c: r.to_json() for c, r in self.per_class.items()}}

    def summary(self) -> str:
        """One line: the shares of the false positives among the top-ranked detections."""
        if not self.fp:
            return f"no false positives among the {'top-N' if self.top == 'npos' else 'all'} detections"
        shares = ", ".join(f"{ERROR_NAMES[k]} {v:.0%}" for k, v in self.fractions.items())
        what = "each class's top-N detections (N = its objects)" if self.top == "npos" else "all detections"
        return f"{self.fp} false positives among {what}: {shares}"


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return None if v is None or not math.isfinite(v) else float(v)


def _class_errors(name: str, ids: Sequence[str], scores: np.ndarray, boxes: np.ndarray, label: int | None,
                  dataset: Dataset, all_gt: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  similar: frozenset[str], *, metric: str, min_overlap: float, top: str,
                  source: str) -> ClassErrors:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not (len(ids) == len(scores) == len(boxes)):
        raise ValueError(f"{source}: {len(ids)} image ids, {len(scores)} scores, {len(boxes)} boxes")
    if np.isnan(scores).any():
        raise ResultsError(f"{source}: score is NaN")
    gt = ground_truth(dataset, label)           # image -> (VOC boxes of the class, difficult), annotation order
    for iid in ids:
        if iid not in gt:
            raise ResultsError(f"{source}: unrecognized image {iid!r} (not in the split)")
    npos = int(sum(np.count_nonzero(~d) for _, d in gt.values()))
    order = np.argsort(-scores, kind="stable")   # MATLAB's stable sort, as the devkit
    nd = len(order)

    # per detection: the first best overlap with an object of the class, and the best overlap with
    # objects of similar / of any other class (difficult objects included)
    best = np.full(nd, -np.inf)
    jbest = np.zeros(nd, dtype=np.int64)
    sim_ov = np.full(nd, -np.inf)
    oth_ov = np.full(nd, -np.inf)
    per_image: dict[str, list[int]] = {}
    for r, j in enumerate(order):
        per_image.setdefault(ids[j], []).append(r)
    names = dataset.classes
    for iid, ranks in per_image.items():
        ra = np.asarray(ranks)
        bb = boxes[order[ra]]
        own = gt[iid][0]
        if len(own):
            ov = devkit_overlaps(bb, own)
            jbest[ra] = np.argmax(ov, axis=1)                # the first maximum, as the devkit's scan
            best[ra] = ov[np.arange(len(ra)), jbest[ra]]
        g_boxes, g_labels = all_gt[iid]
        others = g_labels != (label if label is not None else -1)
        if others.any():
            ov = devkit_overlaps(bb, g_boxes[others])
            is_sim = np.array([names[k] in similar for k in g_labels[others]])
            if is_sim.any():
                sim_ov[ra] = ov[:, is_sim].max(axis=1)
            oth_ov[ra] = ov.max(axis=1)

    ranked: list[str] = []
    dup = np.zeros(nd, dtype=bool)
    detected = {iid: np.zeros(len(gt[iid][0]), dtype=bool) for iid in per_image}
    for r, j in enumerate(order):
        iid = ids[j]
        if best[r] >= min_overlap:
            k = jbest[r]
            if gt[iid][1][k]:
                ranked.append("ignored")
            elif not detected[iid][k]:
                detected[iid][k] = True
                ranked.append("tp")
            else:
                ranked.append("localisation")       # a duplicate
                dup[r] = True
        elif best[r] >= MIN_ERROR_OVERLAP:
            ranked.append("localisation")
        elif sim_ov[r] >= MIN_ERROR_OVERLAP:
            ranked.append("similar")
        elif oth_ov[r] >= MIN_ERROR_OVERLAP:
            ranked.append("other")
        else:
            ranked.append("background")

    # the devkit's AP, and the AP with the localisation errors fixed
    tp = np.array([k == "tp" for k in ranked], dtype=np.float64)
    fp = np.array([k in ERROR_TYPES for k in ranked], dtype=np.float64)
    tp_fix: list[float] = []                       # a removed detection is left out altogether
    fp_fix: list[float] = []
    taken = {iid: np.zeros(len(gt[iid][0]), dtype=bool) for iid in per_image}
    for r, j in enumerate(order):
        iid = ids[j]
        if best[r] >= MIN_ERROR_OVERLAP:           # a match, or a localisation error to fix
            k = jbest[r]
            if gt[iid][1][k]:                       # on a difficult object: ignored, as the devkit
                tp_fix.append(0.0)
                fp_fix.append(0.0)
            elif not taken[iid][k]:
                taken[iid][k] = True
                tp_fix.append(1.0)
                fp_fix.append(0.0)
            # else: a duplicate, or a second detection of an object already taken: removed
        else:
            tp_fix.append(0.0)
            fp_fix.append(1.0)
    ap = ap_fixed = float("nan")
    if npos > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            ctp, cfp = np.cumsum(tp), np.cumsum(fp)
            ap = voc_ap(ctp / np.float64(npos), ctp / (ctp + cfp), metric)
            ctp, cfp = np.cumsum(np.asarray(tp_fix)), np.cumsum(np.asarray(fp_fix))
            ap_fixed = voc_ap(ctp / np.float64(npos), ctp / (ctp + cfp), metric)

    n = nd if top == "all" else min(npos, nd)
    head = ranked[:n]
    counts = {k: int(sum(1 for x in head if x == k)) for k in ERROR_TYPES}
    return ClassErrors(name, npos, n, int(head.count("tp")), int(head.count("ignored")), counts,
                       int(dup[:n].sum()), float(ap), float(ap_fixed), ranked)


def error_breakdown(dataset: Dataset, per_class: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]], *,
                    classes: Sequence[str] | None = None, metric: str = "voc07", min_overlap: float = 0.5,
                    groups: Mapping[str, Sequence[str]] | None = None, top: str = "npos",
                    sources: Mapping[str, str] | None = None) -> ErrorBreakdown:
    """The false-positive breakdown of every class (see the module docstring for the rules).

    Args:
        dataset: the split (ground truth in internal coordinates; labels index ``dataset.classes``).
        per_class: class -> (image ids, scores ndarray[D], boxes ndarray[D, 4] VOC 1-based inclusive,
            in results-file order), as :func:`sppdet.evaluation.voc.evaluate_detections` takes them
            (a missing class has no detections).
        classes: the classes to analyse (default ``dataset.classes``).
        metric: ``"voc07"`` or ``"voc12"``, for ``ap`` and ``ap_loc_fixed``.
        min_overlap: the devkit's match threshold (0.5).
        groups: groups of similar classes (default :data:`VOC_GROUPS`, by class name).
        top: ``"npos"``: each class's top N detections, N its non-difficult objects; ``"all"``:
            every detection.
        sources: class -> name used in errors (the results file).

    Raises:
        ResultsError: a detection in an image that is not in the split, or a NaN score.
    """
    if metric not in METRICS:
        raise SppdetError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    if top not in ("npos", "all"):
        raise ValueError(f"top={top!r}: expected 'npos' or 'all'")
    classes = list(classes if classes is not None else dataset.classes)
    sim = similar_classes(dataset.classes, groups)
    all_gt = {r.image_id: (internal_to_voc(r.boxes), np.asarray(r.labels, dtype=np.int64)) for r in dataset.records}
    out = {}
    for c in classes:
        ids, scores, boxes = per_class.get(c, ([], np.zeros(0), np.zeros((0, 4))))
        label = dataset.classes.index(c) if c in dataset.classes else None
        out[c] = _class_errors(c, list(ids), scores, boxes, label, dataset, all_gt, sim.get(c, frozenset()),
                               metric=metric, min_overlap=min_overlap, top=top,
                               source=(sources or {}).get(c, f"detections of {c}"))
    return ErrorBreakdown(out, metric, top, {c: sorted(s) for c, s in sim.items() if s and c in classes})


def per_class_detections(dataset: Dataset, detections: Mapping[str, Any], classes: Sequence[str]
                         ) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Detections per image -> per class, exactly as :func:`sppdet.evaluation.voc.write_voc_results`
    would write them for ``sppdet eval`` and read them back: images in split order (those with
    detections), within an image by decreasing score (stable), boxes in VOC coordinates rounded as
    written (:func:`sppdet.evaluation.voc.as_written`).

    Args:
        detections: image id -> detections with ``boxes`` (ndarray[M, 4], internal 0-based
            continuous), ``scores`` (ndarray[M]) and ``labels`` (ndarray[M], indices into ``classes``).
        classes: what the labels mean.
    """
    ids: list[list[str]] = [[] for _ in classes]
    sc: list[list[np.ndarray]] = [[] for _ in classes]
    bx: list[list[np.ndarray]] = [[] for _ in classes]
    for r in dataset.records:
        det = detections.get(r.image_id)
        if det is None:
            continue
        iid = _check_image_id(r.image_id)
        vb, s, lab = _unpack(iid, det, len(classes))       # the writer's own validation and conversion
        o = np.argsort(-s, kind="stable")
        vb, s, lab = as_written(vb[o]), s[o], lab[o]
        for k in np.unique(lab):
            m = lab == k
            ids[k].extend([iid] * int(m.sum()))
            sc[k].append(s[m])
            bx[k].append(vb[m])
    return {c: (ids[k], np.concatenate(sc[k]) if sc[k] else np.zeros(0),
                np.concatenate(bx[k]) if bx[k] else np.zeros((0, 4))) for k, c in enumerate(classes)}


def error_breakdown_from_detections(dataset: Dataset, detections: Mapping[str, Any],
                                    classes: Sequence[str] | None = None, **kw) -> ErrorBreakdown:
    """:func:`error_breakdown` of per-image detections (what ``sppdet eval`` scores; see
    :func:`per_class_detections`); ``classes`` (default ``dataset.classes``) give the labels' meaning."""
    classes = list(classes if classes is not None else dataset.classes)
    return error_breakdown(dataset, per_class_detections(dataset, detections, classes), classes=classes, **kw)


def error_breakdown_from_results(dataset: Dataset, results_dir: str | Path, *,
                                 classes: Sequence[str] | None = None, allow_missing: bool = False,
                                 **kw) -> ErrorBreakdown:
    """:func:`error_breakdown` of the VOC results files ``comp4_det_<split>_<class>.txt`` in ``results_dir``."""
    classes = list(classes if classes is not None else dataset.classes)
    raw = read_voc_results(results_dir, dataset.split, classes, allow_missing=allow_missing,
                           image_ids=[r.image_id for r in dataset.records])
    return error_breakdown(dataset, raw, classes=classes, **kw)
