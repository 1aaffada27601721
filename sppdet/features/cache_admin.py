"""The cache folder's bookkeeping: what the conv5 cache will need on disk, what is cached, pruning.

Three things (``sppdet cache list / prune`` and the conv5 stages of ``train`` and ``eval``):

* :func:`check_conv5_space` -- before a conv5 stage: the bytes the split's maps need
  (images x scales x flips x map size x dtype bytes, map sizes from the records' image sizes)
  minus what is cached, against the free space of the cache's filesystem (plus a margin); a run
  that cannot fit stops with one line (exit 2) before it writes anything.  It also records the
  use (``uses/<hash>.json`` in the backbone's entry) and logs the disk use, in total and per
  image, when the stage's last map is written.
* :func:`list_cache` -- every entry of a cache folder: proposal stores (one per dataset, split,
  preset and box cap), conv5 maps (one folder per backbone and weights), R-CNN window features;
  with its size on disk (allocated blocks, like ``du``), images and last use.
* :func:`prune_cache` -- delete entries by age, by recency rank, by key or all, touching only
  files whose names and places are sppdet's (see :func:`list_cache`), never following a symlink,
  and never an entry a running job is using (conv5: its lock; proposals and R-CNN features: files
  written in the last :data:`ACTIVE_SECONDS`).

Layout (``<cache>`` = ``--cache``, else ``$SPPDET_CACHE``, else ``~/.cache/sppdet``)::

    <cache>/features/<backbone>-<id8>/<kk>/<40 hex>.npz       conv5 maps (sppdet.features.conv5_cache)
                                     /uses/<16 hex>.json      who used the entry, with which settings
                                     /.sppdet-lock            held by the processes using the entry
    <cache>/proposals/<dataset>-<split>/ss-<preset key>-max<N>.npz   proposal stores (sppdet.proposals.store)
                                       /<store>.parts/, <stem>.shard-<i>-of-<n>.npz   work in progress
    <cache>/rcnn_windows/<16 hex>.npy                         R-CNN mode window features

Entry keys are these paths relative to the cache folder: ``features/zf5-1a2b3c4d``,
``proposals/voc07-trainval/ss-0123456789abcdef-max2000``, ``rcnn_windows``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import CacheError
from ..models.spp import resize_factor
from .conv5_cache import (CACHE_FORMAT, LOCK_NAME, MAP_FILE_RE, SHARD_DIR_RE, USE_FILE_RE, USES_DIR, entry_name,
                          open_noatime, read_use_record, write_use_record)

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

GiB = 2 ** 30
MiB = 2 ** 20

#: Bytes of an ``.npz`` map file beyond the map itself (zip headers, the other arrays): 1168 measured.
NPZ_OVERHEAD = 1536
#: Allocation unit assumed for the estimate (files take whole blocks).
BLOCK = 4096
#: Free space kept beyond the estimate: this fraction of it plus :data:`MARGIN_BYTES`.
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 256 * MiB
#: ``SPPDET_DISK_CHECK=0`` turns the refusal into a warning (a filesystem whose free space is misreported).
DISK_CHECK_ENV = "SPPDET_DISK_CHECK"
#: A proposal store or R-CNN feature folder with work files written this recently is taken as in use.
ACTIVE_SECONDS = 600.0

KINDS = ("conv5", "proposals", "rcnn_windows")
_TOP = {"features": "conv5", "proposals": "proposals", "rcnn_windows": "rcnn_windows"}


class CacheSpaceError(CacheError):
    """The cache's filesystem has not enough free space for what a run will write."""


def human_bytes(n: float) -> str:
    """``1.23 GiB``, ``45.6 MiB``, ``789 KiB``, ``12 B``."""
    n = float(n)
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n:.0f} B"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / GiB:.3f} GiB"


# ---------------------------------------------------------------------------
# estimate and check


def map_file_bytes(height: int, width: int, scale: int, max_side: int, channels: int, stride: int,
                   itemsize: int) -> int:
    """Disk bytes (whole :data:`BLOCK`\\ s) of one cached conv5 map of an ``height x width`` image.

    The map of the resized image is taken as ``ceil(h / stride) x ceil(w / stride)`` cells (exact
    for ZF-5 and Lite0, one cell more than VGG16's floor), so the estimate errs high.
    """
    f = resize_factor(height, width, scale, max_side)
    h, w = max(1, int(round(height * f))), max(1, int(round(width * f)))
    nbytes = channels * math.ceil(h / stride) * math.ceil(w / stride) * itemsize + NPZ_OVERHEAD
    return int(math.ceil(nbytes / BLOCK) * BLOCK)


