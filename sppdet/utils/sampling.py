"""Seeded "bottom-k" sampling of a stream: a pseudo-random key per item, a function of the seed and
the item only, so that keeping the ``k`` items with the smallest keys is a uniform sample without
replacement whatever the order the items arrive in, and the bottom-k of a union is the bottom-k of
the parts' bottom-k (processes sample their shares independently and merge exactly).

Used for the box-regression pairs (:class:`sppdet.train.bbox_reg.PairReservoir`) and the SVM
positives (:class:`sppdet.train.svm.PositiveSample`).
"""

from __future__ import annotations

import numpy as np


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def pair_keys(seed: int, image: int, windows: np.ndarray) -> np.ndarray:
    """Pseudo-random uint64 keys of the pairs ``(image, window)``: a function of the seed and the
    pair only (not of the order images are seen in, nor of which rank sees them).

    Keeping the ``cap`` pairs of a class with the smallest ``(key, image, window)`` is a uniform
    random sample of that class's pairs without replacement ("bottom-k" sampling), and the
    bottom-k of a union is the bottom-k of the parts' bottom-k: ranks sample independently and
    merge exactly.
    """
    w = np.asarray(windows, dtype=np.int64).astype(np.uint64)
    s = _splitmix64(np.array([np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)]))[0]
    return _splitmix64(((np.uint64(int(image)) << np.uint64(32)) | w) ^ s)


def bottom_k(keys: np.ndarray, image: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` smallest ``(key, image, index)`` triples (all when ``k`` <= 0 or
    there are fewer), in increasing order of the triple."""
    order = np.lexsort((index, image, keys))
    return order if k <= 0 else order[:k]
