"""The conv5 map cache: float16 (or float32) ``.npz`` files on disk, written atomically and
checked when read, in front of them an in-memory LRU; and the image content hashes that key it.

Files: ``<folder>/<backbone>-<weights_id[:8]>/<kk>/<key>.npz`` with arrays ``fmap``
(``[C, h, w]``, cache dtype), ``factor`` (resize factor), ``size`` (original ``[H, W]``) and
``key`` (the full key string).  The key hashes :data:`CACHE_FORMAT`, the backbone's name and
weights hash, the image content, the scale, ``max_side``, the flip and the dtype.  A file that
cannot be read, holds another key, or has the wrong channel count, dtype or resize factor is
logged and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.spp import resize_factor
from ..utils.io import atomic_path, file_sha1, stable_hash

log = logging.getLogger(__name__)

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

    def cache_file(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        bb = self.backbone
        return self.cache_dir / f"{bb.name}-{str(bb.weights_id)[:8]}" / key[:2] / f"{key}.npz"

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
