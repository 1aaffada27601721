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

import logging
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_from_dict
from .errors import CheckpointError
from .utils.io import atomic_torch_save

logger = logging.getLogger(__name__)

FORMAT = "sppdet-checkpoint"
VERSION = 1

_ZIP_MAGIC = b"PK\x03\x04"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (``payload`` without format/version keys).

    Raises:
        DiskFullError: the disk filled up (one line naming ``path``; an older ``path`` survives).
    """
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **payload}
    return atomic_torch_save(path, data)


def _sniff(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely and check it; one-line :class:`CheckpointError` on any problem.

    Loading never runs code from the file (``weights_only=True``).  A file that is not a
    PyTorch zip archive is "not an sppdet checkpoint"; one whose pickle names Python
    classes or functions "contains Python objects" and is refused.  The tensors are then
    checked against the sizes the checkpoint itself declares (:func:`check_contents`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    head = _sniff(path)
    if not head:
        raise CheckpointError(f"{path}: not an sppdet checkpoint (empty file)")
    is_zip = head.startswith(_ZIP_MAGIC)
    looks_pickled = head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5 if len(head) > 1 else False
    try:
        with warnings.catch_warnings():       # e.g. torch's "Detected pickle protocol 4" note
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if is_zip or looks_pickled:
            raise CheckpointError(f"{path}: contains Python objects; refusing to load it (an sppdet checkpoint "
                                  "holds only tensors and plain values, never pickled classes or functions)") from None
        raise CheckpointError(f"{path}: not an sppdet checkpoint (not a PyTorch checkpoint file)") from None
    except Exception:  # truncated zip, garbage, ...
        if is_zip:
            raise CheckpointError(f"{path}: not an sppdet checkpoint, or a truncated or corrupt one "
                                  "(its zip archive cannot be read)") from None
        raise CheckpointError(f"{path}: not an sppdet checkpoint (not a PyTorch checkpoint file)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sppdet checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {data.get('version')} is not supported (this sppdet reads {VERSION})")
    for key in ("config", "classes", "backbone", "svm"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint is missing '{key}'")
    check_contents(data, path)
    return data


# ---------------------------------------------------------------------------
# Checks of the contents against the sizes the checkpoint declares


def _shape(t: Any) -> str:
    return "[" + ", ".join(str(int(n)) for n in t.shape) + "]"


def _check_tensor(path: Path, where: str, t: Any, shape: tuple[int, ...], why: str) -> None:
    """``t`` is a finite float32 tensor of ``shape`` (``why`` says where the sizes come from)."""
    if t is None:
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: tensor {where} is missing")
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: {where} is a {type(t).__name__}, "
                              "not a tensor")
    if t.dtype != torch.float32:
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: {where} has dtype "
                              f"{str(t.dtype).replace('torch.', '')}, expected float32")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: {where} has shape {_shape(t)}, expected "
                              f"[{', '.join(map(str, shape))}] ({why})")
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: {where} contains NaN or infinite values")


def _check_scale(path: Path, where: str, v: Any) -> None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: {where} must be a positive number, got {v!r}")


def _check_keys(path: Path, where: str, state: Any, expected: set[str]) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: '{where}' is not a mapping of tensors")
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing:
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: tensor {where}.{missing[0]} is missing")
    if extra:
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: unexpected entry {where}.{extra[0]}")


def _positive_int(path: Path, where: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: {where} must be a positive integer, got {v!r}")
    return v


def check_contents(data: dict[str, Any], path: str | Path = "checkpoint") -> None:
    """Check every tensor of a loaded checkpoint against the sizes it declares.

    The declared sizes: K = ``len(classes)``, D = ``feature_dim``, ``head_dims`` (the fc
    widths) and ``config.svm.features`` (whether the SVMs score fc7 or pooled features).
    Checked: the fc head (``hidden.<i>.weight/bias``, ``cls_score``: [K + 1, ...]), the
    SVMs (``W [D_svm, K]``, ``b [K]``, positive ``scale``), the box regressors
    (``W [K, D, 4]``, ``b``/``mean``/``std`` [K, 4]); each a finite float32 tensor, no key
    missing or extra.  (``backbone_state`` is checked against the backbone it is loaded
    into: :func:`load_module_state`.)

    Raises:
        CheckpointError: one line naming the file and the first wrong entry.
    """
    path = Path(path)
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: 'classes' must be a list of distinct "
                              f"names, got {str(classes)[:80]}")
    K = len(classes)
    cfg = data.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: 'config' is not a mapping")
    if "feature_dim" not in data:
        raise CheckpointError(f"{path}: checkpoint is missing 'feature_dim'")
    D = _positive_int(path, "feature_dim", data["feature_dim"])
    svm_cfg = cfg.get("svm") if isinstance(cfg.get("svm"), dict) else {}
    svm_on = svm_cfg.get("features", "fc7")

    fc7_dim = None
    if "head" in data:
        dims = data.get("head_dims")
        if not isinstance(dims, list):
            raise CheckpointError(f"{path}: tampered or damaged checkpoint: 'head' without a 'head_dims' list")
        dims = [_positive_int(path, f"head_dims[{i}]", d) for i, d in enumerate(dims)]
        head = data["head"]
        # FCHead: (Linear, ReLU, Dropout) per hidden layer, so the Linear layers are hidden.0, hidden.3, ...
        expected = {"cls_score.weight", "cls_score.bias"}
        expected |= {f"hidden.{3 * i}.{p}" for i in range(len(dims)) for p in ("weight", "bias")}
        _check_keys(path, "head", head, expected)
        prev = D
        for i, d in enumerate(dims):
            why = f"head_dims[{i}] = {d}, input {prev}" + (" = feature_dim" if i == 0 else "")
            _check_tensor(path, f"head.hidden.{3 * i}.weight", head[f"hidden.{3 * i}.weight"], (d, prev), why)
            _check_tensor(path, f"head.hidden.{3 * i}.bias", head[f"hidden.{3 * i}.bias"], (d,), why)
            prev = d
        why = f"{K} classes + background, input {prev}"
        _check_tensor(path, "head.cls_score.weight", head["cls_score.weight"], (K + 1, prev), why)
        _check_tensor(path, "head.cls_score.bias", head["cls_score.bias"], (K + 1,), why)
        fc7_dim = prev
    if svm_on == "fc7":
        if fc7_dim is None:
            raise CheckpointError(f"{path}: tampered or damaged checkpoint: its SVMs score fc7 features but it "
                                  "holds no fc layers ('head')")
        d_svm, why = fc7_dim, f"fc7 width {fc7_dim}, {K} classes"
    else:
        d_svm, why = D, f"feature_dim {D}, {K} classes"
    svm = data["svm"]
    _check_keys(path, "svm", svm, {"W", "b", "scale"})
    _check_tensor(path, "svm.W", svm["W"], (d_svm, K), why)
    _check_tensor(path, "svm.b", svm["b"], (K,), f"{K} classes")
    _check_scale(path, "svm.scale", svm["scale"])

    reg = data.get("bbox_reg")
    if reg is not None:
        _check_keys(path, "bbox_reg", reg, {"W", "b", "mean", "std", "scale"})
        _check_tensor(path, "bbox_reg.W", reg["W"], (K, D, 4), f"{K} classes, feature_dim {D}")
        for k in ("b", "mean", "std"):
            _check_tensor(path, f"bbox_reg.{k}", reg[k], (K, 4), f"{K} classes")
        _check_scale(path, "bbox_reg.scale", reg["scale"])


def load_module_state(module: torch.nn.Module, state: Any, path: str | Path, what: str) -> None:
    """``module.load_state_dict(state)`` with one-line errors: every tensor present, same shape and dtype.

    Raises:
        CheckpointError: naming the file, ``what`` (e.g. ``backbone_state``) and the first bad tensor.
    """
    own = module.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: '{what}' is not a mapping of tensors")
    _check_keys(Path(path), what, state, set(own))
    for k, ref in own.items():
        t = state[k]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: tampered or damaged checkpoint: {what}.{k} is not a tensor")
        if t.dtype != ref.dtype:
            raise CheckpointError(f"{path}: tampered or damaged checkpoint: {what}.{k} has dtype "
                                  f"{str(t.dtype).replace('torch.', '')}, expected {str(ref.dtype).replace('torch.', '')}")
        if t.shape != ref.shape:
            raise CheckpointError(f"{path}: tampered or damaged checkpoint: {what}.{k} has shape {_shape(t)}, "
                                  f"expected {_shape(ref)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tampered or damaged checkpoint: {what}.{k} contains NaN or infinite values")
    module.load_state_dict(state)


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


def proposal_settings(config: Config) -> dict[str, Any]:
    """Every setting of the config's selective-search preset (``Preset.settings()``)."""
    from .proposals.presets import get_preset

    return get_preset(config.proposals.mode, **config.proposals.overrides).settings()


