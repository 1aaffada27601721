"""Tests of sppdet.train.svm: objective, solvers, mining loop, self-check, serialisation."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from sppdet.train import svm as svm_mod
from sppdet.train.svm import (
    KEY_STRIDE,
    NO_POSITIVES_BIAS,
    HardNegativeMiner,
    LinearSVMs,
    dedupe_negatives,
    SVMParams,
    WindowSet,
    check_svm_scores,
    feature_scale,
    fit_svm,
    svm_objective,
    train_svms,
)

# ---------------------------------------------------------------------------
# Slow references


def ref_objective(X, y, w, b, C, pos_weight, B):
    """liblinear -s 3 primal with -B: 1/2 (|w|^2 + (b/B)^2) + C sum c_i max(0, 1 - y_i (x_i.w + b))."""
    total = 0.5 * (sum(float(v) ** 2 for v in w) + (b / B) ** 2)
    for xi, yi in zip(X, y):
        s = sum(float(a) * float(c) for a, c in zip(xi, w)) + b
        ci = pos_weight if yi > 0 else 1.0
        total += C * ci * max(0.0, 1.0 - yi * s)
    return total


def make_problem(seed: int, n: int = 200, d: int = 6, pos_frac: float = 0.2):
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < pos_frac, 1, -1)
    X = rng.normal(size=(n, d)) + 0.8 * y[:, None] * rng.normal(size=d)[None]
    X = X * feature_scale(X, 20.0)
    return X, y


# ---------------------------------------------------------------------------
# feature_scale


def test_feature_scale_matches_loop_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 11)).astype(np.float32) * 3.0
    norms = [sum(float(v) ** 2 for v in row) ** 0.5 for row in x]
    expected = 20.0 / (sum(norms) / len(norms))
    s = feature_scale(x, 20.0)
    assert s == pytest.approx(expected, rel=1e-6)
    scaled = x.astype(np.float64) * s
    assert np.linalg.norm(scaled, axis=1).mean() == pytest.approx(20.0, rel=1e-6)
    assert feature_scale(x, 5.0) == pytest.approx(expected / 4.0, rel=1e-6)
    assert feature_scale(np.zeros((0, 4))) == 1.0
    assert feature_scale(np.zeros((3, 4))) == 1.0


# ---------------------------------------------------------------------------
# One SVM: objective and solvers


def test_svm_objective_matches_loop_reference():
    X, y = make_problem(1, n=40, d=5)
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=5) * 0.1, -0.7
    p = SVMParams(C=0.05, pos_weight=2.0, bias_multiplier=10.0)
    obj, hinge = svm_objective(X, y, w, b, p)
    assert obj == pytest.approx(ref_objective(X, y, w, b, 0.05, 2.0, 10.0), rel=1e-10)
    c = np.where(y > 0, 2.0, 1.0)
    assert hinge == pytest.approx(float((c * np.maximum(0, 1 - y * (X @ w + b))).sum() / c.sum()), rel=1e-10)


def test_liblinear_mapping_is_the_biased_regularised_objective():
    """On a 1-D problem, brute-force the 2-parameter objective on a grid: liblinear reaches its minimum.

    This pins the mapping of -w1/-c/-B onto LinearSVC: with the bias (nearly) unregularised, or
    the class weight on the wrong class, the solution is measurably worse under this objective.
    """
    rng = np.random.default_rng(3)
    n = 60
    y = np.where(np.arange(n) < 15, 1, -1)
    x = (rng.normal(size=n) + 1.5 * (y > 0) + 2.0)[:, None]      # all positive: the bias matters
    C, pw, B = 0.5, 2.0, 3.0

    def grid_objective(wg, bg):
        # the same formula as ref_objective, evaluated on a whole grid at once
        s = wg[..., None] * x[:, 0] + bg[..., None]
        c = np.where(y > 0, pw, 1.0)
        return 0.5 * (wg ** 2 + (bg / B) ** 2) + C * (c * np.maximum(0, 1 - y * s)).sum(-1)

    assert grid_objective(np.array(0.3), np.array(-1.2)) == pytest.approx(
        ref_objective(x, y, [0.3], -1.2, C, pw, B), rel=1e-12)
    wg, bg = np.meshgrid(np.linspace(-5, 5, 301), np.linspace(-15, 15, 301), indexing="ij")
    o = grid_objective(wg, bg)
    i = np.unravel_index(o.argmin(), o.shape)
    wg, bg = np.meshgrid(np.linspace(wg[i] - 0.05, wg[i] + 0.05, 201),
                         np.linspace(bg[i] - 0.15, bg[i] + 0.15, 201), indexing="ij")
    o = grid_objective(wg, bg)
    i = np.unravel_index(o.argmin(), o.shape)
    best, w_best, b_best = float(o[i]), float(wg[i]), float(bg[i])

    p = SVMParams(C=C, pos_weight=pw, bias_multiplier=B, tol=1e-8, max_iter=200000)
    w, b, _ = fit_svm(x, y, p)
    obj = ref_objective(x, y, w, b, C, pw, B)
    assert obj <= best * (1 + 1e-6)
    assert obj >= best * (1 - 1e-4)                     # the grid is fine enough to be close
    assert w[0] == pytest.approx(w_best, abs=0.02)
    assert b == pytest.approx(b_best, abs=0.06)
    # the check is sensitive: wrong mappings land clearly above the minimum
    for kw in ({"class_weight": {1: 1.0, -1: pw}, "intercept_scaling": B},
               {"class_weight": {1: pw, -1: 1.0}, "intercept_scaling": 100.0}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            bad = LinearSVC(loss="hinge", dual=True, C=C, tol=1e-8, max_iter=200000, **kw).fit(x, y)
        assert ref_objective(x, y, bad.coef_[0], float(bad.intercept_[0]), C, pw, B) > best * (1 + 1e-3)


def test_svm_separates_a_separable_problem():
    rng = np.random.default_rng(4)
    d = 8
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    X = rng.normal(size=(120, d))
    margin = X @ direction
    keep = np.abs(margin) > 0.5
    X, y = X[keep], np.where(margin[keep] > 0, 1, -1)
    w, b, decision = fit_svm(X * 5.0, y, SVMParams(C=1.0))
    s = X * 5.0 @ w + b
    assert (np.sign(s) == y).all()
    np.testing.assert_allclose(decision(X * 5.0), s, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_liblinear_solution_beats_perturbations(seed):
    X, y = make_problem(seed)
    p = SVMParams()                                   # the paper's C = 1e-3, w1 = 2, B = 10
    w, b, _ = fit_svm(X, y, p)
    obj = ref_objective(X, y, w, b, p.C, p.pos_weight, p.bias_multiplier)
    rng = np.random.default_rng(100 + seed)
    scale = np.linalg.norm(w) + abs(b) / 10
    for mag in (0.3, 0.1, 0.03):
        for _ in range(10):
            dw = rng.normal(size=w.shape) * mag * scale / np.sqrt(len(w))
            db = rng.normal() * mag * scale * 10
            assert ref_objective(X, y, w + dw, b + db, p.C, p.pos_weight, p.bias_multiplier) >= obj - 1e-7


def test_torch_solver_matches_liblinear_objective():
    X, y = make_problem(5, n=400, d=12)
    p = SVMParams(device="cpu", tol=1e-5)
    w1, b1, _ = fit_svm(X, y, p)
    w2, b2, dec2 = fit_svm(X, y, SVMParams(device="cpu", tol=1e-5, solver="torch"))
    o1 = ref_objective(X, y, w1, b1, p.C, p.pos_weight, p.bias_multiplier)
    o2 = ref_objective(X, y, w2, b2, p.C, p.pos_weight, p.bias_multiplier)
    assert abs(o1 - o2) <= 1e-4 * o1
    # strong convexity (modulus 1 in (w, b/B)): near-equal objectives mean near-equal solutions
    assert np.linalg.norm(w1 - w2) <= 0.05 * np.linalg.norm(w1)
    np.testing.assert_allclose(dec2(X), X @ w2 + b2, rtol=1e-9, atol=1e-9)


def test_fit_svm_needs_both_classes():
    X, y = make_problem(0, n=20)
    with pytest.raises(ValueError):
        fit_svm(X, np.ones(len(X), dtype=int), SVMParams())


def test_params_validation():
    with pytest.raises(ValueError):
        SVMParams(evict_threshold=0.0)
    with pytest.raises(ValueError):
        SVMParams(solver="sgd")
    with pytest.raises(ValueError):
        SVMParams(C=0.0)


# ---------------------------------------------------------------------------
# LinearSVMs


def test_linear_svms_decision_function_and_state_dict_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    W = rng.normal(size=(7, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    m = LinearSVMs(W, b, 0.37)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    ref = np.array([[sum(0.37 * float(x[i, d]) * float(W[d, k]) for d in range(7)) + float(b[k])
                     for k in range(3)] for i in range(5)])
    s = m.decision_function(x)
    assert isinstance(s, np.ndarray) and s.shape == (5, 3) and s.dtype == np.float32
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-5)
    st = m.decision_function(torch.from_numpy(x))
    assert isinstance(st, torch.Tensor) and st.shape == (5, 3)
    np.testing.assert_allclose(st.numpy(), ref, rtol=1e-5, atol=1e-5)

    path = tmp_path / "svm.pt"
    torch.save(m.state_dict(), path)
    m2 = LinearSVMs.from_state_dict(torch.load(path, weights_only=True))
    assert m2.scale == m.scale
    np.testing.assert_array_equal(m2.W, W)
    np.testing.assert_array_equal(m2.b, b)
    np.testing.assert_array_equal(m2.decision_function(x), s)
    with pytest.raises(ValueError):
        LinearSVMs.from_state_dict({"W": torch.zeros(2, 2)})


# ---------------------------------------------------------------------------
# A tiny synthetic detection problem for the mining loop


def make_images(seed: int, num_images: int = 20, K: int = 3, D: int = 10, n_prop: int = 40,
                absent_class: int | None = None) -> list[WindowSet]:
    """Gaussian blobs: a window's feature is background + IoU-weighted class mean + noise.

    Each image has 1-2 ground-truth boxes; proposals get a random IoU with each class
    present (0 for absent classes); other classes' gt boxes have IoU 0 with this class.
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, D)) * 1.5
    bg = rng.normal(size=D)
    images = []
    for _ in range(num_images):
        present = rng.choice([k for k in range(K) if k != absent_class], size=rng.integers(1, 3), replace=False)
        feats, gtl, ious = [], [], []
        for k in present:
            feats.append(bg + means[k] + 0.8 * rng.normal(size=D))
            gtl.append(k)
            iou = np.zeros(K)
            iou[k] = 1.0
            ious.append(iou)
        for _ in range(n_prop):
            iou = np.zeros(K)
            iou[present] = rng.random(len(present)) ** 2
            best = int(np.argmax(iou))
            feats.append(bg + iou[best] * means[best] + 0.8 * rng.normal(size=D))
            gtl.append(-1)
            ious.append(iou)
        perm = rng.permutation(len(feats))
        images.append(WindowSet(np.asarray(feats, np.float32)[perm] * 7.0 + 3.0,
                                np.asarray(gtl)[perm], np.asarray(ious, np.float32)[perm]))
    return images