def _disk_bytes(st: os.stat_result) -> int:
    blocks = getattr(st, "st_blocks", None)
    return int(blocks) * 512 if blocks is not None else int(st.st_size)


def _existing_ancestor(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@dataclass
class _Plan:
    """The maps of one conv5 stage: their keys and estimated sizes, and which are on disk."""

    keys: list[str]
    sizes: list[int]
    cached: list[bool]

    @property
    def missing(self) -> list[str]:
        return [k for k, c in zip(self.keys, self.cached) if not c]

    @property
    def need(self) -> int:
        return int(sum(s for s, c in zip(self.sizes, self.cached) if not c))

    @property
    def total(self) -> int:
        return int(sum(self.sizes))


def _plan(extractor, records: Sequence[Any], flips: Sequence[bool]) -> _Plan:
    cache, bb = extractor.cache, extractor.backbone
    itemsize = 2 if extractor.cache_dtype == "float16" else 4
    entry = Path(extractor.cache_dir) / entry_name(bb)
    keys, sizes, cached = [], [], []
    for rec in records:
        ikey = cache.image_key(rec.path)
        for flip in flips:
            for s in extractor.scales:
                k = cache.map_key(ikey, s, flip)
                keys.append(k)
                sizes.append(map_file_bytes(rec.height, rec.width, s, extractor.max_side, bb.out_channels,
                                            bb.stride, itemsize))
                cached.append((entry / k[:2] / f"{k}.npz").is_file())
    return _Plan(keys, sizes, cached)


def check_conv5_space(extractor, dataset, flips: Sequence[bool] = (False,), *,
                      margin_fraction: float = MARGIN_FRACTION, margin_bytes: int = MARGIN_BYTES) -> dict | None:
    """Refuse a conv5 stage whose maps will not fit on the cache's disk; report its disk use at its end.

    Call it just before the stage computes the maps of ``dataset`` (``FeatureExtractor.precompute``
    for each of ``flips``).  Nothing happens without a disk cache or in R-CNN mode (``None``).

    1. Estimate the bytes of every map (images x scales x flips, :func:`map_file_bytes` from the
       records' image sizes) that is not cached yet; when there are any, compare them plus a
       margin (``margin_fraction`` of them + ``margin_bytes``) with ``shutil.disk_usage``'s free
       space of the cache's filesystem.
    2. Record the use in the backbone's entry (``uses/<hash>.json``: dataset, split, settings).
    3. When the last missing map has been written (at once if none is missing), log the bytes on
       disk of the split's maps, in total and per image, and add them to the use record.

    Args:
        extractor: the stage's :class:`~sppdet.features.FeatureExtractor` (its cache folder,
            backbone, scales, ``max_side``, cache dtype).
        dataset: the split's :class:`~sppdet.data.records.Dataset` (or a sequence of records
            with ``path``, ``width``, ``height``).
        flips: the flips the stage computes (``(False, True)`` with mirrored copies).

    Returns:
        ``{"folder", "images", "maps", "cached_maps", "estimated_bytes", "need_bytes",
        "free_bytes"}``, or ``None``.

    Raises:
        CacheSpaceError: ``<cache dir>: the conv5 cache needs about X GiB, Y GiB free; free space
            or use --cache DIR`` (exit 2).  ``SPPDET_DISK_CHECK=0`` makes it a warning.
    """
    if extractor.mode != "spp" or extractor.cache_dir is None:
        return None
    records = list(getattr(dataset, "records", dataset))
    flips = tuple(bool(f) for f in flips) or (False,)
    folder = Path(extractor.cache_dir)
    plan = _plan(extractor, records, flips)
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    need = plan.need
    want = need + int(margin_fraction * need) + int(margin_bytes) if need else 0
    n, nmaps = len(records), len(plan.keys)
    info = {"folder": str(folder), "images": n, "maps": nmaps, "cached_maps": int(sum(plan.cached)),
            "estimated_bytes": plan.total, "need_bytes": need, "free_bytes": int(free)}
    log.info("conv5 cache %s: %d images x %d scale%s x %d flip%s = %d maps, about %s (%s per image); "
             "%d cached, %s to write, %s free", folder / entry_name(extractor.backbone), n,
             len(extractor.scales), "s" if len(extractor.scales) > 1 else "", len(flips),
             "s" if len(flips) > 1 else "", nmaps, human_bytes(plan.total), human_bytes(plan.total / max(n, 1)),
             info["cached_maps"], human_bytes(need), human_bytes(free))
    if need and want > free:
        msg = (f"{folder}: the conv5 cache needs about {_gib(want)}, {_gib(free)} free; "
               f"free space or use --cache DIR")
        if os.environ.get(DISK_CHECK_ENV, "1").strip() in ("0", "false", "no", "off"):
            log.warning("%s (going on: %s=0)", msg, DISK_CHECK_ENV)
        else:
            raise CacheSpaceError(msg)
    entry = extractor.cache.entry_dir()
    use = {"kind": "conv5", "dataset": getattr(dataset, "name", None), "split": getattr(dataset, "split", None),
           "root": str(getattr(dataset, "root", "") or ""), "images": n, "scales": list(extractor.scales),
           "max_side": extractor.max_side, "flips": list(flips), "dtype": extractor.cache_dtype,
           "backbone": extractor.backbone.name, "weights_id": str(extractor.backbone.weights_id),
           "maps": nmaps, "estimated_bytes": plan.total}
    write_use_record(entry, use, keep_existing=True)
    extractor.cache.expect(plan.missing, lambda: _report_use(entry, use, plan.keys, n))
    return info


def _report_use(entry: Path, use: dict, keys: Sequence[str], images: int) -> None:
    """The end of a conv5 stage: log the split's maps' bytes on disk and add them to the use record."""
    total, found = 0, 0
    for k in keys:
        try:
            total += _disk_bytes(os.stat(entry / k[:2] / f"{k}.npz"))
            found += 1
        except OSError:
            pass
    per = total / max(images, 1)
    what = f"{use.get('dataset')}/{use.get('split')}" if use.get("dataset") else "the split"
    log.info("conv5 cache: %s, %d images, %d maps: %s on disk, %s per image (%s)", what, images, found,
             human_bytes(total), human_bytes(per), entry)
    write_use_record(entry, {**use, "bytes": total, "maps_on_disk": found, "bytes_per_image": int(per)})


def conv5_disk_use(extractor, dataset, flips: Sequence[bool] = (False,)) -> dict:
    """Bytes on disk of a split's conv5 maps: ``{"images", "maps", "maps_on_disk", "bytes",
    "bytes_per_image"}`` (for callers that compute the maps without :func:`check_conv5_space`,
    e.g. sharded over ranks: call it after the barrier)."""
    records = list(getattr(dataset, "records", dataset))
    total, found, nmaps = 0, 0, 0
    if extractor.cache_dir is not None and extractor.mode == "spp":
        entry = Path(extractor.cache_dir) / entry_name(extractor.backbone)
        for rec in records:
            ikey = extractor.cache.image_key(rec.path)
            for flip in flips:
                for s in extractor.scales:
                    k = extractor.cache.map_key(ikey, s, flip)
                    nmaps += 1
                    try:
                        total += _disk_bytes(os.stat(entry / k[:2] / f"{k}.npz"))
                        found += 1
                    except OSError:
                        pass
    return {"images": len(records), "maps": nmaps, "maps_on_disk": found, "bytes": total,
            "bytes_per_image": total / max(len(records), 1)}


# ---------------------------------------------------------------------------
# walking the cache folder (by descriptors: a symlink is never followed, a swapped folder never entered)

_TEMP_RE = re.compile(r"^\.(?P<base>.+)\.tmp(?P<pid>\d+)\.[A-Za-z0-9_]{8}(\.[^.]*)?$")
_STORE_RE = re.compile(r"^(?P<stem>ss-[0-9a-f]{16}-max\d+)\.npz$")
_SHARD_RE = re.compile(r"^(?P<stem>ss-[0-9a-f]{16}-max\d+)\.shard-\d+-of-\d+\.npz$")
_PARTS_RE = re.compile(r"^(?P<stem>ss-[0-9a-f]{16}-max\d+)\.npz\.parts$")
_PART_FILE_RE = re.compile(r"^([0-9a-f]{20}\.npy|settings\.json)$")
_RCNN_FILE_RE = re.compile(r"^[0-9a-f]{16}\.npy$")
_ENTRY_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+-[A-Za-z0-9_.+-]{1,8}$")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return pid > 0


def _temp_of(name: str, base_ok: Callable[[str], bool]) -> re.Match | None:
    m = _TEMP_RE.match(name)
    return m if m is not None and base_ok(m.group("base")) else None


#: A rule says what a name inside a folder is: ``"file"`` (an sppdet file), a rule for a
#: sub-folder, or ``None`` (not sppdet's: left alone).  ``is_dir`` tells which is asked.
Rule = Callable[[str, bool], Any]


def _maps_rule(kk: str) -> Rule:
    def rule(name: str, is_dir: bool):
        if is_dir:
            return None
        ok = lambda b: MAP_FILE_RE.match(b) is not None and b.startswith(kk)  # noqa: E731
        return "file" if ok(name) or _temp_of(name, ok) else None
    return rule


def _uses_rule(name: str, is_dir: bool):
    if is_dir:
        return None
    ok = lambda b: USE_FILE_RE.match(b) is not None  # noqa: E731
    return "file" if ok(name) or _temp_of(name, ok) else None


def _conv5_rule(name: str, is_dir: bool):
    if is_dir:
        if name == USES_DIR:
            return _uses_rule
        return _maps_rule(name) if SHARD_DIR_RE.match(name) else None
    return "file" if name == LOCK_NAME else None


def _parts_rule(name: str, is_dir: bool):
    if is_dir:
        return None
    ok = lambda b: _PART_FILE_RE.match(b) is not None  # noqa: E731
    return "file" if ok(name) or _temp_of(name, ok) else None


def _store_rule(stem: str) -> Rule:
    """The files of one proposal store inside its ``<dataset>-<split>`` folder."""
    def own(b: str) -> bool:
        m = _STORE_RE.match(b) or _SHARD_RE.match(b)
        return m is not None and m.group("stem") == stem

    def rule(name: str, is_dir: bool):
        if is_dir:
            m = _PARTS_RE.match(name)
            return _parts_rule if m is not None and m.group("stem") == stem else None
        return "file" if own(name) or _temp_of(name, own) else None
    return rule


def _rcnn_rule(name: str, is_dir: bool):
    if is_dir:
        return None
    ok = lambda b: _RCNN_FILE_RE.match(b) is not None  # noqa: E731
    return "file" if ok(name) or _temp_of(name, ok) else None


@dataclass
class _Tally:
    files: int = 0
    bytes: int = 0
    newest_mtime: float = 0.0
    newest_atime: float = 0.0
    newest_work: float = 0.0         # newest mtime of work-in-progress files (temps, parts, shards)
    maps: int = 0                    # conv5 map files among ``files``
    deleted_files: int = 0
    deleted_bytes: int = 0
    left: list[str] = field(default_factory=list)   # not sppdet's, or in use: not deleted
    busy_temps: int = 0


def _open_dir(name: str, dir_fd: int | None) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _sweep(dir_fd: int, rule: Rule, tally: _Tally, rel: str, *, delete: bool, skip: Iterable[str] = (),
           work: bool = False) -> None:
    """Tally (and with ``delete`` remove) what ``rule`` recognises inside the open folder ``dir_fd``."""
    skip = set(skip)
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError:
        return
    for name in names:
        path = f"{rel}/{name}"
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue                                   # removed meanwhile
        is_dir = stat.S_ISDIR(st.st_mode)
        what = rule(name, is_dir) if (is_dir or stat.S_ISREG(st.st_mode)) else None
        if what is None:
            tally.left.append(path)
            continue
        if is_dir:
            try:
                sub = _open_dir(name, dir_fd)
            except OSError:
                tally.left.append(path)
                continue
            try:
                _sweep(sub, what, tally, path, delete=delete, work=work or name.endswith(".parts"))
            finally:
                os.close(sub)
            if delete:
                try:
                    os.rmdir(name, dir_fd=dir_fd)
                except OSError:
                    pass                               # something was left in it (listed already)
            continue
        temp = _TEMP_RE.match(name)
        tally.files += 1
        tally.maps += MAP_FILE_RE.match(name) is not None
        tally.bytes += _disk_bytes(st)
        tally.newest_mtime = max(tally.newest_mtime, st.st_mtime)
        tally.newest_atime = max(tally.newest_atime, st.st_atime)
        if work or temp is not None or ".shard-" in name:
            tally.newest_work = max(tally.newest_work, st.st_mtime)
        if not delete or name in skip:
            continue
        if temp is not None and _pid_alive(int(temp.group("pid"))):
            tally.busy_temps += 1
            tally.left.append(path)                    # a live process is writing it
            continue
        try:
            os.unlink(name, dir_fd=dir_fd)
            tally.deleted_files += 1
            tally.deleted_bytes += _disk_bytes(st)
        except OSError:
            tally.left.append(path)


# ---------------------------------------------------------------------------
# entries


@dataclass
class CacheEntry:
    """One thing in a cache folder that can be pruned as a whole.

    Attributes:
        key: its path relative to the cache folder (``features/zf5-1a2b3c4d``,
            ``proposals/<dataset>-<split>/ss-<preset key>-max<N>``, ``rcnn_windows``).
        kind: ``conv5``, ``proposals`` or ``rcnn_windows``.
        bytes: size on disk of its files (allocated blocks).
        files: number of files.
        images: images it holds (conv5: the images of the splits that used it, per its use
            records; proposals: the store's; R-CNN: files, one per image and flip), or ``None``.
        last_use: seconds since the epoch (conv5: the access time of its lock file and use
            records, set by every process that uses it, or its newest file; proposals: the store's
            access time, set whenever a run reuses it, or its newest file; R-CNN: newest access
            or change).
        description: one line saying what it is.
        details: kind-specific facts (JSON-serialisable).
    """

    key: str
    kind: str
    path: Path
    bytes: int
    files: int
    images: int | None
    last_use: float | None
    description: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_image(self) -> float | None:
        return self.bytes / self.images if self.images else None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "path": str(self.path), "bytes": self.bytes,
                "files": self.files, "images": self.images, "bytes_per_image": self.bytes_per_image,
                "last_use": self.last_use,
                "last_use_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_use))
                if self.last_use else None,
                "description": self.description, "details": self.details}


