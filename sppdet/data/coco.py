"""COCO-format datasets (instances JSON + an image folder), read through pycocotools.

COCO boxes are ``[x, y, w, h]`` in continuous pixel coordinates, so the
internal box is simply ``(x, y, x + w, y + h)`` (no 1-pixel shift, unlike VOC).
``iscrowd`` becomes the ``difficult`` flag (a crowd region is neither a true
nor a false positive, as a VOC difficult object).  Category ids are mapped to
0-based contiguous labels in increasing category-id order, or to the given
``classes`` by name.  Image ids become strings; the file's own image and
category ids are kept on the Dataset (``coco_image_ids``, ``coco_category_ids``)
so that results written for this data use them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DatasetError, ImageDecodeError
from ..utils.io import unsafe_relative_reason
from .images import image_size
from .records import Dataset, ImageRecord
from .voc import sanitize_boxes

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read COCO annotation file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or invalid {key!r} list (not a COCO instances file?)")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{path}: 'annotations' is not a list")
    data.setdefault("annotations", [])
    return data


def _coco_api(data: dict[str, Any], path: Path):
    """A pycocotools ``COCO`` index over already-parsed ``data`` (its stdout chatter silenced)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = data
        try:
            api.createIndex()
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{path}: malformed COCO entry (missing or bad field {e})") from None
    return api


def load_coco(annotations_json: str | Path, image_dir: str | Path,
              classes: Sequence[str] | None = None, *, skip_bad_images: bool = False,
              split: str = "") -> Dataset:
    """Read a COCO instances file.

    Args:
        annotations_json: the instances JSON (``images``, ``annotations``, ``categories``).
        image_dir: the folder that ``images[].file_name`` is relative to.
        classes: class names (label = index); every category used by an
            annotation must be among them.  ``None``: all categories, in
            increasing category-id order.
        skip_bad_images: skip a missing/unreadable image with a warning
            instead of raising.
        split: the split name stored in the Dataset (default: the JSON's stem).

    Returns:
        Dataset in the JSON's image order; boxes ``(x1, y1, x2, y2)``
        internal coordinates, clipped to the image (warning); zero-area boxes
        dropped (warning); ``difficult = iscrowd``; ``truncated`` all False.
        The image size comes from the image header; a JSON size that
        disagrees is a warning.

    Raises:
        DatasetError: one line naming the file: missing file, bad JSON, an
            annotation of an unknown category or image, a non-numeric box,
            a missing image (unless ``skip_bad_images``).
    """
    path = Path(annotations_json)
    image_dir = Path(image_dir)
    data = _read_json(path)
    api = _coco_api(data, path)

    cats = sorted(api.cats.values(), key=lambda c: c["id"])
    cat_names = {c["id"]: str(c.get("name", c["id"])) for c in cats}
    if classes is None:
        class_list = [cat_names[c["id"]] for c in cats]
        if len(set(class_list)) != len(class_list):
            raise DatasetError(f"{path}: duplicate category names in {class_list}")
    else:
        class_list = [str(c) for c in classes]
        missing = [c for c in class_list if c not in set(cat_names.values())]
        if missing:
            logger.warning("%s: classes %s have no category in this file", path, missing)
    index = {c: i for i, c in enumerate(class_list)}

    for ann in api.dataset["annotations"]:
        if ann.get("category_id") not in cat_names:
            raise DatasetError(f"{path}: annotation {ann.get('id')} has unknown category id "
                               f"{ann.get('category_id')!r}")
        if ann.get("image_id") not in api.imgs:
            raise DatasetError(f"{path}: annotation {ann.get('id')} refers to unknown image id "
                               f"{ann.get('image_id')!r}")
        name = cat_names[ann["category_id"]]
        if name not in index:
            raise DatasetError(f"{path}: annotation {ann.get('id')} has category {name!r}, "
                               f"not one of the classes ({', '.join(class_list)})")

    from ..utils.progress import progress

    records: list[ImageRecord] = []
    for img in progress(data["images"], desc=f"reading {path.name}", unit="img"):
        if "id" not in img or "file_name" not in img:
            raise DatasetError(f"{path}: an image entry lacks 'id' or 'file_name': {str(img)[:80]}")
        reason = unsafe_relative_reason(str(img["file_name"]))
        if reason:
            raise DatasetError(f"{path}: image {img['id']}: file_name {str(img['file_name'])[:80]!r} {reason}; "
                               f"it must name a file inside the image folder {image_dir}")
        img_path = image_dir / str(img["file_name"])
        try:
            w, h = image_size(img_path)
        except ImageDecodeError as e:
            if not skip_bad_images:
                raise
            logger.warning("skipping image %s: %s", img["id"], e)
            continue
        jw, jh = img.get("width"), img.get("height")
        if jw and jh and (int(jw), int(jh)) != (w, h):
            logger.warning("%s: image %s: JSON size %sx%s but %s is %dx%d; using the image's size",
                           path, img["id"], jw, jh, img_path.name, w, h)
        anns = api.imgToAnns.get(img["id"], [])
        boxes, labels, crowd, names = [], [], [], []
        for ann in anns:
            bbox = ann.get("bbox")
            try:
                x, y, bw, bh = (float(v) for v in bbox)
            except (TypeError, ValueError):
                raise DatasetError(f"{path}: annotation {ann.get('id')}: bbox is not 4 numbers: "
                                   f"{bbox!r}") from None
            if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                raise DatasetError(f"{path}: annotation {ann.get('id')}: bbox is not finite: {bbox!r}")
            boxes.append((x, y, x + bw, y + bh))
            name = cat_names[ann["category_id"]]
            names.append(f"id {ann.get('id')}, {name}")
            labels.append(index[name])
            crowd.append(bool(ann.get("iscrowd", 0)))
        b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        b, keep = sanitize_boxes(b, w, h, f"{path} image {img['id']}", names)
        records.append(ImageRecord(
            image_id=str(img["id"]), path=img_path, width=w, height=h,
            boxes=b[keep], labels=np.array(labels, dtype=np.int64)[keep],
            difficult=np.array(crowd, dtype=bool)[keep],
            truncated=np.zeros(int(keep.sum()), dtype=bool), source=str(path),
        ))
    if not records:
        raise DatasetError(f"{path}: no usable images")
    # the file's own ids, for results written on this data; a class without a category in the
    # file gets the next free id (no ground truth can match it)
    by_name: dict[str, Any] = {}
    for c in cats:
        by_name.setdefault(cat_names[c["id"]], c["id"])
    free = max([c["id"] for c in cats if isinstance(c["id"], int)] + [0]) + 1
    category_ids = []
    for name in class_list:
        if name not in by_name:
            by_name[name] = free
            free += 1
        category_ids.append(by_name[name])
    image_ids = {str(img["id"]): img["id"] for img in data["images"]}
    return Dataset(name=image_dir.name, split=split or path.stem, classes=class_list,
                   records=records, root=image_dir, coco_category_ids=category_ids,
                   coco_image_ids={r.image_id: image_ids[r.image_id] for r in records})


