"""``sppdet evaluate``: results files in, per-class AP table / one JSON object out, one-line errors.

Runs on a VOC-format fixture generated into tmp_path (so it runs on a fresh
clone) and on ../shared/data/voc2007_fixture5 (skipped when absent).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_dataset
from sppdet.cli import main
from sppdet.data.records import VOC_CLASSES

# image id -> (width, height, [(class, xmin, ymin, xmax, ymax, difficult)])  (VOC 1-based inclusive)
FIXTURE = {
    "img001": (64, 48, [("cat", 1, 1, 30, 40, 0), ("dog", 35, 5, 64, 48, 0)]),
    "img002": (50, 50, [("cat", 10, 10, 20, 20, 0), ("cat", 25, 25, 45, 49, 1)]),
    "img003": (40, 60, [("dog", 2, 3, 39, 58, 0)]),
    "img004": (32, 32, []),
}


def make_voc(root: Path, objects=FIXTURE, split="test") -> Path:
    """A VOC root with JPEGs, XML annotations and ImageSets/Main/<split>.txt."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for iid, (w, h, objs) in objects.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{iid}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{iid}.jpg"
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        for name, x1, y1, x2, y2, diff in objs:
            o = ET.SubElement(ann, "object")
            ET.SubElement(o, "name").text = name
            ET.SubElement(o, "difficult").text = str(diff)
            bb = ET.SubElement(o, "bndbox")
            for tag, v in (("xmin", x1), ("ymin", y1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(bb, tag).text = str(v)
        ET.ElementTree(ann).write(root / "Annotations" / f"{iid}.xml")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in objects))
    return root


