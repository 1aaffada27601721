import pickle

import pytest
import torch

from sppdet.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from sppdet.errors import CheckpointError


def payload():
    """A checkpoint whose SVMs score 3-d pooled features of 2 classes (no fc layers, no regressors)."""
    return {"config": {"name": "x", "svm": {"features": "spp"}}, "classes": ["a", "b"], "feature_dim": 3,
            "backbone": {"name": "zf5", "weights": None, "weights_id": "abc"},
            "svm": {"W": torch.ones(3, 2), "b": torch.zeros(2), "scale": 0.5}}


def test_round_trip(tmp_path):
    p = save_checkpoint(tmp_path / "m.pt", payload())
    d = load_checkpoint(p)
    assert d["format"] == FORMAT and d["version"] == VERSION and d["classes"] == ["a", "b"]
    assert torch.equal(d["svm"]["W"], torch.ones(3, 2))
    assert not list(tmp_path.glob(".m.pt*"))   # no temporary files left behind


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("content, needle", [
    (None, "no such checkpoint"),
    (b"not a zip", "not an sppdet checkpoint (not a PyTorch checkpoint file)"),
    (b"", "not an sppdet checkpoint (empty file)"),
    ("evil", "contains Python objects"),
    ("pickle", "contains Python objects"),
    ({"format": "other"}, "not an sppdet checkpoint"),
    ({"format": FORMAT, "version": 99}, "version 99 is not supported"),
    ({"format": FORMAT, "version": VERSION, "config": {}}, "missing 'classes'"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, content, needle, capsys):
    p = tmp_path / "m.pt"
    if content == "evil":                 # a torch zip whose pickle names a function
        torch.save({"x": Evil()}, p)
    elif content == "pickle":             # a bare pickle payload
        p.write_bytes(pickle.dumps({"x": Evil()}))
    elif isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, dict):
        torch.save(content, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)
    assert "weights_only" not in str(e.value)              # never suggest the unsafe way
    captured = capsys.readouterr()
    assert "code ran" not in captured.out                  # weights_only: nothing executed
    assert not captured.err                                # no raw torch warnings either


def full_payload(K=3, D=10, dims=(6, 4)):
    """What the pipeline writes: fc head, fc7 SVMs, box regressors, sizes declared."""
    from sppdet.models.heads import FCHead

    head = FCHead(D, list(dims), K)
    return {"config": {"name": "x", "svm": {"features": "fc7"}}, "classes": [f"c{i}" for i in range(K)],
            "feature_dim": D, "head_dims": list(dims), "head": head.state_dict(),
            "backbone": {"name": "zf5", "weights": None, "weights_id": "abc"},
            "svm": {"W": torch.ones(dims[-1], K), "b": torch.zeros(K), "scale": 0.5},
            "bbox_reg": {"W": torch.zeros(K, D, 4), "b": torch.zeros(K, 4), "mean": torch.zeros(K, 4),
                         "std": torch.ones(K, 4), "scale": 1.0}}


def _drop(d, *keys):
    sub = d
    for k in keys[:-1]:
        sub = sub[k]
    del sub[keys[-1]]


def _set(d, value, *keys):
    sub = d
    for k in keys[:-1]:
        sub = sub[k]
    sub[keys[-1]] = value


TAMPER = [
    # (what is done to a good checkpoint, expected text)
    (lambda d: _drop(d, "svm", "W"), "tensor svm.W is missing"),
    (lambda d: _drop(d, "head", "hidden.3.weight"), "tensor head.hidden.3.weight is missing"),
    (lambda d: _drop(d, "bbox_reg", "std"), "tensor bbox_reg.std is missing"),
    (lambda d: _set(d, torch.ones(5, 3), "svm", "W"), "svm.W has shape [5, 3], expected [4, 3]"),
    (lambda d: _set(d, torch.ones(2), "svm", "b"), "svm.b has shape [2], expected [3]"),
    (lambda d: _set(d, torch.zeros(6, 11), "head", "hidden.0.weight"),
     "head.hidden.0.weight has shape [6, 11], expected [6, 10]"),
    (lambda d: _set(d, torch.zeros(5, 4), "head", "cls_score.weight"),
     "head.cls_score.weight has shape [5, 4], expected [4, 4] (3 classes + background"),
    (lambda d: _set(d, torch.zeros(3, 9, 4), "bbox_reg", "W"), "bbox_reg.W has shape [3, 9, 4], expected [3, 10, 4]"),
    (lambda d: _set(d, torch.ones(4, 3, dtype=torch.float64), "svm", "W"), "svm.W has dtype float64, expected float32"),
    (lambda d: _set(d, torch.ones(4, 3, dtype=torch.int32), "svm", "W"), "svm.W has dtype int32"),
    (lambda d: _set(d, torch.full((4, 3), float("nan")), "svm", "W"), "svm.W contains NaN or infinite values"),
    (lambda d: _set(d, [[1.0] * 3] * 4, "svm", "W"), "svm.W is a list, not a tensor"),
    (lambda d: _set(d, -1.0, "svm", "scale"), "svm.scale must be a positive number"),
    (lambda d: _set(d, ["c0", "c1"], "classes"), "cls_score.weight has shape [4, 4], expected [3, 4]"),  # class count
    (lambda d: _set(d, 12, "feature_dim"), "head.hidden.0.weight has shape [6, 10], expected [6, 12]"),
    (lambda d: _set(d, [6, 5], "head_dims"), "head.hidden.3.weight has shape [4, 6], expected [5, 6]"),
    (lambda d: _set(d, torch.zeros(1), "head", "extra.weight"), "unexpected entry head.extra.weight"),
    (lambda d: _drop(d, "head"), "SVMs score fc7 features but it holds no fc layers"),
    (lambda d: _drop(d, "feature_dim"), "missing 'feature_dim'"),
]


@pytest.mark.parametrize("tamper, needle", TAMPER, ids=[t[1][:40] for t in TAMPER])
def test_tampered_checkpoints_are_refused_at_load_time(tmp_path, tamper, needle):
    good = save_checkpoint(tmp_path / "good.pt", full_payload())
    assert load_checkpoint(good)["classes"] == ["c0", "c1", "c2"]
    d = full_payload()
    tamper(d)
    p = save_checkpoint(tmp_path / "m.pt", d)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_backbone_state_is_checked_against_the_backbone(tmp_path):
    from sppdet.checkpoint import load_module_state

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = net.state_dict()
    load_module_state(net, dict(state), tmp_path / "m.pt", "backbone_state")      # fits
    for change, needle in ((lambda s: s.pop("0.weight"), "backbone_state.0.weight is missing"),
                           (lambda s: s.__setitem__("0.weight", torch.zeros(2, 4)), "has shape [2, 4], expected [2, 3]"),
                           (lambda s: s.__setitem__("0.bias", torch.zeros(2, dtype=torch.float16)), "dtype float16"),
                           (lambda s: s.__setitem__("1.num_batches_tracked", torch.tensor(1.0)), "expected int64")):
        bad = dict(state)
        change(bad)
        with pytest.raises(CheckpointError) as e:
            load_module_state(net, bad, tmp_path / "m.pt", "backbone_state")
        assert needle in str(e.value) and "m.pt" in str(e.value), str(e.value)


def _tiny_detector():
    import numpy as np

    from sppdet.config import Config, merge
    from sppdet.models.backbones import build_backbone
    from sppdet.models.bbox_reg import BBoxRegressors
    from sppdet.models.detector import SPPDetector
    from sppdet.models.heads import FCHead
    from sppdet.models.svm import LinearSVMs

    cfg = merge(Config(), {"features": {"weights": "random", "pyramid": [2, 1]},
                           "finetune": {"fc_dims": [8, 8]}, "test": {"nms": 0.25}})
    rng = np.random.default_rng(0)
    bb = build_backbone("zf5", "random")
    dim = bb.out_channels * 5
    torch.manual_seed(0)
    head = FCHead(dim, [8, 8], 2, 0.5).eval()
    svms = LinearSVMs(rng.normal(size=(8, 2)), rng.normal(size=2), 0.7)
    reg = BBoxRegressors(rng.normal(size=(2, dim, 4)) * 1e-3, rng.normal(size=(2, 4)), rng.normal(size=(2, 4)),
                         rng.uniform(0.5, 1.0, size=(2, 4)), 0.3)
    model = SPPDetector(classes=["a", "b"], backbone=bb, features=cfg.features, svms=svms, head=head, bbox_reg=reg,
                        svm_features="fc7", test=cfg.test, feature_dim=dim, backbone_weights="random",
                        stats={"train_images": 3})
    return model, cfg


def test_detector_round_trip_keeps_every_part(tmp_path):
    """save_detector -> load_detector gives the same scores, boxes, settings and backbone weights,
    in the key layout of format version 1 (what checkpoints written before sppdet.build hold)."""
    import numpy as np

    from sppdet.checkpoint import load_detector, save_detector

    model, cfg = _tiny_detector()
    path = save_detector(tmp_path / "model.pt", model, cfg)
    raw = load_checkpoint(path)
    assert set(raw) == {"format", "version", "config", "classes", "backbone", "feature_dim", "svm", "stats",
                        "backbone_state", "head", "head_dims", "bbox_reg", "proposals"}
    assert raw["backbone"] == {"name": "zf5", "weights": "random", "weights_id": model.backbone.weights_id}
    back, cfg2 = load_detector(path)
    assert cfg2 == cfg and back.classes == ["a", "b"] and back.test.nms == 0.25 and back.stats == {"train_images": 3}
    x = torch.randn(6, model.feature_dim)
    s1, p1 = model.score(x)
    s2, p2 = back.score(x)
    np.testing.assert_array_equal(s1, s2)
    windows = np.array([[0, 0, 10, 10], [5, 5, 40, 30], [1, 2, 3, 4], [0, 0, 50, 50], [9, 9, 19, 29],
                        [2, 2, 12, 12]], np.float32)
    np.testing.assert_array_equal(model.regress(p1, windows), back.regress(p2, windows))
    sd1, sd2 = model.backbone.state_dict(), back.backbone.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert back.backbone.weights_id == model.backbone.weights_id


def test_checkpoint_keeps_the_proposals_it_was_trained_with_when_a_preset_changes(tmp_path, caplog):
    """A checkpoint records its preset's settings: if `fast` means other settings later, loading
    pins the recorded ones (as overrides), so test proposals match training; same settings: untouched."""
    import logging

    from sppdet.checkpoint import load_detector, proposal_settings, save_detector
    from sppdet.config import merge
    from sppdet.proposals.presets import get_preset

    model, cfg = _tiny_detector()
    path = save_detector(tmp_path / "model.pt", model, cfg)
    assert load_checkpoint(path)["proposals"]["settings"] == get_preset("fast").settings()
    assert load_detector(path)[1] == cfg  # unchanged preset: the config as saved
    # a checkpoint trained with `fast` when it meant other settings (here: those of `fast-split`)
    raw = load_checkpoint(path)
    raw["proposals"] = {"settings": get_preset("fast-split").settings()}
    old = tmp_path / "old.pt"
    torch.save(raw, old)
    with caplog.at_level(logging.INFO, logger="sppdet.checkpoint"):
        _, cfg_old = load_detector(old)
    assert cfg_old.proposals.mode == "fast"
    assert proposal_settings(cfg_old) == get_preset("fast-split").settings()
    assert get_preset(cfg_old.proposals.mode, **cfg_old.proposals.overrides).key() == get_preset("fast-split").key()
    assert "using the ones it was trained with" in caplog.text
    # a custom override survives the round trip too
    cfg3 = merge(cfg, {"proposals": {"overrides": {"ks": [90.0]}}})
    p3 = save_detector(tmp_path / "m3.pt", model, cfg3)
    assert proposal_settings(load_detector(p3)[1]) == proposal_settings(cfg3)
    # a record that is not a preset's settings is a one-line checkpoint error
    raw["proposals"] = {"settings": {**get_preset("fast").settings(), "ks": "many"}}
    torch.save(raw, old)
    with pytest.raises(CheckpointError, match="proposal settings are invalid"):
        load_detector(old)


def test_packaged_backbone_weights_are_referenced_not_stored(tmp_path):
    from sppdet.checkpoint import backbone_travels

    model, _ = _tiny_detector()
    assert backbone_travels(model)                    # random weights travel
    model.backbone_weights = None
    assert backbone_travels(model)                    # zf5 has no packaged weights to rebuild from
    model.backbone.name = "lite0"
    assert not backbone_travels(model)                # packaged Lite0: a reference is enough
    model.backbone_trained = True
    assert backbone_travels(model)                    # ... unless training changed the conv layers
