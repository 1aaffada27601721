"""An ordered, bounded prefetching map over background threads.

``prefetch_map(fn, items, ahead=4, threads=2)`` runs ``fn`` on the next items in
worker threads while the caller works on the current one, and yields the
results in input order.  At most ``ahead`` items are in flight or waiting
(plus the one the caller holds), so memory stays bounded however long
``items`` is (it is consumed lazily).  Meant for I/O and for work that
releases the GIL (image decoding, OpenCV).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], *, ahead: int = 4,
                 threads: int = 1) -> Iterator[tuple[T, Future]]:
    """Yield ``(item, future of fn(item))`` in input order, ``fn`` running ahead in threads.

    Args:
        fn: the work per item (runs in a worker thread).
        items: consumed lazily, at most ``ahead`` beyond the one yielded last.
        ahead: how many items are submitted before the caller asks for them (>= 1).
        threads: worker threads (>= 1).

    The caller calls ``future.result()``, which returns ``fn``'s value or raises its
    exception, so one failing item does not stop the others.  Closing the generator
    early cancels the work not yet started.
    """
    ahead, threads = max(1, int(ahead)), max(1, int(threads))
    it = iter(items)
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sppdet-prefetch") as pool:
        try:
            for item in it:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= ahead:
                    break
            while pending:
                item, fut = pending.popleft()
                for nxt in it:
                    pending.append((nxt, pool.submit(fn, nxt)))
                    break
                yield item, fut
        finally:
            for _, fut in pending:
                fut.cancel()
