"""The false-positive breakdown (sppdet.evaluation.errors) against hand-built cases and a slow,
obvious reference written here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sppdet.data.records import Dataset, ImageRecord
from sppdet.evaluation.errors import (ERROR_TYPES, VOC_GROUPS, error_breakdown, error_breakdown_from_detections,
                                      error_breakdown_from_results, similar_classes)
from sppdet.evaluation.voc import ResultsError, eval_class, evaluate_voc_results, ground_truth, write_voc_results

# ---------------------------------------------------------------------------- the slow reference


def ref_overlap(a, b):
    """VOCevaldet.m's overlap of two 1-based inclusive boxes; None when the devkit skips the pair."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if not (iw > 0 and ih > 0):
        return None
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - iw * ih
    return iw * ih / ua


def ref_objects(rec):
    """(VOC box as 4 floats, class index, difficult) of every object of a record, annotation order."""
    return [((float(b[0]) + 1, float(b[1]) + 1, float(b[2]), float(b[3])), int(l), bool(d))
            for b, l, d in zip(rec.boxes, rec.labels, rec.difficult)]


def ref_kinds(dataset, cls, ids, scores, boxes, groups=VOC_GROUPS):
    """Every detection's kind in ranking order, one detection at a time."""
    c = dataset.classes.index(cls)
    similar = {k for k, name in enumerate(dataset.classes)
               if name != cls and any(cls in g and name in g for g in groups.values())}
    recs = {r.image_id: r for r in dataset.records}
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))     # stable, highest first
    detected = set()
    kinds = []
    for j in order:
        objs = ref_objects(recs[ids[j]])
        best, jbest = -math.inf, None
        for g, (box, lab, _) in enumerate(objs):
            if lab == c:
                ov = ref_overlap(boxes[j], box)
                if ov is not None and ov > best:
                    best, jbest = ov, g
        def hits(pred):
            return any(pred(lab) and (ov := ref_overlap(boxes[j], box)) is not None and ov >= 0.1
                       for box, lab, _ in objs)
        if best >= 0.5:
            if objs[jbest][2]:
                kinds.append("ignored")
            elif (ids[j], jbest) not in detected:
                detected.add((ids[j], jbest))
                kinds.append("tp")
            else:
                kinds.append("localisation")
        elif best >= 0.1:
            kinds.append("localisation")
        elif hits(lambda lab: lab in similar):
            kinds.append("similar")
        elif hits(lambda lab: lab != c):
            kinds.append("other")
        else:
            kinds.append("background")
    return order, kinds


def ref_fixed_detections(dataset, cls, ids, scores, boxes):
    """The detections with the localisation errors fixed by hand: a detection overlapping an object
    of its class by >= 0.1 is moved onto the first best such object (onto a difficult one: the
    devkit then ignores it), unless that object is taken already, in which case it is dropped."""
    c = dataset.classes.index(cls)
    recs = {r.image_id: r for r in dataset.records}
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    taken = set()
    out_ids, out_scores, out_boxes = [], [], []
    for j in order:
        objs = ref_objects(recs[ids[j]])
        best, jbest = -math.inf, None
        for g, (box, lab, _) in enumerate(objs):
            if lab == c:
                ov = ref_overlap(boxes[j], box)
                if ov is not None and ov > best:
                    best, jbest = ov, g
        box = boxes[j]
        if best >= 0.1:
            if (ids[j], jbest) in taken and not objs[jbest][2]:
                continue
            taken.add((ids[j], jbest))
            box = objs[jbest][0]
        out_ids.append(ids[j])
        out_scores.append(scores[j])
        out_boxes.append(box)
    return out_ids, np.array(out_scores, dtype=np.float64), np.array(out_boxes, dtype=np.float64).reshape(-1, 4)


# ---------------------------------------------------------------------------- hand-built cases


def rec(image_id, objects, size=400):
    """objects: (x1, y1, x2, y2, class index, difficult) in internal 0-based coordinates."""
    boxes = np.array([o[:4] for o in objects], dtype=np.float32).reshape(-1, 4)
    return ImageRecord(image_id, f"/nonexistent/{image_id}.jpg", size, size, boxes,
                       np.array([o[4] for o in objects], dtype=np.int64),
                       np.array([o[5] for o in objects], dtype=bool))


CLASSES = ["bird", "cat", "dog", "person", "car", "chair"]
CAT, DOG, PERSON, CAR = 1, 2, 3, 4