def ref_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, continuous coordinates (0 when the union is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_dedupe(boxes, scores, t) -> list[int]:
    """The paper's rule, slowly: best score first (ties: the earlier window), a window is dropped
    when it overlaps a window kept before it by IoU > t."""
    kept = []
    for j in sorted(range(len(boxes)), key=lambda j: (-float(scores[j]), j)):
        if all(ref_iou(boxes[j], boxes[m]) <= t for m in kept):
            kept.append(j)
    return sorted(kept)


def add_boxes(images: list[WindowSet], seed: int) -> list[WindowSet]:
    """The same images with window boxes: a few clusters of jittered boxes, so that many overlap."""
    rng = np.random.default_rng(seed)
    out = []
    for ws in images:
        n = len(ws.features)
        centres = rng.uniform(20, 180, size=(3, 2))[rng.integers(0, 3, n)] + rng.normal(0, 6, (n, 2))
        half = rng.uniform(10, 30, size=(n, 2))
        boxes = np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)
        out.append(WindowSet(ws.features, ws.gt_labels, ws.max_iou, boxes))
    return out


def reference_mining(images: list[WindowSet], K: int, p: SVMParams, scale: float):
    """Slow, obvious R-CNN-style mining written independently of the library (with the
    paper's dedupe of overlapping negatives when ``p.neg_overlap_dedupe``).

    Returns the negative keys per class after every image, the retrain log and final (W, b).
    """
    D = images[0].features.shape[1]
    n_img = len(images)
    retrain_images = p.retrain_images or max(1, round(n_img / 10))
    pos = {k: [] for k in range(K)}
    for ws in images:
        for j in range(len(ws.features)):
            if ws.gt_labels[j] >= 0:
                pos[int(ws.gt_labels[j])].append(ws.features[j] * np.float32(scale))
    W = np.zeros((D, K), np.float32)
    b = np.zeros(K, np.float32)
    cache = {k: [] for k in range(K)}          # list of (key, scaled feature), insertion order
    trained = {k: False for k in range(K)}
    num_new = {k: 0 for k in range(K)}
    since = {k: 0 for k in range(K)}
    log, keys_after = [], []

    def score(x, k):
        return float(np.dot(x.astype(np.float64), W[:, k].astype(np.float64)) + float(b[k]))

    def retrain(k, image):
        X = np.array([x for x in pos[k]] + [x for _, x in cache[k]])
        y = np.array([1] * len(pos[k]) + [-1] * len(cache[k]))
        clf = LinearSVC(loss="hinge", dual=True, C=p.C, class_weight={1: p.pos_weight, -1: 1.0},
                        intercept_scaling=p.bias_multiplier, fit_intercept=True, tol=p.tol,
                        max_iter=p.max_iter, random_state=p.seed).fit(X, y)
        W[:, k] = clf.coef_[0]
        b[k] = clf.intercept_[0]
        trained[k] = True
        num_new[k] = 0
        since[k] = 0
        log.append((image, k, "retrain", len(X)))

    for _pass in range(p.passes):
        for i, ws in enumerate(images):
            scores = {}
            for j in range(len(ws.features)):
                x = ws.features[j] * np.float32(scale)
                scores[j] = [score(x, k) for k in range(K)]
            for k in range(K):
                if not pos[k]:
                    continue
                have = {key for key, _ in cache[k]}
                hard = [j for j in range(len(ws.features))
                        if ws.max_iou[j, k] < p.neg_iou and ws.gt_labels[j] != k and scores[j][k] > p.hard_threshold]
                if p.neg_overlap_dedupe:
                    hard = [hard[m] for m in ref_dedupe([ws.boxes[j] for j in hard],
                                                        [scores[j][k] for j in hard], p.neg_overlap_dedupe)]
                for j in hard:
                    key = i * KEY_STRIDE + j
                    if key not in have:
                        cache[k].append((key, ws.features[j] * np.float32(scale)))
                        num_new[k] += 1
                since[k] += 1
            for k in range(K):
                if not pos[k] or num_new[k] == 0:
                    continue
                if (not trained[k] or since[k] >= retrain_images
                        or (p.retrain_limit and num_new[k] > p.retrain_limit)):
                    retrain(k, i)
                    before = len(cache[k])
                    cache[k] = [(key, x) for key, x in cache[k] if score(x, k) >= p.evict_threshold]
                    if len(cache[k]) < before:
                        log.append((i, k, "evict", before - len(cache[k])))
            keys_after.append({k: [key for key, _ in cache[k]] for k in range(K)})
    for k in range(K):
        if pos[k] and cache[k]:
            retrain(k, n_img)
    return keys_after, log, W.copy(), b.copy()


