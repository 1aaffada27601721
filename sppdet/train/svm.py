"""Per-class linear SVMs with hard-negative mining (R-CNN / SPPnet detection stage).

One binary linear SVM per class is trained on window features (fc7, or the pooled
conv5 "SPP" feature) scaled so that their mean L2 norm is ``feature_norm`` (20).

Training set of class ``k``:

* positives: the ground-truth boxes of class ``k`` (every training image);
* negatives: windows (proposals and ground-truth boxes of other classes) whose
  IoU with every ground-truth box of class ``k`` is below ``neg_iou`` (0.3),
  collected by hard-negative mining in one pass over the images (as R-CNN):
  a negative is *hard* if the current model scores it above ``hard_threshold``
  (-1.0001, i.e. on the wrong side of or inside the margin); hard negatives go
  into a per-class cache (deduplicated by ``(image, window)``), the SVM is
  retrained after each batch of new hard negatives, and after every retrain the
  cached negatives it scores below ``evict_threshold`` (-1.2) are evicted.

Objective (liblinear ``-s 3``: L2-regularised L1-loss SVC, solved in the dual;
``-w1 pos_weight -c C -B bias_multiplier``), with ``B = bias_multiplier``::

    min_{w, v}  1/2 (||w||^2 + v^2) + C * sum_i c_i * max(0, 1 - y_i (w.x_i + B v))

where ``c_i = pos_weight`` for positives and 1 for negatives, ``x_i`` are the
*scaled* features, and the exported bias is ``b = B v``.  The bias is regularised
(through ``v``) exactly as liblinear does it; a large ``B`` makes that penalty small.
scikit-learn's ``LinearSVC(loss="hinge", dual=True, C=C, class_weight={+1: pos_weight,
-1: 1}, fit_intercept=True, intercept_scaling=B)`` is this problem (sklearn's
``intercept_`` is ``B v``).  A torch solver of the same dual (accelerated projected
gradient with a duality-gap stop) is available for large data on a GPU
(``SVMParams.solver = "torch"``).

Scores of a trained model: ``s = (scale * x) @ W + b`` with ``W`` (float32 [D, K]),
``b`` (float32 [K]) and ``scale`` (float) as stored in :class:`LinearSVMs`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import SVMConfig
from ..models.svm import NO_POSITIVES_BIAS, LinearSVMs
from ..utils import memory
from ..utils.progress import progress as _progress
from ..utils.sampling import bottom_k, pair_keys

logger = logging.getLogger(__name__)

#: Window keys ``image * KEY_STRIDE + window`` identify a window across the data set.
KEY_STRIDE: int = 1 << 32


@dataclass
class SVMParams(SVMConfig):
    """Hyper-parameters of SVM training (defaults: R-CNN / SPPnet).

    The fields and defaults are those of the config's ``svm`` section
    (:class:`~sppdet.config.SVMConfig`, inherited, so each default is written once) plus
    ``device`` and ``seed``; ``features`` (fc7 or spp) is the pipeline's business.

    Attributes:
        C: liblinear's ``-c`` (cost of the hinge loss).
        pos_weight: liblinear's ``-w1``: positives' hinge losses are weighted by this.
        bias_multiplier: liblinear's ``-B``: the constant feature appended to every example.
        feature_norm: features are scaled so that their mean L2 norm is this.
        neg_iou: a window is a negative of class k when its IoU with every ground-truth
            box of class k is below this.
        hard_threshold: a negative scoring above this is hard (goes into the cache).
        evict_threshold: after a retrain, cached negatives scoring below this are evicted.
        retrain_images: retrain a class after this many images have been mined since its
            last retrain (if it got new hard negatives); 0: auto (a tenth of the images, min 1).
        retrain_limit: also retrain a class as soon as it has more than this many new hard
            negatives since its last retrain (R-CNN: 2000); 0: no limit.  Bounds memory.
        max_negatives_first: while a class has no model yet (before the first image that
            gives it negatives has been mined, every negative is hard), take at most this many
            negatives of one image, a seeded random subset; 0: all of them.
        passes: mining passes over the images (R-CNN: 1).
        max_iter: iteration limit of the solver (liblinear epochs / torch iterations / 10).
        tol: solver tolerance (liblinear: projected-gradient tolerance; torch: relative
            duality gap).
        solver: "liblinear" (scikit-learn LinearSVC, CPU) or "torch" (same objective).
        neg_overlap_dedupe: the TPAMI paper's rule (0.7 there); None or 0: off.  Among the
            hard negatives one image gives a class, a window overlapping (IoU > this) a
            higher-scoring one is dropped (see :func:`dedupe_negatives`); needs
            ``WindowSet.boxes``.
        cache_memory_gb: byte budget (GiB) of all classes' negative caches together (features
            and keys); when a mined image takes the caches over it, every class keeps its
            highest-scoring (hardest) cached negatives, the same fraction of each class's cache,
            so that the total is 90% of the budget (see :meth:`HardNegativeMiner.enforce_budget`);
            0: no cap.
        max_positives_per_class: a class with more ground-truth windows is trained on a seeded
            uniform sample of this many (:class:`PositiveSample`; the same for any image order
            and number of processes); 0: all.
        device: torch device for the torch solver ("auto", "cpu", "cuda", ...).
        seed: random state (liblinear's coordinate order, subsampling).
    """

    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        base = getattr(super(), "__post_init__", None)
        if base is not None:
            base()
        if self.C <= 0 or self.pos_weight <= 0 or self.bias_multiplier <= 0 or self.feature_norm <= 0:
            raise ValueError("SVMParams: C, pos_weight, bias_multiplier and feature_norm must be > 0")
        if self.evict_threshold > self.hard_threshold:
            raise ValueError("SVMParams: evict_threshold must be <= hard_threshold")
        if self.solver not in ("liblinear", "torch"):
            raise ValueError(f"SVMParams.solver: expected 'liblinear' or 'torch', got {self.solver!r}")
        if self.cache_memory_gb < 0:
            raise ValueError(f"SVMParams.cache_memory_gb: expected >= 0, got {self.cache_memory_gb}")
        if self.passes < 1 or self.retrain_images < 0 or self.retrain_limit < 0 or self.max_negatives_first < 0:
            raise ValueError("SVMParams: passes >= 1; retrain_images, retrain_limit, max_negatives_first >= 0")
        if self.neg_overlap_dedupe is not None and not 0 <= self.neg_overlap_dedupe < 1:
            raise ValueError(f"SVMParams.neg_overlap_dedupe: expected None or a value in [0, 1), "
                             f"got {self.neg_overlap_dedupe}")


@dataclass
class WindowSet:
    """Everything the miner needs about one training image.

    Attributes:
        features (ndarray[N, D] float32): raw (unscaled) features of the image's windows
            (its ground-truth boxes and its proposals, in any order).
        gt_labels (ndarray[N] int64): class index if the window is a ground-truth box, else -1.
        max_iou (ndarray[N, K] float32): max IoU of each window with the ground-truth boxes
            of each class (0 where the image has none of that class).
        boxes (ndarray[N, 4] float32 or None): the windows ``(x1, y1, x2, y2)`` (any pixel
            frame); needed only for ``neg_overlap_dedupe``.
    """

    features: np.ndarray
    gt_labels: np.ndarray
    max_iou: np.ndarray
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 2:
            raise ValueError(f"WindowSet.features: expected [N, D], got shape {self.features.shape}")
        n = len(self.features)
        self.gt_labels = np.asarray(self.gt_labels, dtype=np.int64).reshape(n)
        self.max_iou = np.asarray(self.max_iou, dtype=np.float32)
        if self.max_iou.ndim != 2 or len(self.max_iou) != n:
            raise ValueError(f"WindowSet.max_iou: expected [{n}, K], got shape {self.max_iou.shape}")
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float32)
            if self.boxes.shape != (n, 4):
                raise ValueError(f"WindowSet.boxes: expected [{n}, 4], got shape {self.boxes.shape}")


def feature_scale(sample: np.ndarray, target_norm: float = 20.0) -> float:
    """Factor that brings the mean L2 norm of feature rows to ``target_norm``.

    Args:
        sample (ndarray[N, D]): a sample of raw features (rows are windows).
        target_norm: the wanted mean norm (R-CNN: 20).

    Returns:
        ``target_norm / mean_i ||sample_i||`` (1.0 for an empty or all-zero sample).
    """
    if len(sample) == 0:
        return 1.0
    x = np.asarray(sample).reshape(len(sample), -1)
    # row norms in float64, a block of rows at a time (no float64 copy of a large sample; each
    # row's norm, and so the mean, is the same as from one copy)
    norms = np.empty(len(x), np.float64)
    step = max(1, (64 << 20) // max(1, 8 * x.shape[1]))
    for a in range(0, len(x), step):
        norms[a:a + step] = np.linalg.norm(x[a:a + step].astype(np.float64), axis=1)
    mean_norm = float(norms.mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        return 1.0
    return float(target_norm) / mean_norm


# ---------------------------------------------------------------------------
# One binary SVM


def svm_objective(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, params: SVMParams) -> tuple[float, float]:
    """Primal objective (liblinear ``-s 3`` with ``-B``) and mean weighted hinge loss.

    Args:
        X (ndarray[N, D]): scaled features.
        y (ndarray[N]): labels in {+1, -1}.
        w (ndarray[D]), b: the SVM (score = X @ w + b).
        params: C, pos_weight, bias_multiplier.

    Returns:
        ``(objective, hinge)`` with ``objective = 1/2 (||w||^2 + (b / B)^2) + C sum_i c_i
        max(0, 1 - y_i s_i)`` and ``hinge = sum_i c_i max(0, 1 - y_i s_i) / sum_i c_i``.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    s = X @ w + b
    c = np.where(y > 0, params.pos_weight, 1.0)
    loss = c * np.maximum(0.0, 1.0 - y * s)
    reg = 0.5 * (float(w @ w) + (b / params.bias_multiplier) ** 2)
    return reg + params.C * float(loss.sum()), float(loss.sum() / max(c.sum(), 1e-12))


def _fit_liblinear(X: np.ndarray, y: np.ndarray, params: SVMParams) -> tuple[np.ndarray, float, Callable[[np.ndarray], np.ndarray]]:
    """Fit with scikit-learn's LinearSVC (liblinear dual CD); returns (w [D], b, decision_function)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    clf = LinearSVC(penalty="l2", loss="hinge", dual=True, C=params.C,
                    class_weight={1: params.pos_weight, -1: 1.0}, fit_intercept=True,
                    intercept_scaling=params.bias_multiplier, tol=params.tol,
                    max_iter=params.max_iter, random_state=params.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(X, y)
    for wrn in caught:
        if issubclass(wrn.category, ConvergenceWarning):
            logger.warning("liblinear did not converge in %d iterations (N=%d, D=%d); "
                           "consider a larger max_iter", params.max_iter, X.shape[0], X.shape[1])
    assert list(clf.classes_) == [-1, 1], clf.classes_
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), clf.decision_function


def _fit_torch(X: np.ndarray, y: np.ndarray, params: SVMParams,
               device: torch.device | None = None) -> tuple[np.ndarray, float, Callable[[np.ndarray], np.ndarray]]:
    """Same objective as liblinear, solved in the dual with FISTA (torch, any device).

    Dual (``z_i = y_i [x_i, B]``, ``c_i`` = C times the class weight)::

        min_a  f(a) = 1/2 ||Z^T a||^2 - sum_i a_i   s.t. 0 <= a_i <= c_i,    u = Z^T a = [w, v].

    Accelerated projected gradient with step ``1/L`` (``L = ||Z||_2^2`` by power iteration)
    and gradient-based adaptive restart; stops when the duality gap
    ``P(u) - (-f(a))`` is below ``tol`` times the primal objective (a certificate:
    the primal objective is then within that fraction of the optimum).
    Runs in float64 on CPU and float32 elsewhere (gap checks in float64).
    """
    from ..utils.device import resolve_device

    dev = device if device is not None else resolve_device(params.device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    B = params.bias_multiplier
    Xt = torch.as_tensor(np.asarray(X), device=dev).to(dtype)
    yt = torch.as_tensor(np.asarray(y, dtype=np.float64), device=dev).to(dtype)
    Z = torch.cat([Xt, torch.full((len(Xt), 1), B, device=dev, dtype=dtype)], dim=1) * yt[:, None]
    c = torch.where(yt > 0, params.C * params.pos_weight, params.C).to(dtype)

    # Lipschitz constant of grad f: largest eigenvalue of Z Z^T (power iteration on Z^T Z).
    g = torch.Generator(device="cpu").manual_seed(params.seed)
    v = torch.randn(Z.shape[1], generator=g, dtype=torch.float64).to(device=dev, dtype=dtype)
    v = v / v.norm()
    lam = torch.tensor(0.0)
    for _ in range(50):
        zv = Z.T @ (Z @ v)
        lam_new = zv.norm()
        v = zv / lam_new
        if abs(float(lam_new) - float(lam)) <= 1e-6 * float(lam_new):
            lam = lam_new
            break
        lam = lam_new
    L = float(lam) * 1.02 + 1e-12

    def primal(u: torch.Tensor) -> float:
        hinge = torch.clamp(1.0 - Z @ u, min=0.0)
        return float(0.5 * (u.double() @ u.double()) + (c.double() * hinge.double()).sum())

    a = torch.zeros(len(Z), device=dev, dtype=dtype)
    t = 1.0
    mom = a.clone()
    gap = float("inf")
    P = float("nan")
    max_iter = max(10 * params.max_iter, 100)
    it = 0
    for it in range(1, max_iter + 1):
        u_m = Z.T @ mom
        grad = Z @ u_m - 1.0
        a_new = torch.minimum(torch.clamp(mom - grad / L, min=0.0), c)
        # Adaptive restart (O'Donoghue & Candes): momentum pointing uphill -> reset it.
        if float(((mom - a_new) * (a_new - a)).sum()) > 0:
            t = 1.0
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        mom = a_new + ((t - 1.0) / t_new) * (a_new - a)
        a, t = a_new, t_new
        if it % 20 == 0 or it == max_iter:
            u = Z.T @ a
            P = primal(u)
            D = float(a.double().sum() - 0.5 * (u.double() @ u.double()))
            gap = P - D
            if gap <= params.tol * max(P, 1e-12):
                break
    else:
        logger.warning("torch SVM solver stopped at %d iterations with relative duality gap %.2e",
                       max_iter, gap / max(P, 1e-12))
    u = (Z.T @ a).double().cpu().numpy()
    w, b = u[:-1].copy(), float(u[-1] * B)
    logger.debug("torch SVM solver: %d iterations, relative gap %.2e, L=%.3g", it, gap / max(P, 1e-12), L)

    def decision(Xq: np.ndarray) -> np.ndarray:
        return np.asarray(Xq, dtype=np.float64) @ w + b

    return w, b, decision


def fit_svm(X: np.ndarray, y: np.ndarray, params: SVMParams) -> tuple[np.ndarray, float, Callable[[np.ndarray], np.ndarray]]:
    """Train one binary SVM (see the module docstring for the objective).

    Args:
        X (ndarray[N, D]): scaled features.
        y (ndarray[N]): +1 (positive) or -1 (negative); both must occur.
        params: hyper-parameters; ``params.solver`` picks liblinear or torch.

    Returns:
        ``(w, b, decision)``: w (ndarray[D] float64), b (float) and the solver's own
        decision function (ndarray[M, D] -> ndarray[M]) for the self-check.
    """
    y = np.asarray(y)
    if not ((y == 1).any() and (y == -1).any()):
        raise ValueError("fit_svm needs at least one positive and one negative example")
    if params.solver == "torch":
        return _fit_torch(X, y, params)
    return _fit_liblinear(X, y, params)


def check_svm_scores(svms: LinearSVMs, k: int, raw_features: np.ndarray, reference: np.ndarray,
                     name: str = "", atol: float = 1e-3, rtol: float = 1e-3) -> None:
    """Self-check: scores from the exported ``W, b, scale`` must equal the trained model's.

    Args:
        svms: the exported models.
        k: the class to check.
        raw_features (ndarray[N, D]): raw (unscaled) training features.
        reference (ndarray[N]): the solver's own decision function on the same examples.
        name: class name for the message.

    Raises:
        RuntimeError: naming the worst example and both scores, when they differ by more
            than ``atol + rtol * |reference|``.
    """
    raw = np.asarray(raw_features, dtype=np.float32)
    if len(raw) == 0:
        return
    ours = svms.decision_function(raw)[:, k].astype(np.float64)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    err = np.abs(ours - ref) - (atol + rtol * np.abs(ref))
    worst = int(np.argmax(err))
    if not err[worst] <= 0:
        raise RuntimeError(f"SVM self-check failed for class {name or k!r}: example {worst} scores "
                           f"{ours[worst]:.6g} from the exported weights but "
                           f"{ref[worst]:.6g} from the trained model")


# ---------------------------------------------------------------------------
# Hard-negative mining


def dedupe_negatives(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """The TPAMI paper's rule for SVM negatives: drop a negative that overlaps another one by
    more than ``iou`` (greedy non-maximum suppression, ``torchvision.ops.nms``).

    Windows are taken in order of decreasing score, ties in the given order (the first one
    first, so that with equal scores -- a class without a model yet -- the earlier window
    wins); a window is dropped when its IoU with a window kept before it is ``> iou``.

    Args:
        boxes (ndarray[N, 4]): ``(x1, y1, x2, y2)`` negatives of one image (continuous pixels).
        scores (ndarray[N]): their scores by the current model.
        iou: the overlap above which the lower-ranked window is dropped (the paper: 0.7).

    Returns:
        ndarray[M] int64: positions (into ``boxes``) of the kept windows, increasing.
    """
    import torchvision

    n = len(boxes)
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    order = np.lexsort((np.arange(n), -np.asarray(scores, dtype=np.float64).reshape(n)))
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(n, 4)[order])
    rank_scores = torch.arange(n, 0, -1, dtype=torch.float64)   # strictly decreasing along ``order``
    keep = torchvision.ops.nms(b, rank_scores, float(iou)).numpy()
    return np.sort(order[keep]).astype(np.int64)


@dataclass
class HardSet:
    """The hard negatives one image gives every class (:meth:`HardNegativeMiner.select_hard`).

    Attributes:
        image: the image index.
        rows (ndarray[U] int64): window indices hard for at least one class, increasing.
        x (ndarray[U, D] float32): their scaled features.
        members (list of K ndarray[int64]): per class, positions into ``rows`` (in window order).
    """

    image: int
    rows: np.ndarray
    x: np.ndarray
    members: list


@dataclass
class _ClassState:
    """Per-class mining state: positives, the negative cache, counters."""

    pos: list[np.ndarray] = field(default_factory=list)     # scaled positives, chunks [n, D]
    neg_x: np.ndarray | None = None                          # scaled cached negatives [M, D]
    neg_keys: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [M]
    key_set: set = field(default_factory=set)
    new_x: list[np.ndarray] = field(default_factory=list)   # not yet merged new negatives
    new_keys: list[np.ndarray] = field(default_factory=list)
    num_new: int = 0
    images_since: int = 0
    trained: bool = False
    retrains: int = 0
    added: int = 0
    evicted: int = 0
    evicted_budget: int = 0                                  # of which for svm.cache_memory_gb
    time_s: float = 0.0
    objective: float = float("nan")
    hinge: float = float("nan")


#: salt of the positives' sampling keys (so they are not the box-regression pairs' keys)
_POSITIVE_SALT = 0x5356_4D50_4F53


class PositiveSample:
    """The ground-truth windows of a stream of images, at most ``cap`` per class (``cap`` 0: all).

    Per class, the positives with the smallest ``(key, image, j)`` seen so far, where ``j`` is
    the window's position among its image's ground-truth windows and the key
    :func:`~sppdet.utils.sampling.pair_keys` of ``(seed, image, j)``: a uniform sample without
    replacement, the same whatever the order the images come in, and the bottom-``cap`` of
    several processes' samples merged is that of one process (:meth:`merge`).  At most
    ``2 cap`` rows per class are held between trims, so memory is ``O(cap K D)`` whatever the
    number of images.  When no class has more than ``cap`` positives, :meth:`per_image` gives
    back exactly what was added.
    """

    def __init__(self, num_classes: int, cap: int = 0, seed: int = 0) -> None:
        if cap < 0:
            raise ValueError(f"PositiveSample: cap must be >= 0, got {cap}")
        self.K, self.cap, self.seed = int(num_classes), int(cap), int(seed) ^ _POSITIVE_SALT
        self.seen = np.zeros(self.K, np.int64)       # positives of each class in the stream
        self._parts: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(self.K)]   # (keys, image, j, x, iou)
        self._held = np.zeros(self.K, np.int64)

    def add(self, image: int, windows: WindowSet) -> None:
        """Add one image's ground-truth windows (``windows`` holds those only, in their order)."""
        labels = np.asarray(windows.gt_labels)
        if len(labels) == 0:
            return
        keys = pair_keys(self.seed, image, np.arange(len(labels)))
        for k in np.unique(labels):
            k = int(k)
            if k < 0 or k >= self.K:
                raise ValueError(f"gt label {k} out of range for {self.K} classes")
            j = np.flatnonzero(labels == k)
            self.seen[k] += len(j)
            self._add_rows(k, keys[j], np.full(len(j), image, np.int64), j, windows.features[j],
                           windows.max_iou[j])

    def _add_rows(self, k: int, keys, img, j, x, iou) -> None:
        self._parts[k].append((keys, img, j, np.asarray(x), np.asarray(iou)))
        self._held[k] += len(keys)
        if self.cap and self._held[k] > 2 * self.cap:
            self._trim(k)

    def _trim(self, k: int) -> None:
        parts = [np.concatenate(a) for a in zip(*self._parts[k])]
        keep = bottom_k(parts[0], parts[1], parts[2], self.cap)
        self._parts[k] = [tuple(a[keep] for a in parts)]
        self._held[k] = len(keep)

    def rows(self, k: int) -> tuple[np.ndarray, ...]:
        """Class ``k``'s kept positives ``(keys, image, j, features, max_iou)``, at most ``cap``
        (class ``k`` must have some)."""
        if self.cap and self._held[k] > self.cap:
            self._trim(k)
        parts = tuple(np.concatenate(a) for a in zip(*self._parts[k]))
        self._parts[k] = [parts]
        return parts

    def export(self) -> list[tuple[np.ndarray, ...] | None]:
        """Every class's kept rows, to send to the process that merges (:meth:`merge`)."""
        return [self.rows(k) if self._parts[k] else None for k in range(self.K)]

    def merge(self, exported: list, seen: np.ndarray) -> None:
        """Add another sample's :meth:`export` (and its ``seen`` counts)."""
        for k, r in enumerate(exported):
            if r is not None:
                self._add_rows(k, *r)
        self.seen += np.asarray(seen, np.int64)

    def per_image(self) -> list[tuple[int, WindowSet]]:
        """The kept positives as one WindowSet per image, in image order, each image's windows in
        their original order (what :meth:`HardNegativeMiner.add_positives` takes)."""
        cols = [(self.rows(k), k) for k in range(self.K) if self._parts[k]]
        if not cols:
            return []
        img = np.concatenate([r[1] for r, _ in cols])
        j = np.concatenate([r[2] for r, _ in cols])
        lab = np.concatenate([np.full(len(r[1]), k, np.int64) for r, k in cols])
        x = np.concatenate([r[3] for r, _ in cols])
        iou = np.concatenate([r[4] for r, _ in cols])
        order = np.lexsort((j, img))
        img, lab, x, iou = img[order], lab[order], x[order], iou[order]
        cuts = np.flatnonzero(np.diff(img)) + 1
        out = []
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(img)]):
            out.append((int(img[a]), WindowSet(x[a:b], lab[a:b], iou[a:b])))
        return out

    def log_capped(self, class_names: Sequence[str] | None = None) -> None:
        for k in np.flatnonzero(self.seen > self.cap) if self.cap else ():
            name = class_names[k] if class_names is not None else str(k)
            logger.info("svm: %s: %d positives, trained on a seeded sample of %d (svm.max_positives_per_class)",
                        name, int(self.seen[k]), self.cap)


