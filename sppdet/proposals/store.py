"""The proposal store: one file of boxes per split and setting, safe to load, resumable.

File format (``.npz``, read with ``np.load(path, allow_pickle=False)``; no pickle anywhere):

===============  =====================  ==================================================
array            shape / dtype          meaning
===============  =====================  ==================================================
``boxes``        [T, 4] float32         all images' boxes, concatenated, ``(x1, y1, x2, y2)``
                                        0-based continuous pixels of the original image
``offsets``      [n + 1] int64          image ``i`` owns ``boxes[offsets[i]:offsets[i+1]]``
``ids``          [n] unicode            image ids, in dataset order
``image_keys``   [n] unicode            per-image key: hash of id, file name and file size
``skipped``      [m] unicode            ids of images skipped as undecodable
``indices``      [n] int64              position of each image in the dataset (shards)
``settings``     0-d unicode            JSON: what produced the boxes (see below)
===============  =====================  ==================================================

``settings`` holds ``format``, the preset's settings and key, ``max_boxes``
and the OpenCV version -- together the *identity* of the store (a store whose
identity differs from a request is stale and never reused) -- plus
informational fields (dataset name, split, number of images, shard).
Each image's boxes are valid only while its image key matches (a replaced
image file is recomputed, the rest reused).

Writes are atomic (temporary file + rename).  A run in progress keeps one
``.npy`` file per finished image in the sidecar folder ``<store>.parts/``
(with its own ``settings.json``), so an interrupted run resumes where it
stopped; the sidecar is merged into the store and removed at the end.
Shards write ``<stem>.shard-<i>-of-<N>.npz`` next to the store;
:func:`merge_shards` combines a complete set into the store.

A store reused by :func:`load_if_valid` gets its access time set to now (:func:`mark_used`):
``sppdet cache list`` shows it as the store's last use and ``sppdet cache prune --older-than``
goes by it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import cv2
import numpy as np

from ..data.records import Dataset, ImageRecord
from ..errors import CacheError
from ..utils.io import atomic_save_npy, atomic_save_npz, atomic_write_json
from .presets import Preset

logger = logging.getLogger(__name__)

#: Format tag written into every store; bump when the layout changes.
FORMAT = "sppdet-proposals/1"

#: Settings keys that decide whether a store can be reused.
IDENTITY_KEYS: tuple[str, ...] = ("format", "preset", "preset_key", "max_boxes", "opencv")

_SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)\.npz$")


class ProposalStoreError(CacheError):
    """A proposal file is missing, corrupt, or not a sppdet proposal store."""


# ---------------------------------------------------------------------------
# Keys and paths


def image_key(record: ImageRecord) -> str:
    """The per-image cache key: hash of the image id, file name and file size (20 hex digits)."""
    try:
        size = record.path.stat().st_size
    except OSError:
        size = -1
    text = f"{record.image_id}\0{record.path.name}\0{size}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def make_settings(preset: Preset, max_boxes: int, dataset: Dataset | None = None) -> dict[str, Any]:
    """The settings dict of a store: identity (:data:`IDENTITY_KEYS`) plus information."""
    s: dict[str, Any] = {
        "format": FORMAT,
        "preset": preset.settings(),
        "preset_key": preset.key(),
        "preset_name": preset.name,
        "max_boxes": int(max_boxes),
        "opencv": cv2.__version__,
    }
    if dataset is not None:
        s["dataset"] = {"name": dataset.name, "split": dataset.split, "num_images": len(dataset),
                        "fingerprint": dataset.fingerprint()}
    return s


def identity(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``settings`` that must match for a store to be reused."""
    return {k: settings.get(k) for k in IDENTITY_KEYS}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or "x"


def default_store_path(cache_dir: str | Path, dataset: Dataset, preset_key: str, max_boxes: int) -> Path:
    """``<cache_dir>/proposals/<dataset name>-<split>/ss-<preset_key>-max<max_boxes>.npz``."""
    return (Path(cache_dir) / "proposals" / f"{_safe(dataset.name)}-{_safe(dataset.split)}"
            / f"ss-{preset_key}-max{int(max_boxes)}.npz")


def shard_path(store_path: str | Path, index: int, count: int) -> Path:
    """``<stem>.shard-<index>-of-<count>.npz`` next to the store (``index`` is 1-based)."""
    p = Path(store_path)
    stem = p.name[:-4] if p.name.endswith(".npz") else p.name
    return p.with_name(f"{stem}.shard-{index}-of-{count}.npz")


