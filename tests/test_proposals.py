"""Selective search core and presets (sppdet.proposals.selective_search / presets)."""

from __future__ import annotations

import numpy as np
import pytest

from sppdet.errors import ConfigError
from sppdet.proposals import PRESETS, Preset, fallback_windows, get_preset, opencv_selective_search, selective_search
from sppdet.proposals.presets import parse_override
from sppdet.proposals.selective_search import (convert_colour, rank_boxes, rects_to_boxes,
                                               resize_for_segmentation)

# A small, cheap preset for tests: one scale, two colour spaces, two thresholds.
TINY = Preset(name="tiny", colour_spaces=("hsv", "lab"), ks=(50.0, 150.0), min_segment=20,
              strategies=("cfst", "fst"), max_sides=(0,), min_box_size=2.0, demote_iou=0.9)


def scene(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A textured background with three coloured rectangles (deterministic)."""
    rng = np.random.default_rng(seed)
    img = (rng.integers(0, 30, size=(h, w, 3)) + np.array([90, 110, 70])).astype(np.uint8)
    img[10:50, 12:60] = (220, 40, 40)
    img[40:90, 70:120] = (30, 60, 200)
    img[60:80, 20:45] = (240, 230, 30)
    return img


def one_rectangle(h: int = 300, w: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A plain image with one big rectangle; returns (image, its box in internal coords)."""
    img = np.full((h, w, 3), (200, 200, 200), np.uint8)
    x1, y1, x2, y2 = 103, 57, 311, 233  # pixel columns 103..310, rows 57..232
    img[y1:y2, x1:x2] = (20, 40, 160)
    return img, np.array([x1, y1, x2, y2], np.float64)


def iou_ref(a, b) -> float:
    """Slow, obvious IoU of two (x1, y1, x2, y2) boxes (continuous convention)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# ---------------------------------------------------------------------------
# Output contract


def test_deterministic_order_even_after_opencv_stock_runs():
    img = scene()
    a = selective_search(img, TINY, 2000)
    opencv_selective_search(img, "fast")  # advances the C library's rand() that OpenCV ranks with
    b = selective_search(img.copy(), TINY, 2000)
    assert a.dtype == np.float32 and a.shape[1] == 4 and len(a) > 10
    np.testing.assert_array_equal(a, b)


def test_boxes_in_bounds_valid_unique():
    img = scene(90, 70, seed=3)
    boxes = selective_search(img, TINY, 2000)
    h, w = img.shape[:2]
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert np.all(boxes[:, 2] - boxes[:, 0] >= TINY.min_box_size)
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    # the hierarchy's root is the whole image, found by every run: ranked first
    np.testing.assert_array_equal(boxes[0], [0, 0, w, h])


def test_max_boxes_is_a_prefix_of_the_full_ranking():
    img = scene()
    full = selective_search(img, TINY, 0)
    for k in (1, 7, 40):
        capped = selective_search(img, TINY, k)
        assert len(capped) == min(k, len(full))
        np.testing.assert_array_equal(capped, full[:k])


def test_rectangle_found_exactly_at_full_size_and_mapped_back_when_downscaled():
    img, rect = one_rectangle()
    full = get_preset(TINY, max_sides=(0,), min_box_size=0.0)
    small = get_preset(TINY, max_sides=(100,), min_box_size=0.0)  # 4x smaller segmentation image
    ref = selective_search(img, full, 0)
    assert max(iou_ref(b, rect) for b in ref) == 1.0  # a box is exactly the rectangle
    got = selective_search(img, small, 0)
    best = max(got, key=lambda b: iou_ref(b, rect))
    assert iou_ref(best, rect) > 0.95
    # each side within one segmentation pixel (4 original pixels) of the true edge
    assert np.all(np.abs(best - rect) <= 4.0 + 1e-4), best
    assert np.all(got[:, 2] <= img.shape[1]) and np.all(got[:, 3] <= img.shape[0])


def test_rects_to_boxes_against_loop_reference():
    rng = np.random.default_rng(1)
    rects = np.c_[rng.integers(0, 50, (20, 2)), rng.integers(1, 30, (20, 2))]
    sx, sy, W, H = 2.5, 1.75, 110, 80
    got = rects_to_boxes(rects, sx, sy, W, H)
    for (x, y, w, h), b in zip(rects, got):
        ref = [min(max(x * sx, 0), W), min(max(y * sy, 0), H),
               min(max((x + w) * sx, 0), W), min(max((y + h) * sy, 0), H)]
        np.testing.assert_allclose(b, ref, rtol=0, atol=1e-4)


def test_resize_for_segmentation_factors():
    img = np.zeros((375, 500, 3), np.uint8)
    small, sx, sy = resize_for_segmentation(img, 250)
    assert small.shape[:2] == (188, 250)
    assert sx == 500 / 250 and sy == 375 / 188
    same, sx1, sy1 = resize_for_segmentation(img, 0)
    assert same is img and sx1 == sy1 == 1.0
    same2, _, _ = resize_for_segmentation(img, 600)  # never enlarges
    assert same2.shape == img.shape


def test_duplicate_runs_merge_without_changing_set_or_order():
    img = scene(seed=5)
    single = get_preset(TINY, colour_spaces=("hsv",))
    doubled = get_preset(TINY, colour_spaces=("hsv", "hsv"))  # every box produced twice
    a = selective_search(img, single, 0)
    b = selective_search(img, doubled, 0)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(b, axis=0)) == len(b)


def test_extra_runs_are_runs_like_the_product():
    img = scene(seed=2)
    product = Preset(colour_spaces=("hsv", "lab"), ks=(80.0,), strategies=("cfst",), min_segment=20)
    extra = Preset(colour_spaces=("hsv",), ks=(80.0,), strategies=("cfst",), min_segment=20,
                   extra_runs=("0:lab:80:cfst",))
    assert extra.num_runs == 2 and extra.runs()[1] == (0, "lab", 80.0, "cfst")
    np.testing.assert_array_equal(selective_search(img, product, 0), selective_search(img, extra, 0))
    for bad in ("300:hsv:100", "x:hsv:100:cfst", "300:cmyk:100:cfst", "300:hsv:-1:cfst", "300:hsv:100:cq",
                "8:hsv:100:cfst"):
        with pytest.raises(ConfigError, match="extra_runs"):
            Preset(extra_runs=(bad,))


def test_strategies_joined_by_plus_share_one_segmentation_and_union_their_boxes():
    from sppdet.proposals.selective_search import grouping_run

    img = convert_colour(scene(seed=4), "hsv")

    def rect_set(strategy):
        return {tuple(r) for r in grouping_run(img, 60.0, 0.8, 20, strategy).tolist()}

    joined = rect_set("fst+cfst+s")
    assert joined == rect_set("fst") | rect_set("cfst") | rect_set("s")
    assert len(joined) > len(rect_set("fst"))
    # one run, one vote: the joined run ranks its boxes as one run
    p = Preset(colour_spaces=("hsv",), ks=(60.0,), strategies=("fst+cfst+s",), min_segment=20)
    assert p.num_runs == 1 and p.runs()[0][3] == "fst+cfst+s"
    assert p.key() != Preset(colour_spaces=("hsv",), ks=(60.0,), strategies=("fst", "cfst", "s"),
                             min_segment=20).key()
    assert Preset(extra_runs=("0:lab:80:cfst+f",)).runs()[-1] == (0, "lab", 80.0, "cfst+f")
    for bad in ("fst+", "+fst", "fst+fst", "fst+cx", "ff+s"):
        with pytest.raises(ConfigError, match="strategy"):
            Preset(strategies=(bad,))
        with pytest.raises(ConfigError, match="extra_runs"):
            Preset(extra_runs=(f"0:hsv:100:{bad}",))


# ---------------------------------------------------------------------------
# Ranking against a slow reference


def rank_reference(boxes, votes, a, thr):
    """Sort by (-score, -area, x1, y1, x2, y2), then move near-duplicates to the back."""
    items = []
    for i, (b, v) in enumerate(zip(boxes.astype(np.float64), votes)):
        area = (b[2] - b[0]) * (b[3] - b[1])
        items.append((-(np.log(v) + a * np.log(area)), -area, b[0], b[1], b[2], b[3], i))
    order = [t[-1] for t in sorted(items)]
    if thr >= 1.0:
        return order
    kept, rest = [], []
    for i in order:
        if all(iou_ref(boxes[i].astype(np.float64), boxes[j].astype(np.float64)) <= thr for j in kept):
            kept.append(i)
        else:
            rest.append(i)
    return kept + rest


@pytest.mark.parametrize("a,thr", [(0.5, 1.0), (0.5, 0.7), (0.0, 0.9), (1.0, 0.5)])
def test_rank_boxes_matches_reference(a, thr):
    rng = np.random.default_rng(7)
    xy = rng.integers(0, 40, (60, 2))
    wh = rng.integers(1, 25, (60, 2))
    boxes = np.unique(np.c_[xy, xy + wh].astype(np.float32), axis=0)
    votes = rng.integers(1, 5, len(boxes))
    got = rank_boxes(boxes, votes, a, thr)
    assert sorted(got.tolist()) == list(range(len(boxes)))
    assert got.tolist() == rank_reference(boxes, votes, a, thr)


# ---------------------------------------------------------------------------
# Never empty


def test_zero_boxes_falls_back_to_whole_image_and_grid():
    img = scene(6, 9)
    p = get_preset(TINY, min_box_size=50.0)  # nothing on a 9x6 image survives this
    boxes = selective_search(img, p, 2000)
    np.testing.assert_array_equal(boxes, fallback_windows(9, 6))
    np.testing.assert_array_equal(boxes[0], [0, 0, 9, 6])
    assert selective_search(img, p, 3).shape == (3, 4)


@pytest.mark.parametrize("w,h", [(1, 1), (2, 3), (500, 375)])
def test_fallback_windows_valid(w, h):
    b = fallback_windows(w, h)
    assert b.dtype == np.float32 and len(b) >= 1
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    assert np.all(b >= 0) and np.all(b[:, 2] <= w) and np.all(b[:, 3] <= h)
    assert len(np.unique(b, axis=0)) == len(b)
    if w >= 3 and h >= 3:
        assert len(b) == 1 + 4 + 9 + 1


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="RGB"):
        selective_search(np.zeros((10, 10), np.uint8), TINY)
    with pytest.raises(ValueError, match="RGB"):
        selective_search(np.zeros((10, 10, 3), np.float32), TINY)


def test_colour_conversions():
    img = scene()
    import cv2

    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    np.testing.assert_array_equal(convert_colour(img, "h"), hsv[:, :, 0])
    rgi = convert_colour(img, "rgi")
    np.testing.assert_array_equal(rgi[:, :, :2], img[:, :, :2])
    np.testing.assert_array_equal(rgi[:, :, 2], cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    assert convert_colour(img, "gray").ndim == 2


# ---------------------------------------------------------------------------
# Presets


def test_presets_exist_and_keys_are_stable():
    assert {"fast", "quality", "opencv-fast", "opencv-quality"} <= set(PRESETS)
    for name in PRESETS:
        p = get_preset(name)
        assert p.key() == get_preset(name).key() and len(p.key()) == 16
    keys = {get_preset(n).key() for n in PRESETS}
    assert len(keys) == len(PRESETS)
    # the name is a label only; settings decide the key
    a = get_preset("fast")
    b = Preset(**{**{f: getattr(a, f) for f in a.__dataclass_fields__}, "name": "other"})
    assert a.key() == b.key()
    assert get_preset("fast", ks=(10.0, 20.0)).key() != a.key()
    # lists and tuples, ints and floats give the same settings
    assert Preset(ks=[150, 300, 450]).key() == Preset(ks=(150.0, 300.0, 450.0)).key()


def test_previous_default_kept_as_fast_300_with_its_cache_key():
    # "fast" changed in issue 15; "fast-300" is the previous default, setting for setting, so
    # configs and caches made with it keep their boxes (this key is the old "fast" store key).
    old = get_preset("fast-300")
    assert old.key() == "a1ecf8b225cdca30"
    assert old.max_sides == (300,) and old.num_runs == 14
    new = get_preset("fast")
    assert new.key() != old.key() and new.num_runs == 5
    # the new default segments at up to 500 px: a VOC-sized image is segmented at its own size
    img = scene(120, 160, seed=6)
    np.testing.assert_array_equal(selective_search(img, get_preset(new, ks=(30.0,)), 0),
                                  selective_search(img, get_preset(new, ks=(30.0,), max_sides=(0,)), 0))


def test_preset_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown proposal preset"):
        get_preset("bogus")
    with pytest.raises(ConfigError, match="unknown"):
        get_preset("fast", nonsense=1)
    with pytest.raises(ConfigError, match="colour space"):
        get_preset("fast", colour_spaces=("cmyk",))
    with pytest.raises(ConfigError, match="strategy"):
        get_preset("fast", strategies=("cx",))
    with pytest.raises(ConfigError, match="max_sides"):
        get_preset("fast", max_sides=(8,))
    with pytest.raises(ConfigError, match="demote_iou"):
        get_preset("fast", demote_iou=0.0)


def test_parse_override_types():
    assert parse_override("ks=50,100") == ("ks", (50.0, 100.0))
    assert parse_override("max_sides=300") == ("max_sides", (300,))
    assert parse_override("colour_spaces=hsv,lab") == ("colour_spaces", ("hsv", "lab"))
    assert parse_override("min_segment=25") == ("min_segment", 25)
    assert parse_override("demote_iou=0.9") == ("demote_iou", 0.9)
    assert parse_override("extra_runs=300:hsv:100:cfst,0:lab:50:f") == ("extra_runs", ("300:hsv:100:cfst",
                                                                                       "0:lab:50:f"))
    for bad in ("ks", "nope=1", "min_segment=2.5", "ks=a,b"):
        with pytest.raises(ConfigError):
            parse_override(bad)


# ---------------------------------------------------------------------------
# Halves of small boxes (`split_below`)


def halves_ref(boxes, split_below, min_box_size):
    """Slow, obvious reference of add_halves: the boxes, then each small box's new halves."""
    out = [tuple(float(v) for v in b) for b in boxes]
    seen = set(out)
    for x1, y1, x2, y2 in list(out):
        if ((x2 - x1) * (y2 - y1)) ** 0.5 >= split_below:
            continue
        xm = float(np.float32((np.float32(x1) + np.float32(x2)) / np.float32(2)))
        for h in ((x1, y1, xm, y2), (xm, y1, x2, y2)):
            w, ht = h[2] - h[0], h[3] - h[1]
            if w > 0 and w >= min_box_size and ht >= min_box_size and h not in seen:
                seen.add(h)
                out.append(h)
    return np.array(out, np.float32).reshape(-1, 4)


@pytest.mark.parametrize("seed,split_below,min_box", [(0, 48.0, 10.0), (1, 20.0, 0.0), (2, 1e9, 4.0), (3, 0.5, 0.0)])
def test_add_halves_matches_reference(seed, split_below, min_box):
    from sppdet.proposals.selective_search import add_halves

    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 60, size=(40, 2)).astype(np.float32)
    wh = rng.integers(1, 70, size=(40, 2)).astype(np.float32)
    boxes = np.unique(np.concatenate([xy, xy + wh], 1), axis=0)
    # a box that is exactly the left half of another: its half must not appear twice
    boxes = np.concatenate([boxes, [[0, 0, 20, 30], [0, 0, 10, 30]]]).astype(np.float32)
    got = add_halves(boxes, split_below, min_box)
    np.testing.assert_array_equal(got, halves_ref(boxes, split_below, min_box))
    np.testing.assert_array_equal(got[:len(boxes)], boxes)
    assert len(np.unique(got, axis=0)) == len(got)


