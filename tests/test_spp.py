"""Spatial pyramid pooling: projection, scale choice and pooling against slow references."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchvision

from sppdet.models import spp


pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------
# Slow, obvious references


def project_ref(box, S, H, W, offset):
    """Cells whose receptive-field centre S*i + offset lies strictly inside the window;
    if none, the in-map cell nearest the window centre (ties: the higher index)."""
    out = []
    for lo_c, hi_c, n in ((box[0], box[2], W), (box[1], box[3], H)):
        inside = [i for i in range(n) if lo_c < S * i + offset < hi_c]
        if inside:
            out.append((min(inside), max(inside)))
        else:
            c = 0.5 * (lo_c + hi_c)
            dist = [abs(S * i + offset - c) for i in range(n)]
            best = min(dist)
            i = max(i for i in range(n) if dist[i] == best)
            out.append((i, i))
    (x1, x2), (y1, y2) = out
    return [x1, y1, x2, y2]


def spp_ref(fmap, cells, levels):
    """Loop over windows, levels and bins; bin i of n covers cells
    [floor(i*w/n), ceil((i+1)*w/n)) of the window (exact rational arithmetic)."""
    C = fmap.shape[0]
    rows = []
    for x1, y1, x2, y2 in cells.tolist():
        w, h = x2 - x1 + 1, y2 - y1 + 1
        feat = []
        for n in levels:
            block = torch.empty(C, n, n, dtype=fmap.dtype)
            for by in range(n):
                ys = y1 + math.floor(Fraction(by * h, n))
                ye = y1 + math.ceil(Fraction((by + 1) * h, n))
                for bx in range(n):
                    xs = x1 + math.floor(Fraction(bx * w, n))
                    xe = x1 + math.ceil(Fraction((bx + 1) * w, n))
                    assert xe > xs and ye > ys
                    block[:, by, bx] = fmap[:, ys:ye, xs:xe].amax(dim=(1, 2))
            feat.append(block.reshape(-1))
        rows.append(torch.cat(feat))
    return torch.stack(rows)


def random_cells(gen, n, H, W):
    x1 = torch.randint(0, W, (n,), generator=gen)
    y1 = torch.randint(0, H, (n,), generator=gen)
    x2 = torch.minimum(x1 + torch.randint(0, W, (n,), generator=gen), torch.tensor(W - 1))
    y2 = torch.minimum(y1 + torch.randint(0, H, (n,), generator=gen), torch.tensor(H - 1))
    return torch.stack([x1, y1, x2, y2], 1)


# ---------------------------------------------------------------------------
# Projection


def test_projection_hand_worked_examples():
    S, H, W = 16, 43, 58   # ZF-5 at s=688 on a 688x917 image
    boxes = torch.tensor([
        [0.0, 0.0, 160.0, 160.0],
        [16.0, 32.0, 48.5, 100.0],
        [20.0, 20.0, 25.0, 25.0],
        [-30.0, -30.0, 2000.0, 2000.0],
    ])
    got = spp.project_windows(boxes, S, H, W, offset=0.5)
    # (0, 0, 160, 160): x1' = floor((0 - 0.5)/16) + 1 = -1 + 1 = 0
    #                   x2' = ceil((160 - 0.5)/16) - 1 = ceil(9.97) - 1 = 9   (cell 10's centre 160.5 is outside)
    # (16, 32, 48.5, 100): x1' = floor(15.5/16) + 1 = 1;  y1' = floor(31.5/16) + 1 = 2
    #                      x2' = ceil(48/16) - 1 = 2 (cell 3's centre 48.5 is on the edge: out)
    #                      y2' = ceil(99.5/16) - 1 = 7 - 1 = 6
    # (20, 20, 25, 25): x1' = floor(19.5/16) + 1 = 2 > x2' = ceil(24.5/16) - 1 = 1: empty ->
    #                   nearest to the centre 22.5: floor((22.5 - 0.5)/16 + 0.5) = floor(1.875) = 1
    # (-30, -30, 2000, 2000): clamped to the map: (0, 0, W-1, H-1)
    assert got.tolist() == [[0, 0, 9, 9], [1, 2, 2, 6], [1, 1, 1, 1], [0, 0, 57, 42]]
    assert got.dtype == torch.int64
    # VGG16 geometry (cell i centred at 16 i + 8):
    # (0, 0, 160, 160): floor(-8/16) + 1 = 0;  ceil(152/16) - 1 = 9
    # (8, 8, 40, 40):   floor(0/16) + 1 = 1 (cell 0's centre 8 is on the edge); ceil(32/16) - 1 = 1
    vgg = spp.project_windows(np.array([[0, 0, 160, 160], [8, 8, 40, 40]], float), S, H, W, offset=8.0)
    assert vgg.tolist() == [[0, 0, 9, 9], [1, 1, 1, 1]]


def test_projection_matches_reference_and_is_never_empty():
    rng = np.random.default_rng(0)
    for S, H, W, off in ((16, 9, 13, 0.5), (16, 7, 5, 8.0), (12, 6, 11, 15.5)):
        xy = rng.uniform(-40, max(H, W) * S + 40, (300, 2))
        wh = np.concatenate([rng.uniform(0, 6, (100, 2)), rng.uniform(0, 200, (200, 2))])
        boxes = np.concatenate([xy, xy + wh], 1)
        boxes[:20] = np.round(boxes[:20] / S) * S + off          # edges exactly on cell centres
        got = spp.project_windows(torch.from_numpy(boxes), S, H, W, off)
        ref = [project_ref(b, S, H, W, off) for b in boxes.tolist()]
        assert got.tolist() == ref
        assert bool((got[:, 2] >= got[:, 0]).all() and (got[:, 3] >= got[:, 1]).all())
        assert bool((got[:, :2] >= 0).all() and (got[:, 2] < W).all() and (got[:, 3] < H).all())


# ---------------------------------------------------------------------------
# Scale choice and resizing


def test_choose_scales_matches_brute_force():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 400, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 400, (200, 2))], 1)
    factors = [480 / 375, 576 / 375, 688 / 375, 864 / 375, 1200 / 375]
    got = spp.choose_scales(boxes, factors).tolist()
    for b, g in zip(boxes, got):
        area = (b[2] - b[0]) * (b[3] - b[1])
        diffs = [abs(area * f * f - 224.0 * 224.0) for f in factors]
        assert g == diffs.index(min(diffs))
    # a 224x224 window at factor 1 picks that scale; ties pick the first
    assert spp.choose_scales(np.array([[0, 0, 224, 224]]), [0.5, 1.0, 2.0]).tolist() == [1]
    assert spp.choose_scales(np.array([[0, 0, 224, 224]]), [0.5, 0.5]).tolist() == [0]
    assert spp.choose_scales(np.zeros((0, 4)), [1.0, 2.0]).shape == (0,)


def test_resize_factor_caps_the_longer_side():
    assert spp.resize_factor(375, 500, 688, 2000) == 688 / 375
    assert spp.resize_factor(100, 3000, 688, 2000) == 2000 / 3000     # 688/100 would make it 20640 wide
    assert spp.resize_factor(500, 375, 1200, 2000) == 1200 / 375


# ---------------------------------------------------------------------------
# Pooling


@pytest.mark.parametrize("levels", [(4, 2, 1), (6, 3, 2, 1), (5, 3, 1), (7,), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_spp_pool_matches_loop_reference(levels, dtype):
    gen = torch.Generator().manual_seed(sum(levels))
    C, H, W = 5, 11, 17
    fmap = torch.randn(C, H, W, generator=gen).to(dtype)       # negative values too
    cells = torch.cat([random_cells(gen, 60, H, W),
                       torch.tensor([[0, 0, W - 1, H - 1], [3, 4, 3, 4], [0, 2, 1, 2], [W - 1, H - 1, W - 1, H - 1]])])
    ref = spp_ref(fmap, cells, levels)
    assert ref.shape == (len(cells), C * spp.num_bins(levels))
    for impl in ("numpy", "torch", "auto"):
        got = spp.spp_pool(fmap, cells, levels, impl=impl)
        assert got.dtype == dtype
        assert torch.equal(got, ref), impl


def test_numpy_path_channel_chunks_and_window_chunks_are_exact():
    gen = torch.Generator().manual_seed(3)
    fmap = torch.rand(37, 13, 21, generator=gen)
    cells = random_cells(gen, 150, 13, 21)
    ref = spp_ref(fmap, cells, (4, 2, 1))
    got = spp._spp_numpy(fmap, cells, (4, 2, 1), max_table_bytes=4000, chunk_windows=7)
    assert torch.equal(got, ref)


def test_feature_layout_is_level_channel_bin():
    # map value = 1000 * c + 10 * y + x: every bin's max is its bottom-right cell
    C, H, W = 3, 8, 8
    c, y, x = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    fmap = (1000 * c + 10 * y + x).float()
    f = spp.spp_pool(fmap, torch.tensor([[0, 0, 7, 7]]), (4, 2, 1))[0]
    assert f.shape == (C * 21,)
    # level 4, channel 1, bin (by=2, bx=3): cells y 4..5, x 6..7 -> 1000 + 10*5 + 7
    assert f[1 * 16 + 2 * 4 + 3] == 1057
    # level 2 starts after C*16; channel 2, bin (1, 0): y 4..7, x 0..3 -> 2000 + 70 + 3
    assert f[C * 16 + 2 * 4 + 1 * 2 + 0] == 2073
    # level 1 starts after C*20: channel 0 -> the whole map's max 77
    assert f[C * 20 + 0] == 77


@pytest.mark.parametrize("levels", [(4, 2, 1), (6, 3, 2, 1)])
def test_spp_pool_equals_torchvision_roi_pool_on_integer_boxes(levels):
    """roi_pool at spatial_scale 1 computes the paper's bins for these levels (verified)."""
    gen = torch.Generator().manual_seed(5)
    C, H, W = 16, 43, 57
    fmap = torch.rand(C, H, W, generator=gen)
    cells = random_cells(gen, 300, H, W)
    rois = torch.cat([torch.zeros(len(cells), 1), cells.float()], 1)
    base = torch.cat([torchvision.ops.roi_pool(fmap[None], rois, (n, n), 1.0).reshape(len(cells), -1)
                      for n in levels], 1)
    assert torch.equal(spp.spp_pool(fmap, cells, levels), base)
    assert all(spp.roi_pool_is_exact(n, 1000) for n in levels)