@dataclass
class CacheListing:
    root: Path
    entries: list[CacheEntry]
    unrecognised: list[str]        # paths (relative) that are not sppdet's: never touched

    @property
    def total_bytes(self) -> int:
        return int(sum(e.bytes for e in self.entries))

    def to_json(self) -> dict[str, Any]:
        return {"cache": str(self.root), "total_bytes": self.total_bytes, "entries": [e.to_json() for e in self.entries],
                "unrecognised": self.unrecognised}


def cache_root(path: str | Path) -> Path | None:
    """``path`` if it is an sppdet cache folder, ``None`` if it does not exist.

    Raises:
        CacheError: it is a file, or a folder with content but none of ``features/``,
            ``proposals/``, ``rcnn_windows/`` (real folders, not symlinks) in it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        return None
    if not p.is_dir():
        raise CacheError(f"{p}: not a folder; pass --cache with the folder sppdet caches into")
    names = os.listdir(p)
    ours = [n for n in names if n in _TOP and (p / n).is_dir() and not (p / n).is_symlink()]
    if names and not ours:
        raise CacheError(f"{p}: not an sppdet cache folder (it holds none of features/, proposals/, "
                         "rcnn_windows/); pass --cache with the folder sppdet caches into")
    return p


def _read_store_settings(path: Path) -> dict | None:
    """The ``settings`` of a proposal store, read without changing its access time (``None``: unreadable)."""
    try:
        fd = open_noatime(path)
        with os.fdopen(fd, "rb") as fh:
            with np.load(fh, allow_pickle=False) as z:
                s = json.loads(str(z["settings"].item()))
                n = len(z["ids"]) if "ids" in z.files else None
        if isinstance(s, dict):
            s.setdefault("_num_ids", n)
            return s
    except Exception:  # noqa: BLE001 - any unreadable store is listed as such
        return None
    return None


def _read_uses(entry: Path) -> list[dict]:
    """The entry's use records, each with ``last_use`` (the record's access time, see
    :func:`~sppdet.features.conv5_cache.write_use_record`)."""
    out = []
    d = entry / USES_DIR
    if not d.is_dir() or d.is_symlink():
        return out
    for f in sorted(d.iterdir()):
        if USE_FILE_RE.match(f.name) and f.is_file() and not f.is_symlink():
            rec = read_use_record(f)
            if rec is not None:
                st = f.stat()
                out.append({**rec, "last_use": max(st.st_atime, st.st_mtime)})
    return out


def _tally(parent_fd: int, name: str, rule: Rule, rel: str) -> _Tally | None:
    t = _Tally()
    try:
        fd = _open_dir(name, parent_fd)
    except OSError:
        return None
    try:
        _sweep(fd, rule, t, rel, delete=False)
    finally:
        os.close(fd)
    return t


def _conv5_entries(root: Path, feat_fd: int, unrecognised: list[str]) -> list[CacheEntry]:
    out = []
    for name in sorted(os.listdir(feat_fd)):
        rel = f"features/{name}"
        try:
            st = os.stat(name, dir_fd=feat_fd, follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or not _ENTRY_NAME_RE.match(name):
            unrecognised.append(rel)
            continue
        t = _tally(feat_fd, name, _conv5_rule, rel)
        if t is None or (t.files == 0 and t.left):
            unrecognised.append(rel)                  # a folder of someone else's files
            continue
        unrecognised.extend(t.left)
        path = root / "features" / name
        uses = _read_uses(path)
        try:
            st_lock = os.stat(path / LOCK_NAME, follow_symlinks=False)
            lock_t = max(st_lock.st_atime, st_lock.st_mtime)
        except OSError:
            lock_t = 0.0
        last = max([lock_t, t.newest_mtime] + [float(u.get("last_use", 0) or 0) for u in uses]) or None
        by_split: dict[tuple, int] = {}
        for u in uses:
            k = (u.get("dataset"), u.get("split"), u.get("root"))
            by_split[k] = max(by_split.get(k, 0), int(u.get("images") or 0))
        images = sum(by_split.values()) or None
        backbone, _, wid = name.rpartition("-")
        parts = []
        for u in uses:
            flips = u.get("flips") or [False]
            parts.append(f"{u.get('dataset')}/{u.get('split')} {u.get('images')} images, s={','.join(map(str, u.get('scales', [])))}"
                         f" max {u.get('max_side')}, {u.get('dtype')}{' +flip' if True in flips else ''}"
                         + (f" ({human_bytes(u['bytes'])})" if "bytes" in u else ""))
        desc = f"conv5 maps of {backbone} (weights {wid})" + (": " + "; ".join(parts) if parts else
                                                             " (no use records)")
        fmt = {u.get("format") for u in uses} - {None}
        out.append(CacheEntry(rel, "conv5", path, t.bytes, t.files, images, last, desc,
                              {"backbone": backbone, "weights_id8": wid, "maps": t.maps, "uses": uses,
                               "stale_format": sorted(f for f in fmt if f != CACHE_FORMAT)}))
    return out


def _proposal_entries(root: Path, prop_fd: int, unrecognised: list[str]) -> list[CacheEntry]:
    out = []
    for dname in sorted(os.listdir(prop_fd)):
        rel_d = f"proposals/{dname}"
        try:
            st = os.stat(dname, dir_fd=prop_fd, follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            unrecognised.append(rel_d)
            continue
        try:
            dfd = _open_dir(dname, prop_fd)
        except OSError:
            unrecognised.append(rel_d)
            continue
        try:
            stems: dict[str, None] = {}
            for n in sorted(os.listdir(dfd)):
                m = (_STORE_RE.match(n) or _SHARD_RE.match(n) or _PARTS_RE.match(n)
                     or _temp_of(n, lambda b: bool(_STORE_RE.match(b) or _SHARD_RE.match(b))))
                if m is None:
                    unrecognised.append(f"{rel_d}/{n}")
                    continue
                stem = m.group("stem") if "stem" in m.re.groupindex else (
                    (_STORE_RE.match(m.group("base")) or _SHARD_RE.match(m.group("base"))).group("stem"))
                stems[stem] = None
            for stem in stems:
                t = _Tally()
                _sweep(dfd, _store_rule(stem), t, rel_d, delete=False)
                path = root / "proposals" / dname / f"{stem}.npz"
                settings = _read_store_settings(path) if path.is_file() and not path.is_symlink() else None
                last = max(t.newest_mtime, t.newest_atime) or None
                details: dict[str, Any] = {"store": path.is_file(), "in_progress": t.newest_work > 0}
                if settings is not None:
                    ds = settings.get("dataset") or {}
                    images = ds.get("num_images", settings.get("_num_ids"))
                    details.update({"dataset": ds.get("name"), "split": ds.get("split"),
                                    "preset": settings.get("preset_name"), "max_boxes": settings.get("max_boxes"),
                                    "format": settings.get("format")})
                    desc = (f"proposals of {ds.get('name')}/{ds.get('split')}: preset {settings.get('preset_name')},"
                            f" at most {settings.get('max_boxes')} boxes per image")
                else:
                    images = None
                    desc = ("proposal store (unreadable)" if path.is_file() else
                            "proposals being computed or interrupted (no store yet)")
                out.append(CacheEntry(f"{rel_d}/{stem}", "proposals", path, t.bytes, t.files,
                                      int(images) if images is not None else None, last, desc, details))
        finally:
            os.close(dfd)
    return out


def _rcnn_entry(root: Path, root_fd: int, unrecognised: list[str]) -> CacheEntry | None:
    t = _tally(root_fd, "rcnn_windows", _rcnn_rule, "rcnn_windows")
    if t is None:
        return None
    unrecognised.extend(t.left)
    last = max(t.newest_mtime, t.newest_atime) or None
    return CacheEntry("rcnn_windows", "rcnn_windows", root / "rcnn_windows", t.bytes, t.files, t.files or None,
                      last, "R-CNN mode window features (one file per training image and flip)", {})


def list_cache(path: str | Path) -> CacheListing:
    """Every entry of the cache folder ``path`` (empty when it does not exist).

    Raises:
        CacheError: ``path`` is not an sppdet cache folder (:func:`cache_root`).
    """
    root = cache_root(path)
    if root is None:
        return CacheListing(Path(path).expanduser(), [], [])
    entries: list[CacheEntry] = []
    unrecognised: list[str] = []
    root_fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for name in sorted(os.listdir(root_fd)):
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            if name not in _TOP or not stat.S_ISDIR(st.st_mode):
                unrecognised.append(name)
                continue
            if name == "rcnn_windows":
                e = _rcnn_entry(root, root_fd, unrecognised)
                if e is not None and e.files:
                    entries.append(e)
                continue
            fd = _open_dir(name, root_fd)
            try:
                entries += (_conv5_entries if name == "features" else _proposal_entries)(root, fd, unrecognised)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    return CacheListing(root, entries, unrecognised)


# ---------------------------------------------------------------------------
# prune


@dataclass
class PruneResult:
    root: Path
    dry_run: bool
    deleted: list[tuple[CacheEntry, int]] = field(default_factory=list)      # (entry, bytes freed)
    skipped: list[tuple[CacheEntry, str]] = field(default_factory=list)      # (entry, why)
    kept: list[CacheEntry] = field(default_factory=list)
    left: list[str] = field(default_factory=list)                            # files not deleted inside pruned entries

    @property
    def freed_bytes(self) -> int:
        return int(sum(b for _, b in self.deleted))

    def to_json(self) -> dict[str, Any]:
        return {"cache": str(self.root), "dry_run": self.dry_run, "freed_bytes": self.freed_bytes,
                "deleted": [{**e.to_json(), "freed_bytes": b} for e, b in self.deleted],
                "skipped": [{"key": e.key, "reason": why} for e, why in self.skipped],
                "kept": [e.key for e in self.kept], "left": self.left}


def select_entries(entries: Sequence[CacheEntry], *, older_than_days: float | None = None,
                   keep_last: int | None = None, keys: Sequence[str] | None = None, everything: bool = False,
                   now: float | None = None) -> list[CacheEntry]:
    """The entries a prune deletes (exactly one criterion).

    ``older_than_days``: last used more than that many days ago (an entry without a known last
    use counts as old); ``keep_last``: all but the ``N`` most recently used entries *of each kind*;
    ``keys``: these (each must exist); ``everything``: all.

    Raises:
        CacheError: no criterion or several, a negative value, a key that is not in the cache.
    """
    given = [older_than_days is not None, keep_last is not None, bool(keys), bool(everything)]
    if sum(given) != 1:
        raise CacheError("sppdet cache prune: give exactly one of --older-than DAYS, --keep-last N, --key K, --all")
    now = time.time() if now is None else now
    if older_than_days is not None:
        if not older_than_days >= 0:
            raise CacheError(f"--older-than {older_than_days}: expected a number of days >= 0")
        limit = now - float(older_than_days) * 86400.0
        return [e for e in entries if (e.last_use or 0.0) < limit]
    if keep_last is not None:
        if keep_last < 0:
            raise CacheError(f"--keep-last {keep_last}: expected N >= 0")
        out = []
        for kind in KINDS:
            same = sorted((e for e in entries if e.kind == kind), key=lambda e: e.last_use or 0.0, reverse=True)
            out += same[keep_last:]
        return out
    if keys:
        by_key = {e.key: e for e in entries}
        missing = [k for k in keys if k.strip("/") not in by_key]
        if missing:
            raise CacheError(f"--key {missing[0]}: no such entry in the cache (see `sppdet cache list`)")
        return [by_key[k.strip("/")] for k in dict.fromkeys(keys)]
    return list(entries)


def _lock_exclusive(entry_fd: int) -> int | None | bool:
    """An exclusive, non-blocking lock on the conv5 entry open as ``entry_fd``: the lock file's
    descriptor, ``None`` (locks unavailable) or ``False`` (a running process holds it)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     0o666, dir_fd=entry_fd)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    return fd


