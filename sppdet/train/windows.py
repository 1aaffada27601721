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

    Stored (about ``24 + 4 C`` bytes a window, ``C`` the number of classes present in the
    image, instead of ``124`` for dense ``[N, K]`` overlaps and int64 labels):

    Attributes:
        index: position of the image in its dataset.
        record: the image record (ground truth as used for training).
        boxes (ndarray[N, 4] float32): ground-truth boxes first, then proposals;
            original-image pixels, 0-based continuous.
        num_classes: K.
        classes (ndarray[C] int64): the classes present in the image's ground truth (sorted).
        class_iou (ndarray[N, C] float32): max IoU of each window with the ground truth of
            each of those classes (the other classes' overlaps are 0).
        max_iou (ndarray[N] float32): max IoU with any ground-truth box.
        best_gt (ndarray[N] int32): index of that best box in ``record.boxes`` (the first on
            ties; -1 with no ground truth).

    Derived, exactly, on each access (fresh arrays: read once per use):
        gt_labels (ndarray[N] int64): class of each ground-truth window, -1 for proposals.
        iou (ndarray[N, K] float32): max IoU of each window with the ground truth of each class
            (0 where a class has no box in the image).
        best_label (ndarray[N] int64): class of the best box (-1 with no ground truth).
    """

    index: int
    record: ImageRecord
    boxes: np.ndarray
    num_classes: int
    classes: np.ndarray
    class_iou: np.ndarray
    max_iou: np.ndarray
    best_gt: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def num_gt(self) -> int:
        return len(self.record.boxes)

    @property
    def gt_labels(self) -> np.ndarray:
        g = self.num_gt
        return np.concatenate([np.asarray(self.record.labels, np.int64).reshape(g),
                               np.full(len(self.boxes) - g, -1, np.int64)])

    @property
    def iou(self) -> np.ndarray:
        out = np.zeros((len(self.boxes), self.num_classes), np.float32)
        out[:, self.classes] = self.class_iou
        return out

    @property
    def best_label(self) -> np.ndarray:
        labels = np.asarray(self.record.labels, np.int64)
        if len(labels) == 0:
            return np.full(len(self.boxes), -1, np.int64)
        return labels[self.best_gt]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (the record aside)."""
        return sum(a.nbytes for a in (self.boxes, self.classes, self.class_iou, self.max_iou, self.best_gt))


def build_windows(index: int, record: ImageRecord, proposals: np.ndarray, num_classes: int,
                  max_proposals: int | None = None) -> ImageWindows:
    """Windows of one image: its ground-truth boxes followed by (at most ``max_proposals``) proposals."""
    props = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    if max_proposals is not None:
        props = props[:max_proposals]
    gt = record.boxes.astype(np.float32)
    boxes = np.concatenate([gt, props], axis=0)
    n = len(boxes)
    iou_all = box_iou(boxes, gt).astype(np.float32)          # [N, G]
    labels = np.asarray(record.labels, np.int64)
    classes = np.unique(labels).astype(np.int64)
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"image {record.image_id}: ground-truth label out of range for {num_classes} classes")
    class_iou = np.zeros((n, len(classes)), dtype=np.float32)
    for j, c in enumerate(classes):
        class_iou[:, j] = iou_all[:, labels == c].max(axis=1)
    if len(gt):
        best_gt = iou_all.argmax(axis=1)
        max_iou = iou_all[np.arange(n), best_gt]
    else:
        best_gt = np.full(n, -1)
        max_iou = np.zeros(n, dtype=np.float32)
    return ImageWindows(index, record, boxes, int(num_classes), classes, class_iou,
                        max_iou.astype(np.float32), best_gt.astype(np.int32))
