"""Class-specific bounding-box regression (R-CNN appendix C; SPPnet uses it on conv5 SPP features).

For class ``k`` a linear map from a proposal's (scaled) pooled conv5 feature ``x`` to
the correction ``t = (dx, dy, log dw, log dh)`` (:func:`sppdet.boxes.encode`) towards
the ground-truth box it overlaps most, learnt by ridge regression (``lam`` ~ 1000) on
the proposals with IoU >= 0.6 to a ground-truth box of class ``k``.

Conventions chosen here:

* Features are multiplied by one global ``scale`` that brings their mean L2 norm to
  ``feature_norm`` (20, as R-CNN scales pool5 features for its regressor and SVMs);
  by default it is estimated from the regression training features themselves.
* Targets are z-scored per class and per coordinate (mean and standard deviation of that
  class's training targets; std floored at 1e-6).  The intercept is not penalised
  (scikit-learn ``Ridge(fit_intercept=True)``), so this normalisation only improves the
  conditioning; predictions are the same as with raw targets.
* Classes with fewer than ``min_samples`` pairs get the identity regressor (zero deltas:
  boxes come back unchanged), with a warning.

Boxes are float ``(x1, y1, x2, y2)``, 0-based continuous pixels of the original image.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..boxes import box_iou, encode
from ..models.bbox_reg import BBoxRegressors
from .svm import feature_scale

logger = logging.getLogger(__name__)


def select_regression_pairs(proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                            min_iou: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proposals that train the regressors, with their targets.

    Each proposal is matched to the ground-truth box it overlaps most (the first one on
    ties); it is kept if that IoU is ``>= min_iou``.  (A proposal without positive width
    and height has IoU 0 with everything, so its undefined target is never asked for.)

    Args:
        proposals (ndarray[N, 4]): ``(x1, y1, x2, y2)`` windows of one image.
        gt_boxes (ndarray[G, 4]): ``(x1, y1, x2, y2)`` ground-truth boxes of the image.
        gt_labels (ndarray[G]): their class indices.
        min_iou: minimum IoU with the best-matching ground-truth box (R-CNN: 0.6).

    Returns:
        ``(index, target_boxes, labels)``: index (ndarray[M] int64) into ``proposals``
        (increasing), target_boxes (ndarray[M, 4] float32) the matched ground-truth boxes,
        labels (ndarray[M] int64) their classes.
    """
    proposals = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(len(gt_boxes))
    if len(proposals) == 0 or len(gt_boxes) == 0:
        return np.zeros((0,), np.int64), np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    iou = box_iou(proposals, gt_boxes)                 # [N, G]
    best = iou.argmax(axis=1)                          # first maximum on ties
    best_iou = iou[np.arange(len(proposals)), best]
    index = np.flatnonzero(best_iou >= min_iou).astype(np.int64)
    return index, gt_boxes[best[index]].astype(np.float32), gt_labels[best[index]]


def fit_ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept (scikit-learn ``Ridge``).

    Minimises ``||Y - X W - 1 b^T||^2 + lam ||W||^2``.

    Args:
        X (ndarray[M, D]), Y (ndarray[M, T]).

    Returns:
        ``(W [D, T] float64, b [T] float64)``.
    """
    from sklearn.linear_model import Ridge

    r = Ridge(alpha=float(lam), fit_intercept=True)
    r.fit(np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64))
    return np.asarray(r.coef_, np.float64).T.reshape(X.shape[1], -1), np.asarray(r.intercept_, np.float64).reshape(-1)


def train_bbox_regressors(features: np.ndarray, proposals: np.ndarray, targets: np.ndarray, labels: np.ndarray,
                          num_classes: int, lam: float = 1000.0, *, min_samples: int = 10,
                          feature_norm: float = 20.0, scale: float | None = None,
                          class_names: list[str] | None = None) -> BBoxRegressors:
    """Train one ridge regressor per class.

    Args:
        features (ndarray[M, D] float32): raw pooled conv5 features of the training proposals.
        proposals (ndarray[M, 4]): the proposals ``(x1, y1, x2, y2)`` (positive size).
        targets (ndarray[M, 4]): their matched ground-truth boxes (see :func:`select_regression_pairs`).
        labels (ndarray[M]): class of each pair.
        num_classes: K.
        lam: ridge penalty (R-CNN: 1000), on the scaled features and z-scored targets.
        min_samples: classes with fewer pairs get the identity regressor (and a warning).
        feature_norm: mean L2 norm of the scaled features.
        scale: feature scale to use; None: ``feature_scale(features, feature_norm)``.
        class_names: for log messages.

    Returns:
        :class:`BBoxRegressors`.
    """
    X = np.asarray(features, dtype=np.float32)
    M = len(X)
    D = X.shape[1] if X.ndim == 2 else 0
    proposals = np.asarray(proposals, dtype=np.float64).reshape(M, 4)
    targets = np.asarray(targets, dtype=np.float64).reshape(M, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(M)
    names = class_names or [str(k) for k in range(num_classes)]
    if scale is None:
        scale = feature_scale(X, feature_norm)
    T = encode(proposals, targets) if M else np.zeros((0, 4))
    if not np.isfinite(T).all():
        raise ValueError("train_bbox_regressors: non-finite targets (proposals of zero size?)")
    K = int(num_classes)
    W = np.zeros((K, D, 4), np.float32)
    b = np.zeros((K, 4), np.float32)
    mean = np.zeros((K, 4), np.float32)
    std = np.ones((K, 4), np.float32)
    for k in range(K):
        m = labels == k
        n = int(m.sum())
        if n < max(min_samples, 2):
            logger.warning("bbox regression %s: %d training pairs (< %d): identity regressor",
                           names[k], n, max(min_samples, 2))
            continue
        t0 = time.perf_counter()
        Tk = T[m]
        mu = Tk.mean(axis=0)
        sd = np.maximum(Tk.std(axis=0), 1e-6)
        Wk, bk = fit_ridge(X[m].astype(np.float64) * scale, (Tk - mu) / sd, lam)
        W[k], b[k], mean[k], std[k] = Wk, bk, mu, sd
        pred = (X[m].astype(np.float64) * scale @ Wk + bk) * sd + mu
        logger.info("bbox regression %s: %d pairs, target mean abs %.4f -> residual mean abs %.4f, %.2f s",
                    names[k], n, float(np.abs(Tk).mean()), float(np.abs(Tk - pred).mean()),
                    time.perf_counter() - t0)
    return BBoxRegressors(W, b, mean, std, scale)
