"""Backbones: shapes, receptive-field geometry, weights loading, the pretrained Lite0."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from sppdet.errors import SppdetError
from sppdet.models import build_backbone
from sppdet.models.efficientnet_lite import same_pad


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("name,channels,size", [
    ("zf5", 256, (5, 6)),            # ceil(67/16), ceil(85/16)
    ("vgg16", 512, (4, 5)),          # floor(67/16), floor(85/16)
    ("lite0", 320, (5, 6)),          # the dilated tail; input padded to 80x96, then /16
    ("lite0-c4", 112, (5, 6)),
    ("lite0-cat", 432, (5, 6)),
])
def test_output_shapes(name, channels, size):
    bb = build_backbone(name, "random")
    assert bb.out_channels == channels and bb.stride == 16 and bb.name == name
    with torch.no_grad():
        y = bb(torch.zeros(2, 3, 67, 85))
    assert tuple(y.shape) == (2, channels) + size
    assert bb.feature_size(67, 85) == size
    assert not bb.training


# ---------------------------------------------------------------------------
# Geometry: receptive field size and centre of a cell (documented in each module)


def _linearised(bb: nn.Module) -> nn.Module:
    """Averaging positive weights, identity BatchNorm and average pooling: a linear
    network with the same geometry whose input gradient covers the whole receptive field
    (all paths positive; the smallest, at the receptive field's edge, is ~1e-20 for
    Lite0's dilated tail: far from float32 underflow)."""
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
    for parent in bb.modules():
        for key, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, key, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return bb


@pytest.mark.parametrize("name,width,col,rf", [
    ("zf5", 192, 6, 139),                # centre 96.5: support 27..165
    ("vgg16", 224, 6, 196),              # centre 104: support 6..201
    ("lite0-c4", 368, 10, 339),          # centre 175.5: support 6..344
    ("lite0-dilated", 880, 27, 851),     # centre 447.5: support 22..872
])
def test_receptive_field_centre_matches_center_offset(name, width, col, rf):
    bb = _linearised(build_backbone(name, "random"))
    x = torch.full((1, 3, 16, width), 1e-3, requires_grad=True)
    bb(x)[0, :, 0, col].sum().backward()
    support = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
    lo, hi = int(support.min()), int(support.max())
    assert hi - lo + 1 == rf
    # pixel k spans [k, k+1): the support's centre in continuous coordinates
    assert (lo + hi + 1) / 2 == bb.stride * col + bb.center_offset


# ---------------------------------------------------------------------------
# Lite0 specifics


def test_tf_same_padding_hand_examples():
    def pads(n, k, s, d=1):
        y = same_pad(torch.ones(1, 1, n, n), k, s, d)
        row = y[0, 0, y.shape[-2] // 2]
        left = int(torch.nonzero(row == 1)[0])
        return left, y.shape[-1] - n - left
    assert pads(224, 3, 2) == (0, 1)     # out 112: (112-1)*2 + 3 - 224 = 1 -> all on the right
    assert pads(225, 3, 2) == (1, 1)     # out 113: 112*2 + 3 - 225 = 2
    assert pads(224, 5, 2) == (1, 2)     # 111*2 + 5 - 224 = 3
    assert pads(30, 5, 1) == (2, 2)      # stride 1: symmetric (k-1)
    assert pads(30, 5, 1, 2) == (4, 4)   # dilation 2: effective kernel 9


def _center_crop_224(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    f = 224 / min(h, w)
    r = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
    y0, x0 = (r.shape[0] - 224) // 2, (r.shape[1] - 224) // 2
    return r[y0:y0 + 224, x0:x0 + 224]


def test_lite0_is_really_pretrained():
    skdata = pytest.importorskip("skimage.data")
    bb = build_backbone("lite0")
    assert bb.weights_source == "imagenet"
    batch = torch.stack([bb.preprocess(_center_crop_224(skdata.chelsea())),
                         bb.preprocess(_center_crop_224(skdata.coffee()))])
    with torch.no_grad():
        top = bb.classify(batch).argmax(1).tolist()
    assert top[0] in (281, 282, 283, 284, 285)     # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top[1] in (967, 968)                    # espresso, cup
    # the same network with random weights does not know cats
    rnd = build_backbone("lite0", "random")
    with torch.no_grad():
        assert rnd.classify(batch).argmax(1).tolist() != top


def test_preprocess_normalisation():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = img.astype(np.float64) / 255.0
    lite = build_backbone("lite0", "random").preprocess(img)
    np.testing.assert_allclose(lite.numpy(), ((x - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)
    zf = build_backbone("zf5", "random").preprocess(img)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(zf.numpy(), ((x - mean) / std).transpose(2, 0, 1), atol=1e-5)
    assert zf.dtype == torch.float32 and zf.shape == (3, 5, 7)
    with pytest.raises(ValueError):
        build_backbone("zf5", "random").preprocess(img.astype(np.float32))


# ---------------------------------------------------------------------------
# Weights and weights_id


def test_weights_id_follows_the_weights(tmp_path):
    a = build_backbone("zf5", "random")
    b = build_backbone("zf5", "random")
    assert a.weights_id == b.weights_id            # deterministic init
    f = tmp_path / "zf5.pt"
    torch.save(a.state_dict(), f)
    c = build_backbone("zf5", str(f))
    assert c.weights_id == a.weights_id and c.weights_source == str(f)
    sd = a.state_dict()
    sd["conv5.bias"] = sd["conv5.bias"] + 1.0
    torch.save(sd, f)
    d = build_backbone("zf5", f)
    assert d.weights_id != a.weights_id
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        assert not torch.equal(d(x), a(x))
    # same weights, another feature variant: another id (caches and checkpoints never mix them)
    assert build_backbone("lite0-c4", "random").weights_id != build_backbone("lite0", "random").weights_id
    assert build_backbone("lite0-dilated", "random").weights_id == build_backbone("lite0", "random").weights_id


def test_zf5_default_is_random_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sppdet.models.backbones"):
        bb = build_backbone("zf5")
    assert "random weights" in caplog.text
    assert bb.weights_id == build_backbone("zf5", "random").weights_id


def _one_line_error(fn, *needles):
    with pytest.raises(SppdetError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


class _NotATensor:
    pass


def test_bad_weight_files_are_one_line_errors(tmp_path):
    sd = build_backbone("zf5", "random").state_dict()
    missing = tmp_path / "missing_key.pt"
    torch.save({k: v for k, v in sd.items() if k != "conv5.bias"}, missing)
    _one_line_error(lambda: build_backbone("zf5", missing), str(missing), "conv5.bias")
    shape = tmp_path / "shape.pt"
    torch.save({**sd, "conv1.weight": torch.zeros(96, 3, 5, 5)}, shape)
    _one_line_error(lambda: build_backbone("zf5", shape), str(shape), "conv1.weight")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    _one_line_error(lambda: build_backbone("zf5", garbage), str(garbage))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"x": _NotATensor()}, unsafe)                # weights_only refuses to unpickle it
    _one_line_error(lambda: build_backbone("zf5", unsafe), str(unsafe))
    _one_line_error(lambda: build_backbone("zf5", tmp_path / "nope.pt"), "nope.pt", "not found")
    _one_line_error(lambda: build_backbone("lite0", missing), str(missing))   # zf5 file for lite0
    _one_line_error(lambda: build_backbone("resnet"), "resnet", "zf5")
    # zf5/vgg16 "imagenet" without the fetched files: tests/test_weights.py (with an isolated torch hub)


def test_vgg16_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    _one_line_error(lambda: build_backbone("vgg16"), "vgg16", "never downloads")


def test_vgg16_loads_a_torchvision_style_file(tmp_path, monkeypatch):
    ref = build_backbone("vgg16", "random")
    sd = dict(ref.state_dict())
    sd["classifier.0.weight"] = torch.zeros(4, 4)          # a full torchvision vgg16 file has fc layers
    f = tmp_path / "vgg16-local.pth"
    torch.save(sd, f)
    bb = build_backbone("vgg16", f)
    assert bb.weights_id == ref.weights_id
    # the same file found in torchvision's cache is the default ImageNet weights
    monkeypatch.setattr("sppdet.models.backbones._torchvision_vgg16_cache_file", lambda: f)
    assert build_backbone("vgg16").weights_source == "imagenet"
    assert build_backbone("vgg16", "imagenet").weights_id == ref.weights_id
