"""Results other tools read (COCO results JSON beside the VOC files) and streaming detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sppdet.data.records import Dataset, ImageRecord

CLASSES = ["checker", "cross", "ring", "star", "triangle"]


def _gt_dataset(tmp_path: Path, ids=("000007", "000003", "000010")) -> Dataset:
    recs = []
    rng = np.random.default_rng(3)
    for n, iid in enumerate(ids):
        k = 2 + n
        xy = rng.uniform(0, 60, size=(k, 2))
        wh = rng.uniform(5, 40, size=(k, 2))
        boxes = np.round(np.concatenate([xy, xy + wh], 1), 2)
        labels = rng.integers(0, len(CLASSES), size=k)
        difficult = np.zeros(k, bool)
        difficult[0] = n == 1
        recs.append(ImageRecord(iid, tmp_path / f"{iid}.jpg", 120, 100, boxes, labels, difficult))
    return Dataset("toy", "test", list(CLASSES), recs, root=tmp_path)


def _oracle(ds: Dataset) -> dict:
    """The ground truth fed back as detections (score 1 - 0.01 * object index)."""
    return {r.image_id: {"boxes": r.boxes, "labels": r.labels,
                         "scores": 1.0 - 0.01 * np.arange(r.num_objects)} for r in ds}


def _cocoeval(gt, dt) -> float:
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(gt, dt, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def _load(index: Path, results: Path):
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(index))
        dt = gt.loadRes(str(results))
    return gt, dt


def test_voc_ids_are_split_positions_and_oracle_scores_ap_1(tmp_path):
    """VOC data: image i of the split -> id i + 1, class k -> k + 1 (as --metric coco scores it);
    pycocotools reads the written files and the ground truth fed back scores AP 1."""
    from sppdet.evaluation.coco import coco_ground_truth, coco_ids, write_coco_results

    ds = _gt_dataset(tmp_path)
    ids, cats = coco_ids(ds)
    assert ids == {"000007": 1, "000003": 2, "000010": 3} and cats == [1, 2, 3, 4, 5]
    res, idx = write_coco_results(tmp_path / "out", ds, _oracle(ds), results_name="r.json", index_name="i.json")
    gt, dt = _load(idx, res)
    assert _cocoeval(gt, dt) == pytest.approx(1.0)
    # the index is the same ground truth evaluate_coco scores against
    assert _cocoeval(coco_ground_truth(ds), coco_ground_truth(ds).loadRes(json.loads(res.read_text()))) \
        == pytest.approx(1.0)
    index = json.loads(idx.read_text())
    assert [(i["id"], i["sppdet_image_id"], i["file_name"]) for i in index["images"]] == \
        [(1, "000007", "000007.jpg"), (2, "000003", "000003.jpg"), (3, "000010", "000010.jpg")]
    assert index["categories"] == [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]
    # every result: internal (x1, y1, x2, y2) -> [x1, y1, x2 - x1, y2 - y1]
    rows = json.loads(res.read_text())
    r0 = ds.records[0]
    first = [d for d in rows if d["image_id"] == 1]
    assert len(first) == r0.num_objects
    x1, y1, x2, y2 = (float(v) for v in r0.boxes[0])
    assert first[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-5)   # float32 boxes, 2 decimals
    assert first[0]["category_id"] == int(r0.labels[0]) + 1 and first[0]["score"] == 1.0


def test_a_wrong_detection_lowers_ap_so_the_oracle_can_fail(tmp_path):
    from sppdet.evaluation.coco import write_coco_results

    ds = _gt_dataset(tmp_path)
    dets = _oracle(ds)
    d = dets["000010"]
    d["boxes"] = d["boxes"].copy()
    d["boxes"][0] += 30.0                                   # moved off its object
    res, idx = write_coco_results(tmp_path, ds, dets, results_name="r.json", index_name="i.json")
    assert _cocoeval(*_load(idx, res)) < 0.99


def test_coco_data_keeps_its_own_image_and_category_ids(tmp_path):
    """A COCO instances file with sparse ids: results use the file's ids and score AP 1 against
    the user's own file, read by pycocotools."""
    from PIL import Image

    from sppdet.data.coco import load_coco
    from sppdet.evaluation.coco import evaluate_coco, write_coco_results

    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns = [], []
    for n, iid in enumerate((42, 7, 1001)):
        Image.new("RGB", (90, 70), (n * 40, 90, 30)).save(img_dir / f"im{iid}.png")
        images.append({"id": iid, "file_name": f"im{iid}.png", "width": 90, "height": 70})
        for j, cat in enumerate((17, 3)[: n + 1]):
            anns.append({"id": len(anns) + 10, "image_id": iid, "category_id": cat,
                         "bbox": [5.0 + 10 * j, 6.0, 30.5, 20.25], "area": 30.5 * 20.25, "iscrowd": 0})
    cats = [{"id": 17, "name": "zebra"}, {"id": 3, "name": "ant"}]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    ds = load_coco(ann_file, img_dir, classes=["zebra", "ant"])
    res, _ = write_coco_results(tmp_path / "out", ds, _oracle(ds), results_name="r.json", index_name="i.json")
    rows = json.loads(res.read_text())
    assert {d["image_id"] for d in rows} == {42, 7, 1001} and {d["category_id"] for d in rows} == {17, 3}
    gt, dt = _load(ann_file, res)                          # the user's own file
    assert _cocoeval(gt, dt) == pytest.approx(1.0)
    assert evaluate_coco(ds, _oracle(ds)).mAP == pytest.approx(1.0)


