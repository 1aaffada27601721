"""VOC-format reader: layout, coordinates, classes, and every bad input."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dataset
from sppdet.config import DataConfig
from sppdet.build import dataset_from_config
from sppdet.data import load_dataset, load_voc
from sppdet.data.records import VOC_CLASSES
from sppdet.data.voc import voc_xml_string
from sppdet.errors import DatasetError, ImageDecodeError

# ----------------------------------------------------------------------------
# Fixture writer (hand-written XML, independent of sppdet's writer)


def _obj_xml(name, box, difficult=None, truncated=None) -> str:
    parts = [f"<object><name>{name}</name>"]
    if difficult is not None:
        parts.append(f"<difficult>{difficult}</difficult>")
    if truncated is not None:
        parts.append(f"<truncated>{truncated}</truncated>")
    xmin, ymin, xmax, ymax = box
    parts.append(f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                 f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts)


def _xml(objects, size=(40, 30), filename="x.jpg") -> str:
    size_xml = "" if size is None else (f"<size><width>{size[0]}</width><height>{size[1]}</height>"
                                        f"<depth>3</depth></size>")
    return (f"<annotation><folder>VOC</folder><filename>{filename}</filename>{size_xml}"
            + "".join(_obj_xml(*o) for o in objects) + "</annotation>\n")


def make_voc(root: Path, images: dict, split: str = "trainval", img_size=(40, 30),
             split_text: str | None = None, ext: str = ".jpg", fmt: str = "JPEG") -> Path:
    """images: id -> list of (name, (xmin, ymin, xmax, ymax) VOC 1-based, difficult, truncated)."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for image_id, objs in images.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(objs, img_size))
        Image.new("RGB", img_size, (90, 120, 150)).save(root / "JPEGImages" / f"{image_id}{ext}", fmt)
    text = split_text if split_text is not None else "".join(f"{i}\n" for i in images)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text(text)
    return root


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------
# Reading


def test_coordinates_voc_to_internal(tmp_path):
    root = make_voc(tmp_path / "voc", {
        "a": [("cat", (1, 1, 10, 20), 0, 0), ("dog", (5, 6, 40, 30), 1, 1)],
    })
    ds = load_voc(root, "trainval")
    r = ds[0]
    # reference: VOC 1-based inclusive -> 0-based continuous: x1 = xmin - 1, x2 = xmax
    np.testing.assert_array_equal(r.boxes, np.array([[0, 0, 10, 20], [4, 5, 40, 30]], np.float32))
    assert r.boxes.dtype == np.float32 and r.labels.dtype == np.int64
    assert list(r.difficult) == [False, True] and list(r.truncated) == [False, True]
    assert (r.width, r.height) == (40, 30)
    assert r.path == root / "JPEGImages" / "a.jpg"
    assert r.source.endswith("a.xml")
    assert ds.classes == list(VOC_CLASSES)
    assert [ds.classes[i] for i in r.labels] == ["cat", "dog"]
    assert ds.name == "voc" and ds.split == "trainval" and ds.root == root


def test_float_coordinates_accepted(tmp_path):
    root = make_voc(tmp_path, {"a": [("x", ("3.0", "4.5", "20.25", "21"), 0, 0)]})
    np.testing.assert_allclose(load_voc(root, "trainval")[0].boxes, [[2, 3.5, 20.25, 21]])


def test_split_order_blank_lines_and_whitespace(tmp_path):
    root = make_voc(tmp_path, {"b": [], "a": [], "c": []},
                    split_text="\n  b  \n\na\t\r\nc   \n\n")
    ds = load_voc(root, "trainval")
    assert [r.image_id for r in ds] == ["b", "a", "c"]
    assert all(r.num_objects == 0 for r in ds)
    assert ds.records[0].boxes.shape == (0, 4)


def test_duplicate_id_kept_once(tmp_path, caplog):
    root = make_voc(tmp_path, {"a": [], "b": []}, split_text="a\nb\na\n")
    with caplog.at_level(logging.WARNING):
        ds = load_voc(root, "trainval")
    assert [r.image_id for r in ds] == ["a", "b"]
    assert "listed twice" in caplog.text


def test_missing_difficult_means_not_difficult(tmp_path):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), None, None)]})
    r = load_voc(root, "trainval")[0]
    assert list(r.difficult) == [False] and list(r.truncated) == [False]


