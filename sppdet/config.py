"""Typed configuration: dataclasses, strict YAML merge, resolved-config dumps.

One place turns the config into objects (:mod:`sppdet.build`); the pipeline
reads it for its stage keys and the commands build it from the command line;
library functions take plain arguments (or a config section that *is* their
parameter object, e.g. ``SVMParams`` subclasses :class:`SVMConfig`).  Loading is strict, as in fast-rcnn's ``cfg_from_file``: an unknown
key or a value of the wrong type is a :class:`~sppdet.errors.ConfigError`
naming the file and the key.

A config file may name a base with ``_base_: other.yaml`` (resolved relative
to the file, or a bundled name); keys in the file override the base.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: Folder of the bundled configs (``configs/`` at the top of the repository links here).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DataConfig:
    """Where the data is and how to read it."""

    root: str | None = None          # VOC root (or COCO image folder); --data overrides
    format: str = "voc"              # voc | coco
    coco_annotations: dict[str, str] = field(default_factory=dict)  # split -> instances JSON (format: coco)
    train_split: str = "trainval"
    test_split: str = "test"
    classes: list[str] | None = None  # None: VOC's 20 when they fit, else discovered (sorted)
    skip_bad_images: bool = False    # skip undecodable images with a warning instead of failing
    use_difficult: bool = False      # train on objects marked difficult


@dataclass
class ProposalConfig:
    """Selective search (see :mod:`sppdet.proposals`)."""

    mode: str = "fast"               # a preset name: fast | quality | ...
    max_boxes: int = 2000
    workers: int = 0                 # 0: all cores
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields to override


@dataclass
class FeatureConfig:
    """Backbone, scales and spatial pyramid pooling."""

    backbone: str = "zf5"            # zf5 | zf5-zfnet | vgg16 | lite0 (= lite0-dilated) | lite0-c4 | lite0-cat
    weights: str | None = None       # None: the backbone's default (packaged / torchvision); "imagenet"; a path;
                                     # "random" (imagenet for zf5/vgg16: sppdet weights fetch zf5|vgg16)
    mode: str = "spp"                # spp | rcnn
    scales: list[int] = field(default_factory=lambda: [688])
    max_side: int = 2000             # cap on the longer side after resizing
    pyramid: list[int] = field(default_factory=lambda: [4, 2, 1])
    flip: bool = True                # also extract features of the mirrored image for training
    cache_dtype: str = "float16"     # conv5 map storage
    amp: str = "auto"                # CUDA only: autocast of the conv5 forward: auto (= fp16 on CUDA) | off |
                                     # fp16 | bf16; no effect on the CPU (maps change at float16 cache noise)
    rcnn_context: int = 16           # R-CNN mode: context padding (pixels at 224)
    rcnn_size: int = 224             # R-CNN mode: warp size
    rcnn_batch: int = 32             # R-CNN mode: windows per backbone batch
    memory_cache: int = 64           # conv maps (image x scale x flip) kept in RAM
    pooled_memory_gb: float = 4.0    # training: SPP features of the training windows kept in RAM (0: off;
                                     # at most half the memory available)
    context: float = 0.0             # beyond the paper: also pool the window enlarged by this factor (0: off)
    context_pyramid: list[int] = field(default_factory=lambda: [2, 1])   # levels of that enlarged window


@dataclass
class FinetuneConfig:
    """Fine-tuning of fc6/fc7 (+ a new (K+1)-way classifier) on SPP features."""

    enabled: bool = True
    fc_dims: list[int] = field(default_factory=lambda: [4096, 4096])
    dropout: float = 0.5
    iterations: int = 0              # 0: scaled to the dataset size (see pipeline)
    iterations_per_image: float = 40.0
    min_iterations: int = 500
    max_iterations: int = 250000
    batch_size: int = 128
    images_per_batch: int = 2
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_low: float = 0.1
    bg_iou_high: float = 0.5
    lr: float = 0.001
    lr_step_fraction: float = 0.6    # lr /= 10 after this fraction of the iterations
    momentum: float = 0.9
    weight_decay: float = 0.0005
    init: str = "auto"               # fc6/fc7 start: imagenet (zf5 imagenet weights, pyramid [6]) | he | auto
    end_to_end: bool = False         # also train the conv layers through SPP (beyond the paper)
    conv_lr_mult: float = 0.1
    fc8_init_std: float = 0.01       # the new classifier (fc8) starts from N(0, this^2) (the paper: 0.01)


@dataclass
class SVMConfig:
    """Per-class linear SVMs with hard-negative mining."""

    features: str = "fc7"            # fc7 | spp (use the pooled conv5 features)
    C: float = 0.001
    pos_weight: float = 2.0
    bias_multiplier: float = 10.0
    feature_norm: float = 20.0
    neg_iou: float = 0.3
    hard_threshold: float = -1.0001
    evict_threshold: float = -1.2
    retrain_images: int = 0          # retrain after this many images' new hard negatives (0: auto)
    retrain_limit: int = 2000        # also retrain once a class has this many new hard negatives
    max_negatives_first: int = 0     # cap on negatives per image before a class has a model (0: all)
    passes: int = 1                  # mining passes over the images (R-CNN: 1)
    solver: str = "liblinear"        # liblinear (scikit-learn, CPU) | torch (same objective, GPU-capable)
    tol: float = 0.0001
    max_iter: int = 10000
    neg_overlap_dedupe: float | None = None  # drop a negative overlapping a higher-scoring negative of the
                                             # same image by IoU > this (the paper: 0.7; null or 0: off)
    cache_memory_gb: float = 4.0     # all classes' hard-negative caches together stay within this (GiB); over
                                     # it, each class's easiest cached negatives go, proportionally (0: no cap)
    max_positives_per_class: int = 5000  # a class with more ground-truth boxes is trained on a seeded uniform
                                     # sample of this many (bounds memory: ~cap x K x 4 D bytes; 0: all;
                                     # VOC 2007 trainval's largest class, person, has fewer)


@dataclass
class BBoxRegConfig:
    """Class-specific ridge regression of box corrections."""

    enabled: bool = True
    min_iou: float = 0.6
    lam: float = 1000.0
    max_pairs_per_class: int = 2000  # a class with more training pairs is fitted on a seeded uniform
                                     # sample of this many (bounds memory: ~cap x K x 4 D bytes; 0: all)


@dataclass
class TestConfig:
    nms: float = 0.3
    max_per_image: int = 100
    score_threshold: float | None = None   # None: keep the top max_per_image after NMS
    # beyond the paper (both off in its configs):
    box_voting: float | None = None   # IoU: kept boxes become the score-weighted mean of their neighbours
    flip: bool = False                # also score the mirrored image; average scores and boxes
    batch_images: int = 1
    scales: list[int] | None = None   # test-time scales (None: the training features.scales)


@dataclass
class Config:
    name: str = "sppdet"
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    cache_dir: str | None = None     # None: $SPPDET_CACHE or ~/.cache/sppdet
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox_reg: BBoxRegConfig = field(default_factory=BBoxRegConfig)
    test: TestConfig = field(default_factory=TestConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------
# Strict merge


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return merge(tp(), value, where)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # pragma: no cover


def merge(obj: Any, updates: dict[str, Any], where: str = "config") -> Any:
    """Return a copy of dataclass ``obj`` with ``updates`` applied, strictly.

    Unknown keys and wrong types raise :class:`ConfigError` naming ``where.key``.
    Nested dataclasses merge recursively (keys not given keep their values).
    """
    if not isinstance(updates, dict):
        raise ConfigError(f"{where}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})"
            )
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, tp, f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config path as given, or a bundled config by name (``demo_lite0`` or ``demo_lite0.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    bundled = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such config file (bundled configs: {bundled})")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                _seen: tuple[Path, ...] = (), *, where: str = "override") -> Config:
    """Load a config file (strict), following ``_base_``, then apply ``overrides`` (errors name
    them as ``where``, e.g. ``--set``)."""
    cfg = Config()
    if path is not None:
        p = resolve_config_path(path).resolve()
        if p in _seen:
            raise ConfigError(f"{p}: _base_ chain loops back to itself")
        data = _read_yaml(p)
        base = data.pop("_base_", None)
        if base is not None:
            if not isinstance(base, str):
                raise ConfigError(f"{p}: _base_ must be a file name, got {base!r}")
            bp = p.parent / base
            cfg = load_config(bp if bp.is_file() else base, None, _seen + (p,))
        try:
            cfg = merge(cfg, data, "config")
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    if overrides:
        cfg = merge(cfg, overrides, where)
    validate(cfg)
    return cfg


def parse_override(text: str) -> dict[str, Any]:
    """``"finetune.lr=0.01"`` -> ``{"finetune": {"lr": 0.01}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. finetune.lr=0.01")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: cannot parse value {raw!r}") from None
    out: dict[str, Any] = {}
    cur = out
    parts = key.strip().split(".")
    for k in parts[:-1]:
        cur = cur.setdefault(k, {})
    cur[parts[-1]] = value
    return out


