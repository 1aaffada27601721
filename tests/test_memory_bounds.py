"""Memory that does not grow with the number of training images (issue 14, item 3).

* box regression: a seeded bottom-k sample of at most ``bbox_reg.max_pairs_per_class`` pairs per
  class (:class:`sppdet.train.bbox_reg.PairReservoir`), exact when no class exceeds the cap;
* SVM hard-negative caches: a total byte budget (``svm.cache_memory_gb``), the easiest cached
  negatives evicted first;
* training windows: the per-class IoU kept only for the classes present in the image.

Each is checked against a slow obvious reference written here.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sppdet.boxes import encode
from sppdet.config import BBoxRegConfig
from sppdet.data.records import ImageRecord
from sppdet.train.bbox_reg import (
    PairReservoir,
    _sorted_pairs,
    fit_ridge,
    merge_bounds,
    pair_keys,
    select_regression_pairs,
    train_bbox_regressors,
    train_bbox_regressors_on_windows,
)
from sppdet.train.svm import feature_scale
from sppdet.train.windows import build_windows

# ---------------------------------------------------------------------------
# Box regression


def make_images(n_images=12, K=4, D=16, seed=0, rare=3, per_gt=25):
    """Images with ground truth of classes 0..K-2 (class K-1 only in image 0, one box: few pairs)
    and proposals jittered around the boxes; features: a fixed random table per image whose rows
    depend linearly on the jitter (so the fit is meaningful) plus noise."""
    rng = np.random.default_rng(seed)
    windows, tables = [], {}
    A = rng.normal(size=(K, 4, D))
    for i in range(n_images):
        n_gt = int(rng.integers(1, 4))
        xy = rng.uniform(0, 200, (n_gt, 2))
        gt = np.concatenate([xy, xy + rng.uniform(40, 120, (n_gt, 2))], 1).astype(np.float32)
        labels = rng.integers(0, K - 1, n_gt)
        if i == 0:
            labels[0] = K - 1
        rec = ImageRecord(f"im{i}", f"im{i}.jpg", 400, 400, gt, labels)
        props = []
        for g, lab in zip(gt, labels):
            m = rare if lab == K - 1 else per_gt
            wh = np.concatenate([g[2:] - g[:2]] * 2)
            props.append(g + rng.normal(0, 0.06, (m, 4)) * wh)
        props.append(rng.uniform(0, 300, (10, 4)))
        props = np.concatenate(props).astype(np.float32)
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
        w = build_windows(i, rec, props, K)
        feats = rng.normal(size=(len(w), D)).astype(np.float32) * 0.3 + 1.0
        for j in range(len(w)):
            b = w.best_gt[j]
            if b >= 0 and w.max_iou[j] > 0:
                t = encode(w.boxes[j:j + 1].astype(np.float64), gt[b:b + 1].astype(np.float64))[0]
                feats[j] += (t @ A[labels[b]]).astype(np.float32) * 4
        tables[i] = feats
        windows.append(w)
    calls = []

    def feature_fn(i, idx, flip):
        assert flip is False
        calls.append(len(idx))
        return tables[int(i)][np.asarray(idx)]

    return windows, feature_fn, calls


def all_pairs(windows, feature_fn, min_iou):
    """Every regression pair, in image order: (images, windows, features, proposals, targets, labels)."""
    out = [[] for _ in range(6)]
    for w in windows:
        is_prop = np.flatnonzero(w.gt_labels < 0)
        idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, min_iou)
        for j, t, lab_j in zip(is_prop[idx], tb, lab):
            out[0].append(w.index)
            out[1].append(j)
            out[2].append(np.asarray(feature_fn(w.index, np.array([j]), False))[0])
            out[3].append(w.boxes[j])
            out[4].append(t)
            out[5].append(lab_j)
    return (np.asarray(out[0]), np.asarray(out[1]), np.asarray(out[2], np.float32),
            np.asarray(out[3], np.float32), np.asarray(out[4], np.float32), np.asarray(out[5]))


def reference_fit(X, P, T, L, K, lam, min_samples=10, feature_norm=20.0):
    """The all-in-memory fit, written out: one global scale, z-scored targets, fit_ridge per class."""
    scale = feature_scale(X, feature_norm)
    D = encode(P.astype(np.float64), T.astype(np.float64))
    W = np.zeros((K, X.shape[1], 4))
    b = np.zeros((K, 4))
    mean, std = np.zeros((K, 4)), np.ones((K, 4))
    for k in range(K):
        m = L == k
        if m.sum() < min_samples:
            continue
        mu, sd = D[m].mean(0), np.maximum(D[m].std(0), 1e-6)
        W[k], b[k] = fit_ridge(X[m].astype(np.float64) * scale, (D[m] - mu) / sd, lam)
        mean[k], std[k] = mu, sd
    return W, b, mean, std, scale


def _state(reg):
    return {k: np.asarray(v) for k, v in reg.state_dict().items()}


def test_streamed_fit_equals_all_in_memory_fit_with_identity_fallback():
    K = 4
    windows, fn, _ = make_images(K=K)
    X, P, T, L = all_pairs(windows, fn, 0.6)[2:]
    counts = np.bincount(L, minlength=K)
    assert counts[K - 1] < 10 and (counts[:K - 1] >= 10).all()     # one class falls back to identity
    reg = train_bbox_regressors_on_windows(fn, windows, K, min_iou=0.6, lam=100.0, max_pairs_per_class=0,
                                           progress=False)
    W, b, mean, std, scale = reference_fit(X, P, T, L, K, 100.0)
    assert reg.scale == pytest.approx(scale, rel=1e-12)
    np.testing.assert_allclose(reg.W, W, rtol=1e-6, atol=1e-6 * np.abs(W).max())
    np.testing.assert_allclose(reg.b, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reg.mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reg.std, std, rtol=1e-6)
    assert (reg.W[K - 1] == 0).all() and (reg.b[K - 1] == 0).all()
    assert np.abs(reg.W[:K - 1]).max() > 0
    # and bit for bit the old stage (every pair's feature held, then one train_bbox_regressors)
    old = train_bbox_regressors(X, P, T, L, K, lam=100.0)
    for k, v in _state(old).items():
        np.testing.assert_array_equal(_state(reg)[k], v, err_msg=k)


def test_default_cap_changes_nothing_when_no_class_exceeds_it():
    windows, fn, _ = make_images(K=4)
    L = all_pairs(windows, fn, 0.6)[5]
    cap = BBoxRegConfig().max_pairs_per_class
    assert cap > 0 and np.bincount(L).max() <= cap
    a = train_bbox_regressors_on_windows(fn, windows, 4, lam=50.0, max_pairs_per_class=cap, seed=3, progress=False)
    b = train_bbox_regressors_on_windows(fn, windows, 4, lam=50.0, max_pairs_per_class=0, progress=False)
    for k, v in _state(b).items():
        np.testing.assert_array_equal(_state(a)[k], v, err_msg=k)


def reference_sample(pairs, cap, seed):
    """Per class, the cap pairs with the smallest (key, image, window): a sort of Python tuples."""
    img, win, X, P, T, L = pairs
    keys = [int(pair_keys(seed, i, np.array([j]))[0]) for i, j in zip(img, win)]
    keep = []
    for k in np.unique(L):
        rows = sorted((keys[r], int(img[r]), int(win[r]), r) for r in np.flatnonzero(L == k))
        keep += [r for *_, r in rows[:cap]]
    keep = sorted(keep, key=lambda r: (img[r], win[r]))
    return tuple(a[keep] for a in pairs)


def test_pair_keys_are_a_function_of_seed_and_pair_only():
    k1 = pair_keys(5, 7, np.array([3, 4, 5]))
    assert k1.dtype == np.uint64 and len(set(k1.tolist())) == 3
    np.testing.assert_array_equal(pair_keys(5, 7, np.array([5, 3])), k1[[2, 0]])
    assert not np.array_equal(pair_keys(6, 7, np.array([3, 4, 5])), k1)
    assert not np.array_equal(pair_keys(5, 8, np.array([3, 4, 5])), k1)


@pytest.mark.parametrize("cap", [7, 20])
def test_capped_reservoir_is_the_seeded_bottom_k_sample(cap):
    K, seed = 4, 11
    windows, fn, calls = make_images(K=K, n_images=15)
    pairs = all_pairs(windows, fn, 0.6)
    counts = np.bincount(pairs[5], minlength=K)
    assert counts.max() > cap                          # the cap binds for some class
    calls.clear()
    res = PairReservoir(K, cap, seed)
    for w in windows:
        is_prop = np.flatnonzero(w.gt_labels < 0)
        idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, 0.6)
        res.add_image(w.index, is_prop[idx], w.boxes[is_prop[idx]], tb, lab, lambda s, i=w.index: fn(i, s, False))
        assert (res.n <= cap).all()
    assert sum(calls) < len(pairs[0])                  # features of pairs that cannot enter are not computed
    np.testing.assert_array_equal(res.seen, counts)
    np.testing.assert_array_equal(res.n, np.minimum(counts, cap))
    got, want = res.arrays(), reference_sample(pairs, cap, seed)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # memory: at most cap rows per class, whatever the number of images
    D = pairs[2].shape[1]
    assert res.nbytes() <= K * cap * (4 * D + 8 * 3 + 2 * 16)
    # the stage fits on exactly that sample; the order of the images does not matter
    reg = train_bbox_regressors_on_windows(fn, windows, K, lam=10.0, max_pairs_per_class=cap, seed=seed,
                                           progress=False)
    ref = train_bbox_regressors(want[2], want[3], want[4], want[5], K, lam=10.0)
    rev = train_bbox_regressors_on_windows(fn, windows[::-1], K, lam=10.0, max_pairs_per_class=cap, seed=seed,
                                           progress=False)
    for k, v in _state(ref).items():
        np.testing.assert_array_equal(_state(reg)[k], v, err_msg=k)
        np.testing.assert_array_equal(_state(rev)[k], v, err_msg=k)


@pytest.mark.parametrize("cap", [0, 5, 16])
def test_reservoirs_of_shards_merge_to_the_one_stream_sample(cap):
    """What the ranks do: each samples its shard, the bounds are cut on the keys, the rest gathered."""
    K, seed = 4, 2
    windows, fn, _ = make_images(K=K, n_images=14, seed=4)

    def fill(ws):
        r = PairReservoir(K, cap, seed)
        for w in ws:
            is_prop = np.flatnonzero(w.gt_labels < 0)
            idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, 0.6)
            r.add_image(w.index, is_prop[idx], w.boxes[is_prop[idx]], tb, lab, lambda s, i=w.index: fn(i, s, False))
        return r

    one = fill(windows)
    for world in (2, 3):
        shards = [fill(windows[r::world]) for r in range(world)]
        bounds = merge_bounds([s.summary() for s in shards], cap)
        for s in shards:
            s.restrict(bounds)
        merged = _sorted_pairs([s.arrays() for s in shards if s.n.sum()])
        for a, b in zip(merged, one.arrays()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.sum([s.seen for s in shards], axis=0), one.seen)
