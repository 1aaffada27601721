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


# ---------------------------------------------------------------------------
# SVM hard-negative caches: a byte budget

from sklearn.svm import LinearSVC  # noqa: E402

from sppdet.config import SVMConfig  # noqa: E402
from sppdet.train import svm as svm_mod  # noqa: E402
from sppdet.train.svm import KEY_STRIDE, HardNegativeMiner, SVMParams, WindowSet, train_svms  # noqa: E402


def svm_images(seed, num_images=16, K=3, D=10, n_prop=50, sep=1.5):
    """Blobs: a ground-truth window is its class mean + noise, a proposal the IoU-weighted mean of
    its best class + noise (IoU drawn per class present)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, D)) * sep
    images = []
    for _ in range(num_images):
        present = rng.choice(K, size=rng.integers(1, 3), replace=False)
        feats, gtl, ious = [], [], []
        for k in present:
            feats.append(means[k] + 0.6 * rng.normal(size=D))
            gtl.append(k)
            iou = np.zeros(K)
            iou[k] = 1.0
            ious.append(iou)
        for _ in range(n_prop):
            iou = np.zeros(K)
            iou[present] = rng.random(len(present)) ** 2
            best = int(np.argmax(iou))
            feats.append(iou[best] * means[best] + 0.6 * rng.normal(size=D))
            gtl.append(-1)
            ious.append(iou)
        images.append(WindowSet(np.asarray(feats, np.float32) * 5.0 + 2.0, np.asarray(gtl),
                                np.asarray(ious, np.float32)))
    return images


def reference_mining_with_budget(images, K, p, scale, budget_bytes):
    """One pass of R-CNN mining (as the library documents it) and, after each image's retrains,
    the budget rule written out: over budget, class k keeps the floor(R_k * room / R) negatives
    its model scores highest (earlier on ties), in cache order, room = 0.9 budget / row bytes."""
    D = images[0].features.shape[1]
    retrain_images = p.retrain_images or max(1, round(len(images) / 10))
    pos = {k: [ws.features[j] * np.float32(scale) for ws in images for j in range(len(ws.features))
               if ws.gt_labels[j] == k] for k in range(K)}
    W, b = np.zeros((D, K), np.float32), np.zeros(K, np.float32)
    cache = {k: [] for k in range(K)}
    trained, num_new, since = [False] * K, [0] * K, [0] * K
    log, keys_after, bytes_after = [], [], []

    def score(x, k):
        return float(np.dot(x.astype(np.float64), W[:, k].astype(np.float64)) + float(b[k]))

    def retrain(k, image):
        X = np.array(pos[k] + [x for _, x in cache[k]])
        y = np.array([1] * len(pos[k]) + [-1] * len(cache[k]))
        clf = LinearSVC(loss="hinge", dual=True, C=p.C, class_weight={1: p.pos_weight, -1: 1.0},
                        intercept_scaling=p.bias_multiplier, fit_intercept=True, tol=p.tol,
                        max_iter=p.max_iter, random_state=p.seed).fit(X, y)
        W[:, k], b[k] = clf.coef_[0], clf.intercept_[0]
        trained[k], num_new[k], since[k] = True, 0, 0
        log.append((image, k, "retrain", len(X)))

    row = 4 * D + 8
    for i, ws in enumerate(images):
        sc = [[score(ws.features[j] * np.float32(scale), k) for k in range(K)] for j in range(len(ws.features))]
        for k in range(K):
            if not pos[k]:
                continue
            have = {key for key, _ in cache[k]}
            for j in range(len(ws.features)):
                if ws.max_iou[j, k] < p.neg_iou and ws.gt_labels[j] != k and sc[j][k] > p.hard_threshold:
                    if i * KEY_STRIDE + j not in have:
                        cache[k].append((i * KEY_STRIDE + j, ws.features[j] * np.float32(scale)))
                        num_new[k] += 1
            since[k] += 1
        for k in range(K):
            if pos[k] and num_new[k] and (not trained[k] or since[k] >= retrain_images):
                retrain(k, i)
                before = len(cache[k])
                cache[k] = [(key, x) for key, x in cache[k] if score(x, k) >= p.evict_threshold]
                if len(cache[k]) < before:
                    log.append((i, k, "evict", before - len(cache[k])))
        total = sum(len(c) for c in cache.values())
        if total * row > budget_bytes:
            room = int(0.9 * budget_bytes) // row
            for k in range(K):
                n_keep = len(cache[k]) * room // total
                if n_keep < len(cache[k]):
                    ranked = sorted(range(len(cache[k])), key=lambda m: (-score(cache[k][m][1], k), m))
                    kept = sorted(ranked[:n_keep])
                    log.append((i, k, "budget", len(cache[k]) - n_keep))
                    cache[k] = [cache[k][m] for m in kept]
        keys_after.append({k: [key for key, _ in cache[k]] for k in range(K)})
        bytes_after.append(sum(len(c) for c in cache.values()) * row)
    for k in range(K):
        if pos[k] and cache[k]:
            retrain(k, len(images))
    return keys_after, log, W.copy(), b.copy()


def test_svm_cache_budget_evicts_the_easiest_negatives_like_a_slow_reference():
    K, D = 3, 10
    images = svm_images(1, K=K, D=D)
    budget_bytes = 90 * (4 * D + 8)                      # room for 90 cached negatives in all
    p = SVMParams(C=1e-3, retrain_images=4, retrain_limit=0, cache_memory_gb=budget_bytes / 2 ** 30)
    scale = feature_scale(np.concatenate([ws.features for ws in images]), p.feature_norm)
    miner = HardNegativeMiner(K, p, scale, len(images))
    for ws in images:
        miner.add_positives(ws)
    ref_keys, ref_log, ref_W, ref_b = reference_mining_with_budget(images, K, p, scale, budget_bytes)
    for i, ws in enumerate(images):
        miner.mine_image(i, ws)
        assert miner.cache_bytes() <= budget_bytes, f"after image {i}"
        held = sum(len(miner.negatives(k)[0]) for k in range(K)) * (4 * D + 8)
        assert held == miner.cache_bytes()               # the count is the arrays' bytes
        for k in range(K):
            assert miner.negatives(k)[1].tolist() == ref_keys[i][k], f"class {k} after image {i}"
            assert set(miner.negatives(k)[1].tolist()) == miner.states[k].key_set
    svms, stats = miner.finish()
    assert miner.events == ref_log
    assert sum(e[2] == "budget" for e in ref_log) >= 3                      # the budget did bind
    assert sum(stats[str(k)].get("evicted_budget", 0) for k in range(K)) > 0
    np.testing.assert_allclose(svms.W, ref_W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(svms.b, ref_b, rtol=1e-5, atol=1e-6)


def test_svm_with_a_tiny_cache_budget_still_separates_an_easy_problem(monkeypatch):
    K, D = 3, 10
    images = svm_images(2, K=K, D=D, sep=4.0, num_images=20)
    budget_bytes = 40 * (4 * D + 8)
    held = []
    real = HardNegativeMiner.retrain_due

    def recording(self, image):
        real(self, image)
        held.append(self.cache_bytes())

    monkeypatch.setattr(svm_mod.HardNegativeMiner, "retrain_due", recording)
    p = SVMParams(C=1e-2, cache_memory_gb=budget_bytes / 2 ** 30)
    svms, stats = train_svms(lambda i: images[i], len(images), K, p, progress=False)
    assert len(held) == len(images) and max(held) <= budget_bytes
    assert sum(stats[str(k)].get("evicted_budget", 0) for k in range(K)) > 0
    # every class: its ground-truth windows score above every negative (IoU < 0.3) of it
    for k in range(K):
        s_pos, s_neg = [], []
        for ws in images:
            s = (ws.features * np.float32(svms.scale)) @ np.asarray(svms.W)[:, k] + np.asarray(svms.b)[k]
            s_pos += list(s[ws.gt_labels == k])
            s_neg += list(s[(ws.max_iou[:, k] < p.neg_iou) & (ws.gt_labels != k)])
        assert min(s_pos) > max(s_neg), f"class {k}"


def test_default_cache_budget_changes_nothing_on_small_data():
    K = 3
    images = svm_images(3, K=K)
    assert SVMConfig().cache_memory_gb > 0
    a, sa = train_svms(lambda i: images[i], len(images), K, SVMParams(), progress=False)
    b, sb = train_svms(lambda i: images[i], len(images), K, SVMParams(cache_memory_gb=0.0), progress=False)
    np.testing.assert_array_equal(np.asarray(a.W), np.asarray(b.W))
    np.testing.assert_array_equal(np.asarray(a.b), np.asarray(b.b))
    assert sa == sb or {k: {kk: v for kk, v in d.items() if kk != "time_s"} for k, d in sa.items() if k != "_total"} \
        == {k: {kk: v for kk, v in d.items() if kk != "time_s"} for k, d in sb.items() if k != "_total"}


# ---------------------------------------------------------------------------
# Training windows: per-class IoU for the classes present only


def dense_windows_reference(record, proposals, K):
    """The former dense layout: [N, K] float32 IoU, int64 labels (as build_windows computed it)."""
    from sppdet.boxes import box_iou

    gt = record.boxes.astype(np.float32)
    boxes = np.concatenate([gt, np.asarray(proposals, np.float32).reshape(-1, 4)])
    iou_all = box_iou(boxes, gt).astype(np.float32)
    iou = np.zeros((len(boxes), K), np.float32)
    for c in np.unique(record.labels):
        iou[:, c] = iou_all[:, record.labels == c].max(axis=1)
    gt_labels = np.concatenate([record.labels, np.full(len(boxes) - len(gt), -1, np.int64)])
    if len(gt):
        best_gt = iou_all.argmax(axis=1)
        return boxes, gt_labels, iou, iou_all[np.arange(len(boxes)), best_gt], record.labels[best_gt], best_gt
    n = len(boxes)
    return boxes, gt_labels, iou, np.zeros(n, np.float32), np.full(n, -1, np.int64), np.full(n, -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_windows_equal_the_dense_layout_exactly(seed):
    rng = np.random.default_rng(seed)
    K = 20
    xy = rng.uniform(0, 200, (4, 2))
    gt = np.concatenate([xy, xy + rng.uniform(20, 90, (4, 2))], 1).astype(np.float32)
    gt = np.concatenate([gt, gt[:1]])                   # the same box twice, with two labels (IoU ties)
    labels = np.array([3, 17, 3, 0, 9])
    rec = ImageRecord("t", "t.jpg", 400, 400, gt, labels)
    wh = np.concatenate([gt[:, 2:] - gt[:, :2]] * 2, 1)
    props = np.concatenate([gt[rng.integers(0, 5, 300)] + rng.normal(0, 0.2, (300, 4)) * wh[rng.integers(0, 5, 300)],
                            [[gt[0, 0], gt[0, 1], gt[0, 0] + 0.5 * (gt[0, 2] - gt[0, 0]), gt[0, 3]]]])
    props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)
    w = build_windows(7, rec, props, K)
    boxes, gt_labels, iou, max_iou, best_label, best_gt = dense_windows_reference(rec, props, K)
    np.testing.assert_array_equal(w.boxes, boxes)
    np.testing.assert_array_equal(w.gt_labels, gt_labels)
    assert w.gt_labels.dtype == np.int64 and w.best_label.dtype == np.int64 and w.iou.dtype == np.float32
    np.testing.assert_array_equal(w.iou, iou)
    np.testing.assert_array_equal(w.max_iou, max_iou)
    np.testing.assert_array_equal(w.best_label, best_label)
    np.testing.assert_array_equal(w.best_gt, best_gt)
    assert abs(w.iou[-1, 3] - 0.5) < 1e-6 and w.iou[-1, 9] == w.iou[-1, 3]   # at a threshold, tied: exact
    # 4 classes present of 20: 24 + 4 * 4 bytes a window instead of 124
    assert w.nbytes <= len(w) * (24 + 4 * 4) + 8 * 4
    assert w.nbytes * 3 < len(w) * 124


# ---------------------------------------------------------------------------
# Box regression on two ranks with the cap binding: the one-process sample and fit, bit for bit


def _capped_bbox_job(rank, out_dir, cap):
    import torch

    torch.set_num_threads(1)
    windows, fn, calls = make_images(K=4, n_images=15)
    reg = train_bbox_regressors_on_windows(fn, windows, 4, lam=10.0, max_pairs_per_class=cap, seed=5,
                                           progress=False)
    return {"state": {k: np.asarray(v).tolist() for k, v in reg.state_dict().items()}, "rows": int(sum(calls))}


def test_capped_bbox_regression_on_two_ranks_equals_one_process(tmp_path):
    from test_distributed import _run_two

    cap = 12                                           # >= min_samples (10): fitted, not identity
    r0, r1 = _run_two(_capped_bbox_job, tmp_path, cap)
    windows, fn, calls = make_images(K=4, n_images=15)
    assert np.bincount(all_pairs(windows, fn, 0.6)[5]).max() > cap
    calls.clear()
    reg = train_bbox_regressors_on_windows(fn, windows, 4, lam=10.0, max_pairs_per_class=cap, seed=5, progress=False)
    want = {k: np.asarray(v).tolist() for k, v in reg.state_dict().items()}
    assert r0["state"] == want and r1["state"] == want
    assert r0["rows"] + r1["rows"] >= sum(calls)       # each rank samples its own share
    assert np.abs(np.asarray(want["W"])).max() > 0


# ---------------------------------------------------------------------------
# SVM positives: a seeded bottom-k sample of at most svm.max_positives_per_class per class

from sppdet.train.svm import _POSITIVE_SALT, PositiveSample  # noqa: E402


def gt_stream(seed, n_images=30, K=3, D=6, max_gt=4):
    """(image, WindowSet of its ground-truth windows only) with 0..max_gt boxes of random classes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_images):
        n = int(rng.integers(0, max_gt + 1))
        lab = rng.integers(0, K, n)
        iou = rng.random((n, K)).astype(np.float32)
        out.append((i, WindowSet(rng.normal(size=(n, D)).astype(np.float32), lab, iou)))
    return out


