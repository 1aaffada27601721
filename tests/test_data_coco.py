"""COCO-format reader and writer (through pycocotools), and a VOC -> COCO -> Dataset round trip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dataset
from sppdet.config import DataConfig
from sppdet.build import dataset_from_config
from sppdet.data import load_coco, load_dataset, load_voc, write_coco
from sppdet.errors import DatasetError, ImageDecodeError


def _images(d: Path, sizes: dict[str, tuple[int, int]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (10, 20, 30)).save(d / name)


def _coco(tmp_path: Path, annotations, categories=None, images=None) -> Path:
    img_dir = tmp_path / "images"
    _images(img_dir, {"a.jpg": (50, 40), "b.png": (30, 20)})
    data = {
        "images": images if images is not None else [
            {"id": 7, "file_name": "a.jpg", "width": 50, "height": 40},
            {"id": 3, "file_name": "b.png", "width": 30, "height": 20},
        ],
        "annotations": annotations,
        "categories": categories if categories is not None else [
            {"id": 5, "name": "zebra"}, {"id": 2, "name": "apple"}],
    }
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(data))
    return p


def _ann(i, image_id, cat, bbox, iscrowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


def test_read_boxes_labels_crowd(tmp_path):
    p = _coco(tmp_path, [
        _ann(1, 7, 5, [1.5, 2.0, 10.0, 20.0]),
        _ann(2, 7, 2, [0, 0, 50, 40], iscrowd=1),
        _ann(3, 3, 2, [4, 5, 6, 7]),
    ])
    ds = load_coco(p, tmp_path / "images")
    # categories in increasing id order: apple (2) -> 0, zebra (5) -> 1
    assert ds.classes == ["apple", "zebra"]
    assert [r.image_id for r in ds] == ["7", "3"]
    a, b = ds
    # reference: [x, y, w, h] -> (x, y, x + w, y + h), no pixel shift
    np.testing.assert_allclose(a.boxes, [[1.5, 2, 11.5, 22], [0, 0, 50, 40]])
    assert list(a.labels) == [1, 0] and list(a.difficult) == [False, True]
    assert not a.truncated.any()
    np.testing.assert_allclose(b.boxes, [[4, 5, 10, 12]])
    assert (a.width, a.height, b.width, b.height) == (50, 40, 30, 20)
    assert b.path == tmp_path / "images" / "b.png"


def test_given_classes_by_name(tmp_path):
    p = _coco(tmp_path, [_ann(1, 7, 5, [1, 2, 3, 4]), _ann(2, 3, 2, [1, 2, 3, 4])])
    ds = load_coco(p, tmp_path / "images", classes=["zebra", "apple"])
    assert [int(r.labels[0]) for r in ds] == [0, 1]
    with pytest.raises(DatasetError) as ei:
        load_coco(p, tmp_path / "images", classes=["apple"])
    msg = str(ei.value)
    assert "instances.json" in msg and "'zebra'" in msg and "\n" not in msg


def test_unknown_category_id(tmp_path):
    p = _coco(tmp_path, [_ann(1, 7, 99, [1, 2, 3, 4])])
    with pytest.raises(DatasetError) as ei:
        load_coco(p, tmp_path / "images")
    assert "instances.json" in str(ei.value) and "unknown category id 99" in str(ei.value)


def test_unknown_image_id(tmp_path):
    p = _coco(tmp_path, [_ann(1, 1234, 5, [1, 2, 3, 4])])
    with pytest.raises(DatasetError, match="unknown image id 1234"):
        load_coco(p, tmp_path / "images")


def test_zero_area_dropped_and_clipped_with_warnings(tmp_path, caplog):
    p = _coco(tmp_path, [
        _ann(1, 7, 5, [1, 2, 0, 4]),        # zero width
        _ann(2, 7, 5, [40, 30, 20, 20]),    # partly outside 50x40 -> clipped
        _ann(3, 7, 2, [5, 5, 5, 5]),
    ])
    with caplog.at_level(logging.WARNING):
        r = load_coco(p, tmp_path / "images")[0]
    np.testing.assert_allclose(r.boxes, [[40, 30, 50, 40], [5, 5, 10, 10]])
    assert list(r.labels) == [1, 0]
    dropped = [m.getMessage() for m in caplog.records if ") dropped: box" in m.getMessage()]
    clipped = [m.getMessage() for m in caplog.records if "; clipped to" in m.getMessage()]
    assert len(dropped) == 1 and "instances.json" in dropped[0] and "id 1" in dropped[0]
    assert len(clipped) == 1 and "id 2" in clipped[0]


def test_missing_and_bad_json(tmp_path):
    with pytest.raises(DatasetError) as ei:
        load_coco(tmp_path / "none.json", tmp_path)
    assert "none.json" in str(ei.value) and "not found" in str(ei.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DatasetError) as ei:
        load_coco(bad, tmp_path)
    assert "bad.json" in str(ei.value) and "not valid JSON" in str(ei.value)
    assert "\n" not in str(ei.value)
    notcoco = tmp_path / "list.json"
    notcoco.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="list.json: expected a JSON object"):
        load_coco(notcoco, tmp_path)
    nocats = tmp_path / "nocats.json"
    nocats.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="nocats.json: missing or invalid 'categories'"):
        load_coco(nocats, tmp_path)


def test_non_numeric_bbox(tmp_path):
    p = _coco(tmp_path, [_ann(1, 7, 5, [1, "x", 3, 4])])
    with pytest.raises(DatasetError, match=r"annotation 1: bbox is not 4 numbers"):
        load_coco(p, tmp_path / "images")


def test_missing_image_error_and_skip(tmp_path, caplog):
    p = _coco(tmp_path, [_ann(1, 7, 5, [1, 2, 3, 4]), _ann(2, 3, 5, [1, 2, 3, 4])])
    (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(ImageDecodeError) as ei:
        load_coco(p, tmp_path / "images")
    assert "a.jpg" in str(ei.value) and "no such image file" in str(ei.value)
    with caplog.at_level(logging.WARNING):
        ds = load_coco(p, tmp_path / "images", skip_bad_images=True)
    assert [r.image_id for r in ds] == ["3"] and "a.jpg" in caplog.text


def test_json_size_disagreement_warns(tmp_path, caplog):
    p = _coco(tmp_path, [], images=[{"id": 1, "file_name": "a.jpg", "width": 99, "height": 40}])
    with caplog.at_level(logging.WARNING):
        r = load_coco(p, tmp_path / "images")[0]
    assert (r.width, r.height) == (50, 40) and "99x40" in caplog.text


def _voc_fixture(root: Path) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    objs = {
        "000001": [("cat", 1, 1, 10, 20, 0), ("dog", 5, 6, 60, 30, 1)],
        "000002": [],
        "000003": [("dog", 2, 3, 4, 5, 0)],
    }
    for i, os_ in objs.items():
        xml = "<annotation><size><width>64</width><height>48</height></size>"
        for n, a, b, c, d, diff in os_:
            xml += (f"<object><name>{n}</name><difficult>{diff}</difficult><bndbox><xmin>{a}</xmin>"
                    f"<ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>")
        (root / "Annotations" / f"{i}.xml").write_text(xml + "</annotation>")
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(objs))
    return root


def test_voc_coco_roundtrip(tmp_path):
    root = _voc_fixture(tmp_path / "voc")
    voc = load_voc(root, "test")
    out = write_coco(voc, tmp_path / "test.json", image_dir=root / "JPEGImages")
    # pycocotools itself can read it
    from pycocotools.coco import COCO
    api = COCO(str(out))
    assert len(api.getImgIds()) == 3 and len(api.getAnnIds()) == 3
    back = load_coco(out, root / "JPEGImages", classes=voc.classes)
    assert back.classes == voc.classes and len(back) == len(voc)
    for a, b in zip(voc, back):
        assert a.path == b.path and (a.width, a.height) == (b.width, b.height)
        np.testing.assert_allclose(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.difficult, b.difficult)
    data = json.loads(out.read_text())
    assert [im["sppdet_image_id"] for im in data["images"]] == ["000001", "000002", "000003"]
    # VOC 000001 cat: xmin=1 ymin=1 xmax=10 ymax=20 -> COCO [0, 0, 10, 20]
    assert data["annotations"][0]["bbox"] == [0.0, 0.0, 10.0, 20.0]


def test_load_dataset_coco_and_config(tmp_path):
    p = _coco(tmp_path, [_ann(1, 7, 5, [1, 2, 3, 4])])
    ds = load_dataset(tmp_path / "images", "val", format="coco", coco_annotations=p)
    assert ds.split == "val" and len(ds) == 2
    with pytest.raises(DatasetError, match="coco_annotations"):
        load_dataset(tmp_path / "images", "val", format="coco")
    cfg = DataConfig(root=str(tmp_path / "images"), format="coco",
                     coco_annotations={"val": str(p)})
    assert len(dataset_from_config(cfg, "val")) == 2
    with pytest.raises(DatasetError) as ei:
        dataset_from_config(cfg, "train")
    assert "'train'" in str(ei.value) and "have: val" in str(ei.value)


def test_shared_voc2012_roundtrip(tmp_path):
    root = shared_dataset("voc2012_sample100")
    voc = load_voc(root, "test")
    out = write_coco(voc, tmp_path / "t.json", image_dir=root / "JPEGImages")
    back = load_coco(out, root / "JPEGImages", classes=voc.classes)
    assert sum(r.num_objects for r in back) == sum(r.num_objects for r in voc)
    for a, b in zip(voc, back):
        np.testing.assert_allclose(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
