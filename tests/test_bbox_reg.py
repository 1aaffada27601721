"""Tests of sppdet.train.bbox_reg: pair selection, ridge solution, refinement, fallback, serialisation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sppdet.boxes import encode
from sppdet.train.bbox_reg import (
    BBoxRegressors,
    fit_ridge,
    select_regression_pairs,
    train_bbox_regressors,
)
from sppdet.train.svm import feature_scale

# ---------------------------------------------------------------------------
# Slow references


def ref_iou(a, b):
    """IoU of two (x1, y1, x2, y2) boxes, continuous convention."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_pairs(proposals, gt, labels, min_iou):
    idx, tb, lab = [], [], []
    for i, p in enumerate(proposals):
        if not (p[2] > p[0] and p[3] > p[1]):
            continue
        best, best_j = -1.0, -1
        for j, g in enumerate(gt):
            o = ref_iou(p, g)
            if o > best:                       # strict: the first maximum wins
                best, best_j = o, j
        if best >= min_iou:
            idx.append(i)
            tb.append(gt[best_j])
            lab.append(labels[best_j])
    return idx, tb, lab


def ridge_closed_form(X, y, lam):
    """Ridge with an unpenalised intercept: centre, solve (Xc^T Xc + lam I) w = Xc^T yc, b = ybar - xbar.w."""
    xbar, ybar = X.mean(0), y.mean(0)
    Xc, yc = X - xbar, y - ybar
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ yc)
    return w, ybar - xbar @ w


def jittered_problem(seed, n_per_class=150, K=3, D=24, noise=0.01):
    """Boxes jittered off their ground truth; the feature encodes the jitter linearly (+ noise).

    Returns features, proposals, target boxes, labels.
    """
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(K, 4, D))            # per-class map from deltas to features
    feats, props, targs, labels = [], [], [], []
    for k in range(K):
        for _ in range(n_per_class):
            w, h = rng.uniform(30, 200, size=2)
            x1, y1 = rng.uniform(0, 300, size=2)
            gt = np.array([x1, y1, x1 + w, y1 + h])
            d = np.array([rng.normal(0, 0.08), rng.normal(0, 0.08), rng.normal(0, 0.1), rng.normal(0, 0.1)])
            pw, ph = w / np.exp(d[2]), h / np.exp(d[3])
            cx, cy = x1 + w / 2 - d[0] * pw, y1 + h / 2 - d[1] * ph
            prop = np.array([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2])
            t = encode(prop[None], gt[None])[0]
            feats.append(t @ A[k] * 5 + rng.normal(size=D) * noise + 1.0)
            props.append(prop)
            targs.append(gt)
            labels.append(k)
    return (np.asarray(feats, np.float32), np.asarray(props), np.asarray(targs), np.asarray(labels))


def mean_iou(a, b):
    return float(np.mean([ref_iou(x, y) for x, y in zip(a, b)]))


# ---------------------------------------------------------------------------
# select_regression_pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_regression_pairs_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    gt = np.array([[10, 10, 60, 80], [50, 40, 120, 100], [55, 45, 118, 102]], np.float64)
    labels = np.array([2, 0, 1])
    props = []
    for _ in range(300):
        g = gt[rng.integers(0, 3)]
        j = rng.normal(0, 8, size=4)
        props.append(g + j)
    props.append([5, 5, 5, 30])               # zero width: never a pair
    props.append(gt[1])                        # exact copy: IoU 1
    props.append([10, 10, 40, 80])             # IoU exactly 0.6 with gt 0: kept (>=)
    props.append([10, 10, 39, 80])             # IoU 0.58: not kept
    props = np.asarray(props)
    idx, tb, lab = select_regression_pairs(props, gt, labels, 0.6)
    ridx, rtb, rlab = ref_pairs(props, gt, labels, 0.6)
    assert idx.dtype == np.int64 and tb.dtype == np.float32 and lab.dtype == np.int64
    assert idx.tolist() == ridx
    np.testing.assert_array_equal(tb, np.asarray(rtb, np.float32).reshape(-1, 4))
    assert lab.tolist() == rlab
    assert 0 < len(idx) < len(props)
    assert len(props) - 3 in idx.tolist() and len(props) - 2 in idx.tolist()
    assert len(props) - 1 not in idx.tolist()


def test_select_regression_pairs_empty_inputs():
    idx, tb, lab = select_regression_pairs(np.zeros((0, 4)), np.array([[0, 0, 5, 5]]), np.array([0]))
    assert idx.shape == (0,) and tb.shape == (0, 4) and lab.shape == (0,)
    idx, tb, lab = select_regression_pairs(np.array([[0, 0, 5, 5]]), np.zeros((0, 4)), np.zeros((0,)))
    assert idx.shape == (0,) and tb.shape == (0, 4) and lab.shape == (0,)


# ---------------------------------------------------------------------------
# ridge


