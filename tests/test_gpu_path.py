"""The GPU path of the test-time detector and the training loops, checked where it can be.

The device path (scoring, regression, NMS and box voting kept on the model's device, one
transfer of the final detections per image) is written in torch ops that run on any device:
here it runs on the CPU and is compared with the numpy path (the CPU default, whose results
other tests pin bit for bit) and with slow references written below.  The tests marked
``cuda`` run only where a GPU is present (none was in the session that wrote them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sppdet import config as C
from sppdet.config import Config, ConfigError, FeatureConfig, merge, validate
from sppdet.detect import Detector, postprocess, postprocess_tensor, vote_boxes, vote_boxes_tensor
from sppdet.features import FeatureExtractor
from sppdet.features.extractor import AMP_MODES, amp_dtype
from sppdet.models.backbones import build_backbone
from sppdet.models.bbox_reg import BBoxRegressors
from sppdet.models.detector import SPPDetector
from sppdet.models.heads import FCHead
from sppdet.models.svm import LinearSVMs
from sppdet.proposals.presets import get_preset

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------
# slow references


def iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def per_class_nms_ref(scores, boxes, w, h, nms, top, thr, pre):
    """The old recipe, one class at a time: the best ``pre`` windows, threshold, clip, drop empty
    boxes, greedy NMS; then every class's survivors by decreasing score, the first ``top``."""
    out = []
    n, k = scores.shape
    for c in range(k):
        order = sorted(range(n), key=lambda i: -scores[i, c])[:pre]
        kept = []
        for i in order:
            if thr is not None and scores[i, c] < thr:
                continue
            b = np.asarray(boxes[i, c], np.float64).copy()
            b[[0, 2]] = np.clip(b[[0, 2]], 0, w)
            b[[1, 3]] = np.clip(b[[1, 3]], 0, h)
            if b[2] - b[0] <= 0 or b[3] - b[1] <= 0:
                continue
            if all(iou_ref(b, kb) <= nms for kb, _ in kept):
                kept.append((b, float(scores[i, c])))
        out += [(b, s, c) for b, s in kept]
    out.sort(key=lambda t: -t[1])
    return out[:top]


def random_problem(rng, n, k, w=240, h=180):
    xy = rng.uniform(-30, w, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 90, (n, k, 2))], 2).astype(np.float32)
    scores = rng.normal(0, 1, (n, k)).astype(np.float32)
    return scores, boxes, w, h


# ---------------------------------------------------------------------------
# NMS: batched on the device vs the per-class recipe


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thr", [None, 0.0])
def test_batched_nms_on_tensors_matches_the_per_class_reference(seed, thr):
    rng = np.random.default_rng(seed)
    scores, boxes, w, h = random_problem(rng, int(rng.integers(20, 120)), int(rng.integers(1, 5)))
    kw = dict(nms=0.3, max_per_image=30, score_threshold=thr, pre_nms_top=60)
    ref = per_class_nms_ref(scores, boxes, w, h, 0.3, 30, thr, 60)
    for det in (postprocess(scores, boxes, w, h, **kw),
                postprocess_tensor(torch.from_numpy(scores), torch.from_numpy(boxes), w, h, **kw)):
        assert len(det.boxes) == len(ref)
        for (b, s, c), db, ds, dl in zip(ref, det.boxes, det.scores, det.labels):
            assert dl == c and ds == pytest.approx(s)
            np.testing.assert_allclose(db, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("voting", [None, 0.5])
def test_postprocess_tensor_equals_postprocess(seed, voting):
    """Same detections as the numpy path, bit for bit (voted boxes up to float rounding), also
    with tied scores, shared boxes [N, 4], a threshold and more candidates than pre_nms_top."""
    rng = np.random.default_rng(100 + seed)
    scores, boxes, w, h = random_problem(rng, int(rng.integers(1, 400)), int(rng.integers(1, 6)))
    if seed % 2:
        scores = np.round(scores, 1)                   # many ties: the stable order must agree
    if seed % 3 == 0:
        boxes = boxes[:, 0]                            # one box per window (no regression)
    for thr in (None, 0.0):
        kw = dict(nms=0.3, max_per_image=50, score_threshold=thr, pre_nms_top=100, box_voting=voting)
        a = postprocess(scores, boxes, w, h, **kw)
        b = postprocess_tensor(torch.from_numpy(scores), torch.from_numpy(boxes), w, h, **kw)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.scores, b.scores)
        if voting is None:
            np.testing.assert_array_equal(a.boxes, b.boxes)
        else:
            np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1e-4)
        assert (a.boxes.dtype, a.scores.dtype, a.labels.dtype) == (b.boxes.dtype, b.scores.dtype, b.labels.dtype)


