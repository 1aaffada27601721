"""Selective-search presets: every setting of a proposal run in one frozen dataclass.

A :class:`Preset` fixes everything that changes the boxes, so
:meth:`Preset.key` (a stable hash of the settings, not of the name) can key the
proposal store: two runs with equal keys produce the same boxes, and a store
written with another key is never reused.

Presets (see ``docs/PROPOSALS.md`` for how they were tuned and measured):

* ``fast`` -- the default for training and testing, as in the paper (which used
  selective search "fast").
* ``fast-split`` -- ``fast`` plus the halves of small boxes: higher recall, not a better detector.
* ``fast-rgi`` -- the previous default (rgI at 300 px, boxes from 16 px).
* ``fast-300`` -- the default before that (every run at 300 px): cheaper on large photos,
  lower recall of small objects.
* ``quality`` -- more colour spaces, thresholds and strategies: higher recall and
  better localisation (AR) for more time and boxes.
* ``opencv-fast`` / ``opencv-quality`` -- OpenCV's stock
  ``switchToSelectiveSearchFast`` / ``Quality`` settings (HSV+Lab, k = 150..450,
  full resolution), but ordered and filtered like every other preset.  Kept for
  comparison in the benchmark.

A strategy is a string of letters, each a similarity measure of Uijlings et al.
combined with equal weights: ``c`` colour, ``t`` texture, ``s`` size, ``f`` fill;
e.g. ``"cfst"`` is OpenCV's (and the paper's) C+T+S+F.  Several strategies joined
by ``+`` (``"fst+f+s+t"``) are one run: one graph segmentation grouped by each of
them (as OpenCV's own modes do), the union of their boxes with one vote.  The
segmentation is most of a run's time, so the extra groupings are cheap (see
``docs/PROPOSALS.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..utils.io import stable_hash

#: Colour spaces a preset may segment in (see :func:`sppdet.proposals.selective_search.convert_colour`).
COLOUR_SPACES: tuple[str, ...] = ("rgb", "hsv", "lab", "gray", "h", "rgi", "ycrcb", "luv", "hls")

#: Letters of a strategy string: colour, fill, size, texture.
STRATEGY_LETTERS: str = "cfst"

#: Bumped whenever the algorithm changes in a way that changes boxes for equal settings.
ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class Preset:
    """Every setting of a selective-search run.

    Attributes:
        name: a label only (not part of :meth:`key`).
        colour_spaces: colour spaces the image is segmented in (:data:`COLOUR_SPACES`).
        ks: Felzenszwalb-Huttenlocher thresholds ``k`` of the initial graph
            segmentations, in units of the segmentation image.
        sigma: Gaussian smoothing of the graph segmentation.
        min_segment: smallest segment (pixels of the segmentation image) the
            graph segmentation keeps.
        strategies: similarity strategies for the hierarchical grouping, each a
            string of letters from ``"cfst"`` (equal weights).
        max_sides: one entry per segmentation scale: the image is resized
            (INTER_AREA) so that its longer side is at most this many pixels
            before segmenting (``0``: the original size).  Boxes are mapped back
            to original-image pixels.  Every (scale, colour space, k, strategy)
            combination is one grouping run.
        extra_runs: more runs outside that product, each
            ``"MAX_SIDE:COLOUR_SPACE:K:STRATEGY"`` (e.g. ``"300:hsv:100:cfst"``),
            sharing ``sigma`` and ``min_segment``.
        min_box_size: boxes whose width or height (original pixels) is below
            this are dropped.  Exact duplicates are always merged.
        area_exponent: boxes are ranked by ``votes * area ** area_exponent``
            (see :mod:`sppdet.proposals.selective_search`).
        demote_iou: a box whose IoU with a better-ranked kept box exceeds this
            is moved behind all kept boxes (``1.0``: no demotion).
        split_below: each kept box whose ``sqrt(width * height)`` (original
            pixels) is below this also gives its left and right halves, appended
            after the ranked boxes in their parents' order (new boxes only, at
            least ``min_box_size``), then the cap applies.  Aimed at the commonest
            miss on VOC: a narrow object (a person or bottle beside another) whose
            best box spans it and its neighbour.  ``0``: off (and then not part of
            :meth:`key`, so presets without it keep their store keys).
    """

    name: str = "custom"
    colour_spaces: tuple[str, ...] = ("hsv", "lab")
    ks: tuple[float, ...] = (150.0, 300.0, 450.0)
    sigma: float = 0.8
    min_segment: int = 100
    strategies: tuple[str, ...] = ("cfst", "fst")
    max_sides: tuple[int, ...] = (0,)
    extra_runs: tuple[str, ...] = ()
    min_box_size: float = 0.0
    area_exponent: float = 0.5
    demote_iou: float = 1.0
    split_below: float = 0.0

    def __post_init__(self) -> None:
        # Normalise sequences to tuples of the right type so equal settings hash equally.
        def tup(name: str, conv) -> None:
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                value = (value,)
            try:
                object.__setattr__(self, name, tuple(conv(v) for v in value))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"proposals preset {self.name!r}: {name}={value!r}: {e}") from None

        tup("colour_spaces", lambda v: str(v).lower())
        tup("ks", float)
        tup("strategies", lambda v: str(v).lower())
        tup("max_sides", int)
        tup("extra_runs", lambda v: str(v).strip().lower())
        for name, conv in (("sigma", float), ("min_segment", int), ("min_box_size", float),
                           ("area_exponent", float), ("demote_iou", float), ("split_below", float)):
            value = getattr(self, name)
            if isinstance(value, bool):
                raise ConfigError(f"proposals preset {self.name!r}: {name}={value!r}: expected a number")
            try:
                object.__setattr__(self, name, conv(value))
            except (TypeError, ValueError):
                raise ConfigError(f"proposals preset {self.name!r}: {name}={value!r}: "
                                  f"expected a {conv.__name__}") from None
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line, naming the setting) on an impossible value."""
        where = f"proposals preset {self.name!r}"
        if not self.colour_spaces:
            raise ConfigError(f"{where}: colour_spaces is empty")
        for cs in self.colour_spaces:
            if cs not in COLOUR_SPACES:
                raise ConfigError(f"{where}: unknown colour space {cs!r} (known: {', '.join(COLOUR_SPACES)})")
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"{where}: ks must be a non-empty list of positive numbers, got {list(self.ks)}")
        if not self.strategies:
            raise ConfigError(f"{where}: strategies is empty")
        for s in self.strategies:
            if not strategy_ok(s):
                raise ConfigError(f"{where}: strategy {s!r} must be distinct letters from "
                                  f"'{STRATEGY_LETTERS}' (c colour, f fill, s size, t texture), several "
                                  f"joined by '+' sharing one segmentation (e.g. fst+f+s)")
        if not self.max_sides or any(m < 0 or 0 < m < 16 for m in self.max_sides):
            raise ConfigError(f"{where}: max_sides must be 0 (original size) or >= 16, got {list(self.max_sides)}")
        for spec in self.extra_runs:
            try:
                parse_run(spec)
            except ValueError as e:
                raise ConfigError(f"{where}: extra_runs entry {spec!r}: {e}") from None
        if self.sigma < 0:
            raise ConfigError(f"{where}: sigma must be >= 0, got {self.sigma}")
        if self.min_segment < 1:
            raise ConfigError(f"{where}: min_segment must be >= 1, got {self.min_segment}")
        if self.min_box_size < 0:
            raise ConfigError(f"{where}: min_box_size must be >= 0, got {self.min_box_size}")
        if not np.isfinite(self.area_exponent) or self.area_exponent < 0:
            raise ConfigError(f"{where}: area_exponent must be a finite number >= 0, got {self.area_exponent}")
        if not np.isfinite(self.split_below) or self.split_below < 0:
            raise ConfigError(f"{where}: split_below must be a finite number >= 0, got {self.split_below}")
        if not 0.0 < self.demote_iou <= 1.0:
            raise ConfigError(f"{where}: demote_iou must be in (0, 1], got {self.demote_iou}")

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the boxes (JSON-serialisable; no name)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        if not d["split_below"]:  # added later: off leaves the keys of earlier settings unchanged
            d.pop("split_below")
        d["algorithm_version"] = ALGORITHM_VERSION
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def key(self) -> str:
        """A stable 16-hex-digit hash of :meth:`settings` (the store key)."""
        return stable_hash(self.settings())

    @property
    def num_runs(self) -> int:
        """Number of hierarchical-grouping runs per image."""
        return len(self.runs())

    def runs(self) -> list[tuple[int, str, float, str]]:
        """Every grouping run ``(max_side, colour_space, k, strategy)``: the product, then ``extra_runs``."""
        out = [(m, cs, k, st) for m in self.max_sides for cs in self.colour_spaces
               for k in self.ks for st in self.strategies]
        return out + [parse_run(spec) for spec in self.extra_runs]