class HardNegativeMiner:
    """The mining loop, one image at a time (used by :func:`train_svms`).

    Protocol: :meth:`add_positives` for every image (in any order), then
    :meth:`mine_image` for each image of each pass, then :meth:`finish`.

    Within :meth:`mine_image(i, windows)` for every class ``k`` with positives:

    1. candidates: windows with ``max_iou[:, k] < neg_iou`` and not a ground-truth box of
       class ``k``; hard: candidates the current model of ``k`` scores ``> hard_threshold``
       (a class without a model scores 0, so all its candidates are hard; capped at
       ``max_negatives_first`` by a seeded random subset; with ``neg_overlap_dedupe``,
       first thinned by :func:`dedupe_negatives`); keys already cached are skipped;
       the rest are appended to the cache (in window order).
    2. the class is retrained when it has new negatives and (it has no model yet, or
       ``retrain_images`` images were mined since its last retrain, or it has more than
       ``retrain_limit`` new negatives); after a retrain, cached negatives scoring
       ``< evict_threshold`` are evicted (the order of the others is kept).

    :meth:`finish` retrains every class once more (no eviction after it, so the cache
    is exactly the final training set) and self-checks the exported weights.

    The training matrix of a class is ``[positives (in add order); cached negatives]``.
    """

    def __init__(self, num_classes: int, params: SVMParams, scale: float, num_images: int,
                 class_names: Sequence[str] | None = None) -> None:
        self.K = int(num_classes)
        self.params = params
        self.scale = float(scale)
        self.num_images = int(num_images)
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(self.K)]
        if len(self.class_names) != self.K:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.K} classes")
        self.retrain_images = params.retrain_images or max(1, int(round(num_images / 10)))
        self.states = [_ClassState() for _ in range(self.K)]
        self.W: np.ndarray | None = None   # float32 [D, K]
        self.b = np.zeros(self.K, dtype=np.float32)
        self.dim: int | None = None
        self.events: list[tuple[int, int, str, int]] = []   # (image, class, "retrain"|"evict"|"budget", count)
        self.has_pos = np.zeros(self.K, dtype=bool)          # classes with at least one positive
        self._changed: set[int] = set()                      # classes retrained since take_model_changes

    # -- positives ---------------------------------------------------------
    def _ensure_dim(self, d: int) -> None:
        if self.dim is None:
            self.dim = int(d)
            self.W = np.zeros((self.dim, self.K), dtype=np.float32)
        elif d != self.dim:
            raise ValueError(f"feature dimension changed from {self.dim} to {d}")

    def add_positives(self, windows: WindowSet) -> None:
        """Add the ground-truth windows (``gt_labels >= 0``) of one image as positives."""
        self._ensure_dim(windows.features.shape[1])
        for k in np.unique(windows.gt_labels[windows.gt_labels >= 0]):
            if k >= self.K:
                raise ValueError(f"gt label {k} out of range for {self.K} classes")
            x = windows.features[windows.gt_labels == k] * np.float32(self.scale)
            self.states[int(k)].pos.append(x.astype(np.float32, copy=False))
            self.has_pos[int(k)] = True

    def num_positives(self, k: int) -> int:
        return int(sum(len(p) for p in self.states[k].pos))

    # -- cache ---------------------------------------------------------------
    def negatives(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The cached negatives of class k: (scaled features [M, D] float32, keys [M] int64)."""
        st = self.states[k]
        self._merge(st)
        x = st.neg_x if st.neg_x is not None else np.zeros((0, self.dim or 0), np.float32)
        return x, st.neg_keys

    def _merge(self, st: _ClassState) -> None:
        if st.new_x:
            parts = ([st.neg_x] if st.neg_x is not None else []) + st.new_x
            st.neg_x = np.concatenate(parts, axis=0)
            st.neg_keys = np.concatenate([st.neg_keys] + st.new_keys)
            st.new_x, st.new_keys = [], []

    def _positives(self, st: _ClassState) -> np.ndarray:
        return np.concatenate(st.pos, axis=0) if st.pos else np.zeros((0, self.dim or 0), np.float32)

    # -- mining ----------------------------------------------------------------
    def mine_image(self, image: int, windows: WindowSet) -> None:
        """Mine hard negatives of one image for every class, then retrain classes as due.

        The same as :meth:`select_hard`, then :meth:`add_hard`, then :meth:`retrain_due`
        (the three steps are separate so that several processes can share the work:
        :func:`train_svms` under torchrun selects on the rank that holds the image's
        features and adds and retrains on rank 0).
        """
        self.add_hard(self.select_hard(image, windows))
        self.retrain_due(image)

    def select_hard(self, image: int, windows: WindowSet) -> HardSet:
        """Step 1 of :meth:`mine_image`: the hard negatives of one image for every class with
        positives, by the current models (``W``, ``b``, which classes are trained), before the
        check against the cache.  Reads the models only; changes nothing."""
        p = self.params
        self._ensure_dim(windows.features.shape[1])
        if windows.max_iou.shape[1] != self.K:
            raise ValueError(f"image {image}: max_iou has {windows.max_iou.shape[1]} classes, expected {self.K}")
        dedupe = float(p.neg_overlap_dedupe or 0.0)
        if dedupe and windows.boxes is None:
            raise ValueError(f"image {image}: svm.neg_overlap_dedupe needs the windows' boxes (WindowSet.boxes)")
        x = (windows.features * np.float32(self.scale)).astype(np.float32, copy=False)
        scores = x @ self.W + self.b                       # [N, K] current models
        per_class: list[np.ndarray] = []
        for k, st in enumerate(self.states):
            if not self.has_pos[k]:
                per_class.append(np.zeros(0, np.int64))
                continue
            cand = (windows.max_iou[:, k] < p.neg_iou) & (windows.gt_labels != k)
            hard = np.flatnonzero(cand & (scores[:, k] > p.hard_threshold))
            if dedupe and len(hard) > 1:
                hard = hard[dedupe_negatives(windows.boxes[hard], scores[hard, k], dedupe)]
            if not st.trained and p.max_negatives_first and len(hard) > p.max_negatives_first:
                rng = np.random.default_rng([p.seed, image, k])
                hard = np.sort(rng.choice(hard, size=p.max_negatives_first, replace=False))
            per_class.append(hard.astype(np.int64))
        rows = np.unique(np.concatenate(per_class)) if per_class else np.zeros(0, np.int64)
        members = [np.searchsorted(rows, h).astype(np.int64) for h in per_class]
        return HardSet(int(image), rows, x[rows], members)

    def add_hard(self, hard: HardSet) -> None:
        """Step 2 of :meth:`mine_image`: add an image's hard negatives that are not cached yet."""
        image = hard.image
        for k, st in enumerate(self.states):
            if not self.has_pos[k]:
                continue
            m = hard.members[k]
            keys = image * KEY_STRIDE + hard.rows[m].astype(np.int64)
            if st.key_set:
                fresh = np.fromiter((kk not in st.key_set for kk in keys.tolist()), bool, len(keys))
                m, keys = m[fresh], keys[fresh]
            if len(m):
                st.new_x.append(hard.x[m])
                st.new_keys.append(keys)
                st.key_set.update(keys.tolist())
                st.num_new += len(m)
                st.added += len(m)
            st.images_since += 1

    def retrain_due(self, image: int) -> None:
        """Step 3 of :meth:`mine_image`: retrain (and evict from) the classes that are due."""
        p = self.params
        for k, st in enumerate(self.states):
            if not self.has_pos[k] or st.num_new == 0:
                continue
            due = (not st.trained or st.images_since >= self.retrain_images
                   or (p.retrain_limit and st.num_new > p.retrain_limit))
            if due:
                self._retrain(k, image)
                self._evict(k, image)
        self.enforce_budget(image)

    # -- the byte budget of the caches ----------------------------------------------------
    #: after an eviction for the budget the caches hold this fraction of it (so that eviction
    #: does not run again at the next image)
    BUDGET_LOW_WATER = 0.9

    def cache_bytes(self) -> int:
        """Bytes the negative caches hold: features and keys, merged or not (the per-class Python
        sets of keys, ~70 B a negative, come on top)."""
        total = 0
        for st in self.states:
            if st.neg_x is not None:
                total += st.neg_x.nbytes
            total += st.neg_keys.nbytes + sum(a.nbytes for a in st.new_x) + sum(a.nbytes for a in st.new_keys)
        return total

    def enforce_budget(self, image: int = -1) -> int:
        """Evict the easiest cached negatives when the caches hold more than ``cache_memory_gb``.

        The caches are cut to :data:`BUDGET_LOW_WATER` of the budget: with ``R`` cached rows in
        all and room for ``B`` rows, class ``k`` keeps ``floor(R_k * B / R)`` of its ``R_k``: those
        its current model scores highest (ties: the earlier in the cache), in cache order.
        Returns the number evicted.
        """
        budget = int(float(self.params.cache_memory_gb) * 2 ** 30)
        if budget <= 0 or self.dim is None or self.cache_bytes() <= budget:
            return 0
        for st in self.states:
            self._merge(st)
        row_bytes = 4 * self.dim + 8
        rows = np.array([0 if st.neg_x is None else len(st.neg_x) for st in self.states], np.int64)
        room = int(self.BUDGET_LOW_WATER * budget) // row_bytes
        total = int(rows.sum())
        out = 0
        for k, st in enumerate(self.states):
            if rows[k] == 0:
                continue
            n_keep = int(rows[k]) * room // total
            if n_keep >= rows[k]:
                continue
            s = st.neg_x @ self.W[:, k] + self.b[k]
            keep = np.sort(np.argsort(-s, kind="stable")[:n_keep])
            mask = np.zeros(len(s), bool)
            mask[keep] = True
            st.key_set.difference_update(st.neg_keys[~mask].tolist())
            st.neg_x = st.neg_x[keep]
            st.neg_keys = st.neg_keys[keep]
            n_out = int(rows[k]) - n_keep
            st.evicted += n_out
            st.evicted_budget += n_out
            out += n_out
            self.events.append((image, k, "budget", n_out))
        logger.debug("svm caches over svm.cache_memory_gb after image %d: %d easiest negatives evicted",
                     image, out)
        return out

    # -- the models, shared between processes ------------------------------------
    def take_model_changes(self) -> dict | None:
        """The classes retrained since the last call: ``{"classes": [k...], "W": [D, n], "b": [n],
        "trained": bool[K]}``, or ``None`` when none was (for :meth:`apply_model_changes`)."""
        if not self._changed:
            return None
        ks = sorted(self._changed)
        self._changed.clear()
        return {"classes": ks, "W": self.W[:, ks].copy(), "b": self.b[ks].copy(),
                "trained": np.array([st.trained for st in self.states])}

    def apply_model_changes(self, changes: dict | None) -> None:
        """Make this miner's models those of the miner that produced ``changes``."""
        if changes is None:
            return
        ks = list(changes["classes"])
        self.W[:, ks] = changes["W"]
        self.b[ks] = changes["b"]
        for st, t in zip(self.states, changes["trained"]):
            st.trained = bool(t)

    def _retrain(self, k: int, image: int = -1) -> Callable[[np.ndarray], np.ndarray] | None:
        st = self.states[k]
        self._merge(st)
        pos = self._positives(st)
        neg = st.neg_x if st.neg_x is not None else np.zeros((0, self.dim), np.float32)
        st.num_new = 0
        st.images_since = 0
        if len(pos) == 0 or len(neg) == 0:
            return None
        t0 = time.perf_counter()
        X = np.concatenate([pos, neg], axis=0)
        y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))]).astype(np.int64)
        w, b, decision = fit_svm(X, y, self.params)
        self.W[:, k] = w.astype(np.float32)
        self.b[k] = np.float32(b)
        self._changed.add(k)
        st.objective, st.hinge = svm_objective(X, y, w, b, self.params)
        st.trained = True
        st.retrains += 1
        st.time_s += time.perf_counter() - t0
        self.events.append((image, k, "retrain", len(X)))
        logger.debug("svm %s: retrain %d after image %d on %d pos + %d neg, objective %.6g",
                     self.class_names[k], st.retrains, image, len(pos), len(neg), st.objective)
        return decision

    def _evict(self, k: int, image: int = -1) -> None:
        st = self.states[k]
        if st.neg_x is None or len(st.neg_x) == 0:
            return
        s = st.neg_x @ self.W[:, k] + self.b[k]
        keep = s >= self.params.evict_threshold
        n_out = int((~keep).sum())
        if n_out:
            st.key_set.difference_update(st.neg_keys[~keep].tolist())
            st.neg_x = st.neg_x[keep]
            st.neg_keys = st.neg_keys[keep]
            st.evicted += n_out
            self.events.append((image, k, "evict", n_out))

    def finish(self) -> tuple[LinearSVMs, dict]:
        """Final retrain of every class, self-check, per-class stats and log lines."""
        if self.dim is None:
            raise ValueError("no features were seen: nothing to train")
        decisions: dict[int, Callable[[np.ndarray], np.ndarray]] = {}
        for k, st in enumerate(self.states):
            name = self.class_names[k]
            if not st.pos:
                self.W[:, k] = 0.0
                self.b[k] = NO_POSITIVES_BIAS
                logger.warning("svm %s: no positive examples; its SVM scores every window %g",
                               name, NO_POSITIVES_BIAS)
                continue
            decision = self._retrain(k, self.num_images)
            if decision is None:
                logger.warning("svm %s: no negative examples; its SVM stays zero (scores 0)", name)
            else:
                decisions[k] = decision
        svms = LinearSVMs(self.W.copy(), self.b.copy(), self.scale)
        stats: dict[str, dict] = {}
        for k, st in enumerate(self.states):
            name = self.class_names[k]
            n_pos = self.num_positives(k)
            if k in decisions:
                X = np.concatenate([self._positives(st), st.neg_x], axis=0)   # scaled
                check_svm_scores(svms, k, X / np.float32(self.scale), decisions[k](X), name)
            negs = 0 if st.neg_x is None else len(st.neg_x)
            stats[name] = {"positives": n_pos, "negatives": negs, "added": st.added, "evicted": st.evicted,
                           "retrains": st.retrains, "objective": st.objective, "hinge_loss": st.hinge,
                           "time_s": round(st.time_s, 3)}
            if st.evicted_budget:
                stats[name]["evicted_budget"] = st.evicted_budget
            if n_pos:
                logger.info("svm %s: %d pos, %d neg cached (%d added, %d evicted), %d retrains, "
                            "objective %.5g, hinge %.4f, %.2f s", name, n_pos, negs, st.added, st.evicted,
                            st.retrains, st.objective, st.hinge, st.time_s)
        return svms, stats