def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/N"`` or ``(i, N)`` (1-based, ``1 <= i <= N``) -> ``(i, N)``; ``None`` stays ``None``.

    Raises:
        ProposalStoreError: malformed (one line naming ``--shard``).
    """
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ProposalStoreError(f"--shard {shard}: expected i/N, e.g. --shard 1/4 (i from 1 to N)")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        i, n = (int(v) for v in shard)
    if n < 1 or not 1 <= i <= n:
        raise ProposalStoreError(f"--shard {i}/{n}: i must be between 1 and N (N >= 1), e.g. 1/{max(n, 1)}")
    return i, n


# ---------------------------------------------------------------------------
# The store


class ProposalStore:
    """Boxes per image id, with the settings that produced them.

    ``store[image_id]`` -> ndarray[N, 4] float32 ``(x1, y1, x2, y2)`` in
    original-image pixels (a copy); ``image_id in store``; ``len(store)``;
    iteration yields ids in dataset order.

    Attributes:
        settings (dict): see the module docstring.
        path (Path | None): the file it was loaded from / saved to.
        skipped (list[str]): ids of images skipped as undecodable.
    """

    def __init__(self, ids: Sequence[str], boxes: Sequence[np.ndarray], settings: Mapping[str, Any], *,
                 image_keys: Sequence[str] | None = None, skipped: Sequence[str] = (),
                 indices: Sequence[int] | None = None, path: str | Path | None = None) -> None:
        ids = [str(i) for i in ids]
        if len(boxes) != len(ids):
            raise ValueError(f"ProposalStore: {len(ids)} ids but {len(boxes)} box arrays")
        arrays = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        counts = np.array([len(b) for b in arrays], dtype=np.int64)
        self._boxes = np.concatenate(arrays) if arrays else np.zeros((0, 4), np.float32)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._init(ids, image_keys, skipped, indices, settings, path)

    def _init(self, ids, image_keys, skipped, indices, settings, path) -> None:
        self._ids = list(ids)
        self._index = {i: n for n, i in enumerate(self._ids)}
        if len(self._index) != len(self._ids):
            raise ValueError("ProposalStore: duplicate image ids")
        self.image_keys = [str(k) for k in image_keys] if image_keys is not None else [""] * len(self._ids)
        self.indices = (np.asarray(indices, dtype=np.int64) if indices is not None
                        else np.arange(len(self._ids), dtype=np.int64))
        self.skipped = [str(s) for s in skipped]
        self.settings = dict(settings)
        self.path = Path(path) if path is not None else None

    @classmethod
    def _from_arrays(cls, ids, boxes, offsets, settings, image_keys, skipped, indices, path) -> "ProposalStore":
        self = cls.__new__(cls)
        self._boxes = boxes
        self._offsets = offsets
        self._init(ids, image_keys, skipped, indices, settings, path)
        return self

    # -- mapping protocol
    def __getitem__(self, image_id: str) -> np.ndarray:
        n = self._index[str(image_id)]
        return self._boxes[self._offsets[n]:self._offsets[n + 1]].copy()

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._index

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for i in self._ids:
            yield i, self[i]

    def key_of(self, image_id: str) -> str:
        """The image key stored with ``image_id`` (see :func:`image_key`)."""
        return self.image_keys[self._index[str(image_id)]]

    def num_boxes(self) -> np.ndarray:
        """ndarray[n] int64: boxes per image, in id order."""
        return np.diff(self._offsets)

    @property
    def mean_boxes(self) -> float:
        return float(self.num_boxes().mean()) if len(self) else 0.0

    def __repr__(self) -> str:
        return (f"ProposalStore({len(self)} images, {self.mean_boxes:.0f} boxes/img, "
                f"preset={self.settings.get('preset_name')!r}, path={str(self.path) if self.path else None!r})")

    # -- files
    def save(self, path: str | Path | None = None) -> Path:
        """Write the store atomically to ``path`` (default: :attr:`path`); returns the path."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("ProposalStore.save: no path given")
        atomic_save_npz(
            target,
            boxes=self._boxes.astype(np.float32),
            offsets=self._offsets.astype(np.int64),
            ids=np.array(self._ids, dtype=str),
            image_keys=np.array(self.image_keys, dtype=str),
            skipped=np.array(self.skipped, dtype=str),
            indices=self.indices.astype(np.int64),
            settings=np.array(json.dumps(self.settings, sort_keys=True)),
        )
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path) -> "ProposalStore":
        """Read a store written by :meth:`save` (``allow_pickle=False``) and check it.

        Raises:
            ProposalStoreError: missing file, not an npz, truncated/corrupt data
                (zip CRC), wrong arrays or inconsistent shapes; one line naming the file.
        """
        path = Path(path)
        if not path.is_file():
            raise ProposalStoreError(f"{path}: no such proposal file")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"boxes", "offsets", "ids", "settings"} - set(z.files)
                if missing:
                    raise ValueError(f"missing arrays {sorted(missing)}")
                boxes = z["boxes"]
                offsets = z["offsets"]
                ids = [str(i) for i in z["ids"].tolist()]
                settings = json.loads(str(z["settings"].item()))
                keys = [str(k) for k in z["image_keys"].tolist()] if "image_keys" in z.files else None
                skipped = [str(s) for s in z["skipped"].tolist()] if "skipped" in z.files else []
                indices = z["indices"] if "indices" in z.files else None
        except ProposalStoreError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
                UnicodeDecodeError, AttributeError, TypeError) as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise ProposalStoreError(f"{path}: not a readable sppdet proposal file ({msg})") from None
        problem = _check_arrays(boxes, offsets, ids, settings, keys, indices)
        if problem:
            raise ProposalStoreError(f"{path}: corrupt sppdet proposal file ({problem})")
        return cls._from_arrays(ids, boxes, offsets.astype(np.int64), settings, keys, skipped, indices, path)


