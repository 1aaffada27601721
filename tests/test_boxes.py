import numpy as np
import pytest

from sppdet import boxes as B


def iou_ref(a, b):
    """Slow, obvious IoU in the continuous convention."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def test_voc_conversion_round_trip():
    # VOC xmin=1..xmax=10 covers 10 pixels: internal [0, 10)
    x1, y1, x2, y2 = B.voc_to_internal(1, 1, 10, 20)
    assert (x1, y1, x2, y2) == (0.0, 0.0, 10.0, 20.0)
    back = B.internal_to_voc(np.array([[x1, y1, x2, y2]]))
    np.testing.assert_array_equal(back, [[1, 1, 10, 20]])


def test_iou_matches_reference():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    got = B.box_iou(a, b)
    ref = np.array([[iou_ref(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert B.box_iou(a, np.zeros((0, 4))).shape == (7, 0)


def test_encode_decode_inverse_and_values():
    rng = np.random.default_rng(1)
    p, t = random_boxes(rng, 20), random_boxes(rng, 20)
    d = B.encode(p, t)
    np.testing.assert_allclose(B.decode(p, d), t, rtol=1e-9, atol=1e-9)
    d0 = B.encode(np.array([[0, 0, 10, 20]]), np.array([[5, 0, 25, 10]]))
    np.testing.assert_allclose(d0, [[(15 - 5) / 10, (5 - 10) / 20, np.log(2), np.log(0.5)]])


def test_clip_flip_valid_area():
    b = np.array([[-5, 3, 50, 120], [10, 10, 10, 30]], dtype=np.float32)
    np.testing.assert_array_equal(B.clip_boxes(b, 40, 100), [[0, 3, 40, 100], [10, 10, 10, 30]])
    np.testing.assert_array_equal(B.flip_boxes(b, 100), [[50, 3, 105, 120], [90, 10, 90, 30]])
    np.testing.assert_array_equal(B.flip_boxes(B.flip_boxes(b, 77), 77), b)
    assert B.valid_boxes(b).tolist() == [True, False]
    np.testing.assert_array_equal(B.box_area(b), [55 * 117, 0])


@pytest.mark.parametrize("thr", [0.3, 0.5])
def test_nms_against_greedy_reference(thr):
    rng = np.random.default_rng(2)
    b = random_boxes(rng, 60)
    s = rng.permutation(60).astype(np.float32)
    keep = B.nms(b, s, thr)
    order = np.argsort(-s)
    ref = []
    for i in order:
        if all(iou_ref(b[i], b[j]) <= thr for j in ref):
            ref.append(i)
    assert keep.tolist() == ref
    labels = rng.integers(0, 3, 60)
    kb = set(B.batched_nms(b, s, labels, thr).tolist())
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        assert kb & set(idx.tolist()) == set(idx[B.nms(b[idx], s[idx], thr)].tolist())