def reference_positive_sample(stream, K, cap, seed):
    """Slow and obvious: every positive's key from pair_keys, sorted, the first cap of each class;
    then grouped by image in (image, j) order."""
    rows = []
    for i, ws in stream:
        for j, k in enumerate(ws.gt_labels):
            key = int(pair_keys(seed ^ _POSITIVE_SALT, i, np.array([j]))[0])
            rows.append((int(k), key, i, j, ws.features[j], ws.max_iou[j]))
    kept = []
    for k in range(K):
        mine = sorted((r for r in rows if r[0] == k), key=lambda r: (r[1], r[2], r[3]))
        kept += mine[:cap] if cap else mine
    kept.sort(key=lambda r: (r[2], r[3]))
    by_image = {}
    for k, _, i, j, x, iou in kept:
        by_image.setdefault(i, []).append((k, x, iou))
    return [(i, np.array([r[0] for r in v]), np.stack([r[1] for r in v]), np.stack([r[2] for r in v]))
            for i, v in sorted(by_image.items())]


def _as_lists(per_image):
    return [(i, ws.gt_labels, ws.features, ws.max_iou) for i, ws in per_image]


def _assert_same(got, want):
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, gl, gx, gi), (_, wl, wx, wi) in zip(got, want):
        np.testing.assert_array_equal(gl, wl)
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gi, wi)


