"""PASCAL VOC-format datasets (DESIGN §3).

Layout of a root (as ``VOCdevkit/VOC2007``)::

    ROOT/ImageSets/Main/<split>.txt   one image id per line
    ROOT/Annotations/<id>.xml         VOC XML: <size>, <object>s with <name>,
                                      <difficult>, <truncated>, <bndbox>
    ROOT/JPEGImages/<id>.jpg          (or .jpeg / .png ... when the .jpg is absent)

VOC files are 1-based and inclusive; boxes are converted on reading with
:func:`sppdet.boxes.voc_to_internal` to float ``(x1, y1, x2, y2)``, 0-based and
continuous (``x1 = xmin - 1``, ``x2 = xmax``).  :func:`write_voc_xml` does the
inverse for writers (the synthetic data set, conversions).

Only image headers are read (never pixels), so a split of ~5000 images loads in
seconds.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..boxes import internal_to_voc, voc_to_internal
from ..errors import DatasetError, ImageDecodeError
from ..utils.io import unsafe_name_reason
from .images import find_image, image_size
from .records import VOC_CLASSES, Dataset, ImageRecord

logger = logging.getLogger(__name__)

_COORDS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class _RawObject:
    name: str
    box: tuple[float, float, float, float]  # internal coordinates, not yet clipped
    difficult: bool
    truncated: bool


@dataclass
class _RawAnnotation:
    image_id: str
    xml: Path
    width: int | None
    height: int | None
    filename: str | None
    objects: list[_RawObject] = field(default_factory=list)


def split_file(root: str | Path, split: str) -> Path:
    """``ROOT/ImageSets/Main/<split>.txt``.

    Raises:
        DatasetError: ``split`` is not a plain name (a path separator, ``..``, NUL, ...),
            which would point outside ``ROOT/ImageSets/Main``.
    """
    reason = unsafe_name_reason(str(split))
    if reason:
        raise DatasetError(f"--split {split!r}: {reason}; a split is a name (ROOT/ImageSets/Main/<split>.txt)")
    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"


def available_splits(root: str | Path) -> list[str]:
    """Split names that have a list in ``ROOT/ImageSets/Main`` (per-class lists excluded)."""
    main = Path(root) / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)


def read_split(path: str | Path) -> list[str]:
    """Image ids of a split file, in file order.

    Blank lines and surrounding whitespace are ignored, and so is a UTF-8 byte-order
    mark at the start; a duplicated id is kept once (with a warning).

    Raises:
        DatasetError: missing or unreadable file, no ids, a line with more than
            one column (e.g. a per-class ``<class>_<split>.txt`` list), or an id that is
            not a plain file name (a path separator, ``..``, an absolute path, a NUL or
            control character): ids name files inside the dataset root, and such an id
            would read (or, as a report name, write) outside it.
    """
    path = Path(path)
    if not path.is_file():
        avail = available_splits(path.parent.parent.parent)
        hint = f" (available splits: {', '.join(avail)})" if avail else ""
        raise DatasetError(f"{path}: split file not found{hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read split file ({e})") from None
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 1:
            raise DatasetError(
                f"{path}:{lineno}: expected one image id per line, got {line.strip()!r} "
                f"(a per-class list? use ImageSets/Main/<split>.txt)")
        reason = unsafe_name_reason(parts[0])
        if reason:
            raise DatasetError(f"{path}:{lineno}: image id {parts[0]!r} {reason}; an id must be a plain "
                               "file name inside the dataset root")
        if parts[0] in seen:
            logger.warning("%s:%d: image id %s listed twice; keeping the first", path, lineno, parts[0])
            continue
        seen.add(parts[0])
        ids.append(parts[0])
    if not ids:
        raise DatasetError(f"{path}: split file lists no image ids")
    return ids


def _text(elem: ET.Element | None, tag: str) -> str | None:
    if elem is None:
        return None
    child = elem.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def _flag(value: str | None, xml: Path, what: str) -> bool:
    """VOC 0/1 flags (also true/false); absent -> False."""
    if value is None or value == "":
        return False
    v = value.lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    try:
        return float(v) != 0
    except ValueError:
        raise DatasetError(f"{xml}: {what} is not 0 or 1: {value!r}") from None


def _size_value(value: str | None, xml: Path, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except ValueError:
        raise DatasetError(f"{xml}: <size><{what}> is not a number: {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise DatasetError(f"{xml}: <size><{what}> is invalid: {value!r}")
    return int(round(v)) or None  # 0 means "unknown" (some tools write 0x0)


def parse_voc_xml(xml: str | Path, image_id: str | None = None) -> _RawAnnotation:
    """Parse one VOC annotation file (boxes converted to internal coordinates, not clipped).

    Raises:
        DatasetError: missing or unparseable file, an object without a name or
            ``<bndbox>``, a coordinate that is not a number.
    """
    xml = Path(xml)
    try:
        tree = ET.parse(xml)
    except FileNotFoundError:
        raise DatasetError(f"{xml}: annotation file not found") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml}: cannot parse XML ({e})") from None
    except OSError as e:
        raise DatasetError(f"{xml}: cannot read annotation file ({e.strerror or e})") from None
    root = tree.getroot()
    size = root.find("size")
    ann = _RawAnnotation(
        image_id=image_id if image_id is not None else xml.stem,
        xml=xml,
        width=_size_value(_text(size, "width"), xml, "width"),
        height=_size_value(_text(size, "height"), xml, "height"),
        filename=_text(root, "filename"),
    )
    for i, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        if not name:
            raise DatasetError(f"{xml}: object {i} has no <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{xml}: object {i} ({name}) has no <bndbox>")
        vals = []
        for tag in _COORDS:
            t = _text(bb, tag)
            if t is None:
                raise DatasetError(f"{xml}: object {i} ({name}): <bndbox> has no <{tag}>")
            try:
                v = float(t)
            except ValueError:
                raise DatasetError(f"{xml}: object {i} ({name}): <{tag}> is not a number: {t!r}") from None
            if not math.isfinite(v):
                raise DatasetError(f"{xml}: object {i} ({name}): <{tag}> is not finite: {t!r}")
            vals.append(v)
        ann.objects.append(_RawObject(
            name=name,
            box=tuple(float(v) for v in voc_to_internal(*vals)),  # type: ignore[arg-type]
            difficult=_flag(_text(obj, "difficult"), xml, f"object {i} ({name}): <difficult>"),
            truncated=_flag(_text(obj, "truncated"), xml, f"object {i} ({name}): <truncated>"),
        ))
    return ann


def discover_classes(names: Sequence[str] | set[str]) -> list[str]:
    """Class list for the object names found in a split.

    All names VOC classes -> the 20 :data:`VOC_CLASSES` in devkit order;
    otherwise the sorted distinct names.
    """
    found = set(names)
    if found and found <= set(VOC_CLASSES):
        return list(VOC_CLASSES)
    return sorted(found)


def sanitize_boxes(boxes: np.ndarray, width: int, height: int, source: str,
                   names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image and find the unusable ones, with warnings.

    Args:
        boxes (ndarray[N, 4]): ``(x1, y1, x2, y2)``, internal coordinates.
        width, height: the image size.
        source: the annotation file (for the warnings).
        names: object names (for the warnings), optional.

    Returns:
        ``(clipped ndarray[N, 4] float32, keep ndarray[N] bool)``: a box partly
        outside the image is clipped (warning naming the file and object index);
        a box with zero or negative width or height after clipping has
        ``keep=False`` (warning naming the file and object).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = boxes.copy()
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    keep = np.ones(len(boxes), dtype=bool)
    for i in range(len(boxes)):
        label = f"object {i}" + (f" ({names[i]})" if names is not None else "")
        valid = out[i, 2] > out[i, 0] and out[i, 3] > out[i, 1]
        if not valid:
            keep[i] = False
            logger.warning("%s: %s dropped: box %s has zero or negative area inside the %dx%d image",
                           source, label, _fmt_box(boxes[i]), width, height)
        elif not np.array_equal(out[i], boxes[i]):
            logger.warning("%s: %s: box %s extends outside the %dx%d image; clipped to %s",
                           source, label, _fmt_box(boxes[i]), width, height, _fmt_box(out[i]))
    return out.astype(np.float32), keep


def _fmt_box(b: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in b) + ")"


def _image_path(root: Path, image_id: str) -> Path | None:
    return find_image(root / "JPEGImages" / image_id)


def load_voc(root: str | Path, split: str, classes: Sequence[str] | None = None, *,
             skip_bad_images: bool = False) -> Dataset:
    """Read a VOC-format split.

    Args:
        root: the VOC root (``ROOT/Annotations``, ``ROOT/JPEGImages``,
            ``ROOT/ImageSets/Main``).
        split: the split name (``ROOT/ImageSets/Main/<split>.txt``).
        classes: the class names (label = index).  ``None``: discovered from
            the split's annotations (:func:`discover_classes`).
        skip_bad_images: a missing or unreadable image is skipped with a
            warning instead of raising.

    Returns:
        Dataset whose records follow the split order; boxes in internal
        coordinates, clipped to the image; zero-area boxes dropped.  The image
        size comes from the image header (EXIF orientation applied); the XML
        ``<size>`` is only checked against it (a disagreement is a warning).

    Raises:
        DatasetError: one line naming the file: missing root / split file /
            annotation / image, empty split, unparseable XML, non-numeric
            coordinate, unknown class name (when ``classes`` is given).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (expected a VOC root with "
                           f"Annotations/, JPEGImages/, ImageSets/Main/)")
    if not (root / "ImageSets" / "Main").is_dir():
        subs = sorted(p.name for p in root.iterdir()
                      if p.is_dir() and (p / "ImageSets" / "Main").is_dir())
        hint = (f"; did you mean {', '.join(str(root / n) for n in subs)}?" if subs else
                " (expected a VOC root with Annotations/, JPEGImages/, ImageSets/Main/)")
        raise DatasetError(f"{root}: not a VOC root: no ImageSets/Main folder{hint}")
    ids = read_split(split_file(root, split))

    from ..utils.progress import progress

    anns: list[tuple[_RawAnnotation, Path, int, int]] = []
    for image_id in progress(ids, desc=f"reading {root.name}/{split}", unit="img"):
        ann = parse_voc_xml(root / "Annotations" / f"{image_id}.xml", image_id)
        img_path = _image_path(root, image_id)
        try:
            if img_path is None:
                raise ImageDecodeError(
                    f"{root / 'JPEGImages' / (image_id + '.jpg')}: image file not found "
                    f"(also tried .jpeg, .png)")
            w, h = image_size(img_path)
        except ImageDecodeError as e:
            if not skip_bad_images:
                raise
            logger.warning("skipping image %s: %s", image_id, e)
            continue
        if ann.width is not None and ann.height is not None and (ann.width, ann.height) != (w, h):
            logger.warning("%s: <size> says %dx%d but the image %s is %dx%d; using the image's size",
                           ann.xml, ann.width, ann.height, img_path.name, w, h)
        anns.append((ann, img_path, w, h))

    if classes is None:
        class_list = discover_classes({o.name for a, *_ in anns for o in a.objects})
    else:
        class_list = [str(c) for c in classes]
        if len(set(class_list)) != len(class_list):
            raise DatasetError(f"classes: duplicate class names in {class_list}")
    index = {c: i for i, c in enumerate(class_list)}

    records: list[ImageRecord] = []
    for ann, img_path, w, h in anns:
        names = [o.name for o in ann.objects]
        for i, n in enumerate(names):
            if n not in index:
                raise DatasetError(f"{ann.xml}: object {i} has unknown class {n!r} "
                                   f"(classes: {', '.join(class_list)})")
        boxes = np.array([o.box for o in ann.objects], dtype=np.float64).reshape(-1, 4)
        boxes, keep = sanitize_boxes(boxes, w, h, str(ann.xml), names)
        records.append(ImageRecord(
            image_id=ann.image_id,
            path=img_path,
            width=w,
            height=h,
            boxes=boxes[keep],
            labels=np.array([index[n] for n in names], dtype=np.int64)[keep],
            difficult=np.array([o.difficult for o in ann.objects], dtype=bool)[keep],
            truncated=np.array([o.truncated for o in ann.objects], dtype=bool)[keep],
            source=str(ann.xml),
        ))
    if not records:
        raise DatasetError(f"{split_file(root, split)}: no usable images in split {split!r} "
                           f"(all were skipped as unreadable)")
    n_obj = sum(r.num_objects for r in records)
    logger.info("%s/%s: %d images, %d objects, %d classes", root, split, len(records), n_obj,
                len(class_list))
    return Dataset(name=root.name, split=split, classes=class_list, records=records, root=root)


