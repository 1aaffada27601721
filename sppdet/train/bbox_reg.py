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
from typing import Callable, Sequence

import numpy as np

from ..boxes import box_iou, encode
from ..errors import SppdetError
from ..models.bbox_reg import BBoxRegressors
from ..utils.progress import progress as _progress
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


def train_bbox_regressors_on_windows(feature_fn: Callable, windows: Sequence, num_classes: int, *,
                                     min_iou: float = 0.6, lam: float = 1000.0,
                                     class_names: list[str] | None = None,
                                     progress: bool = True) -> BBoxRegressors:
    """The box-regression stage of ``sppdet train``: pairs of every training image, then one fit.

    For each image, the proposals (windows that are not ground-truth boxes) with
    IoU >= ``min_iou`` to a ground-truth box (:func:`select_regression_pairs`) and their
    raw pooled features; then :func:`train_bbox_regressors` on all of them, in image order.

    Several processes (a ``torch.distributed`` group): image ``i`` belongs to rank
    ``i mod W`` (:func:`sppdet.utils.dist.shard`), which computes its pairs' features;
    rank 0 gathers them (positives only: the training set one process holds), fits once and
    broadcasts the regressors, so every rank returns the one-process result.

    Args:
        feature_fn: ``(image_index, window_indices, flip) -> Tensor[n, D]`` raw pooled features.
        windows: :class:`~sppdet.train.windows.ImageWindows` of every training image (``.index``
            is the image index ``feature_fn`` takes).
        num_classes: K.
        min_iou, lam: as :func:`select_regression_pairs` / :func:`train_bbox_regressors`.
        class_names: for log messages.
        progress: show a progress bar.

    Raises:
        SppdetError: no proposal of any image reaches ``min_iou`` (on every rank).
    """
    from ..utils import dist
    from ..utils.dist import DistributedError

    rank, world = dist.get_rank(), dist.get_world_size()
    err: BaseException | None = None
    mine: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    try:
        for w in _progress(dist.shard(list(windows)), desc="bbox-reg features", unit="img",
                           disable=None if progress else True):
            is_prop = np.flatnonzero(w.gt_labels < 0)
            idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, min_iou)
            if len(idx) == 0:
                continue
            win = is_prop[idx]
            x = feature_fn(w.index, win, False)
            x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            mine.append((int(w.index), x.astype(np.float32), w.boxes[win], tb, lab))
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        err = e
    dist.raise_if_any(err)
    parts = dist.gather_object(mine)
    del mine
    result = None
    if rank == 0:
        try:
            assert parts is not None
            pairs = sorted((p for part in parts for p in part), key=lambda t: t[0])
            if not pairs:
                raise SppdetError("box regression: no proposal overlaps a ground-truth box by "
                                  f"IoU >= {min_iou}; disable bbox_reg or check the proposals")
            reg = train_bbox_regressors(np.concatenate([p[1] for p in pairs]), np.concatenate([p[2] for p in pairs]),
                                        np.concatenate([p[3] for p in pairs]), np.concatenate([p[4] for p in pairs]),
                                        num_classes, lam=lam, class_names=class_names)
            result = ("ok", reg.state_dict() if world > 1 else reg)
        except Exception as e:  # noqa: BLE001
            err = e
            result = ("failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
    del parts
    if world > 1:
        result = dist.broadcast_object(result)
    assert result is not None
    if result[0] == "failed":
        if err is not None:
            raise err
        raise DistributedError(f"rank 0 of {world} failed: {result[1]}")
    return result[1] if world == 1 else BBoxRegressors.from_state_dict(result[1])
