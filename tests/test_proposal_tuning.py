"""The per-run cache used to tune presets (sppdet.proposals.tuning, bench proposals --run-cache)."""

from __future__ import annotations

import numpy as np

from sppdet.proposals import Preset, selective_search
from sppdet.proposals.tuning import STOCK_FAST_RUN, RunCache, run_key, selective_search_cached

from test_proposals import scene

TINY = Preset(name="tiny", colour_spaces=("hsv", "lab"), ks=(50.0, 150.0), min_segment=20,
              strategies=("fst",), max_sides=(0, 64), extra_runs=("0:hsv:100:cfst",),
              min_box_size=2.0, demote_iou=0.9)


def test_cached_boxes_identical_to_uncached_and_runs_computed_once(tmp_path):
    img = scene(96, 128, seed=1)
    h, w = img.shape[:2]
    decodes = []

    def image():
        decodes.append(1)
        return img

    cache = RunCache(tmp_path / "rc")
    a, sec = selective_search_cached(cache, "img1", image, w, h, TINY, 40)
    np.testing.assert_array_equal(a, selective_search(img, TINY, 40))
    assert cache.computed == TINY.num_runs and cache.reused == 0 and sec > 0
    # a second preset sharing runs reuses them; the image is not decoded again when all are cached
    other = Preset(name="other", colour_spaces=("hsv",), ks=(50.0,), min_segment=20, strategies=("fst",),
                   max_sides=(0,), min_box_size=2.0, demote_iou=0.9)
    decodes.clear()
    b, _ = selective_search_cached(cache, "img1", image, w, h, other, 0)
    np.testing.assert_array_equal(b, selective_search(img, other, 0))
    assert cache.computed == TINY.num_runs and decodes == []
    # a run whose max_side is at least the image's size is the original-size run: shared
    n = cache.computed
    big = Preset(name="big", colour_spaces=("hsv",), ks=(50.0,), min_segment=20, strategies=("fst",),
                 max_sides=(max(h, w),), min_box_size=2.0, demote_iou=0.9)
    d, _ = selective_search_cached(cache, "img1", image, w, h, big, 0)
    np.testing.assert_array_equal(d, selective_search(img, big, 0))
    assert cache.computed == n
    # a fresh cache object on the same folder reads everything back
    cache2 = RunCache(tmp_path / "rc")
    c, _ = selective_search_cached(cache2, "img1", image, w, h, TINY, 40)
    np.testing.assert_array_equal(c, a)
    assert cache2.computed == 0 and cache2.reused == TINY.num_runs


def test_run_key_separates_settings_and_corrupt_files_are_recomputed(tmp_path):
    run = (0, "hsv", 50.0, "fst")
    assert run_key(run, 0.8, 20) != run_key(run, 0.8, 21)
    assert run_key(run, 0.8, 20) != run_key((0, "hsv", 50.0, "cfst"), 0.8, 20)
    assert run_key(run, 0.8, 20) != run_key(STOCK_FAST_RUN, 0.8, 20)
    img = scene(64, 80, seed=2)
    cache = RunCache(tmp_path)
    boxes, _ = cache.get("k", lambda: img, run, 0.8, 20)
    path = tmp_path / "k" / f"{run_key(run, 0.8, 20)}.npz"
    path.write_bytes(b"not a zip")
    again, _ = cache.get("k", lambda: img, run, 0.8, 20)
    # a run's rects come in OpenCV's pseudo-random order: compare the sets
    np.testing.assert_array_equal(np.unique(again, axis=0), np.unique(boxes, axis=0))
    assert cache.computed == 2


def test_bench_run_cache_gives_the_same_boxes_and_recall_and_reuses_runs(tmp_path, capsys):
    import json

    from test_proposal_store import write_voc

    from sppdet.cli import main

    voc = write_voc(tmp_path / "voc", n=2)
    args = ["bench", "proposals", "--data", str(voc), "--split", "train", "--presets", "fast", "--json",
            "--variant", "small fast max_sides=64 extra_runs="]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    cached = []
    for _ in range(2):
        assert main(args + ["--run-cache", str(tmp_path / "rc")]) == 0
        cached.append(json.loads(capsys.readouterr().out))
    assert cached[0]["run_cache"]["computed"] > 0
    assert cached[1]["run_cache"]["computed"] == 0 and cached[1]["run_cache"]["reused"] > 0
    assert cached[0]["timing"].startswith("estimated") and plain["timing"].startswith("measured")
    for d in cached:
        for a, b in zip(plain["results"], d["results"]):
            assert a["preset"] == b["preset"]
            # (OpenCV's stock order is pseudo-random, so its first-K figures may differ)
            keys = ("boxes_per_img", "recall@0.5", "recall@0.7", "AR") + (
                () if a["preset"] == "opencv-stock-fast" else ("AR_first100", "recall@0.5_first500"))
            for k in keys:
                assert a[k] == b[k], (a["preset"], k)
            assert b["s_per_img_cpu"] > 0
    # --shard picks every N-th image
    assert main(args + ["--shard", "2/2"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
