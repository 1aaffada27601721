"""Feature extraction: conv5 caches, scale choice, flips, R-CNN mode, split precompute."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import shared_dataset
from sppdet.boxes import flip_boxes
from sppdet.data.records import ImageRecord
from sppdet.errors import ImageDecodeError
from sppdet.features import FeatureExtractor, context_boxes
from sppdet.models import build_backbone
from sppdet.models.spp import choose_scales, project_windows, resize_factor, spp_pool

SCALES = (64, 96)


pytestmark = pytest.mark.usefixtures("single_thread")


def smooth_image(seed: int, h: int = 90, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def write_png(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def boxes_for(w: int, h: int, n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 4, h - 4], (n, 2))
    wh = rng.uniform(3, [w, h], (n, 2))
    b = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    return np.concatenate([b, [[0, 0, w, h]]])


@pytest.fixture(scope="module")
def zf5():
    return build_backbone("zf5", "random")


def extractor(bb, cache_dir=None, **kw) -> FeatureExtractor:
    kw.setdefault("scales", SCALES)
    kw.setdefault("max_side", 200)
    return FeatureExtractor(bb, cache_dir=cache_dir, **kw)


# ---------------------------------------------------------------------------
# Caches


def test_cache_miss_then_hit_gives_identical_features(tmp_path, zf5):
    img = write_png(tmp_path / "a.png", smooth_image(0))
    boxes = boxes_for(120, 90)
    ex1 = extractor(zf5, tmp_path / "cache")
    f1 = ex1.features(("a", img), boxes)
    assert ex1.stats["computed"] == len(SCALES) and ex1.stats["hits_disk"] == 0
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == len(SCALES)
    f1b = ex1.features(("a", img), boxes)
    assert ex1.stats["hits_memory"] == len(SCALES) and torch.equal(f1, f1b)
    ex2 = extractor(zf5, tmp_path / "cache")
    f2 = ex2.features(("a", img), boxes)
    assert ex2.stats["hits_disk"] == len(SCALES) and ex2.stats["computed"] == 0
    assert torch.equal(f1, f2) and f1.dtype == torch.float32 and f1.shape == (len(boxes), ex1.feature_dim)
    # stored compactly; maps returned exactly as stored, so fresh (uncached) features agree too
    maps = ex2.conv_maps("a", img)
    assert all(m.dtype == torch.float16 for _, m in maps)
    assert torch.equal(extractor(zf5, None).features(("a", img), boxes), f1)
    # another scale set, max_side or backbone weights never reuse these files
    ex3 = extractor(zf5, tmp_path / "cache", scales=(80,))
    ex3.features(("a", img), boxes)
    assert ex3.stats["computed"] == 1


def test_corrupt_and_stale_cache_files_are_rebuilt(tmp_path, zf5, caplog):
    img = write_png(tmp_path / "a.png", smooth_image(1))
    boxes = boxes_for(120, 90)
    ref = extractor(zf5, tmp_path / "c").features(("a", img), boxes)
    files = sorted((tmp_path / "c").rglob("*.npz"))
    files[0].write_bytes(files[0].read_bytes()[:100])                       # truncated
    with open(files[1], "wb") as fh:                                         # stale: another key
        np.savez(fh, fmap=np.zeros((256, 2, 2), np.float16), factor=np.float64(1.0),
                 size=np.array([90, 120]), key=np.str_("something-else"))
    with caplog.at_level(logging.WARNING, logger="sppdet.features"):
        ex = extractor(zf5, tmp_path / "c")
        got = ex.features(("a", img), boxes)
    assert ex.stats["rebuilt"] == 2 and ex.stats["computed"] == 2
    assert "unreadable" in caplog.text and "stale" in caplog.text
    assert torch.equal(got, ref)
    ex2 = extractor(zf5, tmp_path / "c")                                     # repaired on disk
    ex2.features(("a", img), boxes)
    assert ex2.stats["hits_disk"] == 2 and ex2.stats["rebuilt"] == 0


def test_changed_image_content_is_a_miss(tmp_path, zf5):
    path = write_png(tmp_path / "a.png", smooth_image(2))
    boxes = boxes_for(120, 90)
    f1 = extractor(zf5, tmp_path / "c").features(("a", path), boxes)
    write_png(path, smooth_image(3))
    ex = extractor(zf5, tmp_path / "c")
    f2 = ex.features(("a", path), boxes)
    assert ex.stats["computed"] == len(SCALES) and not torch.equal(f1, f2)


def test_undecodable_image_raises(tmp_path, zf5):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageDecodeError):
        extractor(zf5, tmp_path / "c").features(("bad", bad), np.array([[0, 0, 5, 5]]))


# ---------------------------------------------------------------------------
# Scales, flips


def test_pooled_uses_the_right_scale_for_each_window(zf5):
    img = smooth_image(4, 60, 80)
    boxes = boxes_for(80, 60, n=60, seed=4)
    ex = extractor(zf5, None, scales=(180, 240, 360), max_side=1000)
    # factors 3, 4, 6: windows above 2*224^2/(9+16) = 4014 px^2 take scale 0, below 2*224^2/(16+36) = 1930 scale 2
    maps = ex.conv_maps(None, img)
    got = ex.pooled(maps, boxes, 80)
    factors = [f for f, _ in maps]
    assert factors == [resize_factor(60, 80, s, 1000) for s in (180, 240, 360)]
    assert len(set(choose_scales(boxes, factors).tolist())) == 3          # every scale is used
    for i, b in enumerate(boxes):
        area = (b[2] - b[0]) * (b[3] - b[1])
        k = int(np.argmin([abs(area * f * f - 224 ** 2) for f in factors]))
        f, m = maps[k]
        cells = project_windows(b[None] * f, 16, m.shape[1], m.shape[2], zf5.center_offset)
        assert torch.equal(got[i], spp_pool(m, cells, (4, 2, 1))[0].float())


def test_context_region_is_appended(zf5):
    """features.context: the window enlarged about its centre, pooled at the window's own scale
    with the context pyramid, appended after the window's own SPP feature (slow reference)."""
    img = smooth_image(6, 60, 80)
    boxes = boxes_for(80, 60, n=25, seed=6)
    ex = extractor(zf5, None, scales=(180, 240), max_side=1000, context=1.5, context_pyramid=(2, 1))
    plain = extractor(zf5, None, scales=(180, 240), max_side=1000)
    D = plain.feature_dim
    assert ex.feature_dim == D + 256 * 5
    maps = ex.conv_maps(None, img)
    got = ex.pooled(maps, boxes, 80)
    assert got.shape == (len(boxes), ex.feature_dim)
    assert torch.equal(got[:, :D], plain.pooled(maps, boxes, 80))
    factors = [f for f, _ in maps]
    outside = 0
    for i, b in enumerate(boxes):
        area = (b[2] - b[0]) * (b[3] - b[1])
        f, m = maps[int(np.argmin([abs(area * f * f - 224 ** 2) for f in factors]))]
        cx, cy, hw, hh = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, 0.75 * (b[2] - b[0]), 0.75 * (b[3] - b[1])
        big = np.array([[cx - hw, cy - hh, cx + hw, cy + hh]])
        outside += bool(big[0, 0] < 0 or big[0, 1] < 0 or big[0, 2] > 80 or big[0, 3] > 60)
        x1, y1, x2, y2 = project_windows(big * f, 16, m.shape[1], m.shape[2], zf5.center_offset)[0].tolist()
        ref = []
        for n in (2, 1):
            h, w = y2 - y1 + 1, x2 - x1 + 1
            level = torch.empty(m.shape[0], n, n, dtype=m.dtype)
            for r in range(n):
                for c in range(n):
                    ys, ye = y1 + (r * h) // n, y1 + -((-(r + 1) * h) // n)
                    xs, xe = x1 + (c * w) // n, x1 + -((-(c + 1) * w) // n)
                    level[:, r, c] = m[:, ys:ye, xs:xe].amax(dim=(1, 2))
            ref.append(level.reshape(-1))
        assert torch.equal(got[i, D:], torch.cat(ref).float()), i
    assert outside > 0          # enlarged windows past the image border are covered too
    with pytest.raises(ValueError, match="context"):
        extractor(zf5, None, context=0.8)
    with pytest.raises(ValueError, match="context"):
        extractor(zf5, None, context=1.5, mode="rcnn")


