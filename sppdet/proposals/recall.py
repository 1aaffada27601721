"""Proposal recall: how many ground-truth objects have a window close enough.

Definitions (as in Hosang et al., "What makes for effective detection
proposals?", TPAMI 2016):

* the *best IoU* of a ground-truth box is its largest IoU with any proposal of
  its image (no one-to-one matching: one window may cover two objects);
* *recall at t* is the fraction of ground-truth boxes whose best IoU is
  ``>= t``;
* *average recall* (AR) is the mean of recall over the IoU thresholds
  ``0.50, 0.55, ..., 0.95`` (the discrete form of ``2 * integral_{0.5}^{1} recall(t) dt``);
* *recall at K boxes* uses only the first K proposals of each image (the store's
  rank order), so it measures the ordering as well as the set.

Objects marked difficult are excluded by default (as in VOC evaluation).
IoU uses the continuous convention of :func:`sppdet.boxes.box_iou` (no +1).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..boxes import box_iou
from ..data.records import Dataset

logger = logging.getLogger(__name__)

#: IoU thresholds of AR: 0.50, 0.55, ..., 0.95 (rounded so that 0.7 is exactly 0.7).
DEFAULT_IOU_THRESHOLDS: np.ndarray = np.round(np.arange(0.5, 0.96, 0.05), 6)

#: Numbers of boxes for the recall-vs-boxes curve.
DEFAULT_MAX_BOXES: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 700, 1000, 1500, 2000, 3000)


@dataclass
class RecallResult:
    """Recall figures of a proposal set on a dataset.

    Attributes:
        iou_thresholds (ndarray[T]): thresholds of :attr:`recall`.
        recall (ndarray[T]): recall at each threshold with all boxes.
        max_boxes_list (ndarray[K] int): box budgets of :attr:`recall_at_k`.
        recall_at_k (ndarray[K, T]): recall using the first k boxes per image.
        best_iou (ndarray[G]): best IoU of every counted ground-truth box (all boxes).
        num_gt: counted ground-truth boxes (difficult ones excluded unless asked).
        num_images: images evaluated (those with proposals).
        mean_boxes: mean number of proposals per evaluated image.
        missing: ids of dataset images without proposals (their objects count as missed).
    """

    iou_thresholds: np.ndarray
    recall: np.ndarray
    max_boxes_list: np.ndarray
    recall_at_k: np.ndarray
    best_iou: np.ndarray
    num_gt: int
    num_images: int
    mean_boxes: float
    missing: list[str] = field(default_factory=list)

    def recall_at(self, t: float, k: int | None = None) -> float:
        """Recall at IoU ``t`` (with the first ``k`` boxes, or all when ``k`` is None)."""
        if self.num_gt == 0:
            return float("nan")
        if k is None:
            return float(np.mean(self.best_iou >= t - 1e-9)) if self.best_iou.size else 0.0
        j = int(np.searchsorted(self.max_boxes_list, k))
        if j >= len(self.max_boxes_list) or self.max_boxes_list[j] != k:
            raise KeyError(f"recall_at: k={k} not in max_boxes_list {self.max_boxes_list.tolist()}")
        i = int(np.argmin(np.abs(self.iou_thresholds - t)))
        if abs(self.iou_thresholds[i] - t) > 1e-6:
            raise KeyError(f"recall_at: t={t} not in iou_thresholds")
        return float(self.recall_at_k[j, i])

    @property
    def recall_50(self) -> float:
        return self.recall_at(0.5)

    @property
    def recall_70(self) -> float:
        return self.recall_at(0.7)

    @property
    def average_recall(self) -> float:
        """Mean recall over :attr:`iou_thresholds` (AR)."""
        return float(np.mean(self.recall)) if self.num_gt else float("nan")

    def ar_at_k(self) -> np.ndarray:
        """ndarray[K]: AR using the first k boxes, for each k of :attr:`max_boxes_list`."""
        return self.recall_at_k.mean(axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the ``--json`` output of ``sppdet recall``)."""
        def r(x: float) -> float | None:
            return None if not np.isfinite(x) else round(float(x), 6)

        return {
            "metric": "proposal_recall",
            "recall@0.5": r(self.recall_50),
            "recall@0.7": r(self.recall_70),
            "average_recall": r(self.average_recall),
            "mean_boxes_per_image": round(self.mean_boxes, 3),
            "num_images": self.num_images,
            "num_gt": self.num_gt,
            "missing_images": list(self.missing),
            "recall_vs_iou": {f"{t:.2f}": r(v) for t, v in zip(self.iou_thresholds, self.recall)},
            "recall_vs_boxes": {
                str(int(k)): {"recall@0.5": r(_interp(self, 0.5, j)), "recall@0.7": r(_interp(self, 0.7, j)),
                              "average_recall": r(float(self.recall_at_k[j].mean()))}
                for j, k in enumerate(self.max_boxes_list)
            },
        }


def _interp(res: RecallResult, t: float, j: int) -> float:
    i = int(np.argmin(np.abs(res.iou_thresholds - t)))
    if abs(res.iou_thresholds[i] - t) > 1e-6:
        return float("nan")
    return float(res.recall_at_k[j, i])


