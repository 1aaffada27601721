"""The memory budget of the in-RAM feature caches."""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes of physical memory available now (Linux's MemAvailable, which counts reclaimable
    page cache; else free pages; ``None`` where the OS does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None