def test_max_side_caps_huge_images(zf5):
    img = np.zeros((40, 400, 3), np.uint8)
    ex = extractor(zf5, None, scales=(100,), max_side=200)
    (f, m), = ex.conv_maps(None, img)
    assert f == 0.5 and tuple(m.shape) == (256, 2, 13)     # 20 x 200 input -> ceil(/16)


def test_flip_consistency(tmp_path, zf5):
    img = smooth_image(5)
    mirror = np.ascontiguousarray(img[:, ::-1])
    boxes = boxes_for(120, 90, seed=5)
    ex = extractor(zf5, tmp_path / "c")
    flipped = ex.features(("a", img), boxes, flip=True)
    direct = ex.features(("a-mirrored", mirror), flip_boxes(boxes, 120))
    assert torch.equal(flipped, direct)
    assert not torch.equal(flipped, ex.features(("a", img), boxes))
    m1 = ex.conv_maps("a", img, flip=True)
    m2 = ex.conv_maps("a-mirrored", mirror)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(m1, m2))


def test_live_maps_are_differentiable_and_match_cached_values(zf5):
    bb = build_backbone("zf5", "random")
    img = smooth_image(6)
    boxes = boxes_for(120, 90, seed=6)
    ex = extractor(bb, None, scales=(64,), cache_dtype="float32")
    live = ex.conv_maps_live(img, flip=True)
    feats = ex.pooled(live, boxes, 120, flip=True)
    assert feats.requires_grad
    torch.testing.assert_close(feats.detach(), ex.features((None, img), boxes, flip=True), rtol=1e-5, atol=1e-6)
    feats.sum().backward()
    assert bb.conv1.weight.grad is not None and float(bb.conv1.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------
# R-CNN mode


def test_context_boxes_arithmetic():
    # a 192-px box becomes 224 px (192 * 224/192): 16 px of context each side at the warp size
    np.testing.assert_allclose(context_boxes(np.array([[10, 20, 202, 116]]), 224, 16),
                               [[-6, 12, 218, 124]])


def test_warp_samples_the_enlarged_window(zf5):
    ex = extractor(build_backbone("lite0", "random"), None, mode="rcnn")
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3))    # pixel k has value k
    # box x 32..224 -> with context x 16..240: output column u samples x = 16.5 + u, value 16 + u
    crops = ex.warp_windows(ramp, np.array([[32.0, 8.0, 224.0, 56.0]]))
    assert crops.shape == (1, 3, 224, 224)
    expect = ((16 + torch.arange(224.0)) / 255 - 0.5) / 0.5
    torch.testing.assert_close(crops[0, 1, 100], expect, rtol=0, atol=1e-5)
    # context beyond the image is the normalisation's zero (the mean colour)
    edge = ex.warp_windows(ramp, np.array([[0.0, 8.0, 48.0, 56.0]]))      # context from x = -4
    assert float(edge[0, :, :, 0].abs().max()) == 0.0


