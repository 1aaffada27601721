"""Process memory: hand freed heap memory back to the system between work items (glibc only),
and the peak resident size.

PyTorch's CPU tensors come from the C library's ``malloc``.  With glibc, a freed block larger
than the current mmap threshold raises that threshold (up to 32 MiB), so later tensors of a few
MiB -- conv5 maps, pooled windows, fc activations, all of a different size for every image --
are carved from the heap instead of being mapped and unmapped.  The heap then fragments: the
resident size creeps up with every image of a different size although nothing is kept, and a
stage's peak memory grows with the number of images it has seen.  :func:`trim` returns the free
pages of the heap to the system (``malloc_trim(0)``, which also releases whole free pages inside
the heap).  Trimming has a price (the pages released are faulted in again by the next tensors):
the per-image loops call :func:`every`, which trims once every ``interval`` items.

Elsewhere than glibc (macOS, musl, Windows) :func:`trim` does nothing.  ``SPPDET_MALLOC_TRIM=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_trim = None
_loaded = False


def _load():
    global _trim, _loaded
    _loaded, _trim = True, None
    if not sys.platform.startswith("linux") or os.environ.get("SPPDET_MALLOC_TRIM", "1") == "0":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):      # not glibc
        return
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    _trim = fn


def trim() -> bool:
    """Return the heap's free pages to the system; True when something was released."""
    if not _loaded:
        _load()
    if _trim is None:
        return False
    return bool(_trim(0))


def every(index: int, interval: int = 8) -> bool:
    """:func:`trim` after item ``index`` (0-based) of a loop when ``index + 1`` is a multiple of
    ``interval``; returns whether it trimmed."""
    if (index + 1) % interval:
        return False
    return trim()


def peak_rss_mb() -> float | None:
    """This process's peak resident set size so far, in MiB (``None`` where it is not known)."""
    try:
        import resource
    except ImportError:                  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024     # bytes on macOS, KiB on Linux