@pytest.mark.parametrize("cap", [0, 3, 7, 1000])
def test_positive_sample_is_the_seeded_bottom_k_of_a_slow_reference(cap):
    K, seed = 3, 11
    stream = gt_stream(4, K=K)
    ps = PositiveSample(K, cap, seed)
    for i, ws in stream:
        ps.add(i, ws)
    got = _as_lists(ps.per_image())
    _assert_same(got, reference_positive_sample(stream, K, cap, seed))
    counts = np.bincount(np.concatenate([g[1] for g in got]), minlength=K)
    seen = np.bincount(np.concatenate([ws.gt_labels for _, ws in stream]), minlength=K)
    np.testing.assert_array_equal(ps.seen, seen)
    np.testing.assert_array_equal(counts, np.minimum(seen, cap) if cap else seen)
    if cap == 3:
        assert (seen > 2 * cap).all()              # the trims ran, not only the final cut
    if cap in (0, 1000):                           # nothing over the cap: exactly what was added
        _assert_same(got, [(i, ws.gt_labels, ws.features, ws.max_iou) for i, ws in stream if len(ws.gt_labels)])


def test_positive_sample_does_not_depend_on_image_order_or_on_shards():
    K, cap, seed = 3, 5, 2
    stream = gt_stream(9, K=K, n_images=40)
    one = PositiveSample(K, cap, seed)
    for i, ws in stream:
        one.add(i, ws)
    want = _as_lists(one.per_image())
    rev = PositiveSample(K, cap, seed)
    for i, ws in stream[::-1]:
        rev.add(i, ws)
    _assert_same(_as_lists(rev.per_image()), want)
    shards = [PositiveSample(K, cap, seed) for _ in range(3)]
    for i, ws in stream:
        shards[i % 3].add(i, ws)
    merged = PositiveSample(K, cap, seed)
    for s in shards:
        merged.merge(s.export(), s.seen)
    _assert_same(_as_lists(merged.per_image()), want)
    np.testing.assert_array_equal(merged.seen, one.seen)
    other_seed = PositiveSample(K, cap, seed + 1)
    for i, ws in stream:
        other_seed.add(i, ws)
    assert [g[0] for g in _as_lists(other_seed.per_image())] != [g[0] for g in want]