def deep_update(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_sets(path: str | Path | None = None, sets: list[str] | tuple[str, ...] = (), *,
                     base: dict[str, Any] | None = None, device: str | None = None, cache: str | None = None,
                     workers: int | None = None) -> Config:
    """The one way a command line becomes a config: the file ``path``, then ``base`` (a caller's
    fixed updates, e.g. the demo's cache folder), then the ``--set section.key=value`` texts,
    then the runtime options ``device`` / ``cache`` / ``workers`` when given (strictly checked)."""
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers {workers}: must be >= 0 (0: all cores)")
    updates: dict[str, Any] = dict(base or {})
    for text in sets:
        updates = deep_update(updates, parse_override(text))
    if device:
        updates = deep_update(updates, {"device": device})
    if cache:
        updates = deep_update(updates, {"cache_dir": str(cache)})
    if workers is not None:
        updates = deep_update(updates, {"proposals": {"workers": workers}})
    return load_config(path, updates or None, where="--set")


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. from a checkpoint)."""
    cfg = merge(Config(), d, "config")
    validate(cfg)
    return cfg


def _check_number(key: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False, what: str = "") -> None:
    """``value`` is a finite number within [lo, hi] (``lo_open``/``hi_open``: that end excluded)."""
    if lo is not None and hi is not None:
        want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        want = f"{'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        want = f"{'<' if hi_open else '<='} {hi:g}"
    else:
        want = "a finite number"
    ok = value is not None and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ConfigError(f"{key}: must be {want}{what}, got {value}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express: every numeric setting is range-checked here,
    when the config is loaded, so a nonsense value fails before any stage runs."""

    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    num = _check_number
    # ---- top level
    if not cfg.name or "/" in cfg.name or "\\" in cfg.name:
        bad("name", f"must be a non-empty name without path separators, got {cfg.name!r}")
    num("seed", cfg.seed, lo=0)
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        bad("device", f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.cache_dir is not None and not cfg.cache_dir.strip():
        bad("cache_dir", "must be a folder or null, not empty")
    # ---- data
    d = cfg.data
    if d.format not in ("voc", "coco"):
        bad("data.format", f"must be voc or coco, got {d.format!r}")
    for key, split in (("data.train_split", d.train_split), ("data.test_split", d.test_split)):
        reason = _plain_name_reason(split)
        if reason:
            bad(key, f"{split!r} {reason} (a split is a name: ImageSets/Main/<split>.txt)")
    if d.classes is not None:
        if not d.classes or any(not c or not c.strip() for c in d.classes):
            bad("data.classes", f"must be null or a list of non-empty names, got {d.classes}")
        if len(set(d.classes)) != len(d.classes):
            bad("data.classes", f"lists a class twice: {d.classes}")
    # ---- proposals
    p = cfg.proposals
    if not p.mode:
        bad("proposals.mode", "must name a preset (fast, quality, ...)")
    num("proposals.max_boxes", p.max_boxes, lo=1)
    num("proposals.workers", p.workers, lo=0, what=" (0: all cores)")
    # ---- features
    f = cfg.features
    backbones = ("zf5", "zf5-zfnet", "vgg16", "lite0", "lite0-c4", "lite0-dilated", "lite0-cat")
    if f.backbone not in backbones:
        bad("features.backbone", f"must be one of {', '.join(backbones)}, got {f.backbone!r}")
    if f.weights is not None and not f.weights.strip():
        bad("features.weights", "must be null (default weights), 'random' or a file, not empty")
    if f.mode not in ("spp", "rcnn"):
        bad("features.mode", f"must be spp or rcnn, got {f.mode!r}")
    if not f.scales or any(s <= 0 for s in f.scales):
        bad("features.scales", f"must be a non-empty list of positive sizes, got {f.scales}")
    num("features.max_side", f.max_side, lo=1)
    if not f.pyramid or any(n <= 0 for n in f.pyramid):
        bad("features.pyramid", f"must be a non-empty list of positive bin counts, got {f.pyramid}")
    if f.cache_dtype not in ("float16", "float32"):
        bad("features.cache_dtype", f"must be float16 or float32, got {f.cache_dtype!r}")
    if f.amp not in ("auto", "off", "fp16", "bf16"):
        bad("features.amp", f"must be auto, off, fp16 or bf16, got {f.amp!r}")
    num("features.rcnn_size", f.rcnn_size, lo=1)
    num("features.rcnn_context", f.rcnn_context, lo=0)
    if 2 * f.rcnn_context >= f.rcnn_size:
        bad("features.rcnn_context", f"{f.rcnn_context} leaves nothing of a {f.rcnn_size}-px warp "
            "(need 2 * rcnn_context < rcnn_size)")
    num("features.rcnn_batch", f.rcnn_batch, lo=1)
    num("features.memory_cache", f.memory_cache, lo=0)
    num("features.pooled_memory_gb", f.pooled_memory_gb, lo=0, what=" (0: off)")
    num("features.context", f.context, lo=0)
    if f.context and not f.context > 1:
        bad("features.context", f"must be 0 (off) or a factor > 1, got {f.context}")
    if f.context and f.mode != "spp":
        bad("features.context", "works in spp mode only")
    if not f.context_pyramid or any(n <= 0 for n in f.context_pyramid):
        bad("features.context_pyramid", f"must be a non-empty list of positive bin counts, got {f.context_pyramid}")
    # ---- fine-tuning
    ft = cfg.finetune
    if any(n <= 0 for n in ft.fc_dims):
        bad("finetune.fc_dims", f"must be positive layer widths, got {ft.fc_dims}")
    num("finetune.dropout", ft.dropout, lo=0, hi=1, hi_open=True)
    if ft.init not in ("auto", "imagenet", "he"):
        bad("finetune.init", f"must be auto, imagenet or he, got {ft.init!r}")
    num("finetune.iterations", ft.iterations, lo=0, what=" (0: scaled to the dataset)")
    num("finetune.iterations_per_image", ft.iterations_per_image, lo=0)
    num("finetune.min_iterations", ft.min_iterations, lo=0)
    num("finetune.max_iterations", ft.max_iterations, lo=1)
    if ft.min_iterations > ft.max_iterations:
        bad("finetune.min_iterations", f"{ft.min_iterations} is above finetune.max_iterations {ft.max_iterations}")
    num("finetune.batch_size", ft.batch_size, lo=1)
    num("finetune.images_per_batch", ft.images_per_batch, lo=1)
    if ft.images_per_batch > ft.batch_size:
        bad("finetune.images_per_batch", f"{ft.images_per_batch} is above finetune.batch_size {ft.batch_size}")
    num("finetune.fg_fraction", ft.fg_fraction, lo=0, hi=1, lo_open=True)
    num("finetune.fg_iou", ft.fg_iou, lo=0, hi=1, lo_open=True)
    num("finetune.bg_iou_low", ft.bg_iou_low, lo=0, hi=1)
    num("finetune.bg_iou_high", ft.bg_iou_high, lo=0, hi=1)
    if not 0 <= ft.bg_iou_low < ft.bg_iou_high <= ft.fg_iou:
        bad("finetune.bg_iou_low", "need 0 <= bg_iou_low < bg_iou_high <= fg_iou")
    num("finetune.lr", ft.lr, lo=0, lo_open=True)
    num("finetune.lr_step_fraction", ft.lr_step_fraction, lo=0, hi=1)
    num("finetune.momentum", ft.momentum, lo=0, hi=1, hi_open=True)
    num("finetune.weight_decay", ft.weight_decay, lo=0)
    num("finetune.conv_lr_mult", ft.conv_lr_mult, lo=0)
    num("finetune.fc8_init_std", ft.fc8_init_std, lo=0, lo_open=True)
    # ---- SVMs
    sv = cfg.svm
    if sv.solver not in ("liblinear", "torch"):
        bad("svm.solver", f"must be liblinear or torch, got {sv.solver!r}")
    if sv.features not in ("fc7", "spp"):
        bad("svm.features", f"must be fc7 or spp, got {sv.features!r}")
    if sv.features == "fc7" and not ft.enabled:
        # fc7 without fine-tuning is allowed (random fc layers would be useless, so use spp)
        bad("svm.features", "fc7 needs finetune.enabled: true (use svm.features: spp without fine-tuning)")
    num("svm.C", sv.C, lo=0, lo_open=True)
    num("svm.pos_weight", sv.pos_weight, lo=0, lo_open=True)
    num("svm.bias_multiplier", sv.bias_multiplier, lo=0, lo_open=True)
    num("svm.feature_norm", sv.feature_norm, lo=0, lo_open=True)
    num("svm.neg_iou", sv.neg_iou, lo=0, hi=1)
    num("svm.hard_threshold", sv.hard_threshold)
    num("svm.evict_threshold", sv.evict_threshold)
    if sv.evict_threshold > sv.hard_threshold:
        bad("svm.evict_threshold", f"{sv.evict_threshold} is above svm.hard_threshold {sv.hard_threshold}")
    num("svm.retrain_images", sv.retrain_images, lo=0, what=" (0: auto)")
    num("svm.retrain_limit", sv.retrain_limit, lo=0)
    num("svm.max_negatives_first", sv.max_negatives_first, lo=0, what=" (0: all)")
    num("svm.passes", sv.passes, lo=1)
    num("svm.tol", sv.tol, lo=0, lo_open=True)
    num("svm.max_iter", sv.max_iter, lo=1)
    num("svm.cache_memory_gb", sv.cache_memory_gb, lo=0, what=" (0: no cap)")
    num("svm.max_positives_per_class", sv.max_positives_per_class, lo=0, what=" (0: all)")
    if sv.neg_overlap_dedupe is not None:
        num("svm.neg_overlap_dedupe", sv.neg_overlap_dedupe, lo=0, hi=1, hi_open=True, what=" (0 or null: off)")
    # ---- box regression
    num("bbox_reg.min_iou", cfg.bbox_reg.min_iou, lo=0, hi=1, lo_open=True)
    num("bbox_reg.lam", cfg.bbox_reg.lam, lo=0)
    num("bbox_reg.max_pairs_per_class", cfg.bbox_reg.max_pairs_per_class, lo=0, what=" (0: all)")
    # ---- test
    t = cfg.test
    num("test.nms", t.nms, lo=0, hi=1, lo_open=True)
    num("test.max_per_image", t.max_per_image, lo=1)
    if t.score_threshold is not None:
        num("test.score_threshold", t.score_threshold, what=" (an SVM margin) or null")
    if t.box_voting is not None:
        num("test.box_voting", t.box_voting, lo=0, hi=1, lo_open=True, what=" or null")
    num("test.batch_images", t.batch_images, lo=1)
    if t.scales is not None and (not t.scales or any(not isinstance(x, int) or isinstance(x, bool) or x <= 0
                                                      for x in t.scales)):
        bad("test.scales", f"must be null or a non-empty list of positive sizes, got {t.scales}")


def _plain_name_reason(name: str) -> str | None:
    from .utils.io import unsafe_name_reason

    return unsafe_name_reason(name)
