import numpy as np
import pytest

from sppdet.detect import postprocess


def iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference(scores, boxes, w, h, nms, top, thr, pre):
    """Slow per-class greedy NMS, then the global top-k by score."""
    out = []
    n, k = scores.shape
    for c in range(k):
        order = sorted(range(n), key=lambda i: -scores[i, c])[:pre]
        kept = []
        for i in order:
            if thr is not None and scores[i, c] < thr:
                continue
            b = boxes[i, c].copy()
            b[[0, 2]] = np.clip(b[[0, 2]], 0, w)
            b[[1, 3]] = np.clip(b[[1, 3]], 0, h)
            if b[2] - b[0] <= 0 or b[3] - b[1] <= 0:
                continue
            if all(iou_ref(b, kb) <= nms for kb, _ in kept):
                kept.append((b, scores[i, c]))
        out += [(b, s, c) for b, s in kept]
    out.sort(key=lambda t: -t[1])
    return out[:top]


@pytest.mark.parametrize("thr", [None, 0.0])
def test_postprocess_matches_reference(thr):
    rng = np.random.default_rng(0)
    n, k, w, h = 80, 3, 200, 150
    xy = rng.uniform(-20, 180, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (n, k, 2))], 2)
    scores = rng.normal(0, 1, (n, k)).astype(np.float32)
    det = postprocess(scores, boxes, w, h, nms=0.3, max_per_image=25, score_threshold=thr, pre_nms_top=50)
    ref = reference(scores, boxes, w, h, 0.3, 25, thr, 50)
    assert len(det.boxes) == len(ref)
    for (b, s, c), db, ds, dl in zip(ref, det.boxes, det.scores, det.labels):
        assert dl == c and ds == pytest.approx(s)
        np.testing.assert_allclose(db, b, rtol=1e-5, atol=1e-4)
    assert (det.boxes[:, 0] >= 0).all() and (det.boxes[:, 2] <= w).all()


def test_postprocess_shared_boxes_and_empty():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, -0.5]], np.float32)
    det = postprocess(scores, boxes, 100, 100, nms=0.3, max_per_image=10)
    got = sorted((int(lab), round(float(s), 3)) for lab, s in zip(det.labels, det.scores))
    # class 0: box 1 suppressed by box 0 (IoU 0.68); class 1: box 0 suppressed by box 1
    assert got == [(0, 0.2), (0, 0.9), (1, -0.5), (1, 0.7)]
    assert len(postprocess(np.zeros((0, 2)), np.zeros((0, 4)), 10, 10).boxes) == 0


def vote_reference(cands, kept_box, kept_score, label, thr):
    """Slow box voting: the exp(score - kept score)-weighted mean of same-class candidates with IoU >= thr."""
    num, den = np.zeros(4), 0.0
    for b, s, c in cands:
        if c != label:
            continue
        if iou_ref(b, kept_box) >= thr or np.array_equal(b, kept_box):
            w = np.exp(s - kept_score)
            num += w * np.asarray(b, np.float64)
            den += w
    return num / den


@pytest.mark.parametrize("vthr", [0.3, 0.5, 0.8])
def test_box_voting_matches_reference(vthr):
    rng = np.random.default_rng(1)
    n, k, w, h = 60, 2, 200, 150
    xy = rng.uniform(0, 120, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 70, (n, k, 2))], 2)
    scores = rng.normal(0, 1, (n, k)).astype(np.float32)
    plain = postprocess(scores, boxes, w, h, nms=0.3, max_per_image=30, pre_nms_top=40)
    voted = postprocess(scores, boxes, w, h, nms=0.3, max_per_image=30, pre_nms_top=40, box_voting=vthr)
    # voting moves boxes only: the same detections, in the same order, with the same scores
    np.testing.assert_array_equal(voted.scores, plain.scores)
    np.testing.assert_array_equal(voted.labels, plain.labels)
    cands = []
    for c in range(k):
        for i in np.argsort(-scores[:, c], kind="stable")[:40]:
            b = np.clip(boxes[i, c], 0, [w, h, w, h]).astype(np.float32)
            cands.append((b, float(scores[i, c]), c))
    moved = 0
    for b0, b1, s, c in zip(plain.boxes, voted.boxes, plain.scores, plain.labels):
        ref = vote_reference(cands, b0, float(s), int(c), vthr)
        np.testing.assert_allclose(b1, ref, rtol=1e-5, atol=1e-3)
        moved += not np.allclose(b0, b1)
    assert moved > 0          # the case exercises voting


def test_box_voting_hand_worked():
    # two overlapping class-0 boxes (IoU 0.6 after NMS at 0.7 keeps only the first) and a far one
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60]], np.float32)
    scores = np.array([[2.0], [2.0 + np.log(0.5)], [1.0]], np.float32)
    det = postprocess(scores, boxes, 100, 100, nms=0.5, max_per_image=10, box_voting=0.5)
    # kept: box 0 (weight 1) voted with box 1 (weight 0.5): y2 = (10 + 0.5 * 6) / 1.5; box 2 alone
    np.testing.assert_allclose(det.boxes[0], [0, 0, 10, 13 / 1.5], rtol=1e-5)
    np.testing.assert_allclose(det.boxes[1], [50, 50, 60, 60])
    assert det.scores.tolist() == pytest.approx([2.0, 1.0])