def voc(x1, y1, x2, y2):
    """An internal box as the VOC box a results file holds."""
    return (x1 + 1.0, y1 + 1.0, float(x2), float(y2))


def hand_dataset():
    return Dataset("hand", "test", CLASSES, [
        rec("a", [(0, 0, 100, 100, CAT, False), (200, 0, 300, 100, DOG, False),
                  (0, 200, 100, 300, PERSON, False), (300, 300, 390, 390, CAT, True)]),
        rec("b", [(0, 0, 100, 100, CAT, False), (200, 200, 300, 300, CAT, False),
                  (0, 200, 100, 300, CAR, False)]),
    ])


def test_each_type_in_a_hand_built_case():
    ds = hand_dataset()
    dets = [  # (image, score, VOC box), the kind expected
        ("a", 0.95, voc(0, 0, 100, 100)),        # tp on cat a0
        ("a", 0.90, voc(5, 5, 100, 100)),        # IoU 0.9025 with a0, already detected: duplicate
        ("a", 0.85, voc(50, 0, 150, 100)),       # IoU 1/3 with a0: localisation
        ("a", 0.80, voc(200, 0, 300, 100)),      # on the dog: similar class
        ("a", 0.75, voc(0, 200, 100, 300)),      # on the person: other class
        ("a", 0.70, voc(120, 120, 180, 180)),    # nothing: background
        ("a", 0.65, voc(300, 300, 390, 390)),    # the difficult cat: ignored
        ("b", 0.60, voc(0, 200, 100, 300)),      # on the car: other (car is a vehicle, cat an animal)
        ("b", 0.55, voc(200, 200, 300, 300)),    # tp on cat b1
        ("b", 0.50, voc(0, 0, 100, 100)),        # tp on cat b0
    ]
    want = ["tp", "localisation", "localisation", "similar", "other", "background", "ignored", "other",
            "tp", "tp"]
    ids = [d[0] for d in dets]
    scores = np.array([d[1] for d in dets])
    boxes = np.array([d[2] for d in dets])
    b = error_breakdown(ds, {"cat": (ids, scores, boxes)})
    r = b.per_class["cat"]
    assert r.ranked == want
    assert r.npos == 3 and r.considered == 3            # N = 3 non-difficult cats: the top 3 detections
    assert (r.tp, r.ignored, r.fp, r.duplicates) == (1, 0, 2, 1)
    assert r.counts == {"localisation": 2, "similar": 0, "other": 0, "background": 0}
    # every detection: 'all'
    a = error_breakdown(ds, {"cat": (ids, scores, boxes)}, top="all").per_class["cat"]
    assert a.considered == 10 and (a.tp, a.ignored, a.duplicates) == (3, 1, 1)
    assert a.counts == {"localisation": 2, "similar": 1, "other": 2, "background": 1}
    assert a.fractions["other"] == pytest.approx(2 / 6)
    # the devkit's figures agree: same AP, same false positives among the top 3
    dev = eval_class(ids, scores, boxes, ground_truth(ds, CAT))
    assert r.ap == dev.ap and dev.fp[2] == r.fp and dev.tp[2] == r.tp
    # localisation fixed: the duplicate goes, the 1/3-overlap box is a duplicate of a0 too (a0 is
    # taken), so both are removed: TP, sim, other, bg, ign, other, TP, TP -> recall 1 at rank 8
    fixed = eval_class(*ref_fixed_detections(ds, "cat", ids, list(scores), [tuple(x) for x in boxes]),
                       ground_truth(ds, CAT))
    assert r.ap_loc_fixed == fixed.ap and r.ap_loc_fixed > r.ap
    # classes without detections: nothing counted, AP 0 where there are objects, NaN where none
    assert b.per_class["dog"].fp == 0 and b.per_class["dog"].ap == 0.0
    assert b.per_class["bird"].npos == 0 and math.isnan(b.per_class["bird"].ap)