def test_fit_ridge_matches_closed_form():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 8)) + 2.0
    Y = rng.normal(size=(50, 4)) + X[:, :4] * 0.5
    for lam in (0.1, 10.0, 1000.0):
        W, b = fit_ridge(X, Y, lam)
        Wr, br = ridge_closed_form(X, Y, lam)
        np.testing.assert_allclose(W, Wr, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(b, br, rtol=1e-7, atol=1e-10)


def test_train_bbox_regressors_matches_closed_form_per_class():
    X, P, T, L = jittered_problem(4, n_per_class=40, K=2, D=10, noise=0.5)
    lam = 1000.0
    reg = train_bbox_regressors(X, P, T, L, 2, lam=lam, min_samples=5)
    scale = feature_scale(X, 20.0)
    assert reg.scale == pytest.approx(scale, rel=1e-9)
    D = encode(P, T)
    for k in range(2):
        m = L == k
        mu, sd = D[m].mean(0), D[m].std(0)
        Wr, br = ridge_closed_form(X[m].astype(np.float64) * scale, (D[m] - mu) / sd, lam)
        np.testing.assert_allclose(reg.W[k], Wr, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(reg.b[k], br, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(reg.mean[k], mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(reg.std[k], sd, rtol=1e-5)
        # predicted deltas are the closed-form ones, de-normalised
        d_pred = reg.deltas_all(X[m])[:, k]
        np.testing.assert_allclose(d_pred, ((X[m] * scale) @ Wr + br) * sd + mu, rtol=1e-3, atol=1e-5)


def test_regression_reduces_localisation_error():
    X, P, T, L = jittered_problem(5)
    n = len(X)
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    tr, te = perm[: n * 2 // 3], perm[n * 2 // 3:]
    reg = train_bbox_regressors(X[tr], P[tr], T[tr], L[tr], 3, lam=1000.0)
    refined = reg.predict(X[te], P[te], L[te])
    before = mean_iou(P[te], T[te])
    after = mean_iou(refined, T[te])
    assert after > before + 0.1, (before, after)
    assert after > 0.9                        # from ~0.75; lam = 1000 shrinks a little
    # the wrong class's regressor does not help: class-specific maps
    wrong = reg.predict(X[te], P[te], (L[te] + 1) % 3)
    assert mean_iou(wrong, T[te]) < after - 0.05


def test_predict_all_agrees_with_predict_and_accepts_tensors():
    X, P, T, L = jittered_problem(6, n_per_class=30, K=3, D=12, noise=0.1)
    reg = train_bbox_regressors(X, P, T, L, 3, lam=100.0, min_samples=5)
    allk = reg.predict_all(X, P)
    assert allk.shape == (len(X), 3, 4) and allk.dtype == np.float32
    for k in range(3):
        np.testing.assert_allclose(allk[:, k], reg.predict(X, P, np.full(len(X), k)), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(reg.predict_all(torch.from_numpy(X), P), allk, rtol=1e-6, atol=1e-4)
    assert reg.predict_all(np.zeros((0, 12), np.float32), np.zeros((0, 4))).shape == (0, 3, 4)


def test_identity_fallback_for_rare_classes(caplog):
    X, P, T, L = jittered_problem(7, n_per_class=30, K=3, D=12)
    keep = (L != 1) | (np.arange(len(L)) % 10 == 0)        # class 1: 3 samples
    X, P, T, L = X[keep], P[keep], T[keep], L[keep]
    with caplog.at_level(logging.WARNING, logger="sppdet.train.bbox_reg"):
        reg = train_bbox_regressors(X, P, T, L, 4, lam=1000.0, min_samples=10, class_names=["a", "b", "c", "d"])
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("bbox regression b:") for m in msgs)
    assert any(m.startswith("bbox regression d:") for m in msgs)   # class 3: no samples at all
    for k in (1, 3):
        assert (reg.W[k] == 0).all() and (reg.b[k] == 0).all() and (reg.mean[k] == 0).all()
        out = reg.predict(X, P, np.full(len(X), k))
        np.testing.assert_allclose(out, P, rtol=0, atol=1e-4)        # boxes unchanged
    assert not np.allclose(reg.predict(X, P, np.zeros(len(X), int)), P, atol=1e-2)
    ident = BBoxRegressors.identity(3, 12)
    np.testing.assert_allclose(ident.predict_all(X, P), np.repeat(P[:, None], 3, axis=1), atol=1e-4)


def test_state_dict_round_trip(tmp_path):
    X, P, T, L = jittered_problem(8, n_per_class=20, K=2, D=6)
    reg = train_bbox_regressors(X, P, T, L, 2, lam=10.0, min_samples=5)
    path = tmp_path / "reg.pt"
    torch.save(reg.state_dict(), path)
    reg2 = BBoxRegressors.from_state_dict(torch.load(path, weights_only=True))
    for name in ("W", "b", "mean", "std"):
        np.testing.assert_array_equal(getattr(reg2, name), getattr(reg, name))
    assert reg2.scale == reg.scale
    np.testing.assert_array_equal(reg2.predict_all(X, P), reg.predict_all(X, P))
    with pytest.raises(ValueError):
        BBoxRegressors.from_state_dict({"W": torch.zeros(1, 2, 4)})