def test_class_discovery_voc_and_custom(tmp_path):
    voc = make_voc(tmp_path / "v", {"a": [("person", (1, 1, 5, 5), 0, 0)],
                                    "b": [("car", (1, 1, 5, 5), 0, 0)]})
    ds = load_voc(voc, "trainval")
    assert ds.classes == list(VOC_CLASSES)
    assert [ds.classes[int(r.labels[0])] for r in ds] == ["person", "car"]

    custom = make_voc(tmp_path / "c", {"a": [("zebra", (1, 1, 5, 5), 0, 0)],
                                       "b": [("person", (1, 1, 5, 5), 0, 0),
                                             ("apple", (2, 2, 6, 6), 0, 0)]})
    ds = load_voc(custom, "trainval")
    assert ds.classes == ["apple", "person", "zebra"]
    assert [int(x) for x in ds[1].labels] == [1, 0]


def test_given_classes(tmp_path):
    root = make_voc(tmp_path, {"a": [("b", (1, 1, 5, 5), 0, 0), ("a", (1, 1, 5, 5), 0, 0)]})
    ds = load_voc(root, "trainval", classes=["b", "a", "unused"])
    assert ds.classes == ["b", "a", "unused"]
    assert list(ds[0].labels) == [0, 1]


def test_unknown_class_when_classes_given(tmp_path):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0), ("zebra", (1, 1, 5, 5), 0, 0)]})
    with pytest.raises(DatasetError) as ei:
        load_voc(root, "trainval", classes=["cat", "dog"])
    msg = _one_line(ei)
    assert "a.xml" in msg and "'zebra'" in msg and "unknown class" in msg and "object 1" in msg


def test_other_image_extension(tmp_path):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0)]}, ext=".png", fmt="PNG")
    r = load_voc(root, "trainval")[0]
    assert r.path.name == "a.png" and (r.width, r.height) == (40, 30)


def test_size_missing_or_zero_taken_from_image(tmp_path, caplog):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0)], "b": []})
    (root / "Annotations" / "a.xml").write_text(_xml([("cat", (1, 1, 5, 5), 0, 0)], size=(0, 0)))
    (root / "Annotations" / "b.xml").write_text(_xml([], size=None))
    with caplog.at_level(logging.WARNING):
        ds = load_voc(root, "trainval")
    assert [(r.width, r.height) for r in ds] == [(40, 30), (40, 30)]
    assert "<size>" not in caplog.text  # no disagreement warning when the XML gives no size


def test_size_disagreement_image_wins(tmp_path, caplog):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0)]})
    # the image is stored 40x30 with an EXIF "rotate 90" tag: displayed 30x40
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "a.jpg", "JPEG", exif=exif.tobytes())
    with caplog.at_level(logging.WARNING):
        r = load_voc(root, "trainval")[0]
    assert (r.width, r.height) == (30, 40)
    assert "a.xml" in caplog.text and "40x30" in caplog.text and "30x40" in caplog.text


def test_box_clipped_with_warning(tmp_path, caplog):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0), ("dog", (0, -3, 45, 20), 0, 0)]})
    with caplog.at_level(logging.WARNING):
        r = load_voc(root, "trainval")[0]
    np.testing.assert_array_equal(r.boxes[1], [0, 0, 40, 20])
    assert r.num_objects == 2
    rec = [m for m in caplog.records if "; clipped to" in m.getMessage()]
    assert len(rec) == 1 and "a.xml" in rec[0].getMessage() and "object 1" in rec[0].getMessage()


@pytest.mark.parametrize("box", [(10, 5, 9, 20),      # inverted: x2 < x1 after conversion
                                 (10, 5, 9, 5),       # xmax = xmin - 1: zero width
                                 (50, 5, 60, 20)])    # entirely outside: zero after clipping
def test_degenerate_box_dropped_with_warning(tmp_path, caplog, box):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0), ("dog", box, 1, 0)]})
    with caplog.at_level(logging.WARNING):
        ds = load_voc(root, "trainval")
    r = ds[0]
    assert r.num_objects == 1 and list(r.labels) == [ds.classes.index("cat")]
    assert len(r.difficult) == 1 and len(r.truncated) == 1
    msgs = [m.getMessage() for m in caplog.records if ") dropped: box" in m.getMessage()]
    assert len(msgs) == 1 and "a.xml" in msgs[0] and "object 1 (dog)" in msgs[0]


def test_single_pixel_box_kept(tmp_path):
    # VOC xmin == xmax covers one pixel column: width 1 internally
    root = make_voc(tmp_path, {"a": [("cat", (7, 7, 7, 7), 0, 0)]})
    np.testing.assert_array_equal(load_voc(root, "trainval")[0].boxes, [[6, 6, 7, 7]])


# ----------------------------------------------------------------------------
# Errors


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError) as ei:
        load_voc(tmp_path / "nowhere", "trainval")
    assert "nowhere" in _one_line(ei) and "not found" in str(ei.value)