# ---------------------------------------------------------------------------
# Writing


def voc_xml_string(record: ImageRecord, classes: Sequence[str], *, folder: str = "VOC",
                   database: str = "sppdet", depth: int = 3) -> str:
    """A VOC-style annotation XML (1-based inclusive coordinates) for one record.

    Internal boxes are written with :func:`sppdet.boxes.internal_to_voc` and
    rounded to integers (the VOC convention); write integer-aligned boxes for
    an exact round trip.
    """
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = record.path.name
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = database
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(int(record.width))
    ET.SubElement(size, "height").text = str(int(record.height))
    ET.SubElement(size, "depth").text = str(depth)
    ET.SubElement(root, "segmented").text = "0"
    voc = internal_to_voc(record.boxes)
    for i in range(record.num_objects):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[int(record.labels[i])]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(record.truncated[i]))
        ET.SubElement(obj, "difficult").text = str(int(record.difficult[i]))
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(_COORDS, voc[i]):
            ET.SubElement(bb, tag).text = str(int(round(float(v))))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def write_voc_xml(path: str | Path, record: ImageRecord, classes: Sequence[str], **kw) -> None:
    """Write :func:`voc_xml_string` to ``path`` atomically."""
    from ..utils.io import atomic_write_text

    atomic_write_text(path, voc_xml_string(record, classes, **kw))
