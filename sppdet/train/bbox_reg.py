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
from ..utils.sampling import bottom_k, pair_keys
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
        features (ndarray[M, D] float16/32/64): raw pooled conv5 features of the training
            proposals (used as they are: each class's rows are converted to float64 for its fit).
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
    X = np.asarray(features)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
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


# ---------------------------------------------------------------------------
# Bounded memory: a seeded sample of at most ``cap`` pairs per class

class PairReservoir:
    """The box-regression pairs of a stream of images, at most ``cap`` per class (``cap`` 0: all).

    Per class, the pairs with the smallest ``(key, image, window)`` (:func:`pair_keys`) seen so
    far, with their raw features, proposals and target boxes; the features of a pair that cannot
    enter are never computed.  Memory: at most ``cap`` rows per class (allocated as they come),
    i.e. ``cap * K * (2 D + 88)`` bytes, whatever the number of images, while every feature is
    exactly a float16 value (SPP max-pools conv5 maps, which are cached as float16 by default,
    so its features are float16 values): they are held as float16 then, losslessly.  The first
    feature that is not widens the store to float32 for good (``cap * K * (4 D + 88)``).
    When no class has more than ``cap`` pairs, :meth:`arrays` returns every pair in image
    order, exactly what holding them all gives.
    """

    def __init__(self, num_classes: int, cap: int = 0, seed: int = 0) -> None:
        self.K = int(num_classes)
        self.cap = int(cap)
        self.seed = int(seed)
        if self.cap < 0:
            raise ValueError(f"PairReservoir: cap must be >= 0, got {cap}")
        self.seen = np.zeros(self.K, np.int64)          # pairs of each class in the stream
        self.n = np.zeros(self.K, np.int64)             # pairs held
        self._keys = [np.zeros(0, np.uint64) for _ in range(self.K)]
        self._img = [np.zeros(0, np.int64) for _ in range(self.K)]
        self._win = [np.zeros(0, np.int64) for _ in range(self.K)]
        self._x: list[np.ndarray | None] = [None] * self.K
        self.dtype = np.dtype(np.float16)               # the features' storage (see the class doc)
        self._prop = [np.zeros((0, 4), np.float32) for _ in range(self.K)]
        self._targ = [np.zeros((0, 4), np.float32) for _ in range(self.K)]

    # -- bookkeeping -----------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the arrays held (allocated capacity included)."""
        total = 0
        for k in range(self.K):
            for a in (self._keys[k], self._img[k], self._win[k], self._prop[k], self._targ[k], self._x[k]):
                if a is not None:
                    total += a.nbytes
        return total

    def _worst(self, k: int) -> tuple[int, int, int] | None:
        """The largest ``(key, image, window)`` held by class k when it is full, else None."""
        if not self.cap or self.n[k] < self.cap:
            return None
        n = int(self.n[k])
        keys, img, win = self._keys[k][:n], self._img[k][:n], self._win[k][:n]
        j = np.lexsort((win, img, keys))[-1]
        return int(keys[j]), int(img[j]), int(win[j])

    @staticmethod
    def _below(keys, img, win, bound: tuple[int, int, int] | None, inclusive: bool = False) -> np.ndarray:
        """Mask of the triples lexicographically below ``bound`` (or equal to it, ``inclusive``;
        all when None)."""
        if bound is None:
            return np.ones(len(keys), bool)
        bk, bi, bw = np.uint64(bound[0]), bound[1], bound[2]
        last = win <= bw if inclusive else win < bw
        return (keys < bk) | ((keys == bk) & ((img < bi) | ((img == bi) & last)))

    # -- the stream ----------------------------------------------------------------
    def add_image(self, image: int, windows: np.ndarray, proposals: np.ndarray, targets: np.ndarray,
                  labels: np.ndarray, feature_fn: Callable[[np.ndarray], np.ndarray]) -> int:
        """Offer one image's pairs; ``feature_fn(window_indices) -> [m, D]`` is called once, on the
        pairs that enter (in window order).  Returns how many entered."""
        windows = np.asarray(windows, np.int64)
        labels = np.asarray(labels, np.int64)
        if len(windows) == 0:
            return 0
        if labels.min() < 0 or labels.max() >= self.K:
            raise ValueError(f"image {image}: regression pair label out of range for {self.K} classes")
        keys = pair_keys(self.seed, image, windows)
        img = np.full(len(windows), int(image), np.int64)
        enter = np.zeros(len(windows), bool)
        for k in np.unique(labels):
            m = labels == k
            self.seen[k] += int(m.sum())
            enter[m] = self._below(keys[m], img[m], windows[m], self._worst(int(k)))
        sel = np.flatnonzero(enter)
        if len(sel) == 0:
            return 0
        x = feature_fn(windows[sel])
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        x = x.astype(np.float32, copy=False).reshape(len(sel), -1)
        if self.dtype == np.float16:
            half = x.astype(np.float16)
            if np.array_equal(half.astype(np.float32), x):
                x = half
            else:
                self._widen()
        self._insert(keys[sel], img[sel], windows[sel], x, np.asarray(proposals, np.float32)[sel],
                     np.asarray(targets, np.float32)[sel], labels[sel])
        return len(sel)

    def _widen(self) -> None:
        """Hold the features as float32 from now on (the values held are kept exactly)."""
        self.dtype = np.dtype(np.float32)
        self._x = [None if a is None else a.astype(np.float32) for a in self._x]

    def _insert(self, keys, img, win, x, prop, targ, labels) -> None:
        D = x.shape[1]
        for k in np.unique(labels):
            k = int(k)
            m = np.flatnonzero(labels == k)
            if self._x[k] is None:
                self._x[k] = np.zeros((0, D), self.dtype)
            elif self._x[k].shape[1] != D:
                raise ValueError(f"feature dimension changed from {self._x[k].shape[1]} to {D}")
            n = int(self.n[k])
            # keep the (at most cap) smallest triples of held + new
            all_keys = np.concatenate([self._keys[k][:n], keys[m]])
            all_img = np.concatenate([self._img[k][:n], img[m]])
            all_win = np.concatenate([self._win[k][:n], win[m]])
            if self.cap and len(all_keys) > self.cap:
                order = bottom_k(all_keys, all_img, all_win, self.cap)
                keep = np.zeros(len(all_keys), bool)
                keep[order] = True
            else:
                keep = np.ones(len(all_keys), bool)
            old_out = np.flatnonzero(~keep[:n])             # held rows to overwrite
            new_in = m[keep[n:]]                            # new pairs that stay
            slots = np.concatenate([old_out, np.arange(n, n + max(0, len(new_in) - len(old_out)))])[: len(new_in)]
            need = n + max(0, len(new_in) - len(old_out))
            self._grow(k, need, D)
            self._keys[k][slots] = keys[new_in]
            self._img[k][slots] = img[new_in]
            self._win[k][slots] = win[new_in]
            self._x[k][slots] = x[new_in]
            self._prop[k][slots] = prop[new_in]
            self._targ[k][slots] = targ[new_in]
            self.n[k] = need

    def _grow(self, k: int, need: int, D: int) -> None:
        have = len(self._keys[k])
        if need <= have:
            return
        new = max(need, min(2 * have, self.cap) if self.cap else 2 * have, 16)
        if self.cap:
            new = min(new, self.cap)

        def grown(a, shape, dtype):
            b = np.zeros(shape, dtype)
            b[: len(a)] = a
            return b

        self._keys[k] = grown(self._keys[k], (new,), np.uint64)
        self._img[k] = grown(self._img[k], (new,), np.int64)
        self._win[k] = grown(self._win[k], (new,), np.int64)
        self._x[k] = grown(self._x[k], (new, D), self.dtype)
        self._prop[k] = grown(self._prop[k], (new, 4), np.float32)
        self._targ[k] = grown(self._targ[k], (new, 4), np.float32)

    # -- merging (several ranks) -------------------------------------------------------
    def summary(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per class the held ``(keys, images, windows)`` (small: for :func:`merge_bounds`)."""
        return [(self._keys[k][: self.n[k]].copy(), self._img[k][: self.n[k]].copy(),
                 self._win[k][: self.n[k]].copy()) for k in range(self.K)]

    def restrict(self, bounds: Sequence[tuple[int, int, int] | None]) -> None:
        """Drop the held pairs above each class's bound (inclusive bound: the bound itself stays)."""
        for k, bound in enumerate(bounds):
            if bound is None or self.n[k] == 0:
                continue
            n = int(self.n[k])
            keep = np.flatnonzero(self._below(self._keys[k][:n], self._img[k][:n], self._win[k][:n], bound,
                                              inclusive=True))
            for name in ("_keys", "_img", "_win", "_x", "_prop", "_targ"):
                getattr(self, name)[k] = getattr(self, name)[k][keep].copy()
            self.n[k] = len(keep)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(images, windows, features [M, D] (:attr:`dtype`), proposals [M, 4], targets [M, 4],
        labels)`` of every held pair, sorted by ``(image, window)`` (one copy of the features)."""
        return _sorted_pairs([(self._img[k][: self.n[k]], self._win[k][: self.n[k]], self._x[k][: self.n[k]],
                               self._prop[k][: self.n[k]], self._targ[k][: self.n[k]],
                               np.full(int(self.n[k]), k, np.int64)) for k in range(self.K) if self.n[k]])


def _sorted_pairs(parts):
    """Concatenate ``(images, windows, features, proposals, targets, labels)`` parts, sorted by
    ``(image, window)``, writing each part's rows straight to their place (one copy)."""
    if not parts:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    img = np.concatenate([p[0] for p in parts])
    win = np.concatenate([p[1] for p in parts])
    order = np.lexsort((win, img))
    where = np.empty(len(order), np.int64)
    where[order] = np.arange(len(order))               # row j of the concatenation goes to where[j]
    out = [img[order], win[order]]
    for i in range(2, 6):
        first = parts[0][i]
        # ranks may hold their features as float16 or float32 (PairReservoir.dtype): the wider
        a = np.empty((len(order),) + first.shape[1:], np.result_type(*[p[i].dtype for p in parts]))
        start = 0
        for p in parts:
            a[where[start:start + len(p[i])]] = p[i]
            start += len(p[i])
        out.append(a)
    return tuple(out)


def merge_bounds(summaries: Sequence[list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
                 cap: int) -> list[tuple[int, int, int] | None]:
    """Per class, the ``cap``-th smallest ``(key, image, window)`` over several reservoirs'
    :meth:`PairReservoir.summary` (None: keep all): after :meth:`PairReservoir.restrict` to these
    bounds the reservoirs together hold exactly the bottom-``cap`` of the union of their streams."""
    K = len(summaries[0]) if summaries else 0
    out: list[tuple[int, int, int] | None] = []
    for k in range(K):
        keys = np.concatenate([s[k][0] for s in summaries])
        img = np.concatenate([s[k][1] for s in summaries])
        win = np.concatenate([s[k][2] for s in summaries])
        if not cap or len(keys) <= cap:
            out.append(None)
            continue
        j = np.lexsort((win, img, keys))[cap - 1]
        out.append((int(keys[j]), int(img[j]), int(win[j])))
    return out


def train_bbox_regressors_on_windows(feature_fn: Callable, windows: Sequence, num_classes: int, *,
                                     min_iou: float = 0.6, lam: float = 1000.0,
                                     max_pairs_per_class: int = 0, seed: int = 0,
                                     class_names: list[str] | None = None,
                                     progress: bool = True) -> BBoxRegressors:
    """The box-regression stage of ``sppdet train``: pairs of every training image, then one fit.

    For each image, the proposals (windows that are not ground-truth boxes) with
    IoU >= ``min_iou`` to a ground-truth box (:func:`select_regression_pairs`) and their
    raw pooled features; then :func:`train_bbox_regressors` on them, in image order.

    Memory does not grow with the number of images: with ``max_pairs_per_class`` (``cap``) > 0
    a class keeps a seeded uniform sample of ``cap`` of its pairs (:class:`PairReservoir`:
    bottom-``cap`` by a hash of ``(seed, image, window)``, so the sample does not depend on the
    order of the images or on how they are split between ranks), and the features of a pair
    that cannot enter the sample are never computed.  A class with at most ``cap`` pairs keeps
    them all: when no class exceeds the cap, the regressors are exactly those of fitting every
    pair.  ``cap`` 0 keeps every pair (memory grows with the data).

    Several processes (a ``torch.distributed`` group): image ``i`` belongs to rank
    ``i mod W`` (:func:`sppdet.utils.dist.shard`), which samples its own pairs; the ranks'
    samples are cut to the global bottom-``cap`` (:func:`merge_bounds`, keys only), rank 0
    gathers what is left, fits once and broadcasts the regressors, so every rank returns the
    one-process result, bit for bit.

    Args:
        feature_fn: ``(image_index, window_indices, flip) -> Tensor[n, D]`` raw pooled features.
        windows: :class:`~sppdet.train.windows.ImageWindows` of every training image (``.index``
            is the image index ``feature_fn`` takes).
        num_classes: K.
        min_iou, lam: as :func:`select_regression_pairs` / :func:`train_bbox_regressors`.
        max_pairs_per_class: the cap (0: no cap).
        seed: the sample's seed.
        class_names: for log messages.
        progress: show a progress bar.

    Raises:
        SppdetError: no proposal of any image reaches ``min_iou`` (on every rank).
    """
    from ..utils import dist
    from ..utils.dist import DistributedError

    rank, world = dist.get_rank(), dist.get_world_size()
    names = class_names or [str(k) for k in range(num_classes)]
    err: BaseException | None = None
    res = PairReservoir(num_classes, max_pairs_per_class, seed)
    try:
        for w in _progress(dist.shard(list(windows)), desc="bbox-reg features", unit="img",
                           disable=None if progress else True):
            is_prop = np.flatnonzero(w.gt_labels < 0)
            idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, min_iou)
            if len(idx) == 0:
                continue
            win = is_prop[idx]
            res.add_image(int(w.index), win, w.boxes[win], tb, lab,
                          lambda sel, i=int(w.index): feature_fn(i, sel, False))
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        err = e
    dist.raise_if_any(err)
    seen = res.seen
    if world > 1:
        # cut every rank's sample to the global bottom-cap (keys only travel), then gather
        summaries = dist.all_gather_object((res.seen, res.summary()))
        seen = np.sum([s[0] for s in summaries], axis=0)
        res.restrict(merge_bounds([s[1] for s in summaries], max_pairs_per_class))
        del summaries
    parts = dist.gather_object(res.arrays())
    del res
    result = None
    if rank == 0:
        try:
            assert parts is not None
            parts = [p for p in parts if len(p[0])]
            img, _, X, P, T, L = parts[0] if len(parts) == 1 else _sorted_pairs(parts)
            parts = None
            if not len(img):
                raise SppdetError("box regression: no proposal overlaps a ground-truth box by "
                                  f"IoU >= {min_iou}; disable bbox_reg or check the proposals")
            for k in range(num_classes):
                if max_pairs_per_class and seen[k] > max_pairs_per_class:
                    logger.info("bbox regression %s: %d pairs, a seeded sample of %d used "
                                "(bbox_reg.max_pairs_per_class)", names[k], int(seen[k]), max_pairs_per_class)
            reg = train_bbox_regressors(X, P, T, L, num_classes, lam=lam, class_names=class_names)
            result = ("ok", reg.state_dict() if world > 1 else reg)
        except Exception as e:  # noqa: BLE001
            err = e
            result = ("failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
    parts = None
    if world > 1:
        result = dist.broadcast_object(result)
    assert result is not None
    if result[0] == "failed":
        if err is not None:
            raise err
        raise DistributedError(f"rank 0 of {world} failed: {result[1]}")
    return result[1] if world == 1 else BBoxRegressors.from_state_dict(result[1])