def parse_run(spec: str) -> tuple[int, str, float, str]:
    """``"MAX_SIDE:COLOUR_SPACE:K:STRATEGY"`` -> ``(max_side, space, k, strategy)`` (ValueError when malformed)."""
    parts = [t.strip().lower() for t in str(spec).split(":")]
    if len(parts) != 4:
        raise ValueError("expected MAX_SIDE:COLOUR_SPACE:K:STRATEGY, e.g. 300:hsv:100:cfst")
    try:
        max_side, k = int(parts[0]), float(parts[2])
    except ValueError:
        raise ValueError("MAX_SIDE must be an integer and K a number") from None
    space, strategy = parts[1], parts[3]
    if max_side < 0 or 0 < max_side < 16:
        raise ValueError("MAX_SIDE must be 0 (original size) or >= 16")
    if space not in COLOUR_SPACES:
        raise ValueError(f"unknown colour space {space!r} (known: {', '.join(COLOUR_SPACES)})")
    if k <= 0:
        raise ValueError("K must be positive")
    if not strategy_ok(strategy):
        raise ValueError(f"strategy {strategy!r} must be distinct letters from '{STRATEGY_LETTERS}' "
                         f"(several joined by '+', e.g. fst+f+s)")
    return max_side, space, k, strategy


def strategy_ok(strategy: str) -> bool:
    """A strategy string: distinct letters of :data:`STRATEGY_LETTERS`, or several distinct ones joined by ``+``."""
    parts = str(strategy).split("+")
    return bool(parts) and len(set(parts)) == len(parts) and all(
        part and all(ch in STRATEGY_LETTERS for ch in part) and len(set(part)) == len(part) for part in parts)


