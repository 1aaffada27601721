"""``sppdet export``: the TorchScript backbone and head reproduce the Python detector.

The detector here is built from parts (random ZF-5, random fc/SVM/regressor weights) and saved
with ``save_detector``: no training is needed to check that the exported networks compute the
same numbers, and every part (fc7 SVMs, regressors, two scales, flip, a context region, pyramid
levels where ``roi_pool``'s own n x n bins are wrong) is present.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from sppdet.cli import main
from sppdet.models.spp import project_windows, roi_pool_is_exact, spp_pool


def _detector(*, pyramid=(7, 3, 1), context=1.5, scales=(160, 224), flip=True, mode="spp", cache_dtype="float16",
              bbox_reg=True, svm_features="fc7"):
    from sppdet.config import Config, merge
    from sppdet.models.backbones import build_backbone
    from sppdet.models.bbox_reg import BBoxRegressors
    from sppdet.models.detector import SPPDetector
    from sppdet.models.heads import FCHead
    from sppdet.models.spp import window_feature_dim
    from sppdet.models.svm import LinearSVMs

    cfg = merge(Config(), {"features": {"backbone": "zf5", "weights": "random", "pyramid": list(pyramid),
                                        "context": context, "scales": list(scales), "max_side": 320,
                                        "mode": mode, "cache_dtype": cache_dtype},
                           "svm": {"features": svm_features}, "finetune": {"fc_dims": [16, 8]},
                           "proposals": {"max_boxes": 120}, "test": {"flip": flip}})
    bb = build_backbone("zf5", "random")
    dim = window_feature_dim(bb.out_channels, pyramid, context, (2, 1))
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    head = FCHead(dim, [16, 8], 3, 0.5).eval()
    svm_dim = 8 if svm_features == "fc7" else dim
    svms = LinearSVMs(rng.normal(size=(svm_dim, 3)), rng.normal(size=3), 0.7)
    reg = BBoxRegressors(rng.normal(size=(3, dim, 4)) * 2e-3, rng.normal(size=(3, 4)) * 0.1,
                         rng.normal(size=(3, 4)) * 0.1, rng.uniform(0.1, 0.3, size=(3, 4)), 0.3) if bbox_reg else None
    model = SPPDetector(classes=["a", "b", "c"], backbone=bb, features=cfg.features, svms=svms, head=head,
                        bbox_reg=reg, svm_features=svm_features, test=cfg.test, feature_dim=dim,
                        backbone_weights="random")
    return model, cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from sppdet.checkpoint import save_detector

    root = tmp_path_factory.mktemp("export")
    model, cfg = _detector()
    ckpt = save_detector(root / "run" / "model.pt", model, cfg)
    out = root / "exported"
    assert main(["-q", "export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    return {"ckpt": ckpt, "out": out, "model": model}


def _random_windows(rng, n, W, H):
    """Windows (float64 [n, 4]) partly outside the image, a tenth of them smaller than a cell."""
    x1, y1 = rng.uniform(-0.2 * W, 1.1 * W, n), rng.uniform(-0.2 * H, 1.1 * H, n)
    tiny = rng.random(n) < 0.1
    w = np.where(tiny, rng.uniform(0.1, 8, n), rng.uniform(1, 0.8 * W, n))
    h = np.where(tiny, rng.uniform(0.1, 8, n), rng.uniform(1, 0.8 * H, n))
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


# ---------------------------------------------------------------------------
# pooling: bit-identical to sppdet's spp_pool


@pytest.mark.parametrize("levels, context, cache_dtype", [
    ((7, 3, 1), 1.5, "float16"), ((13, 11, 6, 2, 1), 0.0, "float32"), ((4, 2, 1), 0.0, "float16")])
def test_exported_pooling_is_bit_identical_to_spp_pool(levels, context, cache_dtype):
    from sppdet.export import build_head
    from sppdet.features.extractor import enlarge_boxes

    model, _ = _detector(pyramid=levels, context=context, cache_dtype=cache_dtype)
    head = build_head(model)
    rng = np.random.default_rng(7)
    # roi_pool's own n x n bins are not sppdet's at some of these levels: the per-bin route must be
    assert not all(roi_pool_is_exact(n, 60) for n in levels) or levels == (4, 2, 1)
    assert max(levels) <= 13
    for h, w in [(23, 31), (5, 60), (1, 1)]:
        fmap = torch.randn(1, 256, h, w) * 3
        factor = float(rng.uniform(0.5, 1.5))
        boxes = _random_windows(rng, 200, w * 16 / factor, h * 16 / factor)
        got = head.pool(fmap, torch.from_numpy(boxes), factor)
        m = fmap[0].half() if cache_dtype == "float16" else fmap[0]
        b = boxes * factor
        ref = spp_pool(m, project_windows(b, 16, h, w, 0.5), levels).float()
        if context:
            ctx = project_windows(enlarge_boxes(b, context), 16, h, w, 0.5)
            ref = torch.cat([ref, spp_pool(m, ctx, (2, 1)).float()], 1)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert torch.equal(got, ref)


def test_roi_pool_with_n_by_n_bins_would_not_be_exact():
    """Why every bin is its own 1 x 1 roi: roi_pool's float32 n x n bins are not sppdet's for a
    57-cell window at level 7 (its bins can reach one cell further), while the export's are."""
    from sppdet.export import build_head

    w = next(w for w in range(1, 100) if not roi_pool_is_exact(7, w))
    fmap = torch.randn(1, 4, 3, w + 5)
    fmap[:, :, :, w:] = 100.0                       # cells right of the window: caught by a wrong bin
    cells = torch.tensor([[0, 0, w - 1, 2]])
    ours = spp_pool(fmap[0], cells, (7,), impl="numpy")
    theirs = torchvision.ops.roi_pool(fmap, torch.tensor([[0.0, 0, 0, w - 1, 2]]), (7, 7), 1.0).reshape(1, -1)
    assert not torch.equal(ours, theirs)
    model, _ = _detector(pyramid=(7,), context=0.0, cache_dtype="float32")
    win = torch.tensor([[0.0, 0.0, 16.0 * w - 7.5, 40.5]], dtype=torch.float64)    # exactly cells 0..w-1, 0..2
    assert torch.equal(project_windows(win, 16, 3, w + 5, 0.5), cells)
    assert torch.equal(build_head(model).pool(fmap, win, 1.0), ours)