def test_roi_pool_float32_bins_differ_at_level_7():
    """Documents why roi_pool is not used for every level: at n=7, w=57 its float32
    edge ceil(7 * float32(57/7)) = 58 runs one cell past the 57-cell window."""
    assert not spp.roi_pool_is_exact(7, 57)
    assert spp.roi_pool_is_exact(7, 56)
    fmap = torch.zeros(1, 1, 58)
    fmap[0, 0, 57] = 5.0                     # just right of the window 0..56
    cells = torch.tensor([[0, 0, 56, 0]])
    roi = torchvision.ops.roi_pool(fmap[None], torch.tensor([[0.0, 0, 0, 56, 0]]), (7, 7), 1.0)
    assert roi.max() == 5.0                  # roi_pool sees the cell outside the window
    ours = spp.spp_pool(fmap, cells, (7,))
    assert ours.max() == 0.0 and torch.equal(ours, spp_ref(fmap, cells, (7,)))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(7)
    fmap = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    cells = torch.tensor([[0, 0, 5, 4], [1, 1, 3, 2], [2, 0, 2, 4], [4, 3, 5, 4]])
    for levels in ((2, 1), (3,), (4, 2, 1)):
        assert torch.autograd.gradcheck(lambda f: spp.spp_pool(f, cells, levels), (fmap,), eps=1e-6, atol=1e-7)