def test_precedence_and_the_boundaries():
    """localisation > similar > other > background; 0.1 and 0.5 themselves count (>=)."""
    ds = Dataset("p", "test", CLASSES, [
        rec("a", [(0, 0, 10, 10, CAT, False), (100, 100, 200, 200, DOG, False), (100, 100, 210, 200, PERSON, False),
                  (300, 0, 400, 100, PERSON, False)]),
        rec("b", [(0, 0, 10, 10, CAT, False), (0, 0, 10, 1, CAR, False)]),
    ])
    dets = [
        ("a", 5.0, voc(0, 0, 10, 5)),            # IoU exactly 0.5 with the cat: a match (the devkit's >=)
        ("b", 4.0, voc(0, 0, 10, 1)),            # IoU exactly 0.1 with cat b0, 1.0 with the car: localisation
        ("a", 3.0, voc(100, 100, 200, 200)),     # on the dog (1.0) and the person (~0.91): similar wins
        ("a", 2.0, voc(300, 0, 400, 100)),       # other
        ("a", 1.0, voc(20, 20, 30, 30)),         # background
    ]
    ids = [d[0] for d in dets]
    scores = np.array([d[1] for d in dets])
    boxes = np.array([d[2] for d in dets])
    r = error_breakdown(ds, {"cat": (ids, scores, boxes)}, top="all").per_class["cat"]
    assert r.ranked == ["tp", "localisation", "similar", "other", "background"]
    order, kinds = ref_kinds(ds, "cat", ids, list(scores), [tuple(x) for x in boxes])
    assert kinds == r.ranked
    # without groups (or for classes outside VOC's 20) there is no "similar class"
    r = error_breakdown(ds, {"cat": (ids, scores, boxes)}, top="all", groups={}).per_class["cat"]
    assert r.ranked == ["tp", "localisation", "other", "other", "background"]
    # custom groups by name
    r = error_breakdown(ds, {"cat": (ids, scores, boxes)}, top="all",
                        groups={"x": ("cat", "person")}).per_class["cat"]
    assert r.ranked[2:4] == ["similar", "similar"]


def test_classes_outside_voc_have_no_groups():
    assert similar_classes(["a", "b", "c"]) == {"a": frozenset(), "b": frozenset(), "c": frozenset()}
    sim = similar_classes(["cat", "dog", "sofa", "chair", "person", "train", "bus", "shape"])
    assert sim["cat"] == {"dog"} and sim["sofa"] == {"chair"} and sim["train"] == {"bus"}
    assert sim["person"] == frozenset() and sim["shape"] == frozenset()
    ds = Dataset("s", "test", ["a", "b"], [rec("x", [(0, 0, 50, 50, 1, False), (100, 100, 150, 150, 0, False)])])
    b = error_breakdown(ds, {"a": (["x"], np.array([1.0]), np.array([voc(0, 0, 50, 50)]))})
    assert b.per_class["a"].ranked == ["other"] and b.groups == {}


def test_ground_truth_as_detections_has_no_false_positive():
    ds = hand_dataset()
    dets = {r.image_id: {"boxes": r.boxes, "scores": np.linspace(1, 0.5, len(r.boxes)), "labels": r.labels}
            for r in ds.records}
    b = error_breakdown_from_detections(ds, dets)
    assert b.fp == 0 and all(r.ap_loc_fixed == r.ap for r in b.per_class.values() if r.npos)
    assert b.per_class["cat"].ap == pytest.approx(1.0)
    assert "no false positives" in b.summary()


def test_unknown_image_and_nan_score_are_errors():
    ds = hand_dataset()
    with pytest.raises(ResultsError, match="unrecognized image 'zz'"):
        error_breakdown(ds, {"cat": (["zz"], np.array([1.0]), np.array([voc(0, 0, 5, 5)]))})
    with pytest.raises(ResultsError, match="NaN"):
        error_breakdown(ds, {"cat": (["a"], np.array([np.nan]), np.array([voc(0, 0, 5, 5)]))})


# ---------------------------------------------------------------------------- random cases


VOC6 = ["cat", "dog", "car", "bus", "person", "sofa"]