def train_svms(get_windows: Callable[[int], WindowSet], num_images: int, num_classes: int,
               params: SVMParams, *, class_names: Sequence[str] | None = None, progress: bool = True,
               get_positives: Callable[[int], WindowSet] | None = None,
               scale: float | None = None, scale_sample_per_image: int = 64) -> tuple[LinearSVMs, dict]:
    """Train one linear SVM per class with hard-negative mining.

    Args:
        get_windows: ``i -> WindowSet`` of training image ``i`` (ground-truth boxes and
            proposals; raw features).  Called once per image per mining pass, plus once per
            image for the positives pass unless ``get_positives`` is given.
        num_images: images ``0 .. num_images - 1``.
        num_classes: K.
        params: hyper-parameters.
        class_names: names for logs and stats keys (default ``"0" .. "K-1"``).
        progress: show progress bars.
        get_positives: optional cheaper ``i -> WindowSet`` holding (at least) the image's
            ground-truth windows; only rows with ``gt_labels >= 0`` are used.
        scale: the feature scale; None: ``feature_scale`` of a seeded sample of up to
            ``scale_sample_per_image`` windows per image from the positives pass (all its
            windows when that pass uses ``get_windows``, only ground-truth windows when
            ``get_positives`` returns only those: pass ``scale`` then for R-CNN's statistic).

    Returns:
        ``(svms, stats)``: the trained :class:`LinearSVMs` and ``stats[class_name]`` =
        ``{"positives", "negatives" (final cache), "added", "evicted", "retrains",
        "objective", "hinge_loss", "time_s"}`` plus ``stats["_total"]`` (scale, time, calls).

    Several processes (a ``torch.distributed`` group, e.g. under torchrun): image ``i``
    belongs to rank ``i mod W`` (:func:`sppdet.utils.dist.shard`); ``get_windows`` and
    ``get_positives`` are called on that rank only, so each rank computes the features of
    its own images.  Rank 0 holds the positives and the negative caches and trains; the
    images are mined in the one-process order, each on its rank with the models rank 0 has
    at that point (every retrain is broadcast at once), so the SVMs are the one-process
    ones (up to float rounding of the features; see :func:`_train_svms_ranked`).  Every
    rank returns the same ``(svms, stats)``.

    Raises:
        RuntimeError: the self-check (scores from the exported weights vs the solver's) failed.
    """
    from ..utils import dist

    if dist.get_world_size() > 1:
        return _train_svms_ranked(get_windows, num_images, num_classes, params, class_names=class_names,
                                  progress=progress, get_positives=get_positives, scale=scale,
                                  scale_sample_per_image=scale_sample_per_image)
    t0 = time.perf_counter()
    rng = np.random.default_rng(params.seed)
    pos_fn = get_positives or get_windows
    # Pass 1: positives (and the scale sample).
    pos_sets = PositiveSample(num_classes, params.max_positives_per_class, params.seed)
    sample: list[np.ndarray] = []
    for i in _progress(range(num_images), desc="SVM positives", total=num_images, unit="img",
                       disable=None if progress else True):
        ws = pos_fn(i)
        keep = ws.gt_labels >= 0
        pos_sets.add(i, WindowSet(ws.features[keep], ws.gt_labels[keep], ws.max_iou[keep]))
        if scale is None and len(ws.features):
            m = min(scale_sample_per_image, len(ws.features))
            sample.append(ws.features[np.sort(rng.choice(len(ws.features), m, replace=False))])
    if scale is None:
        scale = feature_scale(np.concatenate(sample) if sample else np.zeros((0, 1)), params.feature_norm)
    logger.info("svm: feature scale %.6g (mean norm -> %g)", scale, params.feature_norm)
    miner = HardNegativeMiner(num_classes, params, scale, num_images, class_names)
    pos_sets.log_capped(class_names)
    for _, ws in pos_sets.per_image():
        miner.add_positives(ws)
    del pos_sets, sample
    # Mining passes.
    for p in range(params.passes):
        desc = "SVM mining" + (f" {p + 1}/{params.passes}" if params.passes > 1 else "")
        for i in _progress(range(num_images), desc=desc, total=num_images, unit="img",
                           disable=None if progress else True):
            miner.mine_image(i, get_windows(i))
            memory.every(i)
    svms, stats = miner.finish()
    stats["_total"] = {"scale": scale, "time_s": round(time.perf_counter() - t0, 3),
                       "retrain_images": miner.retrain_images, "solver": params.solver}
    return svms, stats


