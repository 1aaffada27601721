"""Logging set-up for the CLI (the library only calls ``logging.getLogger``)."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so log lines do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbosity: int = 0) -> None:
    """Console logging: WARNING and up by default, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_sppdet", False):
            root.removeHandler(h)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.setLevel(level)
    handler._sppdet = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(min(level, root.level if root.level != logging.NOTSET else logging.WARNING, logging.INFO))
    logging.getLogger("sppdet").setLevel(logging.DEBUG)


class _RunLogHandler(logging.FileHandler):
    """A log file that, once the disk is full, says so in one line and stops writing
    (``logging`` would otherwise print a traceback for every record)."""

    full = False

    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            if not self.full:
                self.full = True
                print(f"sppdet: warning: {self.baseFilename}: no space left on device; not logging there any more",
                      file=sys.stderr)
            return
        super().handleError(record)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.full:
            super().emit(record)


def add_log_file(path: str | Path) -> logging.Handler:
    """Also log (INFO and up, with timestamps) to ``path``; returns the handler to remove later.

    Under torchrun the lines carry ``[rank r/N]`` and ranks other than 0 write
    only WARNING and up, so a shared log file reads as one process's.
    """
    from .dist import get_rank, get_world_size

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
    rank, world = get_rank(), get_world_size()
    fmt = _FMT if world <= 1 else _FMT.replace("%(levelname)s", f"[rank {rank}/{world}] %(levelname)s")
    handler.setFormatter(logging.Formatter(fmt))
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("sppdet").addHandler(handler)
    return handler