def test_postprocess_tensor_empty_inputs():
    assert len(postprocess_tensor(torch.zeros(0, 3), torch.zeros(0, 4), 10, 10).boxes) == 0
    # every box empty after clipping
    boxes = torch.tensor([[20.0, 20.0, 30.0, 30.0]])
    assert len(postprocess_tensor(torch.ones(1, 2), boxes, 10, 10).boxes) == 0


def test_vote_boxes_tensor_matches_a_slow_reference():
    rng = np.random.default_rng(7)
    scores, boxes, w, h = random_problem(rng, 60, 1)
    b, s = boxes[:, 0], scores[:, 0]
    lab = rng.integers(0, 3, len(b))
    keep = np.array([3, 10, 22, 41])
    got = vote_boxes_tensor(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(lab),
                            torch.from_numpy(keep), 0.4).numpy()
    for row, j in zip(got, keep):
        members = [i for i in range(len(b)) if i == j or (lab[i] == lab[j] and iou_ref(b[i], b[j]) >= 0.4)]
        wts = np.array([np.exp(min(s[i] - s[j], 30.0)) for i in members])
        want = (wts[:, None] * b[members].astype(np.float64)).sum(0) / wts.sum()
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, vote_boxes(b, s, lab, keep, 0.4), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------
# scoring and regression in batches


def tiny_model(D=40, K=4, seed=0, fc_dims=(24,)):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    head = FCHead(D, list(fc_dims), K, dropout=0.5).eval()
    svms = LinearSVMs(rng.normal(0, 0.3, (head.out_dim, K)), rng.normal(0, 0.1, K), 0.7)
    reg = BBoxRegressors(rng.normal(0, 0.01, (K, D, 4)), rng.normal(0, 0.05, (K, 4)),
                         rng.normal(0, 0.02, (K, 4)), rng.uniform(0.1, 0.3, (K, 4)), 0.5)
    pooled = torch.rand(300, D, generator=g) * 3
    return head, svms, reg, pooled


def test_svm_scores_in_batches_equal_all_at_once_and_the_numpy_scores():
    head, svms, _, pooled = tiny_model()
    x = head.fc7(pooled).detach()
    whole = svms.decision_function(x)
    parts = torch.cat([svms.decision_function(x[j:j + 37]) for j in range(0, len(x), 37)])
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole.numpy(), svms.decision_function(x.numpy()), rtol=1e-5, atol=1e-5)
    ref = (x.double() * svms.scale) @ torch.from_numpy(svms.W).double() + torch.from_numpy(svms.b).double()
    np.testing.assert_allclose(whole.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_model_score_tensor_equals_score_and_batches():
    head, svms, reg, pooled = tiny_model()
    model = SPPDetector(classes=list("abcd"), backbone=build_backbone("zf5", "random"), features=FeatureConfig(),
                        svms=svms, head=head, bbox_reg=reg, feature_dim=pooled.shape[1])
    s_np, p_np = model.score(pooled)
    s_t = model.score_tensor(pooled)
    np.testing.assert_array_equal(s_t.numpy(), s_np)          # the same torch ops on the CPU
    np.testing.assert_array_equal(p_np, pooled.numpy())
    parts = torch.cat([model.score_tensor(pooled[j:j + 64]) for j in range(0, len(pooled), 64)])
    torch.testing.assert_close(parts, s_t, rtol=1e-5, atol=1e-5)


def test_regressors_in_torch_equal_numpy_and_a_slow_reference():
    _, _, reg, pooled = tiny_model()
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, (len(pooled), 2))
    windows = np.concatenate([xy, xy + rng.uniform(4, 80, xy.shape)], 1)
    got = reg.predict_all_tensor(pooled, torch.from_numpy(windows)).numpy()
    np.testing.assert_allclose(got, reg.predict_all(pooled.numpy(), windows), rtol=1e-5, atol=1e-3)
    parts = np.concatenate([reg.predict_all_tensor(pooled[j:j + 50], torch.from_numpy(windows[j:j + 50])).numpy()
                            for j in range(0, len(pooled), 50)])
    np.testing.assert_allclose(parts, got, rtol=1e-5, atol=1e-3)
    # slow reference: one window, one class at a time, in float64
    x = pooled.numpy().astype(np.float64) * reg.scale
    for i in (0, 17, 299):
        for k in range(reg.num_classes):
            d = (x[i] @ reg.W[k].astype(np.float64) + reg.b[k]) * reg.std[k] + reg.mean[k]
            p = windows[i]
            pw, ph = p[2] - p[0], p[3] - p[1]
            cx, cy = p[0] + 0.5 * pw + d[0] * pw, p[1] + 0.5 * ph + d[1] * ph
            ww, hh = pw * np.exp(min(d[2], np.log(1000 / 16))), ph * np.exp(min(d[3], np.log(1000 / 16)))
            np.testing.assert_allclose(got[i, k], [cx - ww / 2, cy - hh / 2, cx + ww / 2, cy + hh / 2],
                                       rtol=1e-5, atol=1e-3)
    assert reg.predict_all_tensor(pooled[:0], torch.zeros(0, 4)).shape == (0, reg.num_classes, 4)


