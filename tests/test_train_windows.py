import numpy as np
import pytest

from sppdet.data.records import ImageRecord
from sppdet.train.finetune import sample_windows
from sppdet.train.windows import build_windows


def iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_record(rng, n_gt=3, k=3):
    xy = rng.uniform(0, 200, (n_gt, 2))
    gt = np.concatenate([xy, xy + rng.uniform(20, 80, (n_gt, 2))], 1)
    return ImageRecord("img", "img.jpg", 300, 300, gt, rng.integers(0, k, n_gt))


def jitter(rng, boxes, n):
    base = boxes[rng.integers(0, len(boxes), n)]
    wh = np.concatenate([base[:, 2:] - base[:, :2]] * 2, 1)
    return base + rng.normal(0, 0.25, (n, 4)) * wh


def test_build_windows_matches_loop_reference():
    rng = np.random.default_rng(0)
    rec = make_record(rng, 4, 3)
    props = np.concatenate([jitter(rng, rec.boxes, 30), rng.uniform(0, 300, (10, 4))])
    props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)
    w = build_windows(5, rec, props, 3)
    assert w.index == 5 and len(w) == 4 + 40 and w.num_gt == 4
    np.testing.assert_array_equal(w.boxes[:4], rec.boxes)
    assert (w.gt_labels[:4] == rec.labels).all() and (w.gt_labels[4:] == -1).all()
    for i, b in enumerate(w.boxes):
        ious = [iou_ref(b, g) for g in rec.boxes]
        assert w.max_iou[i] == pytest.approx(max(ious), abs=1e-6)
        assert w.best_gt[i] == int(np.argmax(ious))
        assert w.best_label[i] == rec.labels[int(np.argmax(ious))]
        for c in range(3):
            ref = max([iou for iou, lab in zip(ious, rec.labels) if lab == c], default=0.0)
            assert w.iou[i, c] == pytest.approx(ref, abs=1e-6)
    # ground-truth windows overlap themselves perfectly
    assert np.allclose(w.max_iou[:4], 1.0)


def test_build_windows_without_ground_truth_and_cap():
    rec = ImageRecord("e", "e.jpg", 100, 100)
    w = build_windows(0, rec, np.array([[0, 0, 10, 10], [5, 5, 50, 50], [1, 1, 2, 2]], np.float32), 2,
                      max_proposals=2)
    assert len(w) == 2 and w.num_gt == 0
    assert (w.max_iou == 0).all() and (w.best_label == -1).all() and (w.iou == 0).all()


def test_sample_windows_fractions_and_ranges():
    rng = np.random.default_rng(1)
    rec = make_record(rng, 3, 3)
    props = np.concatenate([jitter(rng, rec.boxes, 400), rng.uniform(0, 300, (200, 4))])
    props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)
    w = build_windows(0, rec, props, 3)
    idx, lab = sample_windows(w, 64, 0.25, 0.5, 0.1, 0.5, np.random.default_rng(2))
    assert len(idx) == 64
    fg = lab > 0
    assert fg.sum() == 16                      # 25% of 64, enough foreground exists
    assert (w.max_iou[idx[fg]] >= 0.5).all()
    assert (lab[fg] == w.best_label[idx[fg]] + 1).all()
    assert ((w.max_iou[idx[~fg]] >= 0.1) & (w.max_iou[idx[~fg]] < 0.5)).all()
    assert len(set(idx[fg].tolist())) == 16     # foreground without replacement
    # same generator state -> same sample
    idx2, lab2 = sample_windows(w, 64, 0.25, 0.5, 0.1, 0.5, np.random.default_rng(2))
    assert (idx == idx2).all() and (lab == lab2).all()


def test_sample_windows_few_foreground_and_no_background_range():
    rec = ImageRecord("a", "a.jpg", 100, 100, np.array([[0, 0, 50, 50]], np.float32), np.array([1]))
    # proposals: one foreground (the box itself), the rest far away (IoU 0 < 0.1)
    props = np.array([[0, 0, 50, 50]] + [[60, 60, 70 + i, 70 + i] for i in range(10)], np.float32)
    w = build_windows(0, rec, props, 2)
    idx, lab = sample_windows(w, 16, 0.25, 0.5, 0.1, 0.5, np.random.default_rng(0))
    assert len(idx) == 16
    assert (lab > 0).sum() == 2                 # only 2 foreground windows exist (gt + identical proposal)
    assert (lab[lab == 0] == 0).all() and (w.max_iou[idx[lab == 0]] < 0.5).all()  # fallback background
