"""scripts/faster_rcnn_peer.py: a few iterations end to end, one JSON line, files only under --out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "faster_rcnn_peer.py"
FIXTURE = ROOT.parent / "shared" / "data" / "voc2007_fixture5"


def _script():
    spec = importlib.util.spec_from_file_location("faster_rcnn_peer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """voc2007_fixture5 when it is there, else a tiny synthetic VOC-format set."""
    if FIXTURE.is_dir():
        return FIXTURE
    from sppdet.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("peer") / "data", num_images=6, seed=3)


def test_peer_runs_a_few_iterations_and_prints_one_json_line(data_root, tmp_path):
    from sppdet.data.records import Dataset
    from sppdet.evaluation.voc import evaluate_voc_results

    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, SPPDET_PROGRESS="0", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    before = sorted(p.relative_to(data_root) for p in Path(data_root).rglob("*"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data_root), "--out", str(out),
                           "--max-iterations", "2", "--batch-size", "1", "--min-size", "256", "--max-size", "320",
                           "--warmup-iters", "1", "--threads", "1", "--test-limit", "2"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    res = json.loads(lines[0])
    assert set(res) == {"mAP", "per_class", "train_s", "iterations", "test_s_per_image"}
    train, test = _script().load_splits(data_root, "trainval", "test")
    assert list(res["per_class"]) == train.classes == test.classes
    assert res["iterations"] == 2 and res["train_s"] > 0 and res["test_s_per_image"] > 0
    assert res["mAP"] is None or 0.0 <= res["mAP"] <= 1.0
    # written only under --out: nothing in the working directory, the data untouched
    assert not any(work.iterdir())
    assert sorted(p.relative_to(data_root) for p in Path(data_root).rglob("*")) == before
    assert {p.name for p in tmp_path.iterdir()} == {"work", "out"}
    assert {"result.json", "error_breakdown.json", "results"} <= {p.name for p in out.iterdir()}
    # the printed mAP is sppdet's VOC07 evaluator on the results files it wrote
    test = Dataset(test.name, test.split, test.classes, test.records[:2], test.root)
    ev = evaluate_voc_results(test, out / "results", "voc07").to_json()
    assert res["mAP"] == ev["mAP"] and res["per_class"] == ev["ap"]
    saved = json.loads((out / "result.json").read_text())
    assert saved["mAP"] == res["mAP"] and saved["settings"]["max_iterations"] == 2


def test_backbone_is_lite0_with_frozen_batchnorm_and_stem():
    peer = _script()
    args = peer.parse_args(["--data", "d", "--out", "o", "--max-iterations", "1"])
    model = peer.build_model(3, args)
    body = model.backbone
    assert body.out_channels == 320 and body.net.name == "lite0" and body.net.weights_source == "imagenet"
    model.train()
    assert model.training and model.rpn.training and not body.net.training
    assert not any(m.training for m in body.net.modules())          # BatchNorm statistics frozen
    frozen = {n for n, p in body.net.named_parameters() if not p.requires_grad}
    assert all(n in frozen for n, _ in body.net._conv_stem.named_parameters(prefix="_conv_stem"))
    assert any(n.startswith("_blocks.3.") for n, p in body.net.named_parameters() if p.requires_grad)
    assert not any(n.startswith("_blocks.2.") for n, p in body.net.named_parameters() if p.requires_grad)
    assert all("_bn" not in n for n, p in body.net.named_parameters() if p.requires_grad)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4       # 3 classes + background
    gen = model.rpn.anchor_generator
    assert gen.sizes == ((32, 64, 128, 256, 512),) and gen.num_anchors_per_location() == [15]


def test_learning_rate_warms_up_then_steps_down():
    peer = _script()
    args = peer.parse_args(["--data", "d", "--out", "o", "--minutes", "1", "--warmup-iters", "10"])
    assert peer.lr_factor(0, 0.0, args) == pytest.approx(0.001)
    assert peer.lr_factor(5, 0.1, args) == pytest.approx(0.001 * 0.5 + 0.5)
    assert peer.lr_factor(10, 0.5, args) == 1.0 and peer.lr_factor(500, 0.8, args) == pytest.approx(0.1)


def test_mirrored_sample_boxes_cover_the_mirrored_object(tmp_path):
    """The flipped target box is where the object's pixels are in the flipped image."""
    from sppdet.data.records import ImageRecord

    peer = _script()
    img = np.zeros((40, 64, 3), np.uint8)
    img[5:20, 10:30] = (255, 0, 0)                         # rows 5..19, columns 10..29
    Image.fromarray(img).save(tmp_path / "a.png")
    rec = ImageRecord("a", tmp_path / "a.png", 64, 40,
                      np.array([[10, 5, 30, 20], [0, 0, 4, 4]], np.float32), np.array([0, 1]),
                      np.array([False, True]))
    x, t = peer.training_sample(rec, True, "cpu")
    red = np.argwhere(x[0].numpy() > 0.5)                  # (row, column) of the red pixels
    want = [red[:, 1].min(), red[:, 0].min(), red[:, 1].max() + 1, red[:, 0].max() + 1]
    assert t["boxes"].tolist() == [want] and t["labels"].tolist() == [1]     # difficult one left out
    x, t = peer.training_sample(rec, False, "cpu")
    assert t["boxes"].tolist() == [[10, 5, 30, 20]]


def test_training_stops_at_the_wall_clock_budget(tmp_path):
    """--minutes: the loop runs until the budget is spent (at least one iteration), then stops."""
    import torch

    from sppdet.data.records import ImageRecord

    peer = _script()
    img = np.full((96, 128, 3), 40, np.uint8)
    img[20:70, 30:90] = (220, 200, 30)
    Image.fromarray(img).save(tmp_path / "a.png")
    rec = ImageRecord("a", tmp_path / "a.png", 128, 96, np.array([[30, 20, 90, 70]], np.float32), np.array([0]))
    args = peer.parse_args(["--data", "d", "--out", "o", "--minutes", "0.01", "--min-size", "96",
                            "--max-size", "128", "--batch-size", "1", "--warmup-iters", "1"])
    model = peer.build_model(1, args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds, iterations, _ = peer.train(model, [rec], args, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert iterations >= 1 and seconds >= 0.6
