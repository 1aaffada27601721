"""COCO metrics through pycocotools (:mod:`sppdet.evaluation.coco`): oracles and hand-checkable cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sppdet.data.records import Dataset, ImageRecord
from sppdet.evaluation.coco import evaluate_coco
from sppdet.evaluation.voc import ResultsError, format_ap_table

#: pycocotools' IoU thresholds, .5:.05:.95 (as COCOeval's Params builds them)
COCO_IOUS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)


def dataset(objects, classes=("cat", "dog", "bird"), size=(200, 150)) -> Dataset:
    """One record per entry of ``objects``: a list of (class, internal box, difficult)."""
    recs = []
    for i, objs in enumerate(objects):
        recs.append(ImageRecord(f"im{i}", Path(f"/nonexistent/im{i}.jpg"), size[0], size[1],
                                np.array([b for _, b, _ in objs], dtype=np.float32).reshape(-1, 4),
                                np.array([classes.index(c) for c, _, _ in objs], dtype=np.int64),
                                np.array([d for _, _, d in objs], dtype=bool)))
    return Dataset("t", "test", list(classes), recs)


def gt_as_detections(ds: Dataset, with_difficult=True):
    out = {}
    for r in ds:
        keep = np.ones(len(r.boxes), bool) if with_difficult else ~r.difficult
        out[r.image_id] = {"boxes": r.boxes[keep].astype(np.float64), "scores": np.linspace(1, 0.5, int(keep.sum())),
                           "labels": r.labels[keep]}
    return out


def test_ground_truth_as_detections_gives_one():
    # small (< 32^2), medium and large (> 96^2) objects, a difficult one (iscrowd: ignored)
    ds = dataset([[("cat", [10, 10, 30, 30], False), ("dog", [50, 20, 110, 90], False)],
                  [("cat", [0, 0, 150, 120], False), ("dog", [5, 5, 20, 25], True)],
                  [("cat", [40, 40, 70, 80], False)]])
    res = evaluate_coco(ds, gt_as_detections(ds))
    assert res.metric == "coco"
    assert res.mAP == pytest.approx(1.0)
    for k in ("AP50", "AP75", "APs", "APm", "APl"):
        assert res.extra[k] == pytest.approx(1.0), k
    assert res.ap["cat"] == pytest.approx(1.0) and res.ap["dog"] == pytest.approx(1.0)
    assert math.isnan(res.ap["bird"])                     # no ground truth: not a class of this split
    j = res.to_json()
    assert j["metric"] == "coco" and j["mAP"] == pytest.approx(1.0) and j["ap"]["bird"] is None
    assert {"AP50", "AP75", "APs", "APm", "APl"} <= set(j)
    assert "AP50" in format_ap_table(res)


@pytest.mark.parametrize("iou", [0.72, 0.5 + 1e-6, 0.93, 0.97, 0.3])
def test_one_detection_at_known_iou(iou):
    # One 10 x 10 object (area 100: "small") and one detection of the same width whose height
    # makes the continuous IoU exactly `iou` (the detection lies inside the object).
    # Per threshold t, a single TP gives AP 1 (precision 1 at every recall point), a miss AP 0,
    # so AP@[.5:.95] = fraction of thresholds with iou >= t, AP50 = [iou >= .5], AP75 = [iou >= .75].
    ds = dataset([[("cat", [0, 0, 10, 10], False)]])
    det = {"im0": {"boxes": np.array([[0, 0, 10, 10 * iou]]), "scores": np.array([0.9]), "labels": np.array([0])}}
    res = evaluate_coco(ds, det)
    passed = [bool(iou >= t) for t in COCO_IOUS]
    assert res.mAP == pytest.approx(sum(passed) / len(COCO_IOUS), abs=1e-12)
    assert res.ap["cat"] == pytest.approx(sum(passed) / len(COCO_IOUS), abs=1e-12)
    assert res.extra["AP50"] == pytest.approx(float(iou >= 0.5), abs=1e-12)
    assert res.extra["AP75"] == pytest.approx(float(iou >= 0.75), abs=1e-12)
    assert res.extra["APs"] == pytest.approx(res.mAP)           # the only object is small
    assert math.isnan(res.extra["APm"]) and math.isnan(res.extra["APl"])   # no object in range


def test_ranking_hand_computed_at_iou_05():
    # Two objects; detections ranked FP, TP, TP at every threshold (exact boxes) except the FP.
    # COCO AP per threshold: precision at recall .5 is max(prec at rec >= .5) = 2/3 (interpolated),
    # at recall 1: 2/3 -> 101-point average = 2/3; the same at every threshold.
    ds = dataset([[("cat", [0, 0, 40, 40], False), ("cat", [100, 0, 140, 40], False)]])
    det = {"im0": {"boxes": np.array([[50, 50, 90, 90], [0, 0, 40, 40], [100, 0, 140, 40]], float),
                   "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([0, 0, 0])}}
    res = evaluate_coco(ds, det)
    assert res.mAP == pytest.approx(2 / 3, abs=1e-12)
    assert res.extra["AP50"] == pytest.approx(2 / 3, abs=1e-12)


def test_detection_on_difficult_object_is_ignored():
    ds = dataset([[("cat", [0, 0, 40, 40], False), ("cat", [100, 0, 140, 40], True)]])
    det = {"im0": {"boxes": np.array([[100, 0, 140, 40], [0, 0, 40, 40]], float),
                   "scores": np.array([0.9, 0.8]), "labels": np.array([0, 0])}}
    assert evaluate_coco(ds, det).mAP == pytest.approx(1.0)     # not an FP ranked first


def test_no_detections_scores_zero_not_nan():
    ds = dataset([[("cat", [0, 0, 40, 40], False)], []])
    for dets in ({}, {"im1": {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}}):
        res = evaluate_coco(ds, dets)
        assert res.mAP == 0.0 and res.ap["cat"] == 0.0 and res.extra["AP50"] == 0.0
        assert math.isnan(res.ap["dog"])


def test_unknown_image_is_an_error():
    ds = dataset([[("cat", [0, 0, 40, 40], False)]])
    with pytest.raises(ResultsError) as e:
        evaluate_coco(ds, {"elsewhere": {"boxes": np.zeros((1, 4)) + [0, 0, 5, 5], "scores": np.ones(1),
                                         "labels": np.zeros(1, int)}})
    assert "elsewhere" in str(e.value) and "\n" not in str(e.value)