def test_devkit_folder_instead_of_root(tmp_path):
    make_voc(tmp_path / "VOCdevkit" / "VOC2007", {"a": []})
    with pytest.raises(DatasetError) as ei:
        load_voc(tmp_path / "VOCdevkit", "trainval")
    msg = _one_line(ei)
    assert "not a VOC root" in msg and "did you mean" in msg and str(tmp_path / "VOCdevkit" / "VOC2007") in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a VOC root: no ImageSets/Main folder"):
        load_voc(tmp_path / "empty", "trainval")


def test_missing_split_file(tmp_path):
    root = make_voc(tmp_path, {"a": []}, split="train")
    with pytest.raises(DatasetError) as ei:
        load_voc(root, "test")
    msg = _one_line(ei)
    assert "test.txt" in msg and "split file not found" in msg and "available splits: train" in msg


def test_empty_split_file(tmp_path):
    root = make_voc(tmp_path, {"a": []}, split_text="\n  \n")
    with pytest.raises(DatasetError) as ei:
        load_voc(root, "trainval")
    msg = _one_line(ei)
    assert "trainval.txt" in msg and "no image ids" in msg


def test_per_class_split_line_is_an_error(tmp_path):
    root = make_voc(tmp_path, {"000001": [], "000002": []}, split_text="000001 -1\n000002  1\n")
    with pytest.raises(DatasetError) as ei:
        load_voc(root, "trainval")
    msg = _one_line(ei)
    assert "trainval.txt:1" in msg and "one image id per line" in msg


def test_missing_xml(tmp_path):
    root = make_voc(tmp_path, {"a": [], "b": []})
    (root / "Annotations" / "b.xml").unlink()
    with pytest.raises(DatasetError) as ei:
        load_voc(root, "trainval")
    msg = _one_line(ei)
    assert "b.xml" in msg and "annotation file not found" in msg


def test_unparseable_xml(tmp_path):
    root = make_voc(tmp_path, {"a": []})
    (root / "Annotations" / "a.xml").write_text("<annotation><object><name>cat</name>\n<oops")
    with pytest.raises(DatasetError) as ei:
        load_voc(root, "trainval")
    msg = _one_line(ei)
    assert "a.xml" in msg and "cannot parse XML" in msg


def test_non_numeric_coordinate(tmp_path):
    root = make_voc(tmp_path, {"a": [("cat", (1, "abc", 5, 5), 0, 0)]})
    with pytest.raises(DatasetError) as ei:
        load_voc(root, "trainval")
    msg = _one_line(ei)
    assert "a.xml" in msg and "<ymin>" in msg and "'abc'" in msg and "object 0 (cat)" in msg


def test_missing_coordinate_and_bndbox(tmp_path):
    root = make_voc(tmp_path, {"a": []})
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>4</xmax></bndbox></object></annotation>")
    with pytest.raises(DatasetError, match=r"a\.xml: object 0 \(cat\): <bndbox> has no <ymax>"):
        load_voc(root, "trainval")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>cat</name></object></annotation>")
    with pytest.raises(DatasetError, match=r"a\.xml: object 0 \(cat\) has no <bndbox>"):
        load_voc(root, "trainval")


def test_bad_difficult_flag(tmp_path):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), "maybe", 0)]})
    with pytest.raises(DatasetError, match=r"a\.xml: object 0 \(cat\): <difficult> is not 0 or 1"):
        load_voc(root, "trainval")