def test_rcnn_mode_has_the_spp_feature_dimension(zf5):
    img = smooth_image(7)
    boxes = boxes_for(120, 90, n=3, seed=7)
    for pyramid in ((4, 2, 1), (6, 3, 2, 1)):
        spp_ex = extractor(zf5, None, pyramid=pyramid)
        # a small warp keeps the test fast: 96 px -> a 6x6 map, pooled whole
        rcnn_ex = extractor(zf5, None, pyramid=pyramid, mode="rcnn", rcnn_batch=2, rcnn_size=96, rcnn_context=6)
        a = spp_ex.features((None, img), boxes)
        b = rcnn_ex.features((None, img), boxes)
        assert a.shape == b.shape == (len(boxes), spp_ex.feature_dim) == (len(boxes), rcnn_ex.feature_dim)
        assert torch.isfinite(b).all() and not torch.equal(a, b)
    # flipping in R-CNN mode = the mirrored image with mirrored boxes
    fl = rcnn_ex.features((None, img), boxes, flip=True)
    mirror = np.ascontiguousarray(img[:, ::-1])
    torch.testing.assert_close(fl, rcnn_ex.features((None, mirror), flip_boxes(boxes, 120)), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Whole splits


def test_precompute_is_resumable_and_disk_report(tmp_path, zf5):
    recs = []
    for i in range(3):
        p = write_png(tmp_path / f"{i}.png", smooth_image(10 + i))
        recs.append(ImageRecord(str(i), p, 120, 90))
    ex = extractor(zf5, tmp_path / "c")
    first = ex.precompute(recs[:2], progress=False)
    assert first == {"images": 2, "computed": 2, "cached": 0}
    again = ex.precompute(recs, progress=False)
    assert again == {"images": 3, "computed": 1, "cached": 2}
    rep = ex.disk_report(recs, 2000)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "c").rglob("*.npz"))
    assert rep["conv5_cache_bytes"] == on_disk and rep["missing_maps"] == 0
    assert rep["per_window_bytes"] == 3 * 2000 * ex.feature_dim * 4
    assert rep["ratio"] == pytest.approx(rep["per_window_bytes"] / on_disk)
    assert ex.disk_report(recs, 2000, flips=(False, True))["missing_maps"] == 3 * len(SCALES)


@pytest.mark.shared_data
def test_voc_fixture_lite0_features(tmp_path):
    from sppdet.data.voc import load_voc

    root = shared_dataset("voc2007_fixture5")
    ds = load_voc(root, "trainval")
    ds.records = ds.records[:3]
    ex = FeatureExtractor(build_backbone("lite0"), scales=(128,), cache_dir=tmp_path / "c")
    assert ex.precompute(ds, progress=False)["computed"] == len(ds)
    for rec in ds:
        f = ex.features(rec, rec.boxes)
        assert f.shape == (rec.num_objects, 320 * 21) and torch.isfinite(f).all()
    assert ex.disk_report(ds, 2000)["ratio"] > 10