_PRESETS: dict[str, Preset] = {
    # Tuned with `sppdet bench proposals --run-cache` on voc2007_sub trainval only (docs/PROPOSALS.md,
    # "Tuning protocol"): two full-size segmentations (HSV, Lab) for small objects, each grouped
    # four ways, plus three cheap 300 px segmentations (HSV and Lab at k=100 with colour grouping,
    # HSV at k=50) for the larger ones; boxes down to 10 px kept (small objects: bottles, birds).
    # "Full size" is capped at 500 px (VOC's own size: identical there) so that the time per
    # image stays bounded on large photos.
    "fast": Preset(
        name="fast",
        colour_spaces=("hsv", "lab"),
        ks=(150.0,),
        sigma=0.8,
        min_segment=100,
        strategies=("fst+f+s+t",),
        max_sides=(500,),
        extra_runs=("300:hsv:100:cfst+fst+f+s", "300:lab:100:cfst+fst+f+s", "300:hsv:50:fst+f+s+t"),
        min_box_size=10.0,
        area_exponent=0.5,
        demote_iou=0.85,
    ),
    # The default of the previous round (tuned on all of voc2012_sample100; docs/PROPOSALS.md):
    # 14 runs, all at 300 px.  Kept so configs that override it keep their boxes and caches.
    "fast-300": Preset(
        name="fast-300",
        colour_spaces=("hsv", "lab", "rgi", "h"),
        ks=(50.0, 100.0, 200.0),
        sigma=0.8,
        min_segment=100,
        strategies=("fst",),
        max_sides=(300,),
        extra_runs=("300:hsv:100:cfst", "300:lab:100:cfst"),
        min_box_size=16.0,
        area_exponent=0.5,
        demote_iou=0.85,
    ),
    "quality": Preset(
        name="quality",
        colour_spaces=("hsv", "lab", "rgi", "h", "ycrcb"),
        ks=(50.0, 100.0, 200.0),
        sigma=0.8,
        min_segment=100,
        strategies=("cfst", "fst"),
        max_sides=(300,),
        min_box_size=16.0,
        area_exponent=0.5,
        demote_iou=0.85,
    ),
    "opencv-fast": Preset(
        name="opencv-fast",
        colour_spaces=("hsv", "lab"),
        ks=(150.0, 300.0, 450.0),
        sigma=0.8,
        min_segment=100,
        strategies=("cfst", "fst"),
        max_sides=(0,),
    ),
    "opencv-quality": Preset(
        name="opencv-quality",
        colour_spaces=("hsv", "lab", "gray", "h", "rgi"),
        ks=(150.0, 300.0, 450.0, 600.0, 750.0),
        sigma=0.8,
        min_segment=100,
        strategies=("cfst", "fst", "f", "s"),
        max_sides=(0,),
    ),
}
# The previous `fast` (tuned on 250 voc2007_sub trainval images): rgI instead of HSV at k=50 for
# the third 300 px run, boxes from 16 px.  The voc07_lite0 figures of the first VOC round were
# measured with it (docs/TRAINING.md).
_PRESETS["fast-rgi"] = dataclasses.replace(
    _PRESETS["fast"], name="fast-rgi", min_box_size=16.0,
    extra_runs=("300:hsv:100:cfst+fst+f+s", "300:lab:100:cfst+fst+f+s", "300:rgi:100:fst+f+s+t"))

