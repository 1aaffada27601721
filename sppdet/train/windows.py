"""Per-image training windows (ground truth + proposals) and their overlaps.

This is the "roidb" of the R-CNN family: for every training image, the boxes
that any stage may look at, with their IoU against the ground truth.  Window
index ``j`` means the same box in every stage (fine-tuning samples them, the
SVM miner scores them, the regressor picks the good ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..boxes import box_iou
from ..data.records import ImageRecord


@dataclass
class ImageWindows:
    """Windows of one training image.

    Attributes:
        index: position of the image in its dataset.
        record: the image record (ground truth as used for training).
        boxes (ndarray[N, 4] float32): ground-truth boxes first, then proposals;
            original-image pixels, 0-based continuous.
        gt_labels (ndarray[N] int64): class of each ground-truth window, -1 for proposals.
        iou (ndarray[N, K] float32): max IoU of each window with the ground truth
            of each class (0 where a class has no box in the image).
        max_iou (ndarray[N] float32): max IoU with any ground-truth box.
        best_label (ndarray[N] int64): class of that best box (-1 with no ground truth).
        best_gt (ndarray[N] int64): index of that best box in ``record.boxes`` (-1 if none).
    """

    index: int
    record: ImageRecord
    boxes: np.ndarray
    gt_labels: np.ndarray
    iou: np.ndarray
    max_iou: np.ndarray
    best_label: np.ndarray
    best_gt: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def num_gt(self) -> int:
        return int((self.gt_labels >= 0).sum())


def build_windows(index: int, record: ImageRecord, proposals: np.ndarray, num_classes: int,
                  max_proposals: int | None = None) -> ImageWindows:
    """Windows of one image: its ground-truth boxes followed by (at most ``max_proposals``) proposals."""
    props = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    if max_proposals is not None:
        props = props[:max_proposals]
    gt = record.boxes.astype(np.float32)
    boxes = np.concatenate([gt, props], axis=0)
    n = len(boxes)
    gt_labels = np.concatenate([record.labels, np.full(len(props), -1, dtype=np.int64)])
    iou_all = box_iou(boxes, gt).astype(np.float32)          # [N, G]
    iou = np.zeros((n, num_classes), dtype=np.float32)
    for c in np.unique(record.labels):
        iou[:, c] = iou_all[:, record.labels == c].max(axis=1)
    if len(gt):
        best_gt = iou_all.argmax(axis=1).astype(np.int64)
        max_iou = iou_all[np.arange(n), best_gt]
        best_label = record.labels[best_gt]
    else:
        best_gt = np.full(n, -1, dtype=np.int64)
        max_iou = np.zeros(n, dtype=np.float32)
        best_label = np.full(n, -1, dtype=np.int64)
    return ImageWindows(index, record, boxes, gt_labels, iou, max_iou.astype(np.float32),
                        best_label.astype(np.int64), best_gt)