def _open_path(root: Path, comps: Sequence[str]) -> int:
    """A descriptor of ``root/comps...``, opened one component at a time, never through a symlink."""
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for comp in comps:
            nfd = _open_dir(comp, fd)
            os.close(fd)
            fd = nfd
    except OSError:
        os.close(fd)
        raise
    return fd


def _prune_one(root: Path, e: CacheEntry, dry_run: bool, now: float) -> tuple[int | None, str | None, list[str]]:
    """Delete one entry; returns (bytes freed or None, why skipped or None, paths left)."""
    parts = e.key.split("/")
    if e.kind == "proposals":
        holder, rule, inside = parts[:-1], _store_rule(parts[-1]), "/".join(parts[:-1])
    else:            # a folder of its own: features/<entry>, rcnn_windows
        holder, rule, inside = parts, (_conv5_rule if e.kind == "conv5" else _rcnn_rule), e.key
    try:
        fd = _open_path(root, holder)
    except OSError:
        return None, "gone (removed meanwhile) or not a folder", []
    lock: int | None | bool = None
    try:
        if e.kind == "conv5":
            lock = _lock_exclusive(fd)
            if lock is False:
                return None, "in use by a running sppdet process (it holds the entry's lock)", []
        else:
            t = _Tally()
            _sweep(fd, rule, t, inside, delete=False)
            newest = t.newest_work if e.kind == "proposals" else t.newest_mtime
            age = now - newest
            if newest and age < ACTIVE_SECONDS:
                return None, (f"being written (a work file changed {age:.0f} s ago: a running job?); "
                              "prune it when that job has finished"), []
        if dry_run:
            return e.bytes, None, []
        t = _Tally()
        _sweep(fd, rule, t, inside, delete=True, skip=(LOCK_NAME,) if e.kind == "conv5" else ())
        if e.kind == "conv5" and not t.left:
            try:
                st = os.stat(LOCK_NAME, dir_fd=fd, follow_symlinks=False)
                os.unlink(LOCK_NAME, dir_fd=fd)        # still locked: a job waiting on it retries
                t.deleted_bytes += _disk_bytes(st)
            except OSError:
                pass
    finally:
        if type(lock) is int:
            os.close(lock)
        os.close(fd)
    # the entry's folder (conv5, R-CNN) or the store's <dataset>-<split> folder, when empty now
    try:
        pfd = _open_path(root, holder[:-1])
        try:
            os.rmdir(holder[-1], dir_fd=pfd)
        finally:
            os.close(pfd)
    except OSError:
        pass
    return t.deleted_bytes, None, t.left