# ---------------------------------------------------------------------------- a tiny detector


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A detector with random weights (nothing trained), saved as a checkpoint, and synthetic data."""
    from sppdet.checkpoint import save_detector
    from sppdet.config import Config, merge
    from sppdet.data.synthetic import make_synthetic
    from sppdet.models.backbones import build_backbone
    from sppdet.models.detector import SPPDetector
    from sppdet.models.heads import FCHead
    from sppdet.models.svm import LinearSVMs

    root = tmp_path_factory.mktemp("tiny")
    cfg = merge(Config(), {"features": {"backbone": "zf5", "weights": "random", "pyramid": [2, 1],
                                        "scales": [96], "max_side": 128},
                           "proposals": {"max_boxes": 40, "workers": 1},
                           "finetune": {"fc_dims": [8, 8]}, "test": {"score_threshold": None}})
    rng = np.random.default_rng(0)
    bb = build_backbone("zf5", "random")
    dim = bb.out_channels * 5
    torch.manual_seed(0)
    head = FCHead(dim, [8, 8], len(CLASSES), 0.5).eval()
    svms = LinearSVMs(rng.normal(size=(8, len(CLASSES))), rng.normal(size=len(CLASSES)), 0.7)
    model = SPPDetector(classes=list(CLASSES), backbone=bb, features=cfg.features, svms=svms, head=head,
                        bbox_reg=None, svm_features="fc7", test=cfg.test, feature_dim=dim,
                        backbone_weights="random", stats={})
    ckpt = save_detector(root / "model.pt", model, cfg)
    data = make_synthetic(root / "data", num_images=8, seed=2)
    return {"ckpt": ckpt, "data": data, "root": root}


def test_eval_writes_coco_results_holding_the_voc_files_detections(tiny, tmp_path, single_thread):
    """eval: coco_det_<split>.json has exactly the detections of the comp4 files (same boxes as
    written, same scores), loads with pycocotools against coco_gt_<split>.json, and COCOeval on
    those files gives the mAP `--metric coco` printed."""
    from sppdet.data.voc import load_voc
    from sppdet.eval_checkpoint import evaluate_checkpoint
    from sppdet.evaluation.coco import voc_results_to_detections
    from sppdet.evaluation.voc import read_voc_results

    res = tmp_path / "res"
    ev = evaluate_checkpoint(tiny["ckpt"], tiny["data"], "test", metric="coco", results_dir=res, device="cpu",
                             cache_dir=tiny["root"] / "cache", show_progress=False)
    ds = load_voc(tiny["data"], "test", classes=CLASSES)
    gt, dt = _load(res / "coco_gt_test.json", res / "coco_det_test.json")
    assert _cocoeval(gt, dt) == pytest.approx(ev.result.mAP, abs=1e-12)
    assert sum(len(d.scores) for d in ev.detections.values()) > 0
    voc = voc_results_to_detections(read_voc_results(res, "test", CLASSES, image_ids=[r.image_id for r in ds]),
                                    CLASSES)
    pos = {r.image_id: n for n, r in enumerate(ds.records, 1)}
    from_voc = sorted((pos[i], int(lab) + 1, float(s), *np.round(b, 6))
                      for i, d in voc.items() for b, s, lab in zip(d["boxes"], d["scores"], d["labels"]))
    rows = json.loads((res / "coco_det_test.json").read_text())
    from_coco = sorted((d["image_id"], d["category_id"], d["score"],
                        *np.round([d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                                   d["bbox"][1] + d["bbox"][3]], 6)) for d in rows)
    assert len(from_coco) == len(from_voc) == sum(len(d.scores) for d in ev.detections.values())
    for a, b in zip(from_coco, from_voc):
        assert a[:3] == b[:3] and np.allclose(a[3:], b[3:], atol=1e-6)
    # the ground truth file is the split, its ids the split positions
    idx = json.loads((res / "coco_gt_test.json").read_text())
    assert [i["sppdet_image_id"] for i in idx["images"]] == [r.image_id for r in ds.records]
    assert len(idx["annotations"]) == sum(r.num_objects for r in ds.records)


def test_detect_many_with_prefetch_equals_one_by_one(tiny, single_thread):
    from sppdet.data.images import load_image
    from sppdet.detect import Detector

    det = Detector.from_checkpoint(tiny["ckpt"], device="cpu", cache_dir=tiny["root"] / "cache2")
    paths = sorted((tiny["data"] / "JPEGImages").glob("*.jpg"))[:4]
    one = [det(p) for p in paths]
    array = load_image(paths[1])
    items = [paths[0], array, paths[2], paths[3]]
    many = list(det.detect_many(iter(items), threads=2, ahead=2))   # a generator: consumed lazily
    assert [im is x for (im, _), x in zip(many, items)] == [True] * 4
    for (_, got), ref in zip(many, one):
        assert set(got) == {"boxes", "scores", "labels"}
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])
    assert sum(len(r["scores"]) for r in one) > 0


def test_detect_many_skips_a_corrupt_image_or_raises(tiny, tmp_path, single_thread):
    from sppdet.detect import Detector
    from sppdet.errors import ImageDecodeError

    det = Detector.from_checkpoint(tiny["ckpt"], device="cpu", cache_dir=tiny["root"] / "cache2")
    paths = sorted((tiny["data"] / "JPEGImages").glob("*.jpg"))[:2]
    bad = tmp_path / "bad.jpg"
    data = paths[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])               # a valid header, truncated pixel data
    out = list(det.detect_many([paths[0], bad, paths[1]], skip_bad_images=True, threads=2))
    assert [p for p, _ in out] == [paths[0], bad, paths[1]]
    assert isinstance(out[1][1], ImageDecodeError) and str(bad) in str(out[1][1])
    assert isinstance(out[0][1], dict) and isinstance(out[2][1], dict)
    with pytest.raises(ImageDecodeError):
        list(det.detect_many([paths[0], bad, paths[1]]))


def test_detect_cli_streams_reports_a_corrupt_image_once_and_writes_coco(tiny, tmp_path, capsys, caplog):
    """`sppdet detect DIR --format coco`: a truncated image in the middle of the folder is reported
    once (one stderr line, nothing logged) and skipped; the others have their JSON, the same
    detections as the Python API, and the COCO results file loads with pycocotools."""
    import shutil

    from sppdet.cli import main
    from sppdet.detect import Detector

    folder = tmp_path / "imgs"
    folder.mkdir()
    src = sorted((tiny["data"] / "JPEGImages").glob("*.jpg"))[:3]
    names = ["a.jpg", "b.jpg", "d.jpg"]
    for s, n in zip(src, names):
        shutil.copy(s, folder / n)
    data = src[0].read_bytes()
    (folder / "bz.jpg").write_bytes(data[:300])                   # its header cannot be read
    (folder / "c.jpg").write_bytes(data[: len(data) // 2])        # header fine, pixel data truncated
    out = tmp_path / "det"
    capsys.readouterr()
    args = ["detect", "--checkpoint", str(tiny["ckpt"]), str(folder), "--out", str(out), "--threshold", "-100",
            "--format", "coco", "--no-draw", "--device", "cpu", "--workers", "2", "--cache", str(tmp_path / "c")]
    rc = main(args)                                                # default verbosity: warnings shown
    cap = capsys.readouterr()
    assert rc == 2
    for name in ("bz.jpg", "c.jpg"):
        assert cap.err.count(name) == 1 and name not in cap.out
        assert not [r for r in caplog.records if name in r.getMessage()]
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json", "coco_det.json", "coco_images.json",
                                                     "d.json"]
    det = Detector.from_checkpoint(tiny["ckpt"], device="cpu", cache_dir=tmp_path / "c2")
    index = json.loads((out / "coco_images.json").read_text())
    assert [(i["id"], Path(i["file_name"]).name) for i in index["images"]] == [(1, "a.jpg"), (2, "b.jpg"),
                                                                              (5, "d.jpg")]
    rows = json.loads((out / "coco_det.json").read_text())
    for img in index["images"]:
        ref = det(folder / Path(img["file_name"]).name)
        mine = json.loads((out / (Path(img["file_name"]).stem + ".json")).read_text())["detections"]
        assert [d["score"] for d in mine] == [round(float(s), 5) for s in ref["scores"]]
        got = [d for d in rows if d["image_id"] == img["id"]]
        assert sorted(d["score"] for d in got) == sorted(float(s) for s in ref["scores"])
    gt, dt = _load(out / "coco_images.json", out / "coco_det.json")
    assert len(dt.getAnnIds()) == len(rows) > 0
    # a rerun reuses the cached proposals (none computed) and gives the same files
    from sppdet.detect import detect_images, iter_image_paths

    before = (out / "coco_det.json").read_text()
    det = Detector.from_checkpoint(tiny["ckpt"], device="cpu", cache_dir=tmp_path / "c")
    res = list(detect_images(det, iter_image_paths([str(folder)]), out, threshold=-100, draw=False, coco=True,
                             show_progress=False))
    assert [p.name for p, r in res if isinstance(r, Exception)] == ["bz.jpg", "c.jpg"]
    assert "proposals" not in det.timer.seconds and det.timer.images == 3
    assert (out / "coco_det.json").read_text() == before


def test_prefetch_map_keeps_order_and_reads_only_a_few_items_ahead():
    """The loader is bounded: when the first result is handed out, at most ``ahead`` more items
    have been taken from the input (a generator), and results come in input order whatever
    the threads' finishing order."""
    import time

    from sppdet.utils.prefetch import prefetch_map

    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield i

    def work(i):
        time.sleep(0.002 * (5 - i % 5))          # later items finish first
        if i == 7:
            raise ValueError("seven")
        return i * i

    out = []
    for n, (item, fut) in enumerate(prefetch_map(work, items(), ahead=3, threads=3)):
        if n == 0:
            assert len(pulled) <= 1 + 3
        try:
            out.append((item, fut.result()))
        except ValueError as e:
            out.append((item, str(e)))
    assert out == [(i, "seven" if i == 7 else i * i) for i in range(20)]
