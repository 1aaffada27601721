"""Datasets: VOC- and COCO-format readers, robust image decoding, a synthetic set.

Public API::

    load_image(path) -> ndarray[H, W, 3] uint8 RGB      (sppdet.data.images)
    image_size(path) -> (width, height)                 (header only)
    load_voc(root, split, classes=None, *, skip_bad_images=False) -> Dataset
    load_coco(annotations_json, image_dir, classes=None, *, skip_bad_images=False) -> Dataset
    write_coco(dataset, path, image_dir=None) -> Path
    load_dataset(root, split, *, format="voc", classes=None, coco_annotations=None,
                 skip_bad_images=False) -> Dataset
    dataset_from_config(data_cfg, split, root=None) -> Dataset
    make_synthetic(out_dir, num_images=300, seed=0, ...) -> Path   (sppdet.data.synthetic)

Every box is float ``(x1, y1, x2, y2)``, 0-based continuous pixels of the
original (EXIF-rotated) image; see :mod:`sppdet.data.records`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import DatasetError
from .coco import load_coco, write_coco
from .images import image_size, load_image
from .records import VOC_CLASSES, Dataset, ImageRecord
from .voc import load_voc

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

__all__ = [
    "VOC_CLASSES", "Dataset", "ImageRecord", "load_image", "image_size", "load_voc",
    "load_coco", "write_coco", "load_dataset", "dataset_from_config", "make_synthetic",
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


def dataset_from_config(data_cfg: "DataConfig", split: str, root: str | Path | None = None) -> Dataset:
    """Read ``split`` as the config's ``data`` section describes.

    Args:
        data_cfg: :class:`sppdet.config.DataConfig` (format, classes,
            coco_annotations, skip_bad_images).
        split: the split name.
        root: overrides ``data_cfg.root`` (the CLI's ``--data``).

    Raises:
        DatasetError: no root given or the root does not exist (one line
            telling the user to pass ``--data``), and everything the readers raise.
    """
    r = root if root is not None else data_cfg.root
    if r is None or str(r) == "":
        raise DatasetError("data.root: no dataset given; pass --data ROOT (a VOC root such as "
                           "VOCdevkit/VOC2007, or the image folder of a COCO-format set)")
    rp = Path(r).expanduser()
    if not rp.is_dir():
        raise DatasetError(f"{rp}: dataset folder not found; pass --data ROOT with an existing "
                           f"dataset folder")
    coco_ann = None
    if data_cfg.format == "coco":
        coco_ann = data_cfg.coco_annotations.get(split)
        if coco_ann is None:
            raise DatasetError(f"data.coco_annotations: no instances JSON for split {split!r} "
                               f"(have: {', '.join(sorted(data_cfg.coco_annotations)) or 'none'})")
    return load_dataset(rp, split, format=data_cfg.format, classes=data_cfg.classes,
                        coco_annotations=coco_ann, skip_bad_images=data_cfg.skip_bad_images)


def make_synthetic(*args, **kwargs) -> Path:
    """See :func:`sppdet.data.synthetic.make_synthetic` (imported lazily)."""
    from .synthetic import make_synthetic as _make

    return _make(*args, **kwargs)