# ---------------------------------------------------------------------------
# the exported files against the Python detector


def run_exported(folder: Path, image: np.ndarray, windows: np.ndarray):
    """The exported detector without sppdet: torch, torchvision, OpenCV and export.json only.
    Returns (scores [N, K], boxes [N, K, 4]) like ``Detector.window_scores``."""
    meta = json.loads((folder / "export.json").read_text())
    backbone = torch.jit.load(str(folder / meta["files"]["backbone"]))
    head = torch.jit.load(str(folder / meta["files"]["head"]))
    mean = torch.tensor(meta["input"]["mean"])[:, None, None]
    std = torch.tensor(meta["input"]["std"])[:, None, None]
    H, W = image.shape[:2]

    def view(img, win):
        factors = []
        for s in meta["scales"]:
            f = s / min(H, W)
            if max(H, W) * f > meta["max_side"]:
                f = meta["max_side"] / max(H, W)
            factors.append(f)
        area = np.clip(win[:, 2] - win[:, 0], 0, None) * np.clip(win[:, 3] - win[:, 1], 0, None)
        which = np.argmin(np.abs(area[:, None] * np.array(factors)[None] ** 2 - 224.0 ** 2), axis=1)
        scores = np.zeros((len(win), len(meta["classes"])), np.float32)
        boxes = np.zeros((len(win), len(meta["classes"]), 4), np.float32)
        for k, f in enumerate(factors):
            idx = np.nonzero(which == k)[0]
            if not len(idx):
                continue
            size = (max(1, round(W * f)), max(1, round(H * f)))
            x = img if size == (W, H) else cv2.resize(img, size, interpolation=cv2.INTER_AREA if f < 1 else
                                                      cv2.INTER_LINEAR)
            x = (torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 255.0 - mean) / std
            x = x[None].contiguous(memory_format=torch.channels_last)   # as sppdet's extractor on the CPU
            with torch.no_grad():
                s_, b_ = head(backbone(x), torch.from_numpy(win[idx]).double(), f)
            scores[idx], boxes[idx] = s_.numpy(), b_.numpy()
        return scores, boxes

    scores, boxes = view(image, windows)
    if meta["test"]["flip"]:
        mirror = windows.copy()
        mirror[:, [0, 2]] = W - windows[:, [2, 0]]
        s2, b2 = view(np.ascontiguousarray(image[:, ::-1]), mirror)
        b2 = b2.copy()
        b2[..., [0, 2]] = W - b2[..., [2, 0]]
        scores, boxes = (scores + s2) / 2, (boxes + b2) / 2
    return scores, boxes


