"""VOC AP (:mod:`sppdet.evaluation.voc`) against a literal transliteration of the official devkit.

What is transliterated below, line by line, in plain Python loops:

* ``VOCevaldet.m`` of the VOC2007 devkit (``VOCdevkit/VOCcode/VOCevaldet.m``; the copy read for
  this file: github.com/npinto/VOCdevkit, ``VOCcode/VOCevaldet.m`` at commit b0890ec): ground
  truth extraction, ``[sc,si]=sort(-confidence)``, the overlap loop with the inclusive ``+1``
  pixel convention and ``if ov>ovmax``, ``ovmax>=VOCopts.minoverlap``, the difficult / duplicate
  rules, ``rec=tp/npos``, ``prec=tp./(fp+tp)`` and the 11-point loop ``for t=0:0.1:1``.
* ``VOCap.m`` of the VOC2010+ devkits (``function ap = VOCap(rec,prec)``: ``mrec=[0;rec;1]``,
  ``mpre=[0;prec;0]``, the backwards ``max``, ``find(mrec(2:end)~=mrec(1:end-1))+1`` and the
  ``sum``).  The VOC2010+ ``VOCevaldet.m`` (e.g. github.com/weiliu89/VOCdevkit,
  ``VOCcode/VOCevaldet.m``) matches exactly as the VOC2007 one and ends with
  ``ap=VOCap(rec,prec)``.
* MATLAB's colon operator, for the values ``t`` takes in ``for t=0:0.1:1``: ``colonop.m``, the
  M-file MathWorks published to document how the built-in ``a:d:b`` is built (technical solution
  1-4FLI96, "How does the colon operator work?"; copy: gist.github.com/zmughal/379e22dadd0b39ca47b6,
  and ports that cite it, e.g. the Ruby ``range`` of the si_taxi project).  Its header states the
  property tested below: "v = -1 : 0.01 : 1 consists of 201 floating point numbers centered
  symmetrically about zero".
* MATLAB semantics the devkit relies on: ``sort`` is stable and puts NaN last; ``max(v)`` of a
  vector ignores NaN (all NaN -> NaN, ``[]`` -> ``[]``); ``max(a,b)`` ignores a NaN operand;
  ``x/0`` is Inf or NaN (IEEE), ``NaN ~= NaN`` is true; ``sum`` adds left to right.

The module is compared with this reference to 1e-9 on every class (and on the whole PR curve)
for many randomised inputs, plus hand-computed cases whose arithmetic is written out.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_dataset
from sppdet.data.records import VOC_CLASSES, Dataset, ImageRecord
from sppdet.evaluation.voc import (
    ELEVEN_POINTS,
    EvalResult,
    ResultsError,
    VOCEvaluator,
    eval_class,
    evaluate_detections,
    evaluate_voc_results,
    format_ap_table,
    matlab_colon,
    read_voc_results,
    voc_ap,
    write_voc_results,
)

INF = math.inf
NAN = math.nan
EPS = 2.0 ** -52                 # MATLAB eps


# =====================================================================================
# The literal reference: MATLAB primitives
# =====================================================================================


def m_round(x: float) -> float:
    """MATLAB round: halves away from zero."""
    return math.copysign(math.floor(abs(x) + 0.5), x)


def m_sign(x: float) -> float:
    return 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)


def m_colon(a: float, d: float, b: float) -> list[float]:
    """colonop.m (MathWorks solution 1-4FLI96), statement by statement."""
    tol = 2.0 * EPS * max(abs(a), abs(b))
    sig = m_sign(d)
    # Exceptional cases.
    if not math.isfinite(a) or not math.isfinite(d) or not math.isfinite(b):
        return [NAN]
    elif d == 0 or (a < b and d < 0) or (b < a and d > 0):
        return []
    # n = number of intervals = length(v) - 1.
    if a == math.floor(a) and d == 1:
        n = math.floor(b) - a                          # consecutive integers
    elif a == math.floor(a) and d == math.floor(d):
        q = math.floor(a / d)                          # integers with spacing > 1
        r = a - q * d
        n = math.floor((b - r) / d) - q
    else:
        n = m_round((b - a) / d)                       # general case
        if sig * (a + n * d - b) > tol:
            n = n - 1
    n = int(n)
    # c = right hand end point.
    c = a + n * d
    if sig * (c - b) > -tol:
        c = b
    # v should be symmetric about the mid-point.
    v = [0.0] * (n + 1)
    for k in range(0, math.floor(n / 2) + 1):          # k = 0:floor(n/2)
        v[1 + k - 1] = a + k * d                       # v(1+k) = a + k*d
        v[n + 1 - k - 1] = c - k * d                   # v(n+1-k) = c - k*d
    if n % 2 == 0:
        v[n // 2 + 1 - 1] = (a + c) / 2                # v(n/2+1) = (a+c)/2
    return v


def m_sort_ascending(x: list[float]) -> list[int]:
    """[~, si] = sort(x): stable, NaN last.  Returns 0-based indices."""
    return sorted(range(len(x)), key=lambda i: (math.isnan(x[i]), 0.0 if math.isnan(x[i]) else x[i]))


def m_max_vector(v: list[float]):
    """max(v) of a vector: [] for [], NaN ignored, NaN if all NaN."""
    if len(v) == 0:
        return None                                    # MATLAB []
    vals = [x for x in v if not math.isnan(x)]
    if not vals:
        return NAN
    m = vals[0]
    for x in vals[1:]:
        if x > m:
            m = x
    return m


def m_max2(a: float, b: float) -> float:
    """max(a, b) of two scalars: a NaN operand is ignored."""
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return a if a >= b else b


def m_min2(a: float, b: float) -> float:
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return a if a <= b else b


def m_div(a: float, b: float) -> float:
    """a / b with IEEE semantics (MATLAB never raises on division by zero)."""
    if b == 0:
        if a == 0 or math.isnan(a):
            return NAN
        return math.copysign(INF, a) * math.copysign(1.0, b)
    return a / b


def m_cumsum(v: list[float]) -> list[float]:
    out, s = [], 0.0
    for x in v:
        s = s + x
        out.append(s)
    return out


def m_sum(v: list[float]) -> float:
    s = 0.0
    for x in v:
        s = s + x
    return s


# =====================================================================================
# The literal reference: VOCevaldet.m and VOCap.m
# =====================================================================================


def literal_vocap(rec: list[float], prec: list[float]) -> float:
    """VOCap.m (VOC2010+ devkits)."""
    mrec = [0.0] + list(rec) + [1.0]                   # mrec=[0 ; rec ; 1];
    mpre = [0.0] + list(prec) + [0.0]                  # mpre=[0 ; prec ; 0];
    for i in range(len(mpre) - 1, 0, -1):              # for i=numel(mpre)-1:-1:1
        mpre[i - 1] = m_max2(mpre[i - 1], mpre[i])     #     mpre(i)=max(mpre(i),mpre(i+1));
    # i=find(mrec(2:end)~=mrec(1:end-1))+1;   (1-based; NaN ~= NaN is true)
    idx = [k + 1 for k in range(1, len(mrec)) if mrec[k] != mrec[k - 1]]
    # ap=sum((mrec(i)-mrec(i-1)).*mpre(i));
    return m_sum([(mrec[i - 1] - mrec[i - 2]) * mpre[i - 1] for i in idx])


def literal_11point(rec: list[float], prec: list[float]) -> float:
    """The end of VOCevaldet.m (VOC2007)."""
    ap = 0.0
    for t in m_colon(0, 0.1, 1):                       # for t=0:0.1:1
        p = m_max_vector([prec[k] for k in range(len(rec)) if rec[k] >= t])   # p=max(prec(rec>=t));
        if p is None:                                  # if isempty(p)
            p = 0.0                                    #     p=0;
        ap = ap + p / 11                               # ap=ap+p/11;
    return ap


def literal_vocevaldet(gtids, recs, cls, ids, confidence, BB, minoverlap=0.5, metric="voc07"):
    """VOCevaldet.m for one class.

    Args:
        gtids: the split's image ids.
        recs: per image, list of objects ``(class, [xmin, ymin, xmax, ymax], difficult)`` as
            PASreadrecord gives them (1-based inclusive VOC coordinates, annotation order).
        cls: the class.
        ids, confidence, BB: the results file's columns (BB: list of [b1 b2 b3 b4]).

    Returns:
        (rec, prec, ap, tp_per_detection, fp_per_detection) in ranking order.
    """
    # hash image ids
    hash_ = {}
    for i, g in enumerate(gtids):
        hash_.setdefault(g, []).append(i)
    # extract ground truth objects
    npos = 0
    gt = []
    for i in range(len(gtids)):
        clsinds = [j for j, o in enumerate(recs[i]) if o[0] == cls]      # strmatch(cls,...,'exact')
        gt.append({"BB": [list(map(float, recs[i][j][1])) for j in clsinds],
                   "diff": [bool(recs[i][j][2]) for j in clsinds],
                   "det": [False] * len(clsinds)})
        npos = npos + sum(1 for x in gt[i]["diff"] if not x)             # npos=npos+sum(~gt(i).diff);
    # sort detections by decreasing confidence
    si = m_sort_ascending([-c for c in confidence])                    # [sc,si]=sort(-confidence);
    ids = [ids[k] for k in si]
    BB = [BB[k] for k in si]
    # assign detections to ground truth objects
    nd = len(confidence)
    tp = [0.0] * nd
    fp = [0.0] * nd
    for d in range(nd):
        i = hash_.get(ids[d], [])                                      # i=VOChash_lookup(hash,ids{d});
        if len(i) == 0:
            raise RuntimeError(f'unrecognized image "{ids[d]}"')
        elif len(i) > 1:
            raise RuntimeError(f'multiple image "{ids[d]}"')
        i = i[0]
        bb = BB[d]
        ovmax = -INF
        jmax = None
        for j in range(len(gt[i]["BB"])):                              # for j=1:size(gt(i).BB,2)
            bbgt = gt[i]["BB"][j]
            bi = [m_max2(bb[0], bbgt[0]), m_max2(bb[1], bbgt[1]), m_min2(bb[2], bbgt[2]), m_min2(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                # compute overlap as area of intersection / area of union
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                      - iw * ih)
                ov = m_div(iw * ih, ua)
                if ov > ovmax:
                    ovmax = ov
                    jmax = j
        # assign detection as true positive/don't care/false positive
        if ovmax >= minoverlap:
            if not gt[i]["diff"][jmax]:
                if not gt[i]["det"][jmax]:
                    tp[d] = 1.0            # true positive
                    gt[i]["det"][jmax] = True
                else:
                    fp[d] = 1.0            # false positive (multiple detection)
        else:
            fp[d] = 1.0                    # false positive
    tp_raw, fp_raw = list(tp), list(fp)
    # compute precision/recall
    fp = m_cumsum(fp)
    tp = m_cumsum(tp)
    rec = [m_div(t, npos) for t in tp]
    prec = [m_div(t, f + t) for t, f in zip(tp, fp)]
    ap = literal_11point(rec, prec) if metric == "voc07" else literal_vocap(rec, prec)
    return rec, prec, ap, tp_raw, fp_raw


# =====================================================================================
# Helpers: datasets from VOC-style lists
# =====================================================================================


def same(a: float, b: float, tol: float = 1e-9) -> bool:
    """Equal to ``tol``, NaN equal to NaN, inf equal to inf of the same sign."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol


def assert_same_curve(mod: np.ndarray, ref: list[float], what: str) -> None:
    assert len(mod) == len(ref), what
    for k, (x, y) in enumerate(zip(np.asarray(mod, dtype=float).tolist(), ref)):
        assert same(x, y), f"{what}[{k}]: module {x!r} vs devkit {y!r}"


def make_dataset(gtids, recs, classes, split="test") -> Dataset:
    """A Dataset whose ground truth is ``recs`` (VOC 1-based coordinates, integer-valued)."""
    records = []
    for iid, objs in zip(gtids, recs):
        boxes = [[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b, _ in objs]   # VOC -> internal
        assert all(float(np.float32(v)) == v for bx in boxes for v in bx), "ground truth must be exact in float32"
        records.append(ImageRecord(iid, Path(f"/nonexistent/{iid}.jpg"), 500, 500,
                                   np.array(boxes, dtype=np.float32).reshape(-1, 4),
                                   np.array([classes.index(c) for c, _, _ in objs], dtype=np.int64),
                                   np.array([bool(d) for _, _, d in objs], dtype=bool)))
    return Dataset("t", split, list(classes), records)


def per_class_arrays(dets):
    """class -> (ids, scores ndarray, boxes ndarray) from class -> list of (id, score, box)."""
    return {c: ([d[0] for d in v], np.array([d[1] for d in v], dtype=np.float64),
                np.array([d[2] for d in v], dtype=np.float64).reshape(-1, 4)) for c, v in dets.items()}


def compare_with_devkit(gtids, recs, classes, dets, metric):
    """Run module and literal devkit on every class; assert they agree. Returns the module result."""
    ds = make_dataset(gtids, recs, classes)
    res = evaluate_detections(ds, per_class_arrays(dets), metric)
    for c in classes:
        v = dets.get(c, [])
        rec, prec, ap, tp_raw, fp_raw = literal_vocevaldet(
            gtids, recs, c, [d[0] for d in v], [d[1] for d in v], [list(d[2]) for d in v], metric=metric)
        r = res.per_class[c]
        assert same(r.ap, ap), f"{metric} {c}: module AP {r.ap!r} vs devkit {ap!r}"
        # stronger than the 1e-9 asked for: the module does the devkit's float operations in the
        # devkit's order, so the AP is bit-identical
        assert r.ap == ap or (math.isnan(r.ap) and math.isnan(ap)), (metric, c, r.ap, ap)
        assert_same_curve(r.rec, rec, f"{metric} {c} rec")
        assert_same_curve(r.prec, prec, f"{metric} {c} prec")
        assert_same_curve(r.tp, m_cumsum(tp_raw), f"{metric} {c} tp")
        assert_same_curve(r.fp, m_cumsum(fp_raw), f"{metric} {c} fp")
        npos = sum(1 for objs in recs for o in objs if o[0] == c and not o[2])
        assert r.npos == npos
        # the reported AP: the devkit's where the class has ground truth, NaN (not averaged) where not
        assert same(res.ap[c], ap if npos > 0 else NAN)
    have = [ap for c, ap in res.ap.items() if res.per_class[c].npos > 0]
    assert same(res.mAP, float(np.mean(have)) if have else NAN)
    return res


# =====================================================================================
# Random inputs
# =====================================================================================

CLASSES = ["cat", "dog", "bird"]


def random_case(seed: int):
    """A small split with ground truth and detections built to hit the devkit's corner cases.

    Boxes are integer-valued on a small canvas (many overlaps, exact ties in overlap, IoU exactly
    0.5 reachable), scores come from a tiny set half the time (ties), and scenario switches make
    splits with no objects, all objects difficult, no detections, detections only on difficult
    objects, duplicates, +-inf scores and fractional detection coordinates.
    """
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(1, 6))
    gtids = [f"{seed:04d}_{i}" for i in range(n_img)]
    all_difficult = rng.random() < 0.1
    no_objects = rng.random() < 0.05
    recs = []
    for _ in gtids:
        objs = []
        for _ in range(0 if no_objects else int(rng.integers(0, 6))):
            x1, y1 = int(rng.integers(1, 30)), int(rng.integers(1, 30))
            w, h = int(rng.integers(0, 20)), int(rng.integers(0, 20))
            diff = all_difficult or rng.random() < 0.25
            objs.append((CLASSES[int(rng.integers(0, len(CLASSES)))], [x1, y1, x1 + w, y1 + h], diff))
        recs.append(objs)
    tie_scores = [0.25, 0.5, 0.75]
    dets = {}
    for c in CLASSES:
        mode = rng.random()
        n = 0 if mode < 0.1 else int(rng.integers(1, 16))
        only_difficult = 0.1 <= mode < 0.2
        own = [(gtids[i], o) for i, objs in enumerate(recs) for o in objs if o[0] == c]
        diff_own = [(g, o) for g, o in own if o[2]]
        out = []
        for _ in range(n):
            kind = rng.random()
            if only_difficult and diff_own:
                g, o = diff_own[int(rng.integers(0, len(diff_own)))]
                box = list(map(float, o[1]))
            elif kind < 0.3 and own:                      # exactly a ground-truth box
                g, o = own[int(rng.integers(0, len(own)))]
                box = list(map(float, o[1]))
            elif kind < 0.55 and own:                     # a shifted ground-truth box
                g, o = own[int(rng.integers(0, len(own)))]
                s = rng.integers(-4, 5, size=4).astype(float)
                if rng.random() < 0.3:
                    s = s + rng.choice([0.0, 0.5, 0.25, 0.01], size=4)
                box = (np.asarray(o[1], float) + s).tolist()
            elif kind < 0.65 and out:                     # a duplicate of an earlier detection
                g, _, box = out[int(rng.integers(0, len(out)))]
                box = list(box)
            else:                                         # anywhere
                g = gtids[int(rng.integers(0, n_img))]
                x1, y1 = rng.uniform(-3, 35, size=2).round(int(rng.integers(0, 3)))
                w, h = rng.uniform(-2, 25, size=2).round(int(rng.integers(0, 3)))
                box = [float(x1), float(y1), float(x1 + w), float(y1 + h)]
            u = rng.random()
            if u < 0.5:
                score = tie_scores[int(rng.integers(0, 3))]
            elif u < 0.53:
                score = [INF, -INF][int(rng.integers(0, 2))]
            else:
                score = float(rng.uniform(-2, 2))
            out.append((g, score, box))
        dets[c] = out
    return gtids, recs, dets


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_random_inputs_match_literal_devkit(metric):
    """400 random splits x 3 classes: every AP, rec, prec, tp, fp equal to the devkit's to 1e-9."""
    seen = {"npos0": 0, "nodets": 0, "nan_prec": 0, "dup": 0, "tie": 0, "partial": 0}
    for seed in range(400):
        gtids, recs, dets = random_case(seed)
        res = compare_with_devkit(gtids, recs, CLASSES, dets, metric)
        for c in CLASSES:
            r = res.per_class[c]
            seen["npos0"] += r.npos == 0
            seen["nodets"] += len(r.tp) == 0
            seen["nan_prec"] += bool(np.isnan(r.prec).any())
            seen["dup"] += bool(len(r.fp) and np.diff(np.r_[0, r.fp]).sum() > 0 and r.tp[-1] > 0)
            sc = [d[1] for d in dets[c]]
            seen["tie"] += len(sc) != len(set(sc))
            seen["partial"] += bool(r.npos > 0 and len(r.tp) and 0 < r.tp[-1] < r.npos)
    # the generator really produced the corner cases (so this test can fail on them)
    assert all(v >= 10 for v in seen.values()), seen