@pytest.mark.parametrize("retrain_images,retrain_limit,passes,dedupe", [(5, 0, 1, None), (0, 25, 1, None),
                                                                        (3, 0, 2, None), (5, 0, 1, 0.5)])
def test_mining_matches_slow_reference(retrain_images, retrain_limit, passes, dedupe):
    K = 3
    images = make_images(7, num_images=20, K=K)
    if dedupe:
        images = add_boxes(images, 3)
    p = SVMParams(C=1e-3, retrain_images=retrain_images, retrain_limit=retrain_limit, passes=passes,
                  neg_overlap_dedupe=dedupe)
    scale = feature_scale(np.concatenate([ws.features for ws in images]), p.feature_norm)
    miner = HardNegativeMiner(K, p, scale, len(images))
    for ws in images:
        miner.add_positives(ws)
    ref_keys, ref_log, ref_W, ref_b = reference_mining(images, K, p, scale)
    step = 0
    for _ in range(passes):
        for i, ws in enumerate(images):
            miner.mine_image(i, ws)
            for k in range(K):
                keys = miner.negatives(k)[1]
                assert keys.tolist() == ref_keys[step][k], f"class {k} after image {i}"
                assert len(set(keys.tolist())) == len(keys)              # deduplicated
                # eviction as specified: nothing left in the cache scores below the threshold
                x, _ = miner.negatives(k)
                if miner.states[k].trained and len(x):
                    s = x.astype(np.float64) @ miner.W[:, k].astype(np.float64) + float(miner.b[k])
                    assert s.min() >= p.evict_threshold - 1e-5
            step += 1
    svms, stats = miner.finish()
    assert miner.events == ref_log
    np.testing.assert_allclose(svms.W, ref_W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(svms.b, ref_b, rtol=1e-5, atol=1e-6)
    # the problem exercises the mechanics: several retrains, evictions, and hard negatives kept
    assert all(stats[str(k)]["retrains"] >= 3 for k in range(K))
    assert sum(stats[str(k)]["evicted"] for k in range(K)) > 0
    assert all(0 < stats[str(k)]["negatives"] < stats[str(k)]["added"] for k in range(K))


def test_dedupe_negatives_matches_slow_reference():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(0, 40))
        c = rng.uniform(0, 100, size=(n, 2)) if trial % 3 else np.tile(rng.uniform(0, 100, 2), (n, 1))
        half = rng.uniform(3, 25, size=(n, 2))
        boxes = np.concatenate([c - half, c + half], axis=1).astype(np.float32)
        if n > 3:
            boxes[1] = boxes[0]                                  # an exact duplicate
        # ties: scores on a coarse grid (and all equal in some trials, as before a class has a model)
        scores = np.round(rng.normal(size=n), 1).astype(np.float32) if trial % 4 else np.zeros(n, np.float32)
        for t in (0.3, 0.5, 0.7):
            got = dedupe_negatives(boxes, scores, t)
            want = ref_dedupe(boxes.tolist(), scores.tolist(), t)
            assert got.tolist() == want, (trial, t)
            assert got.dtype == np.int64
            for a in got:                                        # what is left overlaps by at most t
                assert all(ref_iou(boxes[a], boxes[b]) <= t for b in got if b != a)
    assert dedupe_negatives(np.zeros((0, 4)), np.zeros(0), 0.7).tolist() == []