def test_exported_detector_equals_the_python_detector(exported, tmp_path):
    from sppdet.data.synthetic import make_synthetic
    from sppdet.detect import Detector
    from sppdet.proposals import selective_search

    out = exported["out"]
    meta = json.loads((out / "export.json").read_text())
    assert meta["classes"] == ["a", "b", "c"] and meta["scales"] == [160, 224] and meta["pyramid"] == [7, 3, 1]
    assert meta["backbone"]["stride"] == 16 and meta["backbone"]["center_offset"] == 0.5
    assert meta["conv5_rounding"] == "float16" and meta["test"]["flip"] is True
    assert sorted(p.name for p in out.iterdir()) == ["backbone.torchscript.pt", "export.json", "head.torchscript.pt"]

    det = Detector.from_checkpoint(exported["ckpt"], device="cpu", cache_dir=tmp_path / "cache")
    data = make_synthetic(tmp_path / "data", num_images=3, seed=3)
    images = sorted((data / "JPEGImages").glob("*.jpg"))[:3]
    assert len(images) == 3
    for p in images:
        image = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        H, W = image.shape[:2]
        windows = selective_search(image, det.preset, 120).astype(np.float64)
        windows = np.concatenate([windows, [[0, 0, W, H], [3.2, 4.7, 5.1, 6.0], [-10, -5, W + 7, 30]]])
        ref_scores, ref_boxes = det.window_scores((None, image), windows, W)
        scores, boxes = run_exported(out, image, windows)
        assert scores.shape == ref_scores.shape == (len(windows), 3)
        assert boxes.shape == ref_boxes.shape == (len(windows), 3, 4)
        # Scores: bit-identical -- the same conv kernels on the same input, the same float16
        # rounding, the same (exact) pooling, the same torch fc/SVM ops in the same chunks.
        np.testing.assert_array_equal(scores, ref_scores)
        # Boxes: the regressors' float32 matmul runs in torch here and in numpy in sppdet (another
        # summation order), so the deltas differ by float32 rounding; measured: 1 ulp of the box
        # coordinate (3e-5 px at 300 px); allowed: 1e-3 px, far below anything visible or scored.
        np.testing.assert_allclose(boxes, ref_boxes, rtol=0, atol=1e-3)
        # and the boxes moved: the regressors are applied, not skipped
        assert np.abs(boxes - windows[:, None, :]).max() > 0.5


def test_exported_backbone_is_the_python_backbone(exported):
    bb = torch.jit.load(str(exported["out"] / "backbone.torchscript.pt"))
    ref = exported["model"].backbone
    x = torch.randn(1, 3, 77, 119)
    y = bb(x)
    assert not y.requires_grad            # an inference module: plain tensors out, without no_grad
    with torch.no_grad():
        assert torch.equal(y, ref(x))