def test_random_float_ground_truth_eval_class():
    """eval_class on non-integer ground truth (COCO-like data) agrees with the devkit too."""
    rng = np.random.default_rng(7)
    for seed in range(150):
        gtids, recs, dets = random_case(1000 + seed)
        recs = [[(c, (np.asarray(b, float) + rng.choice([0, 0.5, 0.3, -0.7], size=4)).tolist(), d)
                 for c, b, d in objs] for objs in recs]
        for metric in ("voc07", "voc12"):
            for c in CLASSES:
                gt = {g: (np.array([o[1] for o in objs if o[0] == c], dtype=float).reshape(-1, 4),
                          np.array([o[2] for o in objs if o[0] == c], dtype=bool))
                      for g, objs in zip(gtids, recs)}
                v = dets[c]
                r = eval_class([d[0] for d in v], np.array([d[1] for d in v]),
                               np.array([d[2] for d in v], dtype=float).reshape(-1, 4), gt, metric=metric)
                rec, prec, ap, _, _ = literal_vocevaldet(gtids, recs, c, [d[0] for d in v], [d[1] for d in v],
                                                         [d[2] for d in v], metric=metric)
                assert same(r.ap, ap), (seed, metric, c, r.ap, ap)
                assert_same_curve(r.prec, prec, "prec")


