"""ImageNet weights: the ZFNet -> zf5 conversion, its geometry, fc6/fc7 as the fine-tuning start,
and ``sppdet weights fetch|list`` (offline: every download is refused or faked here)."""

from __future__ import annotations

import hashlib
import urllib.error
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sppdet.cli import main
from sppdet.errors import ConfigError, SppdetError
from sppdet.models import build_backbone
from sppdet.models import weights as W
from sppdet.models.heads import FCHead
from sppdet.models.spp import project_windows, spp_pool
from sppdet.models.zf5 import ZF5
from sppdet.train.finetune import init_fc_head, resolve_fc_init

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """torch hub and pytorchcv's root inside tmp_path; any real download fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_download(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path


def _zfnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state_dict with pytorchcv zfnet's keys and shapes (no pytorchcv needed)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"features.stage1.unit1.conv": (96, 3, 7, 7), "features.stage2.unit1.conv": (256, 96, 5, 5),
              "features.stage3.unit1.conv": (384, 256, 3, 3), "features.stage3.unit2.conv": (384, 384, 3, 3),
              "features.stage3.unit3.conv": (256, 384, 3, 3), "output.fc1.fc": (4096, 9216),
              "output.fc2.fc": (4096, 4096), "output.fc3": (1000, 4096)}
    sd = {}
    for k, s in shapes.items():
        fan_in = torch.tensor(s[1:]).prod().item()
        sd[f"{k}.weight"] = torch.randn(s, generator=g) * (2.0 / fan_in) ** 0.5
        sd[f"{k}.bias"] = torch.randn(s[0], generator=g) * 0.1
    return sd


def _pytorchcv_zfnet(seed: int = 0):
    """pytorchcv's own zfnet, randomly initialised (nothing downloaded), in eval mode."""
    zfnet_mod = pytest.importorskip("pytorchcv.models.zfnet")
    net = zfnet_mod.zfnet(pretrained=False)
    net.load_state_dict(_zfnet_state(seed))      # nonzero biases everywhere: a stricter comparison
    return net.eval()


def _pytorchcv_conv5(net, x):
    f = net.features
    return f.stage3.unit3(f.stage3.unit2(f.stage3.unit1(f.stage2(f.stage1(x)))))


# ---------------------------------------------------------------------------
# Conversion, checked against pytorchcv's implementation


