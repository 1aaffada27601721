"""Progress bars (tqdm), quiet when stderr is not a terminal unless asked."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None,
             unit: str = "it", disable: bool | None = None, **kw) -> tqdm:
    """A tqdm bar on stderr with rate and ETA.

    Disabled when ``SPPDET_PROGRESS=0``; forced on with ``SPPDET_PROGRESS=1``;
    otherwise shown when stderr is a terminal.  Under torchrun only rank 0 shows bars.
    """
    from .dist import is_main

    if not is_main():
        disable = True
    elif disable is None:
        env = os.environ.get("SPPDET_PROGRESS")
        disable = (env == "0") if env in ("0", "1") else not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, **kw)