def test_absurd_coordinates_match_devkit():
    """Overflowing areas give NaN overlaps; MATLAB's `ov > ovmax` skips them, and so must we."""
    gtids = ["a"]
    recs = [[("cat", [1, 1, 10, 10], False), ("cat", [1, 1, 10, 10], False)]]
    big = 1e300
    dets = {"cat": [("a", 0.9, [-big, -big, big, big]), ("a", 0.8, [1.0, 1.0, 10.0, 10.0]),
                    ("a", 0.7, [1.0, 1.0, 10.0, 10.0]), ("a", 0.6, [1.0, 1.0, 10.0, 10.0])]}
    for metric in ("voc07", "voc12"):
        res = compare_with_devkit(gtids, recs, ["cat"], dets, metric)
        # huge box: FP; then the first of the two identical objects (first maximum) is found, and
        # the later detections pick that same object again (best overlap decides): duplicates
        assert res.per_class["cat"].tp.tolist() == [0, 1, 1, 1]
        assert res.per_class["cat"].fp.tolist() == [1, 1, 2, 3]


# =====================================================================================
# MATLAB's 0:0.1:1
# =====================================================================================


def test_eleven_thresholds_are_matlab_colon():
    ref = m_colon(0, 0.1, 1)
    assert len(ref) == 11
    assert ELEVEN_POINTS.tolist() == ref                        # bit for bit
    # colonop.m: first half a + k*d, second half c - k*d, middle (a + c)/2
    assert ref[3] == 3 * 0.1 == 0.30000000000000004
    assert ref[6] == 1 - 0.4 == 0.6 and ref[7] == 1 - 3 * 0.1 == 0.7
    # numpy.arange (what the Python ports use) differs exactly at 0.6 and 0.7
    ar = np.arange(0, 1.1, 0.1)
    assert [k for k in range(11) if ar[k] != ref[k]] == [6, 7]
    assert ar[6] == 0.6000000000000001 and ar[7] == 0.7000000000000001


@pytest.mark.parametrize("a,d,b", [(0, 0.1, 1), (-1, 0.01, 1), (0, 0.01, 1), (0, 0.15, 0.5), (1, 0.5, 4),
                                   (0, 0.4, 1), (0, 1, 2.7), (3, 2, 10), (0.5, 0.1, 0.5), (1, 0.1, 0),
                                   (0, 1 / 3, 1), (-2.5, 0.7, 3.3), (0, 0.05, 0.95)])
def test_matlab_colon_matches_colonop(a, d, b):
    assert matlab_colon(a, d, b).tolist() == m_colon(a, d, b)


def test_colonop_documented_properties():
    """Facts about the built-in that the literal colon must reproduce (see the module docstring)."""
    v = m_colon(-1, 0.01, 1)
    assert len(v) == 201 and v == [-x for x in reversed(v)]    # "centered symmetrically about zero"
    # -1:0.01:1 holds no element equal to 0.2 (its 121st is 1 - 80*0.01), 0:0.01:1 does (21st is 20*0.01)
    assert 0.2 not in v and v[120] == 1 - 80 * 0.01
    assert m_colon(0, 0.01, 1)[20] == 0.2
    # 0:0.15:0.5 stops at c = 3*0.15 (0.5 is not within tol of it), and the element before it is
    # c - 0.15 (the second half counts back from c), not 2*0.15
    assert m_colon(0, 0.15, 0.5) == [0, 0.15, 3 * 0.15 - 0.15, 3 * 0.15]
    assert 3 * 0.15 - 0.15 != 2 * 0.15


# =====================================================================================
# Hand-computed cases (arithmetic in the comments and the expected values)
# =====================================================================================


def one_image(objs, dets, metric, cls="cat"):
    """AP of class ``cls`` for one image 'im' with ``objs`` [(box, difficult)] and ``dets`` [(score, box)]."""
    recs = [[(cls, b, d) for b, d in objs]]
    ds = make_dataset(["im"], recs, [cls])
    res = evaluate_detections(ds, per_class_arrays({cls: [("im", s, b) for s, b in dets]}), metric)
    # and the literal devkit agrees
    rec, prec, ap, _, _ = literal_vocevaldet(["im"], recs, cls, ["im"] * len(dets), [s for s, _ in dets],
                                             [list(map(float, b)) for _, b in dets], metric=metric)
    assert same(res.per_class[cls].ap, ap)
    return res.per_class[cls]


# Four separate objects, 1-based inclusive VOC boxes.
A, B, C, D = [1, 1, 10, 10], [21, 1, 30, 10], [41, 1, 50, 10], [61, 1, 70, 10]
FAR = [200, 200, 210, 210]


def test_hand_computed_mixed_ranking():
    # scores 0.9 TP(A), 0.8 FP, 0.7 TP(B), 0.6 FP, 0.5 TP(C); npos = 4 (D never found)
    # tp = 1 1 2 2 3, fp = 0 1 1 2 2 -> rec = .25 .25 .5 .5 .75, prec = 1 .5 2/3 .5 .6
    objs = [(A, False), (B, False), (C, False), (D, False)]
    dets = [(0.9, A), (0.8, FAR), (0.7, B), (0.6, FAR), (0.5, C)]
    r07 = one_image(objs, dets, "voc07")
    assert r07.rec.tolist() == [0.25, 0.25, 0.5, 0.5, 0.75]
    assert np.allclose(r07.prec, [1, 0.5, 2 / 3, 0.5, 0.6])
    # 11-point: t = 0, .1, .2 -> max prec over rec >= t = 1;   t = .3(0000000000000004), .4, .5 -> 2/3;
    #           t = .6, .7 -> .6 (only rec .75 qualifies);     t = .8, .9, 1 -> none -> 0
    assert r07.ap == pytest.approx((3 * 1 + 3 * (2 / 3) + 2 * 0.6) / 11, abs=1e-15)
    # area: envelope over mrec = 0 .25 .25 .5 .5 .75 1 is 1 1 2/3 2/3 .6 .6 0
    #       -> .25*1 + .25*(2/3) + .25*.6 + .25*0
    r12 = one_image(objs, dets, "voc12")
    assert r12.ap == pytest.approx(0.25 * (1 + 2 / 3 + 0.6), abs=1e-15)


def test_ground_truth_as_detections_gives_one():
    objs = [(A, False), (B, True), (C, False)]           # B difficult: its detection is ignored
    dets = [(1.0, A), (1.0, B), (1.0, C)]
    for metric in ("voc07", "voc12"):
        r = one_image(objs, dets, metric)
        assert r.ap == pytest.approx(1.0, abs=1e-12) and r.npos == 2
    # The devkit's 11-point sum is eleven additions of the double 1/11: 1.0000000000000002, not 1.
    assert one_image(objs, dets, "voc07").ap == 1.0000000000000002
    assert one_image(objs, dets, "voc12").ap == 1.0


