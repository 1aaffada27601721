"""sppdet.utils.memory: handing freed heap pages back (glibc) and the peak resident size."""

from __future__ import annotations

import ctypes
import sys

import pytest

from sppdet.utils import memory


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import resource

    return pages * resource.getpagesize() // 1024


def _glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    return True


def test_every_trims_on_multiples_of_the_interval_only(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    did = [memory.every(i, interval=4) for i in range(12)]
    assert did == [False, False, False, True] * 3
    assert len(calls) == 3
    assert memory.every(0, interval=1) and len(calls) == 4


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")
def test_trim_returns_the_free_pages_inside_a_fragmented_heap(monkeypatch):
    monkeypatch.setattr(memory, "_loaded", False)
    monkeypatch.setattr(memory, "_trim", memory._trim)     # restored after the test
    monkeypatch.delenv("SPPDET_MALLOC_TRIM", raising=False)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size = 64 * 1024                               # below glibc's mmap threshold: from the heap
    blocks = [libc.malloc(size) for _ in range(2000)]   # 125 MiB
    for b in blocks:
        libc.memset(b, 1, size)                    # resident
    before = _rss_kib()
    for b in blocks[:-1:2] + blocks[1:-1:2]:       # free all but the last: the heap cannot shrink
        libc.free(b)                               # from its top, the free space is inside it
    kept_after_free = _rss_kib()
    assert memory.trim() is True
    after = _rss_kib()
    libc.free(blocks[-1])
    assert before - kept_after_free < 32 * 1024    # free() alone gave (almost) nothing back
    assert kept_after_free - after > 64 * 1024     # trim() returned most of the 125 MiB


def test_trim_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(memory, "_loaded", False)
    monkeypatch.setattr(memory, "_trim", memory._trim)     # restored after the test
    monkeypatch.setenv("SPPDET_MALLOC_TRIM", "0")
    assert memory.trim() is False


def test_peak_rss_is_at_least_the_current_resident_size():
    peak = memory.peak_rss_mb()
    if sys.platform.startswith("linux"):
        assert peak is not None and peak * 1024 >= _rss_kib() * 0.99 and peak > 10