def test_svm_positive_cap_changes_nothing_unless_reached_and_then_trains_on_cap_positives():
    K = 3
    images = svm_images(5, K=K, num_images=40)
    per_class = np.bincount(np.concatenate([ws.gt_labels[ws.gt_labels >= 0] for ws in images]), minlength=K)
    assert SVMConfig().max_positives_per_class >= per_class.max()
    a, sa = train_svms(lambda i: images[i], len(images), K, SVMParams(), progress=False)
    b, sb = train_svms(lambda i: images[i], len(images), K, SVMParams(max_positives_per_class=0), progress=False)
    np.testing.assert_array_equal(np.asarray(a.W), np.asarray(b.W))
    np.testing.assert_array_equal(np.asarray(a.b), np.asarray(b.b))
    cap = int(per_class.min()) - 3
    c, sc = train_svms(lambda i: images[i], len(images), K, SVMParams(max_positives_per_class=cap), progress=False)
    assert [sc[str(k)]["positives"] for k in range(K)] == [cap] * K
    assert not np.array_equal(np.asarray(c.W), np.asarray(a.W))
    # still a working classifier: positives score above the cached negatives' mean
    X = np.concatenate([ws.features for ws in images])
    lab = np.concatenate([ws.gt_labels for ws in images])
    s = c.decision_function(X)
    for k in range(K):
        assert s[lab == k, k].mean() > s[lab == -1, k].mean()