def test_converted_zf5_gives_pytorchcv_conv5(tmp_path):
    ref = _pytorchcv_zfnet()
    conv, fc = W.convert_zfnet(ref.state_dict(), "ref")
    conv_file, _ = W.save_converted_zf5(conv, fc, tmp_path / "zf5.pt", "test", "0" * 40)
    bb = build_backbone("zf5", conv_file)        # the file says its layout
    assert bb.name == "zf5-zfnet" and bb.layout == "zfnet" and bb.imagenet_fc_file == conv_file
    x = torch.randn(2, 3, 237, 301, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = bb(x), _pytorchcv_conv5(ref, x)
    assert ours.shape == theirs.shape == (2, 256, 13, 17)     # f(237), f(301) of the zf5 docs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the same weights in the paper's layout are another network (padding, pooling, LRN k)
    paper = build_backbone("zf5", "random")
    paper.load_state_dict(conv)
    with torch.no_grad():
        assert paper(x).shape != ours.shape or not torch.allclose(paper(x), ours)
    # fc6/fc7 are zfnet's fc1/fc2; fc3 (the 1000 ImageNet classes) is dropped
    sd = ref.state_dict()
    assert set(fc) == {"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"}
    assert torch.equal(fc["fc6.weight"], sd["output.fc1.fc.weight"])
    assert torch.equal(fc["fc6.bias"], sd["output.fc1.fc.bias"])
    assert torch.equal(fc["fc7.weight"], sd["output.fc2.fc.weight"])
    assert torch.equal(fc["fc7.bias"], sd["output.fc2.fc.bias"])
    assert torch.equal(W.load_zf5_fc(conv_file)["fc6.weight"], sd["output.fc1.fc.weight"])


def test_spp6_of_the_whole_map_is_zfnets_fc6_input_and_fc7_follows():
    """A 224 x 224 image: sppdet's {6} pyramid of the whole window is pool5 flattened as ZFNet's
    classifier reads it, so the ImageNet fc6/fc7 loaded into FCHead give ZFNet's fc7."""
    ref = _pytorchcv_zfnet(seed=3)
    conv, fc = W.convert_zfnet(ref.state_dict())
    bb = ZF5("zfnet").eval()
    bb.load_state_dict(conv)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fmap = bb(x)[0]
        cells = project_windows(torch.tensor([[0.0, 0.0, 224.0, 224.0]]), bb.stride, fmap.shape[1],
                                fmap.shape[2], bb.center_offset)
        assert cells.tolist() == [[0, 0, 12, 12]]
        pooled = spp_pool(fmap, cells, (6,))
        flat = ref.features(x).flatten(1)                   # what ZFNet's fc1 reads
        assert torch.equal(pooled, flat)
        head = FCHead(9216, [4096, 4096], num_classes=4).eval()
        head.load_imagenet_fc(fc)
        theirs = ref.output.fc2(ref.output.fc1(flat))
        torch.testing.assert_close(head.fc7(pooled), theirs, rtol=1e-5, atol=1e-5)


def test_spp6_order_is_torch_flatten_of_pool5_by_hand():
    """Without pytorchcv: {6} over a 13 x 13 map = 3x3/2 ceil max pooling, flattened (C, 6, 6)
    (slow reference: every bin by hand)."""
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(5, 13, 13, generator=g)
    pooled = spp_pool(fmap, torch.tensor([[0, 0, 12, 12]]), (6,))[0]
    ref = torch.empty(5, 6, 6)
    for c in range(5):
        for by in range(6):
            for bx in range(6):
                ref[c, by, bx] = fmap[c, 2 * by:2 * by + 3, 2 * bx:2 * bx + 3].max()
    assert torch.equal(pooled, ref.flatten())
    assert torch.equal(pooled, F.max_pool2d(fmap[None], 3, 2, ceil_mode=True).flatten())


def test_zfnet_layout_geometry_by_gradient_support():
    """Receptive field 139 centred at 16 i + 20.5 (docs of sppdet.models.zf5); map sizes."""
    bb = build_backbone("zf5-zfnet", "random")
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                m.bias.zero_()
    for key in ("pool1", "pool2"):     # average pooling with the same geometry (ceil_mode kept)
        p = getattr(bb, key)
        setattr(bb, key, nn.AvgPool2d(p.kernel_size, p.stride, p.padding, ceil_mode=p.ceil_mode))
    x = torch.full((1, 3, 48, 192), 1e-3, requires_grad=True)
    col = 5
    bb(x)[0, :, 0, col].sum().backward()
    support = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
    lo, hi = int(support.min()), int(support.max())
    assert hi - lo + 1 == bb.receptive_field == 139
    assert (lo + hi + 1) / 2 == bb.stride * col + bb.center_offset == 100.5
    zf = build_backbone("zf5-zfnet", "random")
    assert zf.feature_size(688, 224) == (42, 13)
    assert zf.feature_size(31, 31) == (1, 1)
    assert zf.weights_id != build_backbone("zf5", "random").weights_id    # another architecture


@pytest.mark.parametrize("key", ["features.stage3.unit3.conv.bias", "output.fc1.fc.weight"])
def test_convert_rejects_what_is_not_zfnet(key):
    sd = _zfnet_state()
    del sd[key]
    with pytest.raises(SppdetError, match=key.replace(".", r"\.")):
        W.convert_zfnet(sd, "x.pth")
    sd = _zfnet_state()
    sd["output.fc1.fc.weight"] = torch.zeros(4096, 12800)
    with pytest.raises(SppdetError, match="12800"):
        W.convert_zfnet(sd, "x.pth")


def test_pinned_store_entry_is_pytorchcvs():
    store = pytest.importorskip("pytorchcv.models.common.model_store")
    error, sha1, release = store.get_model_name_suffix_data("zfnet")
    e = W.ZFNET_STORE
    assert (e.error, e.sha1, e.release) == (error, sha1, release)
    assert e.repo_url == store.imgclsmob_repo_url
    assert e.file_name == f"zfnet-{error}-{sha1[:8]}.pth"


# ---------------------------------------------------------------------------
# build_backbone: imagenet means the fetched files


def _fake_store(caches, monkeypatch, seed: int = 0):
    """A raw 'pytorchcv' zfnet file in pytorchcv's root and a store entry pinning its SHA-1."""
    raw_dir = caches / "home" / ".torch" / "models"
    raw_dir.mkdir(parents=True)
    tmp = raw_dir / "tmp.pth"
    torch.save(_zfnet_state(seed), tmp)
    sha1 = hashlib.sha1(tmp.read_bytes()).hexdigest()
    entry = W.StoreEntry("zfnet", "1727", sha1, "v0.0.395")
    tmp.rename(raw_dir / entry.file_name)
    monkeypatch.setattr(W, "ZFNET_STORE", entry)
    return entry


def test_zf5_imagenet_absent_is_a_one_line_error_naming_the_fetch_command(caches):
    for name in ("zf5", "vgg16"):
        with pytest.raises(SppdetError) as e:
            build_backbone(name, "imagenet")
        msg = str(e.value)
        assert "\n" not in msg and f"sppdet weights fetch {name}" in msg and str(caches / "hub") in msg


def test_fetch_zf5_converts_a_present_file_without_downloading(caches, monkeypatch, capsys):
    entry = _fake_store(caches, monkeypatch)
    assert main(["weights", "fetch", "zf5"]) == 0
    out = capsys.readouterr().out
    conv_file = caches / "hub" / "checkpoints" / f"sppdet-zf5-zfnet-{entry.sha1[:8]}.pt"
    assert str(conv_file) in out and conv_file.is_file() and W.zf5_fc_file(conv_file).is_file()
    bb = build_backbone("zf5", "imagenet")
    assert (bb.name, bb.weights_source, bb.imagenet_fc_file) == ("zf5-zfnet", "imagenet", conv_file)
    assert torch.equal(bb.conv5.weight, _zfnet_state()["features.stage3.unit3.conv.weight"])
    # a checkpoint names it zf5-zfnet: rebuilt by that name, same network
    assert build_backbone("zf5-zfnet").weights_id == bb.weights_id
    assert build_backbone(bb.name, "random").center_offset == bb.center_offset == 20.5
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert sum("present" in line for line in listing) == 3 and "absent" in listing[0]   # vgg16 absent


def test_fetch_zf5_offline_is_one_line_exit_2_and_leaves_nothing(caches, monkeypatch, capsys):
    def unreachable(url, dst, *a, **k):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    for name, host in (("zf5", "github.com"), ("vgg16", "download.pytorch.org")):
        assert main(["weights", "fetch", name]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("sppdet: error:")]
        assert len(errors) == 1 and errors[0].startswith("sppdet: error: could not reach " + host), err
        assert "Traceback" not in err and err.endswith(errors[0] + "\n")
    assert not (caches / "home" / ".torch").exists() and not (caches / "hub").exists()


def test_fetch_zf5_checks_the_sha1_of_what_it_downloads(caches, monkeypatch):
    entry = _fake_store(caches, monkeypatch)
    raw = W.zfnet_raw_file()
    good = raw.read_bytes()
    raw.write_bytes(good[:-1] + b"\0")           # a corrupt local copy is downloaded again
    served = {"data": good}

    def fake_download(url, dst, hash_prefix=None, progress=True):
        assert url == entry.url
        with zipfile.ZipFile(dst, "w") as zf:
            zf.writestr(entry.file_name, served["data"])

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    W.fetch_zf5()
    assert raw.read_bytes() == good and not raw.with_name(raw.name + ".zip").exists()
    raw.unlink()
    served["data"] = good[:-1] + b"\1"            # the server sends something else
    with pytest.raises(SppdetError, match="SHA-1"):
        W.fetch_zf5()
    assert not raw.exists()


# ---------------------------------------------------------------------------
# finetune.init


def test_fc_init_resolution(caches, monkeypatch):
    _fake_store(caches, monkeypatch)
    W.fetch_zf5()
    zf = build_backbone("zf5", "imagenet")
    assert resolve_fc_init("auto", zf, 9216, [6], 0.0, [4096, 4096]) == "imagenet"
    assert resolve_fc_init("imagenet", zf, 9216, [6], 0.0, [4096, 4096]) == "imagenet"
    assert resolve_fc_init("he", zf, 9216, [6], 0.0, [4096, 4096]) == "he"
    # 9216 values with another layout (25 + 9 + 1 + 1 bins) are not pool5
    assert resolve_fc_init("auto", zf, 9216, [5, 3, 1, 1], 0.0, [4096, 4096]) == "he"
    assert resolve_fc_init("auto", zf, 5376, [4, 2, 1], 0.0, [4096, 4096]) == "he"
    assert resolve_fc_init("auto", zf, 9216, [6], 0.0, [1024, 1024]) == "he"
    assert resolve_fc_init("auto", build_backbone("zf5", "random"), 9216, [6], 0.0, [4096, 4096]) == "he"
    with pytest.raises(ConfigError) as e:
        resolve_fc_init("imagenet", zf, 12800, [6, 3, 2, 1], 0.0, [4096, 4096])
    assert "\n" not in str(e.value) and "[6]" in str(e.value) and "9216" in str(e.value)
    with pytest.raises(ConfigError, match="ImageNet fc"):
        resolve_fc_init("imagenet", build_backbone("zf5", "random"), 9216, [6], 0.0, [4096, 4096])
    W.zf5_fc_file(zf.imagenet_fc_file).unlink()
    assert resolve_fc_init("auto", zf, 9216, [6], 0.0, [4096, 4096]) == "he"


def test_init_fc_head_loads_fc6_fc7_and_keeps_he_otherwise(caches, monkeypatch):
    _fake_store(caches, monkeypatch)
    W.fetch_zf5()
    zf = build_backbone("zf5", "imagenet")
    sd = _zfnet_state()
    head = FCHead(9216, [4096, 4096], num_classes=3)
    init_fc_head(head, "imagenet", zf)
    assert torch.equal(head.hidden[0].weight, sd["output.fc1.fc.weight"])
    assert torch.equal(head.hidden[3].bias, sd["output.fc2.fc.bias"])
    torch.manual_seed(0)
    he = FCHead(9216, [4096, 4096], num_classes=3)
    init_fc_head(he, "he", zf)
    assert not torch.equal(he.hidden[0].weight, sd["output.fc1.fc.weight"])
    assert abs(float(he.hidden[0].weight.detach().std()) - (2.0 / 9216) ** 0.5) < 1e-3
    with pytest.raises(ValueError, match="fc6"):
        FCHead(5376, [4096, 4096], 3).load_imagenet_fc(W.load_zf5_fc(zf.imagenet_fc_file))


def test_config_knows_finetune_init():
    from sppdet.config import load_config

    assert load_config(None).finetune.init == "auto"
    assert load_config(None, {"finetune": {"init": "he"}, "features": {"backbone": "zf5-zfnet"}}).finetune.init == "he"
    with pytest.raises(ConfigError, match="finetune.init"):
        load_config(None, {"finetune": {"init": "xavier"}})