def test_dedupe_needs_boxes_and_thins_the_cache():
    K = 3
    images = add_boxes(make_images(12, num_images=8, K=K), 5)
    caches = {}
    for dedupe in (None, 0.7):
        p = SVMParams(retrain_images=3, neg_overlap_dedupe=dedupe)
        miner = HardNegativeMiner(K, p, 0.1, len(images))
        for ws in images:
            miner.add_positives(ws)
        for i, ws in enumerate(images):
            miner.mine_image(i, ws)
        caches[dedupe] = [miner.states[k].added for k in range(K)]
        if dedupe:                                               # no two same-image negatives overlap > 0.7
            for k in range(K):
                by_image: dict[int, list[int]] = {}
                for key in miner.negatives(k)[1].tolist():
                    by_image.setdefault(key // KEY_STRIDE, []).append(key % KEY_STRIDE)
                for img, js in by_image.items():
                    bx = images[img].boxes
                    assert all(ref_iou(bx[a], bx[b]) <= 0.7 for a in js for b in js if a < b)
    assert sum(caches[0.7]) < sum(caches[None])
    bare = WindowSet(images[0].features, images[0].gt_labels, images[0].max_iou)
    miner = HardNegativeMiner(K, SVMParams(neg_overlap_dedupe=0.7), 0.1, 1)
    miner.add_positives(bare)
    with pytest.raises(ValueError, match="neg_overlap_dedupe needs the windows' boxes"):
        miner.mine_image(0, bare)
    with pytest.raises(ValueError, match="neg_overlap_dedupe"):
        SVMParams(neg_overlap_dedupe=1.0)


def test_negatives_respect_neg_iou_and_hard_threshold():
    K = 3
    images = make_images(8, num_images=12, K=K)
    p = SVMParams(retrain_images=3)
    miner = HardNegativeMiner(K, p, 0.1, len(images))
    for ws in images:
        miner.add_positives(ws)
    n_between = 0
    for i, ws in enumerate(images):
        miner.mine_image(i, ws)
        n_between += int(((ws.max_iou >= 0.3) & (ws.max_iou < 0.5)).sum())
    assert n_between > 0                      # windows that a looser threshold would take exist
    for k in range(K):
        _, keys = miner.negatives(k)
        assert len(keys) > 0
        for key in keys.tolist():
            img, j = divmod(key, KEY_STRIDE)
            ws = images[img]
            assert ws.max_iou[j, k] < p.neg_iou
            assert ws.gt_labels[j] != k


def test_max_negatives_first_caps_the_first_image():
    K = 3
    images = make_images(9, num_images=6, K=K)
    p = SVMParams(max_negatives_first=5, retrain_images=100, retrain_limit=0)
    miner = HardNegativeMiner(K, p, 0.1, len(images))
    for ws in images:
        miner.add_positives(ws)
    first = {}
    for i, ws in enumerate(images):
        untrained = [k for k in range(K) if not miner.states[k].trained]
        miner.mine_image(i, ws)
        for k in untrained:
            if k not in first and miner.states[k].added:
                first[k] = miner.states[k].added
    assert first and all(1 <= v <= 5 for v in first.values())


def _train_tiny(images, K, params, **kw):
    calls = []

    def get_windows(i):
        calls.append(i)
        return images[i]

    svms, stats = train_svms(get_windows, len(images), K, params, progress=False, **kw)
    return svms, stats, calls


def test_train_svms_end_to_end_calls_and_separation():
    K = 3
    images = make_images(10, num_images=15, K=K)
    svms, stats, calls = _train_tiny(images, K, SVMParams(retrain_images=4), class_names=["a", "b", "c"])
    # one positives pass + one mining pass, each image once per pass, in order
    assert calls == list(range(15)) + list(range(15))
    assert set(stats) == {"a", "b", "c", "_total"}
    for k, name in enumerate("abc"):
        st = stats[name]
        assert st["positives"] == sum(int((ws.gt_labels == k).sum()) for ws in images)
        assert st["retrains"] >= 2 and np.isfinite(st["objective"]) and st["time_s"] >= 0
    # the scale brings the mean norm of the windows to 20
    allf = np.concatenate([ws.features for ws in images]).astype(np.float64)
    assert np.linalg.norm(allf * svms.scale, axis=1).mean() == pytest.approx(20.0, rel=0.1)
    # the SVMs rank ground-truth boxes of their class above low-IoU windows
    for k in range(K):
        s_pos = np.concatenate([svms.decision_function(ws.features[ws.gt_labels == k])[:, k] for ws in images])
        s_neg = np.concatenate([svms.decision_function(ws.features[ws.max_iou[:, k] < 0.3])[:, k]
                                for ws in images])
        auc = (s_pos[:, None] > s_neg[None, :]).mean()
        assert auc > 0.9


def test_train_svms_with_get_positives_calls_get_windows_once_per_pass():
    K = 3
    images = make_images(11, num_images=8, K=K)
    pos_calls, calls = [], []

    def get_positives(i):
        pos_calls.append(i)
        ws = images[i]
        m = ws.gt_labels >= 0
        return WindowSet(ws.features[m], ws.gt_labels[m], ws.max_iou[m])

    def get_windows(i):
        calls.append(i)
        return images[i]

    p = SVMParams(passes=2)
    svms, stats = train_svms(get_windows, len(images), K, p, progress=False, get_positives=get_positives,
                             scale=0.05)
    assert pos_calls == list(range(8))
    assert calls == list(range(8)) * 2
    assert svms.scale == 0.05


def test_class_without_positives_gets_a_large_negative_bias(caplog):
    K = 3
    images = make_images(12, num_images=8, K=K, absent_class=1)
    with caplog.at_level(logging.WARNING, logger="sppdet.train.svm"):
        svms, stats, _ = _train_tiny(images, K, SVMParams())
    assert stats["1"]["positives"] == 0 and stats["1"]["negatives"] == 0
    assert (svms.W[:, 1] == 0).all() and svms.b[1] == np.float32(NO_POSITIVES_BIAS)
    s = svms.decision_function(np.concatenate([ws.features for ws in images]))
    assert (s[:, 1] == np.float32(NO_POSITIVES_BIAS)).all()
    assert (s[:, 0] > NO_POSITIVES_BIAS / 2).all()
    assert any("no positive" in r.getMessage() for r in caplog.records)


def test_self_check_passes_and_triggers_on_tampered_weights():
    X, y = make_problem(13, n=80, d=6)
    w, b, decision = fit_svm(X, y, SVMParams())
    scale = 0.5
    svms = LinearSVMs(w[:, None], np.array([b]), scale)
    raw = X / scale
    check_svm_scores(svms, 0, raw, decision(X))                 # untampered: passes
    svms.W[2, 0] += 0.05 * np.abs(svms.W).max() + 1e-2
    with pytest.raises(RuntimeError, match="self-check") as e:
        check_svm_scores(svms, 0, raw, decision(X), name="cat")
    assert "cat" in str(e.value) and "exported" in str(e.value)
    svms.W[2, 0] -= 0.05 * np.abs(svms.W).max() + 1e-2
    svms.scale *= 1.01                                           # a wrong scale is caught too
    with pytest.raises(RuntimeError):
        check_svm_scores(svms, 0, raw, decision(X))


def test_train_svms_self_check_is_wired_in(monkeypatch):
    """A LinearSVMs that corrupts its weights on export makes train_svms raise."""

    class Tampered(LinearSVMs):
        def __init__(self, W, b, scale):
            super().__init__(W, b, scale)
            self.b = self.b + 0.5

    monkeypatch.setattr(svm_mod, "LinearSVMs", Tampered)
    images = make_images(14, num_images=6, K=2)
    with pytest.raises(RuntimeError, match="self-check"):
        _train_tiny(images, 2, SVMParams())