def recorded_proposals(cfg: Config, recorded: Any, path: str | Path) -> Config:
    """``cfg`` with its proposal preset pinned to the settings the checkpoint recorded.

    A checkpoint records the resolved preset; when the preset of the same name has
    other settings in this version (``fast`` was re-tuned), the recorded ones are
    used, as overrides of that name, so the detector sees the proposals it was
    trained with.  Checkpoints without the record (older versions) use the name.
    """
    import dataclasses

    from .config import merge
    from .proposals.presets import ALGORITHM_VERSION, Preset

    if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
        return cfg
    settings = dict(recorded["settings"])
    if settings == proposal_settings(cfg):
        return cfg
    wanted = dict(settings)
    if settings.pop("algorithm_version", ALGORITHM_VERSION) != ALGORITHM_VERSION:
        logger.warning(
            "%s: trained with selective search of another algorithm version; its proposals may differ", path)
    for f in dataclasses.fields(Preset):  # a setting left out of the record (added later: off)
        if f.name != "name" and f.name not in settings:
            settings[f.name] = f.default
    try:
        out = merge(cfg, {"proposals": {"overrides": settings}}, "checkpoint proposals")
        got = proposal_settings(out)
    except Exception as e:
        raise CheckpointError(f"{path}: checkpoint proposal settings are invalid ({e})") from None
    got["algorithm_version"] = wanted.get("algorithm_version", ALGORITHM_VERSION)
    if got != wanted:
        raise CheckpointError(f"{path}: checkpoint proposal settings are invalid (not a preset's settings)")
    logger.info(
        "%s: proposal preset %r has other settings in this version; using the ones it was trained with",
        path, cfg.proposals.mode)
    return out


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
        # every setting of the selective search it was trained with: a preset name may change
        # meaning in a later version, the recorded settings do not (load_detector)
        "proposals": {"settings": proposal_settings(config)},
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
    from .models.spp import window_feature_dim
    from .models.svm import LinearSVMs

    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except Exception as e:
        raise CheckpointError(f"{path}: checkpoint config is invalid ({e})") from None
    cfg = recorded_proposals(cfg, ckpt.get("proposals"), path)
    bb = ckpt["backbone"]
    if "backbone_state" in ckpt:
        backbone = build_backbone(bb["name"], "random")
        load_module_state(backbone, ckpt["backbone_state"], path, "backbone_state")
        backbone.weights_id = bb["weights_id"]
    else:
        backbone = build_backbone(bb["name"], bb.get("weights"))
        if getattr(backbone, "weights_id", None) != bb["weights_id"]:
            raise CheckpointError(
                f"{path}: the backbone weights {bb.get('weights') or '(default)'} differ from the ones "
                "this detector was trained with")
    f = cfg.features
    feature_dim = window_feature_dim(backbone.out_channels, f.pyramid, f.context, f.context_pyramid)
    if feature_dim != ckpt["feature_dim"]:
        raise CheckpointError(f"{path}: tampered or damaged checkpoint: its config gives {feature_dim}-d "
                              f"features but it declares feature_dim {ckpt['feature_dim']}")
    head = None
    if "head" in ckpt:
        head = FCHead(feature_dim, ckpt["head_dims"], len(ckpt["classes"]), cfg.finetune.dropout)
        load_module_state(head, ckpt["head"], path, "head")
        head.eval()
    svms = LinearSVMs.from_state_dict(ckpt["svm"])
    reg = BBoxRegressors.from_state_dict(ckpt["bbox_reg"]) if ckpt.get("bbox_reg") else None
    model = SPPDetector(
        classes=list(ckpt["classes"]), backbone=backbone, features=cfg.features, svms=svms, head=head,
        bbox_reg=reg, svm_features=cfg.svm.features, test=cfg.test,
        feature_dim=feature_dim, backbone_weights=bb.get("weights"),
        backbone_trained="backbone_state" in ckpt and cfg.finetune.end_to_end,
        stats=dict(ckpt.get("stats") or {}))
    return model, cfg