def test_detection_on_difficult_is_neither_tp_nor_fp():
    # 0.9 on the difficult object B (ignored), 0.8 on A: tp = 0 1, fp = 0 0
    # -> rec = 0 1, prec = 0/0 = NaN, 1 -> AP 1 (max ignores the NaN); were B an FP it would be .5
    objs = [(A, False), (B, True)]
    for metric in ("voc07", "voc12"):
        r = one_image(objs, [(0.9, B), (0.8, A)], metric)
        assert r.tp.tolist() == [0, 1] and r.fp.tolist() == [0, 0]
        assert math.isnan(r.prec[0]) and r.prec[1] == 1.0
        assert r.ap == pytest.approx(1.0, abs=1e-12)
    # only detections on difficult objects: tp = fp = 0 everywhere, rec 0, prec NaN -> AP 0 (voc07:
    # 11 x max(NaN) would be NaN, but rec >= 0 holds so p = NaN... the devkit sums NaN/11 -> NaN)
    r = one_image([(A, False), (B, True)], [(0.9, B), (0.8, B)], "voc07")
    assert r.tp.tolist() == [0, 0] and r.fp.tolist() == [0, 0]
    assert math.isnan(r.ap)                    # t = 0: rec 0 >= 0 -> p = max([NaN NaN]) = NaN
    r = one_image([(A, False), (B, True)], [(0.9, B), (0.8, B)], "voc12")
    assert r.ap == 0.0                         # envelope: max(NaN, 0) = 0 everywhere


def test_duplicate_is_false_positive():
    # 0.9 A (TP), 0.8 A again (FP, multiple detection), 0.7 B (TP); npos = 2
    # tp = 1 1 2, fp = 0 1 1 -> rec = .5 .5 1, prec = 1 .5 2/3
    objs = [(A, False), (B, False)]
    dets = [(0.9, A), (0.8, A), (0.7, B)]
    r = one_image(objs, dets, "voc07")
    assert r.fp.tolist() == [0, 1, 1] and r.tp.tolist() == [1, 1, 2]
    # 11-point: t = 0 .. .5 (6 thresholds) -> 1;  t = .6 .. 1 (5 thresholds) -> 2/3
    assert r.ap == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=1e-15)
    # area: .5 * 1 + .5 * 2/3
    assert one_image(objs, dets, "voc12").ap == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)


def test_best_overlap_decides_even_if_difficult():
    # The detection overlaps the non-difficult A with IoU 0.5 and the difficult A' (same box as the
    # detection) with IoU 1: the best box is difficult -> ignored, not a TP on A.
    a_half = [1, 1, 10, 20]                            # 10 x 20 inclusive; A is its top half
    objs = [(A, False), (a_half, True)]
    r = one_image(objs, [(0.9, a_half)], "voc07")
    assert r.tp.tolist() == [0] and r.fp.tolist() == [0]
    # equal overlaps: the FIRST box in annotation order wins (MATLAB `if ov > ovmax`)
    objs = [(A, True), (A, False)]
    r = one_image(objs, [(0.9, A)], "voc07")
    assert r.tp.tolist() == [0] and r.fp.tolist() == [0]      # box 1 (difficult) wins the tie
    objs = [(A, False), (A, True)]
    r = one_image(objs, [(0.9, A)], "voc07")
    assert r.tp.tolist() == [1]


