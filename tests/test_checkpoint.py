import pickle

import pytest
import torch

from sppdet.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from sppdet.errors import CheckpointError


def payload():
    return {"config": {"name": "x"}, "classes": ["a", "b"], "backbone": {"name": "zf5", "weights": None,
            "weights_id": "abc"}, "svm": {"W": torch.ones(3, 2), "b": torch.zeros(2), "scale": 0.5}}


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
    (b"not a zip", "not a readable sppdet checkpoint"),
    ("evil", "not a readable sppdet checkpoint"),
    ({"format": "other"}, "not an sppdet checkpoint"),
    ({"format": FORMAT, "version": 99}, "version 99 is not supported"),
    ({"format": FORMAT, "version": VERSION, "config": {}}, "missing 'classes'"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, content, needle, capsys):
    p = tmp_path / "m.pt"
    if content == "evil":
        p.write_bytes(pickle.dumps({"x": Evil()}))
        torch.save({"x": Evil()}, p)
    elif isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, dict):
        torch.save(content, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)
    assert "code ran" not in capsys.readouterr().out      # weights_only: nothing executed


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
                        "backbone_state", "head", "head_dims", "bbox_reg"}
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