def coco_dict(dataset: Dataset, image_dir: str | Path | None = None) -> dict[str, Any]:
    """A COCO instances dict for ``dataset`` (see :func:`write_coco`)."""
    base = Path(image_dir) if image_dir is not None else None
    numeric = all(r.image_id.isdigit() and str(int(r.image_id)) == r.image_id for r in dataset)
    images, annotations = [], []
    ann_id = 1
    for k, r in enumerate(dataset.records):
        img_id = int(r.image_id) if numeric else k + 1
        if base is not None:
            try:
                fname = str(Path(r.path).relative_to(base))
            except ValueError:
                fname = str(Path(r.path).resolve())
        else:
            fname = Path(r.path).name
        images.append({"id": img_id, "file_name": fname, "width": int(r.width),
                       "height": int(r.height), "sppdet_image_id": r.image_id})
        for i in range(r.num_objects):
            x1, y1, x2, y2 = (float(v) for v in r.boxes[i])
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": ann_id, "image_id": img_id, "category_id": int(r.labels[i]) + 1,
                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(bool(r.difficult[i])),
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
            })
            ann_id += 1
    categories = [{"id": i + 1, "name": c, "supercategory": "object"}
                  for i, c in enumerate(dataset.classes)]
    return {"info": {"description": f"{dataset.name} {dataset.split} (written by sppdet)"},
            "images": images, "annotations": annotations, "categories": categories}


def write_coco(dataset: Dataset, path: str | Path, image_dir: str | Path | None = None) -> Path:
    """Write ``dataset`` as a COCO instances JSON (atomically).

    Boxes are written as ``[x1, y1, x2 - x1, y2 - y1]``; ``iscrowd =
    difficult``; category ids are ``label + 1`` in class order.  Image ids are
    the dataset's ids when they are all plain integers, else 1, 2, ... in
    record order (the original id is kept in ``sppdet_image_id``).
    ``file_name`` is relative to ``image_dir`` (default: the bare file name).

    Returns:
        the written path.
    """
    from ..utils.io import atomic_write_json

    path = Path(path)
    atomic_write_json(path, coco_dict(dataset, image_dir))
    return path