def test_equal_scores_keep_file_order():
    # One object; two detections with the SAME score: first in the file an FP, then the TP.
    # MATLAB's stable sort keeps that order: tp = 0 1, fp = 1 1 -> rec = 0 1, prec = 0 .5
    #   -> voc07: every threshold sees rec 1 with prec .5 -> 11 * .5/11 = .5; voc12: 1 * .5 = .5
    # In the other file order (TP first) the AP is 1.
    objs = [(A, False)]
    for metric in ("voc07", "voc12"):
        assert one_image(objs, [(0.5, FAR), (0.5, A)], metric).ap == pytest.approx(0.5, abs=1e-15)
        assert one_image(objs, [(0.5, A), (0.5, FAR)], metric).ap == pytest.approx(1.0, abs=1e-12)
    # A long run of ties, where an unstable sort (numpy's default quicksort) may reorder: the module
    # must rank them in file order.
    objs = [([10 * k + 1, 1, 10 * k + 8, 8], False) for k in range(40)]
    dets = [(0.5, [1000 + k, 1000, 1010 + k, 1010]) if k % 2 else (0.5, objs[k // 2][0]) for k in range(80)]
    r = one_image(objs, dets, "voc07")
    assert r.tp.tolist() == m_cumsum([0.0 if k % 2 else 1.0 for k in range(80)])


def test_overlap_exactly_half_inclusive_convention_counts():
    # GT [1 1 4 4] covers 4 x 4 = 16 pixels; detection [1 1 4 2] covers 4 x 2 = 8 pixels, all inside:
    # ov = 8 / (16 + 8 - 8) = 0.5 exactly.  MATLAB `ovmax >= 0.5`: a TP -> AP 1.
    # (py-faster-rcnn's `ovmax > 0.5` makes it an FP -> AP 0; without the +1 the continuous
    #  overlap would be (3*1)/(3*3) = 1/3, also an FP.)
    objs = [([1, 1, 4, 4], False)]
    for metric in ("voc07", "voc12"):
        r = one_image(objs, [(0.9, [1, 1, 4, 2])], metric)
        assert r.tp.tolist() == [1] and r.ap == pytest.approx(1.0, abs=1e-12)
    iw, ih = 4 - 1 + 1, 2 - 1 + 1
    assert iw * ih / ((4 * 4) + (4 * 2) - iw * ih) == 0.5


@pytest.mark.parametrize("npos,hits", [(5, 3), (10, 7)])
def test_recall_exactly_06_07_reaches_matlab_threshold(npos, hits):
    # npos objects, the first `hits` found (precision 1), then nothing.  rec ends at 3/5 = 0.6 or
    # 7/10 = 0.7, which equal MATLAB's thresholds 1-0.4 and 1-0.30000000000000004.
    # MATLAB: thresholds 0 .. 0.6 (7) or 0 .. 0.7 (8) see precision 1 -> 7/11 or 8/11.
    # numpy.arange thresholds 0.6000000000000001 / 0.7000000000000001 miss it -> 6/11 or 7/11.
    objs = [([10 * k + 1, 1, 10 * k + 8, 8], False) for k in range(npos)]
    dets = [(1.0 - 0.01 * k, objs[k][0]) for k in range(hits)]
    r = one_image(objs, dets, "voc07")
    assert r.rec[-1] == hits / npos == (0.6 if npos == 5 else 0.7)
    matlab_points = round(hits / npos * 10) + 1
    assert r.ap == pytest.approx(matlab_points / 11, abs=1e-15)
    numpy_ap = sum(max(r.prec[r.rec >= t], default=0.0) for t in np.arange(0, 1.1, 0.1)) / 11
    assert numpy_ap == pytest.approx((matlab_points - 1) / 11, abs=1e-15)
    assert r.ap != pytest.approx(numpy_ap)


def test_no_ground_truth_and_no_detections():
    ds = make_dataset(["x", "y"], [[("cat", A, False)], [("dog", B, True)]], ["cat", "dog", "bird"])
    res = evaluate_detections(ds, per_class_arrays({"cat": [("x", 0.5, FAR)], "dog": [("y", 0.9, B)]}), "voc07")
    # cat: npos 1, one FP -> AP 0 (a real 0, averaged); dog: only a difficult object (npos 0) and a
    # detection on it -> rec 0/0 = NaN -> the devkit's AP is 0, reported NaN, not averaged;
    # bird: nothing at all -> NaN, not averaged.
    assert res.ap["cat"] == 0.0
    assert math.isnan(res.ap["dog"]) and math.isnan(res.ap["bird"])
    assert res.per_class["dog"].npos == 0 and res.per_class["bird"].npos == 0
    assert res.mAP == 0.0
    j = res.to_json()
    assert j["ap"] == {"cat": 0.0, "dog": None, "bird": None} and j["mAP"] == 0.0


def test_voc_ap_directly():
    # rec/prec given directly (the devkit's two AP functions)
    rec, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert voc_ap(rec, prec, "voc07") == pytest.approx((6 * 1 + 5 * 0.5) / 11, abs=1e-15)
    assert voc_ap(rec, prec, "voc12") == pytest.approx(0.5 * 1 + 0.5 * 0.5, abs=1e-15)
    assert voc_ap(np.zeros(0), np.zeros(0), "voc07") == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), "voc12") == 0.0
    with pytest.raises(ValueError):
        voc_ap(rec, prec, "voc2010")


def test_ap_table_and_json():
    ds = make_dataset(["x"], [[("cat", A, False)]], ["cat", "dog"])
    res = evaluate_detections(ds, per_class_arrays({"cat": [("x", 0.5, A)]}), "voc12")
    assert isinstance(res, EvalResult) and res.metric == "voc12" and res.mAP == 1.0
    table = format_ap_table(res, ["cat", "dog"])
    assert "cat" in table and "1.0000" in table and "mAP" in table
    row = [line for line in table.splitlines() if line.startswith("dog")][0]
    assert "-" in row and "nan" not in row.lower()
    j = res.to_json()
    assert j["metric"] == "voc12" and j["mAP"] == 1.0 and j["ap"] == {"cat": 1.0, "dog": None}


# =====================================================================================
# Results files
# =====================================================================================


def tiny_dataset(split="test") -> Dataset:
    recs = [[("cat", A, False), ("dog", B, False), ("cat", C, True)],
            [("dog", [5, 5, 60, 40], False)],
            [],
            [("cat", [3, 7, 33, 47], False), ("cat", [30, 7, 70, 47], False)]]
    return make_dataset(["im0", "im1", "im2", "im3"], recs, ["cat", "dog"], split)


def random_internal_detections(ds: Dataset, seed: int, n=12):
    rng = np.random.default_rng(seed)
    out = {}
    for r in ds.records:
        k = int(rng.integers(0, n))
        x1y1 = rng.uniform(-5, 60, size=(k, 2))
        wh = rng.uniform(1, 40, size=(k, 2))
        boxes = np.concatenate([x1y1, x1y1 + wh], axis=1)
        if len(r.boxes):                      # some near the ground truth
            m = rng.random(k) < 0.6
            src = r.boxes[rng.integers(0, len(r.boxes), size=k)].astype(np.float64)
            boxes[m] = src[m] + rng.normal(0, 1.5, size=(int(m.sum()), 4))
        scores = rng.uniform(-1, 1, size=k)
        scores[rng.random(k) < 0.3] = 0.5      # ties
        out[r.image_id] = {"boxes": boxes, "scores": scores, "labels": rng.integers(0, 2, size=k)}
    return out


def test_results_file_round_trip(tmp_path):
    ds = tiny_dataset()
    dets = random_internal_detections(ds, 3)
    files = write_voc_results(tmp_path, "test", ds.classes, dets)
    assert [f.name for f in files] == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt"]
    raw = read_voc_results(tmp_path, "test", ds.classes)
    for k, c in enumerate(ds.classes):
        ids, scores, boxes = raw[c]
        exp = [(iid, s, b) for iid, d in dets.items()
               for j in np.argsort(-d["scores"], kind="stable")
               for s, b, lab in [(d["scores"][j], d["boxes"][j], d["labels"][j])] if lab == k]
        assert ids == [e[0] for e in exp]
        # scores survive to the written precision (the ranking, ties included, is kept)
        assert np.abs(scores - [e[1] for e in exp]).max(initial=0) <= 5e-7
        # VOC coordinates = internal + (1, 1, 0, 0), to the written precision (2 decimals)
        voc = np.array([e[2] for e in exp]).reshape(-1, 4) + [1, 1, 0, 0]
        assert np.abs(boxes - voc).max(initial=0) <= 0.005 + 1e-9
        # and exactly what %.2f writes
        assert boxes.tolist() == [[float(f"{v:.2f}") for v in b] for b in voc]
    # every line has the documented format
    line = files[0].read_text().splitlines()[0]
    assert re.fullmatch(r"im\d \S+ -?\d+\.\d\d -?\d+\.\d\d -?\d+\.\d\d -?\d+\.\d\d", line)


def test_integer_boxes_round_trip_exactly(tmp_path):
    # VOC ground truth read as internal (xmin - 1), written back: the same integers, and back again
    ds = tiny_dataset()
    gt = {r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels} for r in ds}
    write_voc_results(tmp_path, "test", ds.classes, gt)
    raw = read_voc_results(tmp_path, "test", ds.classes)
    got = sorted((iid, tuple(b)) for c in ds.classes for iid, b in zip(raw[c][0], raw[c][2].tolist()))
    exp = sorted((r.image_id, tuple((r.boxes[j].astype(float) + [1, 1, 0, 0]).tolist()))
                 for r in ds for j in range(len(r.boxes)))
    assert got == exp
    line = (tmp_path / "comp4_det_test_cat.txt").read_text().splitlines()[0]
    assert line.split()[2:] == ["1.00", "1.00", "10.00", "10.00"]


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_evaluator_equals_results_files(tmp_path, metric):
    ds = tiny_dataset()
    for seed in range(4):
        dets = random_internal_detections(ds, 100 + seed)
        ev = VOCEvaluator(ds, metric)
        ev.reset()
        for iid, d in dets.items():
            ev.process(iid, d["boxes"], d["scores"], d["labels"])
        mem = ev.evaluate()
        out = tmp_path / f"r{seed}"
        write_voc_results(out, "test", ds.classes, dets)
        disk = evaluate_voc_results(ds, out, metric)
        for c in ds.classes:
            assert same(mem.per_class[c].ap, disk.per_class[c].ap, 0.0), (seed, c)
            assert np.array_equal(mem.per_class[c].tp, disk.per_class[c].tp)
        assert same(mem.mAP, disk.mAP, 0.0)
        # and the file path agrees with the literal devkit on exactly what is in the files
        raw = read_voc_results(out, "test", ds.classes)
        recs = [[(ds.classes[int(lab)], (b.astype(float) + [1, 1, 0, 0]).tolist(), bool(df))
                 for b, lab, df in zip(r.boxes, r.labels, r.difficult)] for r in ds]
        for c in ds.classes:
            ids, sc, bx = raw[c]
            _, _, ap, _, _ = literal_vocevaldet([r.image_id for r in ds], recs, c, ids, sc.tolist(), bx.tolist(),
                                                metric=metric)
            assert same(disk.per_class[c].ap, ap)
    # reset forgets everything
    ev.reset()
    assert all(len(r.tp) == 0 for r in ev.evaluate().per_class.values())


