"""Proposal recall (sppdet.proposals.recall) and the ``sppdet recall`` / ``sppdet bench proposals`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_proposal_store import PRESET, write_voc

from sppdet.cli import main
from sppdet.data import load_dataset
from sppdet.data.records import Dataset, ImageRecord
from sppdet.proposals import compute_proposals, compute_recall, plot_recall

THR = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def iou_ref(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def recall_reference(dataset, store, thresholds, ks, include_difficult=False):
    """Slow, obvious loops: best IoU per counted object, with all boxes and with the first k."""
    best_all, best_k = [], []
    for rec in dataset.records:
        props = store.get(rec.image_id, np.zeros((0, 4)))
        for box, diff in zip(rec.boxes, rec.difficult):
            if diff and not include_difficult:
                continue
            ious = [iou_ref(box, p) for p in props]
            best_all.append(max(ious, default=0.0))
            best_k.append([max(ious[:k], default=0.0) for k in ks])
    best_all = np.array(best_all)
    best_k = np.array(best_k)
    recall = [sum(b >= t for b in best_all) / len(best_all) for t in thresholds]
    recall_k = [[sum(b >= t for b in best_k[:, j]) / len(best_all) for t in thresholds] for j in range(len(ks))]
    return np.array(recall), np.array(recall_k), len(best_all)


def random_dataset(seed: int = 0):
    rng = np.random.default_rng(seed)
    records, store = [], {}
    for i in range(6):
        w, h = 120, 90
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (n, 2))
        wh = rng.uniform(8, 40, (n, 2))
        gt = np.c_[xy, xy + wh]
        diff = rng.random(n) < 0.3
        rec = ImageRecord(f"im{i}", Path(f"im{i}.jpg"), w, h, gt, np.zeros(n, np.int64), diff)
        records.append(rec)
        if i == 4:
            continue  # no proposals for this image at all
        m = 0 if i == 5 else int(rng.integers(5, 40))
        pxy = rng.uniform(0, 70, (m, 2))
        pwh = rng.uniform(5, 50, (m, 2))
        props = np.c_[pxy, pxy + pwh].astype(np.float32)
        # a few near-perfect windows so high thresholds are exercised
        if n and m:
            props[: min(n, m)] = (gt[: min(n, m)] + rng.normal(0, 1.0, (min(n, m), 4))).astype(np.float32)
            props = props[rng.permutation(m)]
        store[f"im{i}"] = props
    return Dataset("rand", "x", ["a"], records), store


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("include_difficult", [False, True])
def test_recall_matches_loop_reference(seed, include_difficult):
    ds, store = random_dataset(seed)
    ks = [1, 3, 10, 25]
    res = compute_recall(ds, store, THR, ks, include_difficult=include_difficult)
    recall, recall_k, n = recall_reference(ds, store, THR, ks, include_difficult)
    assert res.num_gt == n > 0
    np.testing.assert_allclose(res.recall, recall, atol=1e-12)
    np.testing.assert_allclose(res.recall_at_k, recall_k, atol=1e-12)
    assert res.recall_50 == pytest.approx(recall[0]) and res.recall_70 == pytest.approx(recall[4])
    assert res.average_recall == pytest.approx(np.mean(recall))
    assert res.missing == ["im4"]
    assert res.num_images == 5
    assert res.mean_boxes == pytest.approx(np.mean([len(store[k]) for k in store]))


def test_ground_truth_as_proposals_gives_recall_one():
    ds, _ = random_dataset(3)
    store = {r.image_id: r.boxes for r in ds.records}
    res = compute_recall(ds, store, include_difficult=True)
    assert np.all(res.recall == 1.0) and res.average_recall == 1.0


def test_iou_exactly_at_threshold_counts():
    gt = np.array([[0, 0, 10, 10], [20, 0, 27, 10]], np.float32)
    props = np.array([[0, 0, 10, 20],      # IoU 100/200 = 0.5 with the first
                      [20, 0, 30, 10]],    # IoU 70/100 = 0.7 with the second
                     np.float32)
    ds = Dataset("t", "t", ["a"], [ImageRecord("a", Path("a.jpg"), 40, 30, gt, [0, 0], [False, False])])
    res = compute_recall(ds, {"a": props})  # default thresholds come from np.arange (0.7000000000000002)
    assert res.recall_50 == 1.0 and res.recall_70 == 0.5  # both reach 0.5; the second reaches 0.7
    assert res.recall_at(0.55) == 0.5 and res.recall_at(0.75) == 0.0
    assert dict(zip(np.round(res.iou_thresholds, 2), res.recall))[0.7] == 0.5


def test_difficult_excluded_by_default():
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    ds = Dataset("t", "t", ["a"], [ImageRecord("a", Path("a.jpg"), 80, 80, gt, [0, 0], [False, True])])
    store = {"a": np.array([[0, 0, 10, 10]], np.float32)}
    assert compute_recall(ds, store).recall_50 == 1.0
    assert compute_recall(ds, store, include_difficult=True).recall_50 == 0.5


def test_plots_are_png(tmp_path):
    ds, store = random_dataset(0)
    paths = plot_recall({"a": compute_recall(ds, store), "b": compute_recall(ds, {})}, tmp_path / "plots")
    assert [p.name for p in paths] == ["recall_vs_iou.png", "recall_vs_boxes.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


# ---------------------------------------------------------------------------
# Commands


def test_cli_recall_json_matches_library(tmp_path, capsys):
    voc = write_voc(tmp_path / "voc")
    ds = load_dataset(voc, "train")
    store = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "p.npz", progress=False)
    expected = compute_recall(ds, store)
    assert main(["recall", "--data", str(voc), "--split", "train", "--proposals", str(store.path), "--json",
                 "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    d = json.loads(out)
    assert d["recall@0.5"] == pytest.approx(expected.recall_50) and d["num_gt"] == expected.num_gt == 7
    assert d["recall@0.7"] == pytest.approx(expected.recall_70)
    assert d["average_recall"] == pytest.approx(expected.average_recall)
    assert d["mean_boxes_per_image"] == pytest.approx(store.mean_boxes, abs=1e-3)
    assert set(d["recall_vs_iou"]) == {f"{t:.2f}" for t in THR}
    assert (tmp_path / "plots" / "recall_vs_boxes.png").exists()


def test_cli_recall_computes_proposals_when_not_given(tmp_path, capsys):
    voc = write_voc(tmp_path / "voc")
    rc = main(["recall", "--data", str(voc), "--split", "train", "--workers", "1", "--cache", str(tmp_path / "c"),
               "--set", "proposals.overrides.max_sides=[64]", "--max-boxes", "30"])
    out = capsys.readouterr().out
    assert rc == 0 and "recall@0.5" in out and "AR" in out
    assert list((tmp_path / "c" / "proposals").rglob("*.npz"))


def test_cli_recall_bad_proposals_file(tmp_path, capsys):
    voc = write_voc(tmp_path / "voc")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    rc = main(["recall", "--data", str(voc), "--split", "train", "--proposals", str(bad)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("sppdet: error:")]
    assert rc == 2 and len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in err


def test_bench_proposals_json(tmp_path, capsys):
    voc = write_voc(tmp_path / "voc", n=2)
    assert main(["bench", "proposals", "--data", str(voc), "--split", "train", "--presets", "fast",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["images"] == 2 and [r["preset"] for r in d["results"]] == ["opencv-stock-fast", "fast"]
    for r in d["results"]:
        assert r["s_per_img_cpu"] > 0 and 0 <= r["recall@0.5"] <= 1 and r["boxes_per_img"] > 0


def test_fast_preset_on_real_voc_images(tmp_path):
    """Real VOC2007 images end to end: boxes valid in each image's pixels, recall near stock OpenCV's.

    Measured (docs/PROPOSALS.md): fast 14/15 = 0.933 at IoU 0.5 (fast-300 13/15), OpenCV stock fast 14/15.
    """
    from conftest import shared_dataset

    ds = load_dataset(shared_dataset("voc2007_fixture5"), "test")
    store = compute_proposals(ds, "fast", 2000, workers=1, out=tmp_path / "p.npz", progress=False)
    for r in ds:
        b = store[r.image_id]
        assert 100 < len(b) <= 2000
        assert np.all(b[:, 2] <= r.width) and np.all(b[:, 3] <= r.height) and np.all(b >= 0)
    res = compute_recall(ds, store)
    assert res.num_gt == 15 and res.recall_50 >= 0.8