def _capped_svm_job(rank, out_dir, cap):
    import torch

    torch.set_num_threads(1)
    images = svm_images(5, K=3, num_images=40)
    svms, stats = train_svms(lambda i: images[i], len(images), 3, SVMParams(max_positives_per_class=cap),
                             progress=False)
    return {"W": np.asarray(svms.W).tolist(), "b": np.asarray(svms.b).tolist(),
            "pos": [stats[str(k)]["positives"] for k in range(3)]}


def test_capped_svm_positives_on_two_ranks_equal_one_process(tmp_path):
    from test_distributed import _run_two

    cap = 6
    r0, r1 = _run_two(_capped_svm_job, tmp_path, cap)
    images = svm_images(5, K=3, num_images=40)
    svms, stats = train_svms(lambda i: images[i], len(images), 3, SVMParams(max_positives_per_class=cap),
                             progress=False)
    assert r0["pos"] == [cap] * 3 == r1["pos"]
    np.testing.assert_allclose(r0["W"], np.asarray(svms.W), rtol=0, atol=1e-6)
    np.testing.assert_allclose(r0["b"], np.asarray(svms.b), rtol=0, atol=1e-6)
    assert r0["W"] == r1["W"]


# ---------------------------------------------------------------------------
# Box-regression pairs held as float16 while the features are float16 values (SPP of float16 maps)


