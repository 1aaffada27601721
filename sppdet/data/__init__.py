"""Datasets: VOC- and COCO-format readers, robust image decoding, a synthetic set.

Public API::

    load_image(path) -> ndarray[H, W, 3] uint8 RGB      (sppdet.data.images)
    image_size(path) -> (width, height)                 (header only)
    load_voc(root, split, classes=None, *, skip_bad_images=False) -> Dataset
    load_coco(annotations_json, image_dir, classes=None, *, skip_bad_images=False) -> Dataset
    write_coco(dataset, path, image_dir=None) -> Path
    load_dataset(root, split, *, format="voc", classes=None, coco_annotations=None,
                 skip_bad_images=False) -> Dataset
    make_synthetic(out_dir, num_images=300, seed=0, ...) -> Path   (sppdet.data.synthetic)

Every box is float ``(x1, y1, x2, y2)``, 0-based continuous pixels of the
original (EXIF-rotated) image; see :mod:`sppdet.data.records`.  Reading a split as a
config describes it is :func:`sppdet.build.dataset_from_config` (the data layer never
sees the config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import DatasetError
from .coco import load_coco, write_coco
from .images import image_size, load_image
from .records import VOC_CLASSES, Dataset, ImageRecord
from .voc import load_voc

__all__ = [
    "VOC_CLASSES", "Dataset", "ImageRecord", "load_image", "image_size", "load_voc",
    "load_coco", "write_coco", "load_dataset", "make_synthetic",
]

FORMATS = ("voc", "coco")


def load_dataset(root: str | Path, split: str, *, format: str = "voc",
                 classes: Sequence[str] | None = None, coco_annotations: str | Path | None = None,
                 skip_bad_images: bool = False) -> Dataset:
    """Read a split of a VOC- or COCO-format dataset.

    Args:
        root: VOC: the VOC root; COCO: the image folder.
        split: the split name (VOC: ``ImageSets/Main/<split>.txt``; COCO: a label).
        format: ``"voc"`` or ``"coco"``.
        classes: class names (label = index), or ``None`` to discover them.
        coco_annotations: COCO only: the instances JSON of this split
            (relative paths are relative to ``root``).
        skip_bad_images: skip unreadable images with a warning instead of failing.

    Raises:
        DatasetError: unknown format, missing root, missing COCO annotation
            file, and everything the readers raise.
    """
    if format not in FORMATS:
        raise DatasetError(f"data.format: unknown dataset format {format!r} (known: {', '.join(FORMATS)})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if format == "voc":
        return load_voc(root, split, classes, skip_bad_images=skip_bad_images)
    if coco_annotations is None:
        raise DatasetError(f"data.coco_annotations: no instances JSON given for split {split!r} "
                           f"(format: coco needs one per split)")
    ann = Path(coco_annotations).expanduser()
    if not ann.is_absolute() and not ann.exists():
        ann = root / ann
    return load_coco(ann, root, classes, skip_bad_images=skip_bad_images, split=split)


def make_synthetic(*args, **kwargs) -> Path:
    """See :func:`sppdet.data.synthetic.make_synthetic` (imported lazily)."""
    from .synthetic import make_synthetic as _make

    return _make(*args, **kwargs)