# `fast` with the left and right halves of boxes under 48 px: test recall@0.5 0.961 against
# 0.958 (tuned on trainval: +11 of 2474 objects), no measurable time, 8 % more boxes; but a
# detector trained on `fast` loses 0.8 mAP when tested on it (docs/PROPOSALS.md), so it is not
# the default.
_PRESETS["fast-split"] = dataclasses.replace(_PRESETS["fast"], name="fast-split", split_below=48.0)

#: Names of the built-in presets.
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str | Preset = "fast", **overrides: Any) -> Preset:
    """A built-in preset (or ``name`` itself when it is a :class:`Preset`), with fields overridden.

    Raises:
        ConfigError: unknown preset name, unknown field, or a bad value (one line).
    """
    if isinstance(name, Preset):
        base = name
    else:
        key = str(name).lower()
        if key not in _PRESETS:
            raise ConfigError(f"--mode {name}: unknown proposal preset (known: {', '.join(PRESETS)})")
        base = _PRESETS[key]
    if not overrides:
        return base
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name"}
    for k in overrides:
        if k not in fields:
            raise ConfigError(f"proposal setting {k!r}: unknown (known: {', '.join(sorted(fields))})")
    return dataclasses.replace(base, **overrides)


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` (CLI ``--set``) -> ``(key, value)`` typed for the Preset field.

    Sequence fields take comma-separated values (``ks=50,100``); booleans take
    ``true/false/1/0/yes/no``.

    Raises:
        ConfigError: no ``=``, unknown key, or a value of the wrong type.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE (e.g. --set ks=50,100)")
    key, value = (s.strip() for s in text.split("=", 1))
    types = {f.name: f.type for f in dataclasses.fields(Preset)}
    if key not in types or key == "name":
        known = ", ".join(sorted(k for k in types if k != "name"))
        raise ConfigError(f"--set {text}: unknown proposal setting {key!r} (known: {known})")
    default = getattr(Preset(), key)
    try:
        if isinstance(default, tuple):
            items = [v.strip() for v in value.split(",") if v.strip()]
            conv = type(default[0]) if default else str
            return key, tuple(conv(float(v)) if conv is int else conv(v) for v in items)
        if isinstance(default, bool):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return key, True
            if low in ("0", "false", "no", "off"):
                return key, False
            raise ValueError(value)
        if isinstance(default, int):
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return key, int(f)
        if isinstance(default, float):
            return key, float(value)
        return key, value
    except ValueError:
        raise ConfigError(f"--set {text}: bad value {value!r} for {key} "
                          f"(expected {type(default).__name__}{' list' if isinstance(default, tuple) else ''})") from None


__all__ = ["Preset", "PRESETS", "COLOUR_SPACES", "STRATEGY_LETTERS", "get_preset", "parse_override"]
