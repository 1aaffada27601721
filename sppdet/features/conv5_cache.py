"""The conv5 map cache: float16 (or float32) ``.npz`` files on disk, written atomically and
checked when read, in front of them an in-memory LRU; and the image content hashes that key it.

Files: ``<folder>/<backbone>-<weights_id[:8]>/<kk>/<key>.npz`` with arrays ``fmap``
(``[C, h, w]``, cache dtype), ``factor`` (resize factor), ``size`` (original ``[H, W]``) and
``key`` (the full key string).  The key hashes :data:`CACHE_FORMAT`, the backbone's name and
weights hash, the image content, the scale, ``max_side``, the flip and the dtype.  A file that
cannot be read, holds another key, or has the wrong channel count, dtype or resize factor is
logged and rebuilt.

Each ``<backbone>-<id8>`` folder is one cache *entry* (``sppdet cache list / prune``,
:mod:`sppdet.features.cache_admin`).  A process that uses an entry holds a shared ``flock`` on
its ``.sppdet-lock`` file (taken on first use, kept while the cache object lives, its access
time the entry's last use); ``sppdet cache prune`` takes the lock exclusively, so it never deletes an
entry under a running job, and a job that starts while a prune deletes its entry waits for the
prune to end.  ``uses/<hash>.json`` records which dataset, split and settings used the entry
(written before each conv5 stage, completed with the bytes on disk at its end, rewritten only
when that changes; its access time is the use's time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..errors import SppdetError
from ..models.spp import resize_factor
from ..utils.io import atomic_path, atomic_write_json, file_sha1, stable_hash

try:  # POSIX advisory locks; elsewhere entries are not locked
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Name of an entry's lock file (held shared by users, exclusively by ``sppdet cache prune``).
LOCK_NAME = ".sppdet-lock"
#: Sub-folder of an entry with one JSON record per (dataset, split, settings) that used it.
USES_DIR = "uses"
#: File names inside an entry: ``<kk>/<40 hex>.npz`` (``kk`` = the key's first two digits).
SHARD_DIR_RE = re.compile(r"^[0-9a-f]{2}$")
MAP_FILE_RE = re.compile(r"^[0-9a-f]{40}\.npz$")
USE_FILE_RE = re.compile(r"^[0-9a-f]{16}\.json$")

#: Bump when the content of a cache file would change for the same key.
# v2: Lite0's 1x1 convolutions became one matrix product (same bits for any thread count;
# the last bits differ from v1's oneDNN maps, which must not be mixed with new ones)
CACHE_FORMAT = "sppdet-conv5-v2"

#: One cached map: (resize factor, Tensor[C, h, w] in the cache dtype, original (H, W)).
Entry = tuple[float, torch.Tensor, tuple[int, int]]


class Conv5Cache:
    """Conv5 maps by key, in RAM (LRU of ``memory`` entries) and under ``folder`` (``None``: RAM only).

    Args:
        folder: the disk cache's root, or ``None``.
        backbone: whose maps these are (``name``, ``weights_id``, ``out_channels`` are read at
            each call, so a backbone whose weights change gets new keys).
        max_side, cache_dtype: part of the key and of the checks on read.
        memory: entries kept in RAM.
        stats: counters ``hits_memory``, ``hits_disk``, ``rebuilt`` (updated in place).
    """

    def __init__(self, folder: str | Path | None, backbone, *, max_side: int, cache_dtype: str, memory: int,
                 stats: dict[str, int]) -> None:
        self.cache_dir = Path(folder) if folder is not None else None
        self.backbone = backbone
        self.max_side = int(max_side)
        self.cache_dtype = cache_dtype
        self.stats = stats
        self._mem: OrderedDict[str, Entry] = OrderedDict()
        self._mem_size = int(memory)
        self._hash_memo: dict[tuple[str, int, int], str] = {}
        self._locks: dict[Path, int | None] = {}
        self._pending: set[str] | None = None
        self._on_complete: Callable[[], None] | None = None

    def get(self, key: str, scale: int) -> Entry | None:
        """The entry of ``key`` from RAM, else from disk (checked), else ``None``."""
        e = self._mem.get(key)
        if e is not None:
            self._mem.move_to_end(key)
            self.stats["hits_memory"] += 1
            return e
        e = self._load_entry(key, scale)
        if e is not None:
            self.stats["hits_disk"] += 1
            self._remember(key, e)
        return e

    def put(self, key: str, entry: Entry) -> None:
        """Store a freshly computed entry on disk and in RAM."""
        self._save_entry(key, entry[0], entry[1], entry[2])
        self._remember(key, entry)
        if self._pending is not None:
            self._pending.discard(key)
            if not self._pending:
                self._complete()

    def expect(self, keys: Iterable[str], on_complete: Callable[[], None]) -> int:
        """Call ``on_complete()`` once every one of ``keys`` has a file: at once when they all
        have one now, else right after the :meth:`put` that writes the last missing one (the
        end of a conv5 stage).  Replaces an earlier expectation.  Returns the number missing."""
        self._pending, self._on_complete = None, None
        if self.cache_dir is None:
            return 0
        pending = {k for k in keys if not self.has_file(k)}
        self._pending, self._on_complete = pending, on_complete
        if not pending:
            self._complete()
        return len(pending)

    def _complete(self) -> None:
        cb, self._pending, self._on_complete = self._on_complete, None, None
        if cb is not None:
            try:
                cb()
            except Exception as e:  # a report must never break the stage that triggered it
                log.debug("conv5 cache report failed: %s", e)

    def has_file(self, key: str) -> bool:
        f = self.cache_file(key)
        return f is not None and f.is_file()

    # ------------------------------------------------------------ image keys
    def image_key(self, src: Any) -> str:
        """Content hash of an image file (memoised by path, size, mtime) or array."""
        if isinstance(src, np.ndarray):
            a = np.ascontiguousarray(src)
            h = hashlib.sha1(str((a.shape, a.dtype.str)).encode())
            h.update(a.view(np.uint8).reshape(-1).data)
            return "a:" + h.hexdigest()
        p = Path(src)
        try:
            st = p.stat()
        except OSError:
            # let the decoder raise its one-line ImageDecodeError
            return "missing:" + str(p)
        memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in self._hash_memo:
            self._hash_memo[memo] = "f:" + file_sha1(p)
        return self._hash_memo[memo]

    def map_key(self, image_key: str, scale: int, flip: bool) -> str:
        bb = self.backbone
        return stable_hash([CACHE_FORMAT, bb.name, bb.weights_id, image_key, scale, self.max_side, bool(flip),
                            self.cache_dtype], length=40)

    def entry_dir(self) -> Path | None:
        """``<folder>/<backbone>-<weights_id[:8]>``: this backbone's entry (``None``: RAM only).
        The first call for an entry takes its shared lock (see the module docstring)."""
        if self.cache_dir is None:
            return None
        d = self.cache_dir / entry_name(self.backbone)
        if d not in self._locks:
            fd = hold_entry_lock(d)
            self._locks[d] = fd
            if fd is not None:
                weakref.finalize(self, os.close, fd)
        return d

    def cache_file(self, key: str) -> Path | None:
        d = self.entry_dir()
        if d is None:
            return None
        return d / key[:2] / f"{key}.npz"

    # ------------------------------------------------------------ disk cache
    def _load_entry(self, key: str, scale: int) -> tuple[float, torch.Tensor, tuple[int, int]] | None:
        f = self.cache_file(key)
        if f is None or not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                stored_key = str(z["key"])
                fmap = z["fmap"]
                factor = float(z["factor"])
                size = tuple(int(v) for v in z["size"])
            problem = None
            if stored_key != key:
                problem = "holds another key (stale)"
            elif fmap.ndim != 3 or fmap.shape[0] != self.backbone.out_channels or fmap.dtype != np.dtype(
                    self.cache_dtype):
                problem = f"has a {fmap.dtype} map of shape {fmap.shape}"
            elif len(size) != 2 or factor != resize_factor(size[0], size[1], scale, self.max_side):
                problem = "has an inconsistent resize factor"
        except Exception as e:  # truncated zip, missing array, garbage bytes ...
            problem = f"is unreadable ({type(e).__name__}: {str(e)[:80]})"
        if problem:
            log.warning("%s: conv5 cache file %s; rebuilding it", f, problem)
            self.stats["rebuilt"] += 1
            return None
        return factor, torch.from_numpy(fmap), (size[0], size[1])

    def _save_entry(self, key: str, factor: float, fmap: torch.Tensor, size: tuple[int, int]) -> None:
        f = self.cache_file(key)
        if f is None:
            return
        with atomic_path(f, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, fmap=fmap.numpy(), factor=np.float64(factor), size=np.asarray(size, np.int64),
                         key=np.str_(key))

    def _remember(self, key: str, entry: tuple[float, torch.Tensor, tuple[int, int]]) -> None:
        if self._mem_size <= 0:
            return
        self._mem[key] = entry
        self._mem.move_to_end(key)
        while len(self._mem) > self._mem_size:
            self._mem.popitem(last=False)


# ---------------------------------------------------------------------------
# entries: names, locks, use records (sppdet.features.cache_admin lists and prunes them)


def entry_name(backbone) -> str:
    """The folder name of a backbone's conv5 entry: ``<name>-<weights_id[:8]>``."""
    return f"{backbone.name}-{str(backbone.weights_id)[:8]}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def hold_entry_lock(entry: Path) -> int | None:
    """Open ``entry/.sppdet-lock`` (creating the folder and the file) and hold a shared lock on it.

    Blocks while ``sppdet cache prune`` holds it exclusively (it deletes the entry, lock file
    included, then lets go: the lock is then taken on a fresh file).  Sets the file's access time
    to now (the entry's last use; its mtime and content never change).  Returns the descriptor (close it to let go), or ``None`` where locks
    are unavailable (no ``fcntl``, a read-only cache): the cache works unlocked then.
    """
    if fcntl is None:
        return None
    path = entry / LOCK_NAME
    for _ in range(10):
        try:
            entry.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileNotFoundError:
            continue      # a prune removed the folder between the two calls: again
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: waiting for `sppdet cache prune` to finish with this cache entry", entry)
                fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            mark_used(fd)
            return fd
        os.close(fd)      # the prune removed the file we waited on: lock the new one
    return None