def test_split_below_adds_halves_after_the_same_ranking_and_keeps_the_cap():
    img = scene(seed=4)
    plain = selective_search(img, TINY, 0)
    split = selective_search(img, get_preset(TINY, split_below=40.0), 0)
    np.testing.assert_array_equal(split[:len(plain)], plain)  # the ranked boxes are untouched
    extra = split[len(plain):]
    assert len(extra) > 0
    # every extra box is the left or right half of a small ranked box
    small = plain[np.sqrt((plain[:, 2] - plain[:, 0]) * (plain[:, 3] - plain[:, 1])) < 40.0]
    mid = (small[:, 0] + small[:, 2]) / 2
    halves = {tuple(b) for b in np.concatenate([np.stack([small[:, 0], small[:, 1], mid, small[:, 3]], 1),
                                                np.stack([mid, small[:, 1], small[:, 2], small[:, 3]], 1)])}
    assert all(tuple(b) in halves for b in extra)
    capped = selective_search(img, get_preset(TINY, split_below=40.0), len(plain) + 3)
    np.testing.assert_array_equal(capped, split[:len(plain) + 3])
    # a cap below the ranked boxes leaves no room: the same boxes as without splitting
    np.testing.assert_array_equal(selective_search(img, get_preset(TINY, split_below=40.0), 10), plain[:10])


def test_split_off_keeps_earlier_store_keys_and_fast_split_uses_it():
    # `split_below` was added after stores were written: off, it is not part of the key
    before = {"fast": "8fc4fe302d60c65b",  # the key of `fast` before split_below existed
              "fast-rgi": "8c96c53f46a3c267", "fast-300": "a1ecf8b225cdca30", "quality": "3d1efd35efe87986",
              "opencv-fast": "1c2faa4ec22045d7", "opencv-quality": "bbbb45084199f2f2"}
    assert {n: get_preset(n).key() for n in before} == before
    assert get_preset("fast-split").split_below > 0 and get_preset("fast-split").key() != get_preset("fast").key()
    assert get_preset("fast-split", split_below=0.0).key() == get_preset("fast").key()
    with pytest.raises(ConfigError, match="split_below"):
        get_preset("fast", split_below=-1.0)