def test_ground_truth_fed_back_gives_one(tmp_path):
    ds = tiny_dataset()
    gt = {r.image_id: {"boxes": r.boxes, "scores": np.linspace(1, 0.5, len(r.boxes)), "labels": r.labels}
          for r in ds}
    write_voc_results(tmp_path, "test", ds.classes, gt)
    for metric in ("voc07", "voc12"):
        res = evaluate_voc_results(ds, tmp_path, metric)
        assert res.mAP == pytest.approx(1.0, abs=1e-12)
        assert res.ap == pytest.approx({"cat": 1.0, "dog": 1.0}, abs=1e-12)
        ev = VOCEvaluator(ds, metric)
        for iid, d in gt.items():
            ev.process(iid, d["boxes"], d["scores"], d["labels"])
        assert ev.evaluate().mAP == pytest.approx(1.0, abs=1e-12)


def _one_line_error(exc_info, *must_contain):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for s in must_contain:
        assert s in msg, (s, msg)
    return msg


def test_results_file_errors(tmp_path):
    ds = tiny_dataset()
    write_voc_results(tmp_path, "test", ds.classes, {})
    f = tmp_path / "comp4_det_test_cat.txt"

    f.write_text("im0 0.5 1 1 10 10\nim0 0.5 1 1 10\n")                 # 5 fields on line 2
    with pytest.raises(ResultsError) as e:
        evaluate_voc_results(ds, tmp_path, "voc07")
    _one_line_error(e, str(f), ":2")

    f.write_text("\nim0 0.5 1 1 ten 10\n")                              # non-numeric on line 2
    with pytest.raises(ResultsError) as e:
        evaluate_voc_results(ds, tmp_path, "voc07")
    _one_line_error(e, str(f), ":2")

    f.write_text("im0 0.5 1 1 10 10\nim0 0.4 1 1 10 10\nnope 0.5 1 1 10 10\n")   # unknown image, line 3
    with pytest.raises(ResultsError) as e:
        evaluate_voc_results(ds, tmp_path, "voc07")
    _one_line_error(e, str(f), ":3", "nope")

    f.unlink()                                                          # a missing class file
    with pytest.raises(ResultsError) as e:
        evaluate_voc_results(ds, tmp_path, "voc07")
    _one_line_error(e, "comp4_det_test_cat.txt")

    with pytest.raises(ResultsError) as e:                               # a missing folder
        evaluate_voc_results(ds, tmp_path / "nowhere", "voc07")
    _one_line_error(e, "nowhere")

    with pytest.raises(ResultsError) as e:                               # no file of this split
        evaluate_voc_results(tiny_dataset("val"), tmp_path, "voc07")
    _one_line_error(e, "val")


def test_evaluator_rejects_unknown_image():
    ev = VOCEvaluator(tiny_dataset(), "voc07")
    with pytest.raises(ResultsError):
        ev.process("not_in_split", np.zeros((1, 4)) + [0, 0, 5, 5], np.ones(1), np.zeros(1, int))


# =====================================================================================
# Real data (development machines only)
# =====================================================================================


def _raw_voc_recs(root: Path, ids):
    """Ground truth exactly as PASreadrecord reads it: raw XML coordinates, annotation order."""
    recs = []
    for iid in ids:
        objs = []
        for o in ET.parse(root / "Annotations" / f"{iid}.xml").getroot().findall("object"):
            bb = o.find("bndbox")
            box = [float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
            d = o.find("difficult")
            objs.append((o.find("name").text.strip(), box, d is not None and d.text.strip() == "1"))
        recs.append(objs)
    return recs


@pytest.mark.parametrize("split", ["trainval", "test"])
def test_voc2012_sample100_reference_detections(tmp_path, split):
    """The sample detections shipped with voc2012_sample100, scored by the module and the devkit."""
    from sppdet.data import load_dataset

    root = shared_dataset("voc2012_sample100")
    ref = root / "reference_detections"
    names = [n.strip() for n in (ref / "voc.names").read_text().splitlines() if n.strip()]
    assert names == list(VOC_CLASSES)                      # class_id indexes the devkit's class order
    ds = load_dataset(root, split)
    assert ds.classes == list(VOC_CLASSES)
    ids = [r.image_id for r in ds]
    recs = _raw_voc_recs(root, ids)
    lines = {c: [] for c in names}
    n_confident = 0
    agree = np.zeros(len(names))                           # confident detections whose class is in
    for iid, objs in zip(ids, recs):                        # the image, per cyclic shift of the ids
        f = ref / "abs_xyx2y2" / f"{iid}.txt"
        if not f.is_file():
            continue
        present = {o[0] for o in objs}
        for row in f.read_text().split("\n"):
            if not row.strip():
                continue
            k, s, x1, y1, x2, y2 = row.split()
            lines[names[int(k)]].append(f"{iid} {s} {x1} {y1} {x2} {y2}")
            if float(s) > 0.8:
                n_confident += 1
                agree += [names[(int(k) + sh) % len(names)] in present for sh in range(len(names))]
    # the class ids mean what voc.names says: with that mapping most confident detections name a
    # class present in their image, far more than with any shifted mapping
    assert agree[0] >= 0.6 * n_confident and agree[0] > 2 * agree[1:].max(), agree
    for c in names:
        (tmp_path / f"comp4_det_{split}_{c}.txt").write_text("".join(x + "\n" for x in lines[c]))
    figures = {}
    for metric in ("voc07", "voc12"):
        res = evaluate_voc_results(ds, tmp_path, metric)
        raw = read_voc_results(tmp_path, split, names)
        aps = []
        for c in names:
            i_, s_, b_ = raw[c]
            _, _, ap, _, _ = literal_vocevaldet(ids, recs, c, i_, s_.tolist(), b_.tolist(), metric=metric)
            assert same(res.per_class[c].ap, ap), (metric, c, res.per_class[c].ap, ap)
            if res.per_class[c].npos > 0:
                aps.append(ap)
        assert same(res.mAP, float(np.mean(aps)))
        figures[metric] = res.mAP
    # plausible figures for a real detector's sample output (and voc12 >= a bit below voc07 usually)
    assert all(0.05 < v < 1.0 for v in figures.values()), figures


def test_voc2007_fixture5_ground_truth_gives_one(tmp_path):
    from sppdet.data import load_dataset

    root = shared_dataset("voc2007_fixture5")
    ds = load_dataset(root, "test")
    write_voc_results(tmp_path, "test", ds.classes,
                      {r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels}
                       for r in ds})
    for metric in ("voc07", "voc12"):
        res = evaluate_voc_results(ds, tmp_path, metric)
        assert res.mAP == pytest.approx(1.0, abs=1e-12)
        present = {c for c in ds.classes if res.per_class[c].npos > 0}
        assert present == {"car", "chair", "dog", "person", "train", "sofa"}
        assert all(math.isnan(a) for c, a in res.ap.items() if c not in present)