def test_gradient_matches_roi_pool_gradient():
    gen = torch.Generator().manual_seed(8)
    base = torch.rand(4, 9, 12, generator=gen, dtype=torch.float64)
    cells = random_cells(gen, 25, 9, 12)
    weights = torch.rand(25, 4 * 21, generator=gen, dtype=torch.float64)
    a = base.clone().requires_grad_(True)
    (spp.spp_pool(a, cells, (4, 2, 1)) * weights).sum().backward()
    b = base.clone().requires_grad_(True)
    (spp.spp_pool(b, cells, (4, 2, 1), impl="roi_pool") * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_equal_cpu():
    gen = torch.Generator().manual_seed(9)
    fmap = torch.rand(32, 20, 30, generator=gen)
    cells = random_cells(gen, 200, 20, 30)
    for levels in ((4, 2, 1), (7, 1)):
        cpu = spp.spp_pool(fmap, cells, levels)
        for impl in ("auto", "torch"):
            assert torch.equal(spp.spp_pool(fmap.cuda(), cells, levels, impl=impl).cpu(), cpu)


def test_whole_map_pooling_and_module():
    gen = torch.Generator().manual_seed(10)
    maps = torch.randn(3, 4, 14, 14, generator=gen)
    whole = spp.spp_pool_whole(maps, (6, 3, 2, 1))
    for i in range(3):
        assert torch.equal(whole[i], spp_ref(maps[i], torch.tensor([[0, 0, 13, 13]]), (6, 3, 2, 1))[0])
    m = spp.SpatialPyramidPooling((4, 2, 1))
    assert m.num_bins == 21 and m.output_dim(256) == 5376
    assert m(maps[0], torch.tensor([[0, 0, 13, 13]])).shape == (1, 4 * 21)


def test_empty_and_invalid_inputs():
    fmap = torch.rand(3, 5, 5)
    assert spp.spp_pool(fmap, torch.zeros((0, 4), dtype=torch.int64)).shape == (0, 63)
    with pytest.raises(ValueError, match="outside"):
        spp.spp_pool(fmap, torch.tensor([[0, 0, 5, 4]]))
    with pytest.raises(ValueError, match="empty"):
        spp.spp_pool(fmap, torch.tensor([[3, 0, 2, 4]]))
    with pytest.raises(ValueError, match="positive"):
        spp.spp_pool(fmap, torch.tensor([[0, 0, 1, 1]]), (4, 0))


def test_pooling_benchmark_checks_identity():
    from sppdet.bench.features import bench_pooling

    res = bench_pooling(8, 9, 11, 50, (4, 2, 1), repeat=1, seed=0)
    assert res["identical_f32"] and res["identical_f16"]
    assert res["windows"] == 50 and set(res["seconds_median"]) == {"roi_pool", "sppdet_f32", "sppdet_f16"}