def mark_used(fd: int) -> None:
    """Set the access time of the open file ``fd`` to now, its mtime unchanged (a last use that no
    mount option -- ``relatime``, ``noatime`` -- hides, and that changes no file's content or
    mtime).  Best effort: needs to own the file."""
    try:
        os.utime(fd, ns=(time.time_ns(), os.fstat(fd).st_mtime_ns))
    except (OSError, NotImplementedError):
        pass


def open_noatime(path: Path) -> int:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:         # O_NOATIME is for the file's owner only
        return os.open(path, flags)


def read_use_record(path: Path) -> dict[str, Any] | None:
    """A use record (read without changing its access time), or ``None``."""
    try:
        fd = open_noatime(path)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            rec = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def use_record_path(entry: Path, use: dict[str, Any]) -> Path:
    """``entry/uses/<hash>.json`` of a use (its dataset, split, root and map settings)."""
    ident = {k: use.get(k) for k in ("dataset", "split", "root", "scales", "max_side", "flips", "dtype")}
    return entry / USES_DIR / f"{stable_hash(ident)}.json"


def write_use_record(entry: Path, use: dict[str, Any], *, keep_existing: bool = False) -> Path | None:
    """Record one use of ``entry``; its access time is the use's time.

    The file is (atomically) rewritten only when its content would change -- with
    ``keep_existing``, only when a record of these settings is missing or disagrees with ``use``
    on one of its keys (so the bytes a finished stage added stay) -- so a rerun that finds
    everything cached changes no file's content or mtime.  Best effort: a read-only cache gets
    no record (``None``)."""
    rec = {**use, "format": CACHE_FORMAT}
    path = use_record_path(entry, use)
    old = read_use_record(path)
    same = old is not None and (all(old.get(k) == v for k, v in rec.items()) if keep_existing else old == rec)
    try:
        if not same:
            atomic_write_json(path, rec)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            mark_used(fd)
        finally:
            os.close(fd)
    except (OSError, SppdetError) as e:
        log.debug("%s: cannot write the conv5 cache's use record (%s)", path, e)
        return None
    return path