def _half_valued(fn):
    """The same feature function, its rows rounded to float16 values (returned as float32)."""
    def half(i, sel, flip):
        x = fn(i, sel, flip)
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        return x.astype(np.float16).astype(np.float32)
    return half


@pytest.mark.parametrize("cap", [0, 12])
def test_half_valued_pairs_are_held_as_float16_and_fit_bit_identically(cap):
    windows, fn, _ = make_images(K=4, n_images=15)
    hfn = _half_valued(fn)
    res = PairReservoir(4, cap, 5)
    for w in windows:
        is_prop = np.flatnonzero(w.gt_labels < 0)
        idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, 0.6)
        if len(idx):
            win = is_prop[idx]
            res.add_image(int(w.index), win, w.boxes[win], tb, lab, lambda s, i=int(w.index): hfn(i, s, False))
    assert res.dtype == np.float16
    img, win, X, P, T, L = res.arrays()
    assert X.dtype == np.float16
    # the slow reference: every pair (or the bottom-k sample) in float32, fitted as before
    ref = all_pairs(windows, hfn, 0.6)
    if cap:
        ref = reference_sample(ref, cap, 5)
        assert np.bincount(ref[5]).max() == cap < np.bincount(all_pairs(windows, hfn, 0.6)[5]).max()
    np.testing.assert_array_equal(img, ref[0])
    np.testing.assert_array_equal(X.astype(np.float32), ref[2])
    a = train_bbox_regressors(X, P, T, L, 4, lam=10.0)
    b = train_bbox_regressors(ref[2].astype(np.float32), ref[3], ref[4], ref[5], 4, lam=10.0)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(b.state_dict()[k]))


def test_a_feature_that_is_not_a_float16_value_widens_the_store_exactly():
    windows, fn, _ = make_images(K=4, n_images=15)
    hfn = _half_valued(fn)
    res = PairReservoir(4, 0, 5)
    for n, w in enumerate(windows):
        is_prop = np.flatnonzero(w.gt_labels < 0)
        idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, 0.6)
        f = hfn if n < 7 else fn                       # images 7.. give float32 values
        if len(idx):
            win = is_prop[idx]
            res.add_image(int(w.index), win, w.boxes[win], tb, lab, lambda s, i=int(w.index), f=f: f(i, s, False))
    assert res.dtype == np.float32
    img, win, X, P, T, L = res.arrays()
    want = np.concatenate([np.asarray((hfn if n < 7 else fn)(int(w.index), np.array(j), False))
                           for n, w in enumerate(windows) for j in [win[img == w.index]] if len(j)])
    np.testing.assert_array_equal(X, want)