def random_case(seed, n_images=6, n_det=40):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        objs = []
        for _ in range(rng.integers(0, 6)):
            x1, y1 = rng.integers(0, 150, 2)
            w, h = rng.integers(8, 90, 2)
            objs.append((float(x1), float(y1), float(x1 + w), float(y1 + h), int(rng.integers(0, len(VOC6))),
                         bool(rng.random() < 0.15)))
        records.append(rec(f"{i:03d}", objs, 256))
    ds = Dataset("r", "test", VOC6, records)
    per_class = {}
    for c in VOC6:
        ids, scores, boxes = [], [], []
        for _ in range(rng.integers(0, n_det)):
            r = records[rng.integers(0, n_images)]
            if len(r.boxes) and rng.random() < 0.7:     # near some object (of any class): all kinds occur
                g = r.boxes[rng.integers(0, len(r.boxes))].astype(np.float64)
                b = g + rng.normal(0, rng.choice([2.0, 10.0, 30.0]), 4)
            else:
                x1, y1 = rng.uniform(0, 200, 2)
                b = np.array([x1, y1, x1 + rng.uniform(5, 80), y1 + rng.uniform(5, 80)])
            b = np.round(np.array([min(b[0], b[2] - 1), min(b[1], b[3] - 1), b[2], b[3]]) + [1, 1, 0, 0], 2)
            ids.append(r.image_id)
            scores.append(float(np.round(rng.random(), 1)))          # many ties: the stable order matters
            boxes.append(tuple(b))
        per_class[c] = (ids, np.array(scores), np.array(boxes).reshape(-1, 4))
    return ds, per_class


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_random_cases_match_the_slow_reference(metric):
    seen = {k: 0 for k in ("tp", "ignored", *ERROR_TYPES)}
    for seed in range(25):
        ds, per_class = random_case(seed)
        b = error_breakdown(ds, per_class, metric=metric)
        total = {k: 0 for k in ERROR_TYPES}
        for c in VOC6:
            ids, scores, boxes = per_class[c]
            r = b.per_class[c]
            _, kinds = ref_kinds(ds, c, ids, list(scores), [tuple(x) for x in boxes])
            assert r.ranked == kinds, (seed, c)
            for k in kinds:
                seen[k] += 1
            gt = ground_truth(ds, VOC6.index(c))
            dev = eval_class(ids, scores, boxes, gt, metric=metric)
            n = min(dev.npos, len(kinds))
            assert r.considered == n
            assert r.fp == (int(dev.fp[n - 1]) if n else 0) == sum(k in ERROR_TYPES for k in kinds[:n])
            assert r.tp == (int(dev.tp[n - 1]) if n else 0)
            for k in ERROR_TYPES:
                assert r.counts[k] == kinds[:n].count(k)
                total[k] += r.counts[k]
            if dev.npos:
                assert r.ap == dev.ap or (math.isnan(r.ap) and math.isnan(dev.ap))
                fixed = eval_class(*ref_fixed_detections(ds, c, ids, list(scores), [tuple(x) for x in boxes]),
                                   gt, metric=metric)
                assert r.ap_loc_fixed == fixed.ap or (math.isnan(r.ap_loc_fixed) and math.isnan(fixed.ap)), (seed, c)
                assert not r.ap_loc_fixed < r.ap - 1e-12          # fixing errors never hurts
        assert b.counts == total and b.fp == sum(total.values())
        json.dumps(b.to_json())                                     # serialisable (NaN -> null)
    assert all(v > 0 for v in seen.values()), seen                 # the cases exercise every kind


def test_from_detections_equals_from_the_written_results_files(tmp_path):
    """What `sppdet eval` writes and scores: the same breakdown from memory and from the files,
    and the same false positives as the devkit evaluator counts on those files."""
    rng = np.random.default_rng(3)
    ds, _ = random_case(11)
    dets = {}
    for r in ds.records:
        n = int(rng.integers(0, 12))
        x1, y1 = rng.uniform(0, 200, (2, n))
        boxes = np.stack([x1, y1, x1 + rng.uniform(4, 80, n), y1 + rng.uniform(4, 80, n)], 1).astype(np.float32)
        k = min(n, len(r.boxes))                         # some near the objects
        boxes[:k] = r.boxes[:k] + rng.normal(0, 3, (k, 4))
        dets[r.image_id] = {"boxes": boxes, "scores": np.round(rng.normal(size=n), 1).astype(np.float32),
                            "labels": rng.integers(0, len(VOC6), n)}
    write_voc_results(tmp_path, ds.split, VOC6, dets)
    mem = error_breakdown_from_detections(ds, dets, VOC6)
    files = error_breakdown_from_results(ds, tmp_path)
    assert mem.to_json() == files.to_json()
    assert [r.ranked for r in mem.per_class.values()] == [r.ranked for r in files.per_class.values()]
    ev = evaluate_voc_results(ds, tmp_path)
    for c, r in mem.per_class.items():
        n = r.considered
        assert r.fp == (int(ev.per_class[c].fp[n - 1]) if n else 0)
        assert r.ap == ev.per_class[c].ap or math.isnan(r.ap)
    j = mem.to_json()
    assert j["overall"]["fp"] == sum(j["overall"]["counts"].values()) == sum(v["fp"] for v in j["per_class"].values())