def compute_recall(dataset: Dataset, store: Mapping[str, np.ndarray],
                   iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                   max_boxes_list: Sequence[int] = DEFAULT_MAX_BOXES, *,
                   include_difficult: bool = False) -> RecallResult:
    """Recall of the proposals in ``store`` against the ground truth of ``dataset``.

    Args:
        dataset: records with ``boxes`` (ndarray[G, 4], internal coordinates) and ``difficult``.
        store: image id -> proposals (ndarray[N, 4], ``(x1, y1, x2, y2)``, rank order);
            a :class:`~sppdet.proposals.store.ProposalStore` or any mapping.
        iou_thresholds: thresholds of the recall-vs-IoU curve and of AR.
        max_boxes_list: box budgets of the recall-vs-boxes curve.
        include_difficult: count objects marked difficult too.

    Returns:
        RecallResult (see its attributes).  Images missing from ``store`` count
        as having no proposals and are listed in ``missing``.
    """
    thr = np.round(np.asarray(iou_thresholds, dtype=np.float64), 6)
    ks = np.array(sorted({int(k) for k in max_boxes_list if int(k) > 0}), dtype=np.int64)
    best_all: list[np.ndarray] = []
    best_k: list[np.ndarray] = []
    n_boxes: list[int] = []
    missing: list[str] = []
    for rec in dataset.records:
        gt = rec.boxes if include_difficult else rec.boxes[~rec.difficult]
        if rec.image_id not in store:
            missing.append(rec.image_id)
            props = np.zeros((0, 4), np.float32)
        else:
            props = np.asarray(store[rec.image_id], dtype=np.float32).reshape(-1, 4)
            n_boxes.append(len(props))
        if len(gt) == 0:
            continue
        if len(props) == 0:
            best_all.append(np.zeros(len(gt)))
            best_k.append(np.zeros((len(gt), len(ks))))
            continue
        iou = box_iou(gt, props)                      # [G, N]
        running = np.maximum.accumulate(iou, axis=1)  # best IoU within the first n+1 boxes
        best_all.append(running[:, -1])
        cols = np.minimum(ks, len(props)) - 1
        best_k.append(running[:, cols])
    if missing:
        logger.warning("%d of %d images have no proposals (counted as missed): %s%s", len(missing),
                       len(dataset), ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
    best = np.concatenate(best_all) if best_all else np.zeros(0)
    bk = np.concatenate(best_k) if best_k else np.zeros((0, len(ks)))
    eps = 1e-9  # IoU exactly at a threshold counts as recalled despite rounding
    if len(best):
        recall = np.array([np.mean(best >= t - eps) for t in thr])
        recall_k = np.array([[np.mean(bk[:, j] >= t - eps) for t in thr] for j in range(len(ks))])
    else:
        recall = np.full(len(thr), np.nan)
        recall_k = np.full((len(ks), len(thr)), np.nan)
    return RecallResult(
        iou_thresholds=thr, recall=recall, max_boxes_list=ks, recall_at_k=recall_k.reshape(len(ks), len(thr)),
        best_iou=best, num_gt=int(len(best)), num_images=len(n_boxes),
        mean_boxes=float(np.mean(n_boxes)) if n_boxes else 0.0, missing=missing,
    )


def plot_recall(results: Mapping[str, RecallResult] | RecallResult, out_dir: str | Path) -> list[Path]:
    """Write ``recall_vs_iou.png`` and ``recall_vs_boxes.png`` (one curve per result) to ``out_dir``.

    Returns:
        The two paths.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(results, RecallResult):
        results = {"proposals": results}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    for name, res in results.items():
        ax.plot(res.iou_thresholds, res.recall, marker="o", ms=3,
                label=f"{name} (AR {res.average_recall:.3f}, {res.mean_boxes:.0f} boxes)")
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.01)
    ax.set_title("Recall vs IoU (all boxes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    p = out / "recall_vs_iou.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    # one colour per proposal set; line style per measure
    for n, (name, res) in enumerate(results.items()):
        ks = res.max_boxes_list
        colour = f"C{n % 10}"
        for t, style in ((0.5, "-"), (0.7, "--")):
            vals = [_interp(res, t, j) for j in range(len(ks))]
            ax.plot(ks, vals, style, color=colour, label=f"{name} recall@{t}")
        ax.plot(ks, res.ar_at_k(), ":", color=colour, label=f"{name} AR")
    ax.set_xscale("log")
    ax.set_xlabel("number of boxes per image (first K in rank order)")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.01)
    ax.set_title("Recall vs number of boxes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    p = out / "recall_vs_boxes.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)
    return paths


def format_result(res: RecallResult) -> str:
    """A short human-readable summary (several lines)."""
    lines = [
        f"images {res.num_images}  objects {res.num_gt}  boxes/img {res.mean_boxes:.1f}",
        f"recall@0.5 {res.recall_50:.4f}  recall@0.7 {res.recall_70:.4f}  AR(0.5:0.95) {res.average_recall:.4f}",
        "recall@0.5 with the first K boxes: " + "  ".join(
            f"{int(k)}:{_interp(res, 0.5, j):.3f}" for j, k in enumerate(res.max_boxes_list)
            if k in (10, 100, 300, 500, 1000, 2000)),
    ]
    if res.missing:
        lines.append(f"images without proposals: {len(res.missing)}")
    return "\n".join(lines)


def to_json(res: RecallResult, **extra: Any) -> str:
    """One JSON object (one line) of :meth:`RecallResult.to_dict` plus ``extra`` fields."""
    d = res.to_dict()
    d.update(extra)
    return json.dumps(d, sort_keys=False)
