"""Synthetic data set: determinism (hashes), VOC validity, sanity of the ground truth, CLI."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from sppdet.cli import main
from sppdet.data import load_image, load_voc
from sppdet.data.images import image_size
from sppdet.data.synthetic import (
    _C, _MARGIN, DIFFICULT_MIN_SIDE, SYNTHETIC_CLASSES, SyntheticSettings, _class_object, _homography, _warp,
    make_synthetic, render_image,
)
from sppdet.errors import ConfigError, DatasetError

N = 40


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "shapes", num_images=N, seed=7)


def test_byte_identical_for_same_seed(synth, tmp_path):
    again = make_synthetic(tmp_path / "other_name", num_images=N, seed=7)
    assert _hashes(again) == _hashes(synth)
    assert len(_hashes(synth)) == 2 * N + 4  # xml + jpg per image, 2 splits, README, manifest
    other = make_synthetic(tmp_path / "seed8", num_images=N, seed=8)
    h7, h8 = _hashes(synth), _hashes(other)
    assert sum(h7[k] != h8[k] for k in h7 if k.startswith("JPEGImages")) == N


def test_voc_layout_and_splits(synth):
    tv, te = load_voc(synth, "trainval"), load_voc(synth, "test")
    assert tv.classes == list(SYNTHETIC_CLASSES) == te.classes  # discovery gives the label order
    ids_tv, ids_te = {r.image_id for r in tv}, {r.image_id for r in te}
    assert not ids_tv & ids_te and len(ids_tv | ids_te) == N
    assert len(te) == round(N * 0.5)
    readme = (synth / "README.txt").read_text()
    for c in SYNTHETIC_CLASSES:
        assert c in readme
    assert "seed: 7" in readme


def test_ground_truth_sanity(synth):
    tv, te = load_voc(synth, "trainval"), load_voc(synth, "test")
    for ds in (tv, te):
        present = set(np.concatenate([r.labels for r in ds]).tolist())
        assert present == set(range(len(SYNTHETIC_CLASSES))), "every class in both splits"
    records = tv.records + te.records
    n_obj = [r.num_objects for r in records]
    assert min(n_obj) == 0 and max(n_obj) <= 5
    assert any(r.difficult.any() for r in records)
    assert any(r.truncated.any() for r in records)
    for r in records:
        assert 320 <= r.width <= 480 and 240 <= r.height <= 360
        assert image_size(r.path) == (r.width, r.height)
        b = r.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= r.width).all() and (b[:, 3] <= r.height).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        # integer-aligned boxes (tight boxes of pixels), so VOC files round-trip exactly
        np.testing.assert_array_equal(b, np.round(b))
        small = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) < DIFFICULT_MIN_SIDE
        assert r.difficult[small].all(), "tiny objects are difficult"
    sides = np.concatenate([np.maximum(r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1])
                            for r in records])
    assert sides.min() < 30 and sides.max() > 150, "small to large objects"


def test_colour_does_not_identify_the_class(synth):
    """Leave-one-out nearest class mean on (mean R, G, B, luma std) of the box is near chance."""
    X, Y = [], []
    for split in ("trainval", "test"):
        for r in load_voc(synth, split):
            img = load_image(r.path).astype(np.float64)
            for b, lab, d in zip(r.boxes.astype(int), r.labels, r.difficult):
                if d:
                    continue
                crop = img[b[1]:b[3], b[0]:b[2]].reshape(-1, 3)
                luma = crop @ np.array([0.299, 0.587, 0.114])
                X.append([*crop.mean(axis=0), luma.std()])
                Y.append(int(lab))
    X, Y = np.array(X), np.array(Y)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    correct = 0
    for i in range(len(Y)):  # slow, obvious leave-one-out nearest centroid
        best, best_d = -1, math.inf
        for c in range(len(SYNTHETIC_CLASSES)):
            sel = (Y == c) & (np.arange(len(Y)) != i)
            d = float(((X[i] - X[sel].mean(axis=0)) ** 2).sum())
            if d < best_d:
                best, best_d = c, d
        correct += best == Y[i]
    acc = correct / len(Y)
    assert len(Y) > 60
    assert acc < 0.4, f"colour statistics classify {acc:.0%} of the objects (chance is 20%)"


def test_colours_vary_within_class(synth):
    means = {c: [] for c in range(len(SYNTHETIC_CLASSES))}
    for r in load_voc(synth, "trainval"):
        img = load_image(r.path).astype(np.float64)
        for b, lab in zip(r.boxes.astype(int), r.labels):
            means[int(lab)].append(img[b[1]:b[3], b[0]:b[2]].reshape(-1, 3).mean(axis=0))
    for c, m in means.items():
        assert np.std(np.array(m), axis=0).mean() > 20, SYNTHETIC_CLASSES[c]


def test_warp_box_matches_reference():
    """An unrotated, unjittered square (checker) maps onto the box (cx +- s/2, cy +- s/2)."""
    rng = np.random.default_rng(0)
    label = SYNTHETIC_CLASSES.index("checker")
    mask, tex = _class_object(label, rng, None)
    # reference: the canonical square spans pixels [_MARGIN, _C - 1 - _MARGIN] of the canvas
    assert mask[_C // 2, _MARGIN + 1] > 0.99 and mask[_C // 2, _MARGIN - 2] == 0
    for cx, cy, s in [(100.0, 80.0, 60.0), (57.5, 200.25, 33.0)]:
        H = _homography(rng, cx, cy, s, 1.0, 0.0, 0.0)
        wp = _warp(mask, tex, H)
        ys, xs = np.nonzero(wp.alpha > 0.5)
        x1, x2 = wp.x0 + xs.min(), wp.x0 + xs.max() + 1
        y1, y2 = wp.y0 + ys.min(), wp.y0 + ys.max() + 1
        assert abs(x1 - (cx - s / 2)) <= 1.0 and abs(x2 - (cx + s / 2)) <= 1.0
        assert abs(y1 - (cy - s / 2)) <= 1.0 and abs(y2 - (cy + s / 2)) <= 1.0


def test_render_image_deterministic_and_boxes_cover_changed_pixels():
    s = SyntheticSettings(num_images=4, seed=3, clutter=0.0)
    a, objs = render_image(s, 2, [0, 1, 2])
    b, objs_b = render_image(s, 2, [0, 1, 2])
    np.testing.assert_array_equal(a, b)
    assert [o.box for o in objs] == [o.box for o in objs_b] and len(objs) >= 1
    empty, none = render_image(s, 2, [])
    assert none == [] and empty.shape == a.shape
    # outside every object's (visible) box the image equals the object-free render
    # up to sensor noise, which is drawn after the objects and so differs in stream position
    inside = np.zeros(a.shape[:2], bool)
    for o in objs:
        x1, y1, x2, y2 = (int(v) for v in o.box)
        inside[y1:y2, x1:x2] = True
        assert 0 < o.visible_fraction <= 1 and 0 < o.inside_fraction <= 1
    diff = np.abs(a.astype(int) - empty.astype(int)).max(axis=2)
    assert np.median(diff[inside]) > np.median(diff[~inside]) + 10


def test_reuse_and_repair(tmp_path):
    out = make_synthetic(tmp_path / "s", num_images=4, seed=1)
    before = _hashes(out)
    jpg = out / "JPEGImages" / "000002.jpg"
    mtime = jpg.stat().st_mtime_ns
    make_synthetic(out, num_images=4, seed=1)          # same settings: reused, not rewritten
    assert jpg.stat().st_mtime_ns == mtime
    jpg.write_bytes(jpg.read_bytes()[:100])            # damage a file: detected and rebuilt
    make_synthetic(out, num_images=4, seed=1)
    assert _hashes(out) == before
    make_synthetic(out, num_images=5, seed=1)          # other settings: replaced
    assert len(load_voc(out, "trainval")) + len(load_voc(out, "test")) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left"


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError) as ei:
        make_synthetic(tmp_path / "mine", num_images=4)
    assert "mine" in str(ei.value) and "not a synthetic data set" in str(ei.value)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("kw,opt", [({"num_images": 1}, "--images"),
                                    ({"num_images": 10, "test_fraction": 1.0}, "--test-fraction"),
                                    ({"num_images": 3, "test_fraction": 0.05}, "--test-fraction"),
                                    ({"num_images": 4, "seed": -1}, "--seed")])
def test_bad_settings(tmp_path, kw, opt):
    with pytest.raises(ConfigError) as ei:
        make_synthetic(tmp_path / "x", **kw)
    assert str(ei.value).startswith(opt) and "\n" not in str(ei.value)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["-q", "make-synthetic", "--out", str(out), "--images", "6", "--seed", "2",
                 "--test-fraction", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "trainval: 3 images" in text and "test: 3 images" in text
    assert main(["-q", "make-synthetic", "--out", str(tmp_path / "bad"), "--images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sppdet: error: --images")
