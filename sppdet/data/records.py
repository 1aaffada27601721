"""The dataset record types every stage works on.

Coordinates follow DESIGN §3: float ``(x1, y1, x2, y2)`` in pixels of the
original image, 0-based and continuous (a box covering pixel columns 0..9 has
``x1 = 0, x2 = 10``).  Labels are 0-based indices into ``Dataset.classes``.
Readers convert from the on-disk convention (VOC: 1-based inclusive; COCO:
``[x, y, w, h]``) at the edge, and writers convert back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The 20 PASCAL VOC classes, in the devkit's order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


@dataclass
class ImageRecord:
    """One image and its ground truth.

    Attributes:
        image_id: the dataset's id (VOC: the file stem; COCO: the image id as str).
        path: the image file.
        width, height: image size in pixels (of the decoded, EXIF-rotated image).
        boxes (ndarray[N, 4] float32): ``(x1, y1, x2, y2)``, 0-based continuous,
            with ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``.
        labels (ndarray[N] int64): 0-based class indices.
        difficult (ndarray[N] bool): VOC "difficult" flag (COCO: ``iscrowd``).
        truncated (ndarray[N] bool): VOC "truncated" flag (COCO: all False).
        source: where the annotation came from (for error messages).
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=bool))
    truncated: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=bool))
    source: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = len(self.boxes)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(n)
        # flags not given default to False for every object
        self.difficult = (np.zeros(n, dtype=bool) if np.size(self.difficult) == 0
                          else np.asarray(self.difficult, dtype=bool).reshape(n))
        self.truncated = (np.zeros(n, dtype=bool) if np.size(self.truncated) == 0
                          else np.asarray(self.truncated, dtype=bool).reshape(n))

    @property
    def num_objects(self) -> int:
        return len(self.boxes)

    def without_difficult(self) -> "ImageRecord":
        """A copy with the difficult objects removed (for training)."""
        keep = ~self.difficult
        return ImageRecord(
            self.image_id, self.path, self.width, self.height,
            self.boxes[keep], self.labels[keep], self.difficult[keep],
            self.truncated[keep], self.source,
        )


@dataclass
class Dataset:
    """A split of a dataset: its class names and its image records, in split order.

    ``coco_category_ids`` / ``coco_image_ids`` are set by the COCO reader only: the instances
    file's category id of each class (in class order) and image id of each record (record
    ``image_id`` -> the JSON's id, as it was there), so results written for that data use the
    file's own ids (:mod:`sppdet.evaluation.coco`).
    """

    name: str
    split: str
    classes: list[str]
    records: list[ImageRecord]
    root: Path | None = None
    coco_category_ids: list | None = None
    coco_image_ids: dict | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def by_id(self) -> dict[str, ImageRecord]:
        return {r.image_id: r for r in self.records}

    def fingerprint(self) -> str:
        """A short hash of the split's image ids and files (for cache keys)."""
        h = hashlib.sha1()
        for r in self.records:
            h.update(r.image_id.encode())
            h.update(b"\0")
            h.update(str(r.path).encode())
            h.update(b"\0")
        return h.hexdigest()[:16]