# ---------------------------------------------------------------------------
# the whole test path: device path (forced on the CPU) vs the numpy path


def tiny_detector(device="cpu", flip=False, voting=None, amp="off", seed=0):
    torch.manual_seed(seed)
    bb = build_backbone("zf5", "random")
    ex = FeatureExtractor(bb, scales=(96, 128), max_side=300, pyramid=(2, 1), device=device, cache_dir=None,
                          memory_cache=0, amp=amp)
    D, K = ex.feature_dim, 3
    head = FCHead(D, [32], K, 0.5).eval()
    rng = np.random.default_rng(seed)
    svms = LinearSVMs(rng.normal(0, 0.5, (head.out_dim, K)), rng.normal(0, 0.1, K), 1.0 / 20)
    reg = BBoxRegressors(rng.normal(0, 1e-3, (K, D, 4)), rng.normal(0, 0.05, (K, 4)),
                         np.zeros((K, 4)), np.full((K, 4), 0.2), 1.0 / 20)
    feats = FeatureConfig(backbone="zf5", weights="random", scales=[96, 128], max_side=300, pyramid=[2, 1],
                          flip=False)
    model = SPPDetector(classes=["a", "b", "c"], backbone=bb, features=feats, svms=svms, head=head, bbox_reg=reg,
                        test=C.TestConfig(flip=flip, box_voting=voting, max_per_image=40), feature_dim=D)
    model.to(device)
    return Detector(model, ex, preset=get_preset("fast"), max_boxes=200, workers=1, cache_dir=Path("/nonexistent"))


def tiny_image_and_windows(seed=0, n=150):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    xy = rng.uniform(0, 140, (n, 2))
    wins = np.concatenate([xy, np.minimum(xy + rng.uniform(8, 90, (n, 2)), [160, 120])], 1).astype(np.float32)
    return img, wins