def test_missing_image_error_and_skip(tmp_path, caplog):
    root = make_voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0)], "b": [("dog", (1, 1, 5, 5), 0, 0)]})
    (root / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(ImageDecodeError) as ei:
        load_voc(root, "trainval")
    msg = _one_line(ei)
    assert "a.jpg" in msg and "image file not found" in msg
    with caplog.at_level(logging.WARNING):
        ds = load_voc(root, "trainval", skip_bad_images=True)
    assert [r.image_id for r in ds] == ["b"]
    assert "skipping image a" in caplog.text
    # discovered classes come from the images that were kept
    assert ds.classes == list(VOC_CLASSES)


def test_corrupt_image_error_and_skip(tmp_path, caplog):
    root = make_voc(tmp_path, {"a": [], "b": []})
    (root / "JPEGImages" / "b.jpg").write_bytes(b"definitely not an image")
    with pytest.raises(ImageDecodeError, match=r"b\.jpg: not a recognised image format"):
        load_voc(root, "trainval")
    with caplog.at_level(logging.WARNING):
        ds = load_voc(root, "trainval", skip_bad_images=True)
    assert [r.image_id for r in ds] == ["a"] and "b.jpg" in caplog.text


def test_all_images_skipped_is_an_error(tmp_path):
    root = make_voc(tmp_path, {"a": []})
    (root / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match="no usable images"):
        load_voc(root, "trainval", skip_bad_images=True)


# ----------------------------------------------------------------------------
# Writer, load_dataset, dataset_from_config


def test_xml_writer_roundtrip(tmp_path):
    root = make_voc(tmp_path, {"a": [("cat", (1, 2, 10, 20), 1, 0), ("dog", (3, 4, 40, 30), 0, 1)]})
    ds = load_voc(root, "trainval")
    text = voc_xml_string(ds[0], ds.classes)
    assert "<xmin>1</xmin>" in text and "<ymax>20</ymax>" in text
    (root / "Annotations" / "a.xml").write_text(text)
    again = load_voc(root, "trainval")[0]
    np.testing.assert_array_equal(again.boxes, ds[0].boxes)
    np.testing.assert_array_equal(again.difficult, ds[0].difficult)
    np.testing.assert_array_equal(again.truncated, ds[0].truncated)
    np.testing.assert_array_equal(again.labels, ds[0].labels)


def test_load_dataset_and_config(tmp_path):
    root = make_voc(tmp_path / "v", {"a": [("cat", (1, 1, 5, 5), 0, 0)]})
    assert load_dataset(root, "trainval").classes == list(VOC_CLASSES)
    with pytest.raises(DatasetError, match="unknown dataset format 'yolo'"):
        load_dataset(root, "trainval", format="yolo")
    cfg = DataConfig(root=str(root), classes=["cat"])
    ds = dataset_from_config(cfg, "trainval")
    assert ds.classes == ["cat"] and len(ds) == 1
    # root override
    ds = dataset_from_config(DataConfig(root="/nonexistent"), "trainval", root=root)
    assert len(ds) == 1
    with pytest.raises(DatasetError) as ei:
        dataset_from_config(DataConfig(), "trainval")
    assert "--data" in _one_line(ei)
    with pytest.raises(DatasetError) as ei:
        dataset_from_config(DataConfig(root=str(tmp_path / "gone")), "trainval")
    assert "gone" in _one_line(ei) and "--data" in str(ei.value)


def test_parse_speed_many_xml(tmp_path):
    """Parses 500 XMLs (5 objects each); prints the rate (no timing assertion)."""
    objs = [("car", (1 + i, 1 + i, 20 + i, 15 + i), i % 2, 0) for i in range(5)]
    ids = {f"{i:06d}": objs for i in range(500)}
    root = tmp_path / "many"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "000000.jpg")
    data = (root / "JPEGImages" / "000000.jpg").read_bytes()
    for i in ids:
        (root / "Annotations" / f"{i}.xml").write_text(_xml(objs))
        (root / "JPEGImages" / f"{i}.jpg").write_bytes(data)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids))
    t = time.perf_counter()
    ds = load_voc(root, "trainval")
    dt = time.perf_counter() - t
    print(f"load_voc: {len(ds)} images in {dt:.3f} s")
    assert len(ds) == 500 and sum(r.num_objects for r in ds) == 2500
    assert sum(int(r.difficult.sum()) for r in ds) == 1000


# ----------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)


def test_shared_voc2007_fixture5():
    ds = load_voc(shared_dataset("voc2007_fixture5"), "trainval")
    assert len(ds) == 5 and ds.classes == list(VOC_CLASSES)
    assert sum(r.num_objects for r in ds) == 17
    assert sum(int(r.difficult.sum()) for r in ds) == 2
    assert sum(int(r.truncated.sum()) for r in ds) == 5
    r = ds.by_id()["000001"]
    assert (r.width, r.height) == (353, 500)
    # 000001.xml: dog 48 240 195 371, person 8 12 352 498 (VOC 1-based)
    np.testing.assert_array_equal(r.boxes, [[47, 239, 195, 371], [7, 11, 352, 498]])
    assert [ds.classes[i] for i in r.labels] == ["dog", "person"]


def test_shared_voc2012_sample100():
    root = shared_dataset("voc2012_sample100")
    tv, te = load_voc(root, "trainval"), load_voc(root, "test")
    assert (len(tv), len(te)) == (80, 20)
    assert sum(r.num_objects for r in tv) + sum(r.num_objects for r in te) == 273
    assert sum(int(r.difficult.sum()) for r in tv) + sum(int(r.difficult.sum()) for r in te) == 38
    for r in tv:
        assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 2] <= r.width).all()
        assert (r.boxes[:, 1] >= 0).all() and (r.boxes[:, 3] <= r.height).all()


def test_shared_raccoon():
    root = shared_dataset("raccoon")
    ds = load_voc(root, "trainval")
    assert ds.classes == ["raccoon"] and len(ds) == 160
    assert sum(r.num_objects for r in ds) == 173
    assert sum(int(r.truncated.sum()) for r in ds) + sum(
        int(r.truncated.sum()) for r in load_voc(root, "test")) == 59