@pytest.mark.parametrize("name", ["lite0", "lite0-c4", "lite0-cat"])
def test_lite0_backbone_exports_at_every_input_size(name):
    """Lite0 computes its TensorFlow-SAME padding in Python; the export fixes it per layer."""
    from sppdet.export import build_backbone_module
    from sppdet.models.backbones import build_backbone

    ref = build_backbone(name, "random")
    mod = build_backbone_module(ref)
    for hw in [(33, 50), (64, 64), (17, 95)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            a, b = ref(x), mod(x)
        assert a.shape == b.shape == (1, ref.out_channels, -(-hw[0] // 16), -(-hw[1] // 16))
        assert torch.equal(a, b)


def test_head_without_regressors_or_fc7_returns_the_windows(tmp_path):
    from sppdet.export import build_head

    model, _ = _detector(bbox_reg=False, svm_features="spp", context=0.0, pyramid=(2, 1))
    head = build_head(model)
    fmap = torch.randn(1, 256, 6, 7)
    win = torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.0, 20.0, 90.0, 80.0]], dtype=torch.float64)
    scores, boxes = head(fmap, win, 1.0)
    pooled = head.pool(fmap, win, 1.0)
    ref, _ = model.score(pooled)
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(boxes, win.float()[:, None, :].expand(2, 3, 4))
    s0, b0 = head(fmap, win[:0], 1.0)
    assert s0.shape == (0, 3) and b0.shape == (0, 3, 4)


# ---------------------------------------------------------------------------
# the command's errors: one line, exit 2


def _err(capsys):
    e = capsys.readouterr().err.strip()
    assert e.count("\n") == 0, e
    return e


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")]) == 2
    e = _err(capsys)
    assert e.startswith("sppdet: error:") and "none.pt" in e and "no such checkpoint" in e
    assert not (tmp_path / "o").exists()


def test_bad_format_is_one_line(exported, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(exported["ckpt"]), "--out", str(tmp_path / "o"),
                 "--format", "tflite"]) == 2
    assert "--format 'tflite'" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_onnx_without_the_onnx_package_says_what_to_install(exported, tmp_path, capsys):
    try:
        import onnx  # noqa: F401
        pytest.skip("onnx is installed here")
    except ImportError:
        pass
    assert main(["export", "--checkpoint", str(exported["ckpt"]), "--out", str(tmp_path / "o"),
                 "--format", "onnx"]) == 2
    assert "pip install onnx" in _err(capsys)
    assert not (tmp_path / "o").exists()          # nothing written


def test_out_may_be_the_checkpoint_folder_but_never_overwrites_it(exported, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "model.pt"
    shutil.copy(exported["ckpt"], ckpt)
    before = ckpt.read_bytes()
    assert main(["-q", "export", "--checkpoint", str(ckpt), "--out", str(run)]) == 0
    assert ckpt.read_bytes() == before
    assert (run / "head.torchscript.pt").is_file() and (run / "export.json").is_file()
    clash = run / "head.torchscript.pt"        # a checkpoint with an output's name is refused
    shutil.copy(ckpt, clash)
    assert main(["export", "--checkpoint", str(clash), "--out", str(run)]) == 2
    assert "is the checkpoint being exported" in _err(capsys)
    assert clash.read_bytes() == before


def test_out_that_is_a_file_and_rcnn_mode_are_one_line(tmp_path, capsys):
    from sppdet.checkpoint import save_detector

    model, cfg = _detector(mode="rcnn", context=0.0)
    ckpt = save_detector(tmp_path / "rcnn.pt", model, cfg)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "only SPP-mode detectors can be exported" in _err(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in _err(capsys)


def test_export_is_listed_by_the_cli():
    r = subprocess.run([sys.executable, "-m", "sppdet", "export", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "torchscript" in r.stdout


def test_readme_snippet_runs_as_written_without_sppdet(exported, tmp_path):
    """The README's Export snippet, copied out of README.md, in a fresh folder, in a fresh interpreter
    that never imports sppdet (``-I``: no PYTHONPATH, no user site)."""
    import re
    import shutil

    from sppdet.data.synthetic import make_synthetic

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Export"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "torch.jit.load" in code
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copytree(exported["out"], work / "exported")
    data = make_synthetic(tmp_path / "data", num_images=2, seed=4)
    shutil.copy(sorted((data / "JPEGImages").glob("*.jpg"))[0], work / "photo.jpg")
    code += "\nimport sys\nassert not any(m.startswith('sppdet') for m in sys.modules)\n"
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    name, score, box = r.stdout.split(" ", 2)
    assert name in ("a", "b", "c") and np.isfinite(float(score)) and len(json.loads(box)) == 4