# ---------------------------------------------------------------------------
# Several processes


@dataclass
class _Failed:
    """What a rank sends instead of its result when it failed (the first line of its error)."""

    message: str


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _p2p_device() -> torch.device | None:
    """Where point-to-point object transfers stage their bytes: this rank's GPU for nccl."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _send_object(obj, dst: int) -> None:
    torch.distributed.send_object_list([obj], dst=dst, device=_p2p_device())


def _recv_object(src: int):
    box = [None]
    torch.distributed.recv_object_list(box, src=src, device=_p2p_device())
    return box[0]


def _train_svms_ranked(get_windows: Callable[[int], WindowSet], num_images: int, num_classes: int,
                       params: SVMParams, *, class_names: Sequence[str] | None, progress: bool,
                       get_positives: Callable[[int], WindowSet] | None, scale: float | None,
                       scale_sample_per_image: int) -> tuple[LinearSVMs, dict]:
    """:func:`train_svms` on every rank of a process group.

    1. Positives: each rank reads the ground-truth windows of its images (``i mod W == rank``);
       rank 0 gathers them (positives only) and adds them in image order.  With ``scale=None``
       the scale sample of image ``i`` is drawn with its own generator ``(seed, i)`` (one
       process draws the samples from one generator in sequence, so that statistic, and only
       it, differs slightly; the pipeline always passes ``scale``).
    2. Mining, in steps of W consecutive images: every rank computes the WindowSet of its
       image of the step (the expensive part, in parallel); then, image by image in order,
       the owning rank selects the hard negatives with the current models
       (:meth:`HardNegativeMiner.select_hard`), sends them to rank 0, which adds them and
       retrains what is due (as one process does after that image), and broadcasts the
       retrained classes to every rank before the next image is selected.  So every image is
       mined with exactly the models one process would use for it.
    3. Rank 0 finishes (final retrain, self-check) and broadcasts the SVMs and stats.

    Memory: rank 0 holds what one process holds (positives and the bounded caches) plus one
    image's hard negatives in transit; every other rank one image's WindowSet -- neither grows
    with W.  Errors: a failing rank's first error line reaches every rank, which all raise.
    """
    from ..utils import dist
    from ..utils.dist import DistributedError

    t0 = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    pos_fn = get_positives or get_windows
    mine = dist.shard(range(num_images))
    show = None if progress else True

    # ---- 1. positives (and the scale sample)
    err: BaseException | None = None
    pos_sets = PositiveSample(num_classes, params.max_positives_per_class, params.seed)
    sample: list[tuple[int, np.ndarray]] = []
    try:
        for i in _progress(mine, desc="SVM positives", total=len(mine), unit="img", disable=show):
            ws = pos_fn(i)
            keep = ws.gt_labels >= 0
            pos_sets.add(i, WindowSet(ws.features[keep], ws.gt_labels[keep], ws.max_iou[keep]))
            if scale is None and len(ws.features):
                rng = np.random.default_rng([params.seed, i])
                m = min(scale_sample_per_image, len(ws.features))
                sample.append((i, ws.features[np.sort(rng.choice(len(ws.features), m, replace=False))]))
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        err = e
    dist.raise_if_any(err)
    # each rank's own sample (at most the cap per class) travels: the merge is the one-process sample
    parts = dist.gather_object((pos_sets.export(), pos_sets.seen, sample))
    del pos_sets, sample
    miner: HardNegativeMiner | None = None
    setup = None
    if rank == 0:
        try:
            assert parts is not None
            positives = PositiveSample(num_classes, params.max_positives_per_class, params.seed)
            for exported, seen, _ in parts:
                positives.merge(exported, seen)
            if scale is None:
                smp = [x for _, x in sorted((q for _, _, ss in parts for q in ss), key=lambda t: t[0])]
                scale = feature_scale(np.concatenate(smp) if smp else np.zeros((0, 1)), params.feature_norm)
            miner = HardNegativeMiner(num_classes, params, scale, num_images, class_names)
            positives.log_capped(class_names)
            for _, ws in positives.per_image():
                miner.add_positives(ws)
            del positives
            setup = {"scale": float(scale), "has_pos": miner.has_pos.copy(), "dim": miner.dim}
        except Exception as e:  # noqa: BLE001
            err = e
    del parts
    dist.raise_if_any(err)
    setup = dist.broadcast_object(setup)
    scale = setup["scale"]
    if rank != 0:   # a replica of the models only: no positives, no caches
        miner = HardNegativeMiner(num_classes, params, scale, num_images, class_names)
        miner.has_pos[:] = setup["has_pos"]
        if setup["dim"] is not None:
            miner._ensure_dim(setup["dim"])
    assert miner is not None
    logger.info("svm: feature scale %.6g (mean norm -> %g); mining on %d ranks", scale, params.feature_norm, world)

    def fail(update) -> None:
        if err is not None:
            raise err
        raise DistributedError(f"rank {update[1]} of {world} failed: {update[2]}")

    # ---- 2. mining
    bar = _progress(total=num_images * params.passes, desc="SVM mining", unit="img", disable=show)
    try:
        for _ in range(params.passes):
            for first in range(0, num_images, world):
                memory.every(first // world)
                images = list(range(first, min(first + world, num_images)))
                ws = None
                if rank < len(images):
                    try:
                        ws = get_windows(images[rank])
                    except Exception as e:  # noqa: BLE001
                        err = e
                dist.raise_if_any(err)
                for r, i in enumerate(images):
                    hard = None
                    if rank == r:
                        try:
                            hard = miner.select_hard(i, ws)
                        except Exception as e:  # noqa: BLE001
                            err = e
                        ws = None
                        if r != 0:
                            _send_object(_Failed(_first_line(err)) if err is not None else hard, 0)
                            hard = None
                    update = None
                    if rank == 0:
                        if r != 0:
                            hard = _recv_object(r)
                        if isinstance(hard, _Failed):
                            update = ("failed", r, hard.message)
                        elif err is not None:
                            update = ("failed", 0, _first_line(err))
                        else:
                            try:
                                miner.add_hard(hard)
                                miner.retrain_due(i)
                                update = ("ok", miner.take_model_changes())
                            except Exception as e:  # noqa: BLE001
                                err = e
                                update = ("failed", 0, _first_line(e))
                        hard = None
                    update = dist.broadcast_object(update)
                    if update[0] == "failed":
                        fail(update)
                    if rank != 0:
                        miner.apply_model_changes(update[1])
                bar.update(len(images))
    finally:
        bar.close()

    # ---- 3. the final retrain on rank 0, shared
    result = None
    if rank == 0:
        try:
            svms, stats = miner.finish()
            stats["_total"] = {"scale": scale, "time_s": round(time.perf_counter() - t0, 3),
                               "retrain_images": miner.retrain_images, "solver": params.solver, "ranks": world}
            result = ("ok", svms.state_dict(), stats)
        except Exception as e:  # noqa: BLE001
            err = e
            result = ("failed", 0, _first_line(e))
    result = dist.broadcast_object(result)
    if result[0] == "failed":
        fail(result)
    return LinearSVMs.from_state_dict(result[1]), result[2]