def read_xml_objects(root: Path, split: str):
    """image id -> [(class, xmin, ymin, xmax, ymax, difficult)] straight from the XML files."""
    out = {}
    for iid in (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
        objs = []
        for o in ET.parse(root / "Annotations" / f"{iid}.xml").getroot().findall("object"):
            bb = o.find("bndbox")
            d = o.find("difficult")
            objs.append((o.find("name").text.strip(), *(float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")),
                         int(d is not None and d.text.strip() == "1")))
        out[iid] = objs
    return out


def write_gt_results(objects, out: Path, split: str, classes) -> Path:
    """Ground truth as results files: every object (difficult ones too) with score 1.0, VOC coordinates."""
    out.mkdir(parents=True, exist_ok=True)
    for c in classes:
        lines = [f"{iid} 1.0 {x1:g} {y1:g} {x2:g} {y2:g}\n"
                 for iid, objs in objects.items() for name, x1, y1, x2, y2, _ in objs if name == c]
        (out / f"comp4_det_{split}_{c}.txt").write_text("".join(lines))
    return out


def error_lines(err: str) -> list[str]:
    """stderr without the log lines (the CLI logs INFO by default)."""
    return [ln for ln in err.splitlines() if not ln.startswith(("INFO:", "DEBUG:", "WARNING:"))]


def run_json(capsys, *argv) -> dict:
    rc = main(["evaluate", *map(str, argv), "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    lines = cap.out.splitlines()
    assert len(lines) == 1, cap.out                    # exactly one JSON object and nothing else
    return json.loads(lines[0])


@pytest.fixture()
def voc(tmp_path):
    root = make_voc(tmp_path / "VOC")
    res = write_gt_results(read_xml_objects(root, "test"), tmp_path / "results", "test", VOC_CLASSES)
    return root, res


@pytest.mark.parametrize("metric", ["voc07", "voc12", "coco"])
def test_ground_truth_results_give_one(capsys, voc, metric):
    root, res = voc
    out = run_json(capsys, "--data", root, "--split", "test", "--results", res, "--metric", metric)
    assert out["metric"] == metric
    # voc07 sums p/11 eleven times, as MATLAB does: 1.0000000000000002
    assert out["mAP"] == pytest.approx(1.0, abs=1e-12)
    assert set(out["ap"]) == set(VOC_CLASSES)
    assert {c for c, a in out["ap"].items() if a is not None} == {"cat", "dog"}
    assert out["ap"]["cat"] == pytest.approx(1.0, abs=1e-12)
    assert out["npos"]["cat"] == 2 and out["npos"]["dog"] == 2       # the difficult cat is not counted
    assert out["split"] == "test" and out["images"] == 4
    if metric == "coco":
        assert out["AP50"] == pytest.approx(1.0) and out["AP75"] == pytest.approx(1.0)


def test_table_output_and_plots(capsys, voc, tmp_path):
    root, res = voc
    # lose the dog in img003 and add a false cat: cat 2/2 with one FP ranked last, dog 1/2
    (res / "comp4_det_test_cat.txt").write_text(
        (res / "comp4_det_test_cat.txt").read_text() + "img003 0.5 1 1 10 10\n")
    (res / "comp4_det_test_dog.txt").write_text("img001 1.0 35 5 64 48\n")
    plots = tmp_path / "plots"
    rc = main(["evaluate", "--data", str(root), "--split", "test", "--results", str(res), "--metric", "voc12",
               "--plots", str(plots)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = {ln.split()[0]: ln.split()[1:] for ln in cap.out.splitlines() if ln.strip() and ln.split()[0] != "-" * 5}
    assert rows["cat"][:2] == ["1.0000", "2"]
    assert rows["dog"][:2] == ["0.5000", "2"]          # recall .5 at precision 1, then nothing
    assert rows["aeroplane"][:2] == ["-", "0"]
    assert rows["mAP"] == ["0.7500"]
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert pngs == ["overview_pr.png", "pr_cat.png", "pr_dog.png"]
    for p in plots.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert cv2.imread(str(p)) is not None


def test_classes_subset(capsys, voc):
    root, res = voc
    out = run_json(capsys, "--data", root, "--split", "test", "--results", res, "--classes", "dog,cat")
    assert list(out["ap"]) == ["dog", "cat"] and out["mAP"] == pytest.approx(1.0)
    rc = main(["evaluate", "--data", str(root), "--split", "test", "--results", str(res), "--classes", "cat,zebra"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert len(error_lines(cap.err)) == 1
    assert error_lines(cap.err)[0].startswith("sppdet: error: --classes: unknown class zebra")


def bad_cases(res: Path):
    """(what to break, text that the one-line error must contain)."""
    cat = res / "comp4_det_test_cat.txt"
    yield (lambda: cat.write_text("img001 1.0 1 1 30 40\nimg002 0.9 10 10 20\n"), f"{cat}:2: expected")
    yield (lambda: cat.write_text("img001 high 1 1 30 40\n"), f"{cat}:1: non-numeric")
    yield (lambda: cat.write_text("img001 1.0 1 1 30 40\nimg999 1.0 1 1 30 40\n"),
           f"{cat}:2: unrecognized image 'img999'")
    yield (lambda: cat.unlink(), "missing results file comp4_det_test_cat.txt")


def test_bad_results_are_one_line_errors(capsys, voc):
    root, res = voc
    for k, (brk, must) in enumerate(bad_cases(res)):
        write_gt_results(read_xml_objects(root, "test"), res, "test", VOC_CLASSES)
        brk()
        for metric in ("voc07", "coco"):
            rc = main(["evaluate", "--data", str(root), "--split", "test", "--results", str(res),
                       "--metric", metric, "--json"])
            cap = capsys.readouterr()
            assert rc == 2 and cap.out == "", (k, metric)
            err = error_lines(cap.err)
            assert len(err) == 1 and err[0].startswith("sppdet: error: "), cap.err
            assert must in err[0], (must, cap.err)
    rc = main(["evaluate", "--data", str(root), "--split", "test", "--results", str(res / "nowhere")])
    cap = capsys.readouterr()
    assert rc == 2 and "nowhere: results folder not found" in cap.err
    rc = main(["evaluate", "--data", str(root), "--split", "val", "--results", str(res)])
    assert rc == 2 and "val.txt" in capsys.readouterr().err           # the split file is named


def test_subprocess_exit_code_and_no_traceback(voc):
    root, res = voc
    (res / "comp4_det_test_dog.txt").write_text("img003 0.7 2 3 39\n")
    p = subprocess.run([sys.executable, "-m", "sppdet", "-q", "evaluate", "--data", str(root), "--split", "test",
                        "--results", str(res), "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert f"{res / 'comp4_det_test_dog.txt'}:1: expected" in p.stderr


def test_coco_format_dataset(capsys, voc, tmp_path):
    root, res = voc
    # the same ground truth as a COCO instances file (images under root/JPEGImages)
    images, anns = [], []
    cats = ["cat", "dog"]
    for i, (iid, (w, h, objs)) in enumerate(FIXTURE.items(), 1):
        images.append({"id": i, "file_name": f"{iid}.jpg", "width": w, "height": h})
        for name, x1, y1, x2, y2, diff in objs:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cats.index(name) + 1,
                         "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "area": 1.0, "iscrowd": diff})
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": k + 1, "name": c} for k, c in enumerate(cats)]}))
    coco_res = tmp_path / "coco_results"
    coco_res.mkdir()
    for c in cats:                                 # COCO image ids as the results files' image ids
        src = (res / f"comp4_det_test_{c}.txt").read_text().splitlines()
        ids = {iid: str(i) for i, iid in enumerate(FIXTURE, 1)}
        (coco_res / f"comp4_det_test_{c}.txt").write_text(
            "".join(" ".join([ids[ln.split()[0]], *ln.split()[1:]]) + "\n" for ln in src))
    for metric in ("voc07", "coco"):
        out = run_json(capsys, "--data", root / "JPEGImages", "--split", "test", "--results", coco_res,
                       "--format", "coco", "--annotations", ann, "--metric", metric)
        assert out["mAP"] == pytest.approx(1.0, abs=1e-12) and list(out["ap"]) == cats
    rc = main(["evaluate", "--data", str(root), "--split", "test", "--results", str(res), "--format", "coco"])
    assert rc == 2 and "--annotations" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The real VOC2007 fixture (development machines only)


def test_voc2007_fixture5_ground_truth_gives_one(capsys, tmp_path):
    root = shared_dataset("voc2007_fixture5")
    objects = read_xml_objects(root, "test")
    res = write_gt_results(objects, tmp_path / "results", "test", VOC_CLASSES)
    present = {o[0] for objs in objects.values() for o in objs}
    for metric in ("voc07", "voc12"):
        out = run_json(capsys, "--data", root, "--split", "test", "--results", res, "--metric", metric)
        assert out["mAP"] == pytest.approx(1.0, abs=1e-12)
        assert {c for c, a in out["ap"].items() if a is not None} == present
        assert all(out["ap"][c] == pytest.approx(1.0, abs=1e-12) for c in present)
    p = subprocess.run([sys.executable, "-m", "sppdet", "evaluate", "--data", str(root), "--split", "test",
                        "--results", str(res), "--metric", "voc12", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["mAP"] == 1.0
    # an unknown image id: exit 2, one line naming the file and line, no traceback
    (res / "comp4_det_test_dog.txt").write_text("000001 0.9 1 1 10 10\n999999 0.8 1 1 10 10\n")
    p = subprocess.run([sys.executable, "-m", "sppdet", "-q", "evaluate", "--data", str(root), "--split", "test",
                        "--results", str(res)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"sppdet: error: {res / 'comp4_det_test_dog.txt'}:2: "
                                f"unrecognized image '999999' (not in the split)")
