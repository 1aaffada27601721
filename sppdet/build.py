"""The one place that turns a config into objects.

Library code takes plain arguments; this module reads the :class:`~sppdet.config.Config`
and builds what the training pipeline, the test-time detector and the commands need:
the dataset, the proposal preset, the backbone, the feature extractor, the library
parameter objects and the cache folders.

Parameter objects are *derived* from the config sections: :class:`~sppdet.train.finetune.FinetuneParams`
and :class:`~sppdet.train.svm.SVMParams` subclass :class:`~sppdet.config.FinetuneConfig` /
:class:`~sppdet.config.SVMConfig`, so a default is written once, and :func:`params` copies
every field of the section (a field the parameter class lacks is an error, not a silent
fallback to a library default).

Layering (DESIGN §4): this module sits above the model, feature, proposal and data layers
and below ``train/``, ``detect`` and the commands, which call it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch

from .config import Config, DataConfig, FeatureConfig, merge, validate
from .data import load_dataset
from .data.records import Dataset
from .errors import DatasetError
from .features import FeatureExtractor
from .models.backbones import Backbone, build_backbone
from .models.detector import SPPDetector
from .proposals.presets import Preset, get_preset
from .utils.device import resolve_device
from .utils.io import default_cache_dir

log = logging.getLogger(__name__)

P = TypeVar("P")


# ---------------------------------------------------------------------------
# folders


def cache_dir(path: str | Path | None = None) -> Path:
    """The cache folder: ``path`` (``~`` expanded), else ``$SPPDET_CACHE``, else ``~/.cache/sppdet``."""
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    return default_cache_dir()


def training_cache_dir(cfg: Config) -> Path:
    """Where training keeps its caches: ``cache_dir`` of the config (``--cache`` sets it), else the default."""
    return cache_dir(cfg.cache_dir)


# ---------------------------------------------------------------------------
# data and proposals


def dataset_from_config(data_cfg: DataConfig, split: str, root: str | Path | None = None) -> Dataset:
    """Read ``split`` as the config's ``data`` section describes.

    Args:
        data_cfg: :class:`sppdet.config.DataConfig` (format, classes,
            coco_annotations, skip_bad_images).
        split: the split name.
        root: overrides ``data_cfg.root`` (the CLI's ``--data``).

    Raises:
        DatasetError: no root given or the root does not exist (one line
            telling the user to pass ``--data``), and everything the readers raise.
    """
    r = root if root is not None else data_cfg.root
    if r is None or str(r) == "":
        raise DatasetError("data.root: no dataset given; pass --data ROOT (a VOC root such as "
                           "VOCdevkit/VOC2007, or the image folder of a COCO-format set)")
    rp = Path(r).expanduser()
    if not rp.is_dir():
        raise DatasetError(f"{rp}: dataset folder not found; pass --data ROOT with an existing "
                           f"dataset folder")
    coco_ann = None
    if data_cfg.format == "coco":
        coco_ann = data_cfg.coco_annotations.get(split)
        if coco_ann is None:
            raise DatasetError(f"data.coco_annotations: no instances JSON for split {split!r} "
                               f"(have: {', '.join(sorted(data_cfg.coco_annotations)) or 'none'})")
    return load_dataset(rp, split, format=data_cfg.format, classes=data_cfg.classes,
                        coco_annotations=coco_ann, skip_bad_images=data_cfg.skip_bad_images)


def eval_dataset(cfg: Config, root: str | Path, split: str, classes: Sequence[str], *,
                 data_format: str | None = None, annotations: str | None = None) -> Dataset:
    """The split a trained detector is scored on: read as it was trained (format, COCO
    annotations, bad-image policy) unless ``data_format`` / ``annotations`` say otherwise."""
    fmt = data_format or cfg.data.format
    ann = annotations or cfg.data.coco_annotations.get(split)
    return load_dataset(root, split, format=fmt, classes=list(classes), coco_annotations=ann,
                        skip_bad_images=cfg.data.skip_bad_images)


def preset(cfg: Config) -> Preset:
    """The selective-search preset of ``proposals.mode`` with ``proposals.overrides`` applied."""
    return get_preset(cfg.proposals.mode, **cfg.proposals.overrides)


# ---------------------------------------------------------------------------
# networks and features


def backbone(cfg: Config) -> Backbone:
    """The backbone ``features.backbone`` names, with ``features.weights`` (a path's ``~`` expanded)."""
    w = cfg.features.weights
    if isinstance(w, str) and w.startswith("~"):
        w = str(Path(w).expanduser())
    return build_backbone(cfg.features.backbone, w)


def extractor(features: FeatureConfig, backbone: Backbone, device: torch.device | str,
              cache: Path | None) -> FeatureExtractor:
    """The feature extractor a ``features`` section describes; conv5 maps under ``cache/features``."""
    f = features
    return FeatureExtractor(
        backbone, scales=tuple(f.scales), max_side=f.max_side, pyramid=tuple(f.pyramid), device=device,
        cache_dir=Path(cache) / "features" if cache is not None else None, cache_dtype=f.cache_dtype,
        mode=f.mode, rcnn_size=f.rcnn_size, rcnn_context=f.rcnn_context, rcnn_batch=f.rcnn_batch,
        memory_cache=f.memory_cache, context=f.context, context_pyramid=tuple(f.context_pyramid), amp=f.amp,
    )


# ---------------------------------------------------------------------------
# library parameters


def params(cls: type[P], section: Any, **extra: Any) -> P:
    """A parameter object of dataclass ``cls`` holding every field of the config ``section``
    plus ``extra`` (values ``extra`` gives win).

    Raises:
        TypeError: ``cls`` lacks a field of ``section`` (a config field and its library
            parameter drifted apart: renamed on one side only).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    missing = sorted(set(values) - names)
    if missing:
        raise TypeError(f"{cls.__name__} has no field for {type(section).__name__}.{', '.join(missing)}")
    unknown = sorted(set(extra) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return cls(**{**values, **extra})


# ---------------------------------------------------------------------------
# test time


@dataclass
class DetectorSetup:
    """What the test-time detector needs, built from a checkpoint and the caller's options."""

    model: SPPDetector
    config: Config
    extractor: FeatureExtractor
    preset: Preset
    max_boxes: int
    workers: int
    skip_bad_images: bool
    cache_dir: Path
    device: torch.device


def detector_setup(checkpoint: str | Path, *, device: str = "auto", cache: str | Path | None = None,
               test_overrides: dict[str, Any] | None = None) -> DetectorSetup:
    """Load a checkpoint and build its extractor and proposal settings.

    Args:
        checkpoint: ``model.pt`` from ``sppdet train``.
        device: ``auto`` (the checkpoint's device setting), ``cpu``, ``cuda``, ``cuda:N``.
        cache: the cache folder for proposals and conv5 maps: the caller's (``--cache``), else
            ``$SPPDET_CACHE``, else ``~/.cache/sppdet`` -- never the folder recorded in the
            checkpoint (that is the trainer's, maybe someone else's).
        test_overrides: changes to the checkpoint's ``test`` settings (``{"nms": 0.2}``).
    """
    from .checkpoint import load_detector

    model, cfg = load_detector(checkpoint)
    if test_overrides:
        cfg = merge(cfg, {"test": test_overrides}, "--set")
        validate(cfg)
        model.test = cfg.test
    dev = resolve_device(device if device != "auto" else cfg.device)
    model.to(dev)
    folder = cache_dir(cache)
    features = model.features
    if cfg.test.scales:
        # multi-scale (or single-scale) testing of a model trained at other scales: the fc layers,
        # SVMs and regressors see the same pooled feature; only the maps' sizes change
        features = replace(features, scales=list(cfg.test.scales))
    ex = extractor(features, model.backbone, dev, folder)
    return DetectorSetup(model=model, config=cfg, extractor=ex, preset=preset(cfg), max_boxes=cfg.proposals.max_boxes,
                     workers=cfg.proposals.workers, skip_bad_images=cfg.data.skip_bad_images, cache_dir=folder,
                     device=dev)


__all__ = ["cache_dir", "training_cache_dir", "dataset_from_config", "eval_dataset", "preset", "backbone",
           "extractor", "params", "DetectorSetup", "detector_setup"]