@pytest.mark.parametrize("flip, voting", [(False, None), (True, 0.5)])
def test_device_path_on_the_cpu_equals_the_numpy_path(flip, voting):
    det = tiny_detector(flip=flip, voting=voting)
    assert det.device_path is False                   # the CPU default stays the numpy path
    img, wins = tiny_image_and_windows()
    ref = det.detect_item((None, img), wins, 160, 120)
    det.device_path = True
    got = det.detect_item((None, img), wins, 160, 120)
    assert len(ref.boxes) > 5
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.boxes, ref.boxes, rtol=0, atol=1e-3)
    s_np, b_np = det.window_scores((None, img), wins, 160)
    s_t, b_t = det.window_scores_tensor((None, img), wins, 160)
    np.testing.assert_array_equal(s_t.numpy(), s_np)
    np.testing.assert_allclose(b_t.numpy(), b_np, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------
# features.amp


def test_amp_setting_is_validated():
    validate(Config())
    for v in AMP_MODES:
        validate(merge(Config(), {"features": {"amp": v}}))
    with pytest.raises(ConfigError, match="features.amp"):
        validate(merge(Config(), {"features": {"amp": "fp32"}}))
    with pytest.raises(ValueError, match="amp"):
        FeatureExtractor(build_backbone("zf5", "random"), amp="half")
    assert FeatureConfig().amp == "auto"


def test_amp_dtype_per_device():
    for v in AMP_MODES:
        assert amp_dtype(v, "cpu") is None
    assert amp_dtype("auto", "cuda") is torch.float16 and amp_dtype("fp16", "cuda:1") is torch.float16
    assert amp_dtype("bf16", "cuda") is torch.bfloat16 and amp_dtype("off", "cuda") is None


@pytest.mark.parametrize("amp", ["auto", "fp16", "bf16"])
def test_amp_is_a_no_op_on_the_cpu(amp):
    img, _ = tiny_image_and_windows(1)
    torch.manual_seed(0)
    bb = build_backbone("zf5", "random")
    off = FeatureExtractor(bb, scales=(96,), cache_dir=None, memory_cache=0, amp="off").conv_maps(None, img)
    on = FeatureExtractor(bb, scales=(96,), cache_dir=None, memory_cache=0, amp=amp).conv_maps(None, img)
    for (fa, ma), (fb, mb) in zip(off, on):
        assert fa == fb and ma.dtype == mb.dtype == torch.float16
        assert torch.equal(ma, mb)


def test_storage_cast_equals_a_numpy_clamp_and_cast():
    """The cache cast (range check, clamp, cast where the map is, then the transfer) gives the
    bits of the obvious host computation: clip to float16's range, round to float16."""
    ex = FeatureExtractor(build_backbone("zf5", "random"), scales=(96,), cache_dir=None, memory_cache=0)
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(8, 5, 7, generator=g) * 3000
    fmap[0, 0, 0] = 1e6                                 # beyond float16: clamped
    big = float(np.finfo(np.float16).max)
    want = np.clip(fmap.numpy().astype(np.float32), -big, big).astype(np.float16)
    got = ex._to_storage(fmap)
    assert got.dtype == torch.float16 and got.device.type == "cpu"
    assert np.array_equal(got.numpy().view(np.uint16), want.view(np.uint16))


# ---------------------------------------------------------------------------
# fine-tuning with the next batch loaded ahead


def _finetune_problem(seed=1):
    from sppdet.data.records import ImageRecord
    from sppdet.train.windows import build_windows

    K, D = 3, 24
    rng = np.random.default_rng(seed)
    windows, table = [], {}
    for i in range(6):
        gt = np.array([[10, 10, 60, 60], [100, 40, 170, 120]], np.float32)
        rec = ImageRecord(f"im{i}", f"im{i}.jpg", 200, 160, gt, rng.integers(0, K, 2))
        base = gt[rng.integers(0, 2, 120)]
        props = base + rng.normal(0, 12, base.shape).astype(np.float32)
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
        w = build_windows(i, rec, props, K)
        windows.append(w)
        cls = np.where(w.max_iou >= 0.5, w.best_label + 1, 0)
        feats = np.eye(K + 1, D)[cls] * 4 + rng.normal(0, 1, (len(w), D))
        table[(i, False)] = torch.tensor(feats, dtype=torch.float32)
        table[(i, True)] = torch.tensor(feats + rng.normal(0, 0.1, feats.shape), dtype=torch.float32)
    return windows, table, K, D


def test_finetune_with_prefetch_is_the_same_run_and_resumes_identically(tmp_path):
    from sppdet.train.finetune import FinetuneParams, finetune

    windows, table, K, D = _finetune_problem()
    fn = lambda i, idx, flip: table[(i, flip)][torch.as_tensor(idx)]      # noqa: E731
    params = FinetuneParams(iterations=40, batch_size=32, images_per_batch=2, lr=0.05, seed=3,
                            snapshot_seconds=1e9)

    def fresh():
        torch.manual_seed(0)
        h = FCHead(D, [16], K, dropout=0.5)
        h.reset_parameters()
        return h

    seen = {True: [], False: []}

    def recording(ahead):
        def f(i, idx, flip):
            seen[ahead].append((i, tuple(idx.tolist()), flip))
            return fn(i, idx, flip)
        return f

    ref, got = fresh(), fresh()
    s_ref = finetune(ref, recording(False), windows, params, show_progress=False, prefetch=False)
    s_got = finetune(got, recording(True), windows, params, show_progress=False, prefetch=True)
    assert seen[True] == seen[False]                   # the same batches, in the same order
    for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
        assert torch.equal(a, b)
    assert s_ref["curve"] == s_got["curve"] and s_ref["loss"] == s_got["loss"]

    calls = {"n": 0}

    def interrupting(i, idx, flip):
        calls["n"] += 1
        if calls["n"] == 2 * 15 + 1:                   # loading iteration 16's batch (ahead, in the thread)
            raise KeyboardInterrupt
        return fn(i, idx, flip)

    snap = tmp_path / "snap.pt"
    with pytest.raises(KeyboardInterrupt):
        finetune(fresh(), interrupting, windows, params, snapshot=snap, key="k", show_progress=False, prefetch=True)
    assert torch.load(snap, weights_only=True)["iteration"] == 15
    resumed = fresh()
    stats = finetune(resumed, fn, windows, params, snapshot=snap, key="k", show_progress=False, prefetch=True)
    assert stats["resumed_from"] == 15
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# on a GPU only (skipped here: no CUDA in the session that wrote them)


@cuda
@pytest.mark.parametrize("amp", ["fp16", "auto"])
def test_cuda_amp_maps_equal_fp32_maps_within_float16_noise(amp, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    img, _ = tiny_image_and_windows(2)
    torch.manual_seed(0)
    bb = build_backbone("zf5", "random")
    ref = FeatureExtractor(bb, scales=(96, 128), cache_dir=None, memory_cache=0, device="cuda",
                           amp="off").conv_maps(None, img)
    got = FeatureExtractor(bb, scales=(96, 128), cache_dir=None, memory_cache=0, device="cuda",
                           amp=amp).conv_maps(None, img)
    for (fa, ma), (fb, mb) in zip(ref, got):
        assert fa == fb and ma.shape == mb.shape and mb.dtype == torch.float16
        a, b = ma.float(), mb.float()
        scale = float(a.abs().max())
        # float16 keeps 11 bits: a few units of its rounding, relative to the map's range
        assert float((a - b).abs().max()) <= 4e-3 * scale + 1e-3


@cuda
@pytest.mark.parametrize("flip, voting", [(False, None), (True, 0.5)])
def test_cuda_detections_equal_cpu_detections(flip, voting, monkeypatch):
    # cuDNN's TF32 convolutions (torch's default on Ampere and later) round the conv inputs to
    # 10 bits; off here, so that what is compared is the path, not TF32's noise
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    img, wins = tiny_image_and_windows(3)
    cpu = tiny_detector("cpu", flip=flip, voting=voting).detect_item((None, img), wins, 160, 120)
    gpu_det = tiny_detector("cuda", flip=flip, voting=voting, amp="off")
    assert gpu_det.device_path is True
    gpu = gpu_det.detect_item((None, img), wins, 160, 120)
    assert len(cpu.boxes) > 5 and len(gpu.boxes) == len(cpu.boxes)
    np.testing.assert_array_equal(gpu.labels, cpu.labels)
    np.testing.assert_allclose(gpu.scores, cpu.scores, rtol=0, atol=1e-3)
    np.testing.assert_allclose(gpu.boxes, cpu.boxes, rtol=0, atol=1e-3)


@cuda
def test_cuda_finetune_prefetch_equals_no_prefetch():
    from sppdet.train.finetune import FinetuneParams, finetune

    windows, table, K, D = _finetune_problem()
    fn = lambda i, idx, flip: table[(i, flip)][torch.as_tensor(idx)]      # noqa: E731
    params = FinetuneParams(iterations=30, batch_size=32, images_per_batch=2, lr=0.05, seed=3,
                            snapshot_seconds=1e9)
    heads = []
    for ahead in (False, True):
        torch.manual_seed(0)
        torch.cuda.manual_seed(0)
        h = FCHead(D, [16], K, dropout=0.0)
        h.reset_parameters()
        finetune(h, fn, windows, params, device="cuda", show_progress=False, prefetch=ahead)
        heads.append(h)
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