def prune_cache(path: str | Path, *, older_than_days: float | None = None, keep_last: int | None = None,
                keys: Sequence[str] | None = None, everything: bool = False, dry_run: bool = False,
                now: float | None = None) -> PruneResult:
    """Delete the entries :func:`select_entries` picks from :func:`list_cache` (or, with
    ``dry_run``, say what would be deleted).

    Only the files an entry's rules recognise are deleted (:func:`list_cache`'s layout; a temp
    file only when the process that wrote it is gone); folders are removed when empty; symlinks
    are never followed nor deleted; everything else is left and listed in ``left``.

    Concurrency: a conv5 entry is deleted under an exclusive lock (a running ``train``, ``eval``
    or ``detect`` holds it shared: that entry is skipped, and a job starting during the prune
    waits for it); a proposal store with work files (``.parts``, shards, temps) written in the
    last :data:`ACTIVE_SECONDS`, or an R-CNN feature folder written as recently, is skipped.  A
    job that has loaded a store keeps it; one that reads a deleted map or store later recomputes
    it (logged), so a prune never corrupts a run -- at worst it costs recomputation.

    Raises:
        CacheError: not a cache folder, or a bad selection (:func:`select_entries`).
    """
    listing = list_cache(path)
    chosen = select_entries(listing.entries, older_than_days=older_than_days, keep_last=keep_last, keys=keys,
                            everything=everything, now=now)
    now = time.time() if now is None else now
    res = PruneResult(listing.root, dry_run)
    ids = {id(e) for e in chosen}
    res.kept = [e for e in listing.entries if id(e) not in ids]
    for e in chosen:
        freed, why, left = _prune_one(listing.root, e, dry_run, now)
        if why is not None:
            res.skipped.append((e, why))
        else:
            res.deleted.append((e, int(freed or 0)))
            res.left += left
    for e, b in res.deleted:
        log.debug("%s %s (%s)", "would delete" if dry_run else "deleted", e.key, human_bytes(b))
    return res


__all__ = ["CacheSpaceError", "check_conv5_space", "conv5_disk_use", "map_file_bytes", "human_bytes",
           "CacheEntry", "CacheListing", "cache_root", "list_cache", "select_entries", "prune_cache", "PruneResult",
           "KINDS", "ACTIVE_SECONDS", "DISK_CHECK_ENV"]