# =====================================================================================
# More cases: MATLAB-observed colon values, results-file format and errors, evaluator input checks
# =====================================================================================


def test_matlab_colon_matches_observed_matlab_values():
    # Observed in MATLAB (MathWorks Answers, "How does the COLON operator work?", 2012):
    #   x = 0:0.1:0.3; y = 0:0.1:0.4; x - y(1:end-1)  ->  1.0e-16 * [0 0 -0.2776 -0.5551]
    x = matlab_colon(0, 0.1, 0.3)
    y = matlab_colon(0, 0.1, 0.4)
    diff = x - y[:-1]
    assert diff[0] == 0 and diff[1] == 0
    assert diff[2] == pytest.approx(-0.2776e-16, abs=1e-20)
    assert diff[3] == pytest.approx(-0.5551e-16, abs=1e-20)
    assert x[-1] == 0.3                               # the end point is b itself, not 3*0.1
    v = matlab_colon(-1, 0.01, 1)
    assert len(v) == 201 and np.array_equal(v, -v[::-1]) and v[100] == 0.0


def test_matlab_colon_randomised_against_colonop():
    rng = np.random.default_rng(7)
    for _ in range(400):
        a = float(rng.choice([0.0, float(rng.integers(-5, 5)), rng.uniform(-5, 5), round(rng.uniform(-5, 5), 1)]))
        d = float(rng.choice([0.1, 0.01, 0.05, 1 / 3, 1.0, 2.0, rng.uniform(0.01, 2)]))
        b = a + float(rng.choice([d * rng.integers(0, 40), rng.uniform(0, 20), float(rng.integers(0, 9)) - 1e-15]))
        assert matlab_colon(a, d, b).tolist() == m_colon(a, d, b), (a, d, b)


def test_internal_boxes_are_scored_on_their_voc_coordinates():
    # internal (5,0,15,10) -> VOC (6,1,15,10) vs ground truth VOC (1,1,10,10):
    #   iw = 10 - 6 + 1 = 5, ih = 10 -> 50 / (100 + 100 - 50) = 1/3 -> FP
    # internal (0,0,10,5) -> VOC (1,1,10,5): 50 / (100 + 50 - 50) = 0.5 -> TP
    ds = make_dataset(["im"], [[("cat", [1, 1, 10, 10], False)]], ["cat"])
    ev = VOCEvaluator(ds, "voc12")
    ev.process("im", np.array([[5.0, 0.0, 15.0, 10.0]]), np.array([0.9]), np.array([0]))
    assert ev.evaluate().ap["cat"] == 0.0
    ev.reset()
    ev.process("im", np.array([[0.0, 0.0, 10.0, 5.0]]), np.array([0.9]), np.array([0]))
    assert ev.evaluate().ap["cat"] == 1.0


def test_results_file_exact_lines(tmp_path):
    ds = make_dataset(["000005"], [[("b", [1, 1, 10, 10], False)]], ["a", "b"])
    dets = {"000005": {"boxes": np.array([[0.0, 0.0, 10.0, 10.0], [4.25, 5.5, 20.126, 30.0]]),
                       "scores": np.array([0.123456789, 0.5]), "labels": np.array([1, 1])}}
    write_voc_results(tmp_path, "test", ds.classes, dets)
    assert (tmp_path / "comp4_det_test_a.txt").read_text() == ""          # every class gets a file
    # by decreasing score; the score written exactly (shortest repr), coordinates 1-based, 2 decimals
    assert (tmp_path / "comp4_det_test_b.txt").read_text().splitlines() == [
        "000005 0.5 5.25 6.50 20.13 30.00",
        "000005 0.123456789 1.00 1.00 10.00 10.00",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comp4_det_test_a.txt", "comp4_det_test_b.txt"]
    with pytest.raises(ValueError, match="whitespace"):
        write_voc_results(tmp_path, "test", ds.classes, {"a b": dets["000005"]})
    with pytest.raises(ValueError, match="label out of range"):
        write_voc_results(tmp_path, "test", ds.classes,
                          {"000005": {"boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([2])}})


@pytest.mark.parametrize("line, match", [
    ("im 0.5 1 2 3", r"comp4_det_test_cat\.txt:2: expected .* got 5 fields"),
    ("im 0.5 1 2 3 4 5", r":2: expected .* got 7 fields"),
    ("im high 1 2 3 4", r":2: non-numeric score or coordinate"),
    ("im nan 1 2 3 4", r":2: score is NaN"),
    ("im 0.5 1 2 inf 4", r":2: non-finite coordinate"),
    ("other 0.5 1 2 3 4", r"comp4_det_test_cat\.txt:2: unrecognized image 'other'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, match):
    ds = make_dataset(["im"], [[("cat", A, False)]], ["cat"])
    (tmp_path / "comp4_det_test_cat.txt").write_text("im 0.9 1 1 10 10\n" + line + "\n")
    with pytest.raises(ResultsError, match=match) as e:
        evaluate_voc_results(ds, tmp_path, "voc07")
    assert "\n" not in str(e.value)


def test_results_folder_problems(tmp_path):
    ds = make_dataset(["im"], [[("cat", A, False)]], ["cat", "dog"])
    (tmp_path / "f.txt").write_text("")
    with pytest.raises(ResultsError, match="not a folder"):
        evaluate_voc_results(ds, tmp_path / "f.txt")
    (tmp_path / "comp4_det_test_cat.txt").write_text("im 1.0 1 1 10 10\n")
    with pytest.raises(ResultsError, match="missing results file comp4_det_test_dog.txt"):
        evaluate_voc_results(ds, tmp_path)
    res = evaluate_voc_results(ds, tmp_path, "voc12", allow_missing=True)
    assert res.ap["cat"] == 1.0 and math.isnan(res.ap["dog"])
    (tmp_path / "comp4_det_test_dog.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ResultsError, match="comp4_det_test_dog.txt: not a UTF-8 text file"):
        evaluate_voc_results(ds, tmp_path)


def test_evaluator_input_checks():
    ev = VOCEvaluator(make_dataset(["im"], [[("cat", A, False)]], ["cat"]), "voc07")
    with pytest.raises(ValueError, match="label out of range"):
        ev.process("im", np.zeros((1, 4)), np.ones(1), np.array([1]))
    with pytest.raises(ValueError, match="NaN"):
        ev.process("im", np.zeros((1, 4)), np.array([np.nan]), np.zeros(1, int))
    with pytest.raises(ValueError, match="1 boxes, 2 scores"):
        ev.process("im", np.zeros((1, 4)), np.ones(2), np.zeros(1, int))
    with pytest.raises(ValueError, match="metric"):
        VOCEvaluator(make_dataset(["im"], [[]], ["cat"]), "coco")
