"""The checkpoint: one file holding everything a trained detector needs (DESIGN §3).

Contents (a dict of tensors and plain Python values, saved with ``torch.save``
and loaded with ``torch.load(..., weights_only=True)``: loading never runs
code from the file):

- ``format`` / ``version``: ``"sppdet-checkpoint"`` / :data:`VERSION`.
- ``config``: the resolved config (nested dicts), ``classes``: class names.
- ``backbone``: ``{"name", "weights", "weights_id"}``: ``weights`` is the
  config's reference (``None`` = packaged/default weights, ``"random"``, or a
  path); ``backbone_state`` holds the weights themselves whenever they cannot
  be rebuilt from that reference (random init, a user's file, or conv layers
  fine-tuned end to end), so a checkpoint is self-contained.
- ``head``: fc6/fc7/classifier state (absent without fine-tuning) and
  ``head_dims``; ``svm``: SVM weights, biases and feature scale;
  ``bbox_reg``: regressor weights (absent when disabled).
- ``feature_dim``, ``stats``: training statistics (timings, mAP if measured).

Both directions live here: :func:`save_detector` (an :class:`~sppdet.models.detector.SPPDetector`
and its config -> file, including the rule deciding when the backbone's weights travel in the
file) and :func:`load_detector` (file -> detector and config, version and consistency checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import Config, config_from_dict
from .errors import CheckpointError
from .utils.io import atomic_path

FORMAT = "sppdet-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (``payload`` without format/version keys)."""
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; one-line :class:`CheckpointError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, unsafe globals, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable sppdet checkpoint ({reason[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sppdet checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {data.get('version')} is not supported (this sppdet reads {VERSION})")
    for key in ("config", "classes", "backbone", "svm"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint is missing '{key}'")
    return data


# ---------------------------------------------------------------------------
# detector <-> file


def backbone_travels(model) -> bool:
    """Whether the backbone's weights must be stored in the checkpoint.

    Default ImageNet weights (packaged Lite0, torchvision VGG16) are referenced by name;
    anything else (random init, a user's file, conv layers changed by training) travels
    inside the checkpoint, so a checkpoint is self-contained.
    """
    rebuildable = model.backbone_weights is None and model.backbone.name.startswith(("lite0", "vgg16"))
    return model.backbone_trained or not rebuildable


def detector_payload(model, config: Config) -> dict[str, Any]:
    """The checkpoint dict (without format/version) of a trained detector and its config."""
    payload: dict[str, Any] = {
        "config": config.to_dict(),
        "classes": list(model.classes),
        "backbone": {"name": model.backbone.name, "weights": model.backbone_weights,
                     "weights_id": model.backbone.weights_id},
        "feature_dim": model.feature_dim,
        "svm": model.svms.state_dict(),
        "stats": model.stats,
    }
    if backbone_travels(model):
        payload["backbone_state"] = model.backbone.state_dict()
    if model.head is not None:
        payload["head"] = model.head.state_dict()
        payload["head_dims"] = list(model.head.fc_dims)
    if model.bbox_reg is not None:
        payload["bbox_reg"] = model.bbox_reg.state_dict()
    return payload


def save_detector(path: str | Path, model, config: Config) -> Path:
    """Write a trained detector (:class:`~sppdet.models.detector.SPPDetector`) and its config."""
    return save_checkpoint(path, detector_payload(model, config))


def load_detector(path: str | Path):
    """Read ``model.pt`` into ``(SPPDetector on the CPU, Config)``; one-line :class:`CheckpointError`
    when the file is not a usable checkpoint."""
    from .models.backbones import build_backbone
    from .models.bbox_reg import BBoxRegressors
    from .models.detector import SPPDetector
    from .models.heads import FCHead
    from .models.svm import LinearSVMs

    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except Exception as e:
        raise CheckpointError(f"{path}: checkpoint config is invalid ({e})") from None
    bb = ckpt["backbone"]
    if "backbone_state" in ckpt:
        backbone = build_backbone(bb["name"], "random")
        backbone.load_state_dict(ckpt["backbone_state"])
        backbone.weights_id = bb["weights_id"]
    else:
        backbone = build_backbone(bb["name"], bb.get("weights"))
        if getattr(backbone, "weights_id", None) != bb["weights_id"]:
            raise CheckpointError(
                f"{path}: the backbone weights {bb.get('weights') or '(default)'} differ from the ones "
                "this detector was trained with")
    head = None
    if "head" in ckpt:
        from .models.spp import window_feature_dim

        f = cfg.features
        in_dim = window_feature_dim(backbone.out_channels, f.pyramid, f.context, f.context_pyramid)
        head = FCHead(in_dim, ckpt["head_dims"], len(ckpt["classes"]), cfg.finetune.dropout)
        head.load_state_dict(ckpt["head"])
        head.eval()
    svms = LinearSVMs.from_state_dict(ckpt["svm"])
    reg = BBoxRegressors.from_state_dict(ckpt["bbox_reg"]) if ckpt.get("bbox_reg") else None
    model = SPPDetector(
        classes=list(ckpt["classes"]), backbone=backbone, features=cfg.features, svms=svms, head=head,
        bbox_reg=reg, svm_features=cfg.svm.features, test=cfg.test,
        feature_dim=int(ckpt.get("feature_dim") or 0), backbone_weights=bb.get("weights"),
        backbone_trained="backbone_state" in ckpt and cfg.finetune.end_to_end,
        stats=dict(ckpt.get("stats") or {}))
    return model, cfg
