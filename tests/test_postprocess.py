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