def _check_arrays(boxes, offsets, ids, settings, keys, indices) -> str | None:
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        fmt = settings.get("format") if isinstance(settings, dict) else None
        return f"format {fmt!r}, expected {FORMAT!r}"
    if boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4:
        return f"boxes are {boxes.dtype} {boxes.shape}, expected float32 [T, 4]"
    if offsets.ndim != 1 or len(offsets) != len(ids) + 1 or not np.issubdtype(offsets.dtype, np.integer):
        return f"offsets have shape {offsets.shape} for {len(ids)} ids"
    if offsets[0] != 0 or offsets[-1] != len(boxes) or np.any(np.diff(offsets) < 0):
        return "offsets do not index the boxes"
    if len(set(ids)) != len(ids):
        return "duplicate image ids"
    if keys is not None and len(keys) != len(ids):
        return "image_keys do not match ids"
    if indices is not None and (indices.ndim != 1 or len(indices) != len(ids)):
        return "indices do not match ids"
    if not np.all(np.isfinite(boxes)):
        return "non-finite box coordinates"
    return None


# ---------------------------------------------------------------------------
# Resume sidecar


class PartsDir:
    """``<store>.parts/``: one ``<image key>.npy`` per finished image plus ``settings.json``.

    Written by the parent process only, one atomic file per image, so an
    interrupted run loses at most the images in flight.
    """

    def __init__(self, store_path: str | Path, settings: Mapping[str, Any]) -> None:
        self.store_path = Path(store_path)
        self.dir = self.store_path.with_name(self.store_path.name + ".parts")
        self.settings = dict(settings)

    def open(self) -> "PartsDir":
        """Create the folder; wipe it first when it was written with other settings."""
        meta = self.dir / "settings.json"
        if self.dir.exists():
            try:
                old = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            if old is None or identity(old) != identity(self.settings):
                logger.info("%s: partial results from other settings (or unreadable); starting afresh",
                            self.dir)
                shutil.rmtree(self.dir, ignore_errors=True)
        if not meta.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, self.settings)
        return self

    def part(self, key: str) -> Path:
        return self.dir / f"{key}.npy"

    def has(self, key: str) -> bool:
        return self.part(key).is_file()

    def load(self, key: str) -> np.ndarray | None:
        """The boxes saved under ``key``, or ``None`` (missing; a corrupt file is deleted)."""
        p = self.part(key)
        try:
            arr = np.load(p, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:
            logger.warning("%s: unreadable partial result (%s); recomputing that image", p, e)
            p.unlink(missing_ok=True)
            return None
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[1] != 4 or not np.all(np.isfinite(arr)):
            logger.warning("%s: malformed partial result; recomputing that image", p)
            p.unlink(missing_ok=True)
            return None
        return arr

    def save(self, key: str, boxes: np.ndarray) -> None:
        atomic_save_npy(self.part(key), np.ascontiguousarray(boxes, dtype=np.float32))

    def count(self) -> int:
        return sum(1 for _ in self.dir.glob("*.npy")) if self.dir.is_dir() else 0

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# Loading with checks, shards


def load_if_valid(path: str | Path, settings: Mapping[str, Any]) -> ProposalStore | None:
    """The store at ``path`` if it exists, reads cleanly and has the same identity; else ``None``.

    A corrupt file or a store from other settings is logged (it will be rebuilt).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        store = ProposalStore.load(path)
    except ProposalStoreError as e:
        logger.warning("%s; rebuilding it", e)
        return None
    if identity(store.settings) != identity(settings):
        diff = [k for k in IDENTITY_KEYS if store.settings.get(k) != settings.get(k)]
        logger.info("%s: written with other settings (%s differ); not reused, rebuilding", path,
                    ", ".join(diff))
        return None
    mark_used(path)
    return store


def mark_used(path: str | Path) -> None:
    """Set the access time of ``path`` to now, its modification time unchanged (the store's last
    use, whatever the filesystem's ``relatime``/``noatime`` policy).  Best effort: a file of
    another user's or on a read-only filesystem keeps its times."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOATIME", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.utime(fd, ns=(time.time_ns(), os.fstat(fd).st_mtime_ns))
    except (OSError, NotImplementedError):
        pass
    finally:
        os.close(fd)


def find_shards(store_path: str | Path) -> dict[int, dict[int, Path]]:
    """Shard files next to ``store_path``: ``{N: {i: path}}``."""
    p = Path(store_path)
    stem = p.name[:-4] if p.name.endswith(".npz") else p.name
    out: dict[int, dict[int, Path]] = {}
    if not p.parent.is_dir():
        return out
    for f in p.parent.glob(f"{glob_escape(stem)}.shard-*-of-*.npz"):
        m = _SHARD_RE.search(f.name)
        if m and f.name[:m.start()] == stem:
            out.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    return out


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def merge_shards(store_path: str | Path, settings: Mapping[str, Any] | None = None, *,
                 remove: bool = True) -> ProposalStore:
    """Combine a complete set of shard files into the store at ``store_path``.

    Args:
        store_path: the store to write; shards are ``<stem>.shard-<i>-of-<N>.npz`` beside it.
        settings: when given, every shard must have this identity.
        remove: delete the shard files (and the shared ``.parts`` folder) after writing.

    Returns:
        The merged store, images in dataset order (as the shards' ``indices`` say).

    Raises:
        ProposalStoreError: no shards, several shard counts, a missing or corrupt
            shard, shards with different settings, or images missing (one line).
    """
    store_path = Path(store_path)
    found = find_shards(store_path)
    if not found:
        raise ProposalStoreError(f"{store_path}: no shard files "
                                 f"({shard_path(store_path, 1, 2).name.replace('-1-of-2', '-<i>-of-<N>')}) to merge")
    if len(found) > 1:
        raise ProposalStoreError(f"{store_path}: shard files for several shard counts "
                                 f"({', '.join(map(str, sorted(found)))}); remove the stale ones")
    (n, files), = found.items()
    missing = sorted(set(range(1, n + 1)) - set(files))
    if missing:
        raise ProposalStoreError(f"{store_path}: shards {', '.join(map(str, missing))} of {n} are missing; "
                                 f"run them with --shard i/{n} first")
    shards = [ProposalStore.load(files[i]) for i in range(1, n + 1)]
    ref = identity(settings) if settings is not None else identity(shards[0].settings)
    for i, s in enumerate(shards, 1):
        if identity(s.settings) != ref:
            raise ProposalStoreError(f"{files[i]}: shard written with other settings than "
                                     f"{files[1].name if settings is None else 'requested'}; rerun it")
    total = {s.settings.get("dataset", {}).get("num_images") for s in shards}
    entries: dict[int, tuple[str, np.ndarray, str]] = {}
    skipped: list[str] = []
    for s in shards:
        skipped.extend(s.skipped)
        for j, image_id in enumerate(s.ids):
            entries[int(s.indices[j])] = (image_id, s[image_id], s.image_keys[j])
    if len(total) == 1 and None not in total:
        expected = int(total.pop())
        if len(entries) + len(skipped) != expected:
            raise ProposalStoreError(f"{store_path}: the shards hold {len(entries)} images "
                                     f"(+{len(skipped)} skipped) of {expected}; rerun the incomplete shards")
    order = sorted(entries)
    merged_settings = dict(shards[0].settings)
    merged_settings.pop("shard", None)
    store = ProposalStore([entries[i][0] for i in order], [entries[i][1] for i in order], merged_settings,
                          image_keys=[entries[i][2] for i in order], skipped=skipped,
                          indices=order)
    store.save(store_path)
    logger.info("merged %d shards into %s (%d images)", n, store_path, len(store))
    if remove:
        for f in files.values():
            f.unlink(missing_ok=True)
        PartsDir(store_path, merged_settings).remove()
    return store
