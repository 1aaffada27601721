"""Selective search over a dataset: parallel, resumable, shardable, cached.

:func:`compute_proposals` is what the pipeline and ``sppdet proposals`` call.
It returns a :class:`~sppdet.proposals.store.ProposalStore` and computes only
what is missing:

1. a store at the target path with the same settings is reused for every
   image whose key (id, file name, file size) still matches;
2. images finished by an interrupted run are read back from the
   ``<store>.parts/`` sidecar;
3. the rest are computed by a process pool (OpenCV single-threaded in each
   worker); the parent writes each finished image to the sidecar at once, so
   Ctrl-C loses at most the images in flight.

With ``shard=(i, N)`` only every N-th image (dataset positions
``i-1, i-1+N, ...``) is computed and written to
``<stem>.shard-<i>-of-<N>.npz``; when all N shard files are present they are
merged into the store (also by ``sppdet proposals --merge``).

The pool uses the ``forkserver`` start method where available (``spawn``
elsewhere), so a script calling :func:`compute_proposals` with ``workers != 1``
must do so under ``if __name__ == "__main__":``, as with any multiprocessing.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data.records import Dataset, ImageRecord
from ..errors import ImageDecodeError
from ..utils.io import default_cache_dir
from ..utils.progress import progress as progress_bar
from .presets import Preset, get_preset
from .selective_search import selective_search
from .store import (PartsDir, ProposalStore, default_store_path, find_shards, image_key,
                    load_if_valid, make_settings, merge_shards, parse_shard, shard_path)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Worker side

_WORKER: dict[str, Any] = {}


def _init_worker(preset: Preset, max_boxes: int) -> None:
    """Pool initializer: one OpenCV thread per worker; Ctrl-C is handled by the parent only."""
    import cv2

    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["preset"] = preset
    _WORKER["max_boxes"] = max_boxes


def compute_one(path: str | Path, preset: Preset, max_boxes: int) -> np.ndarray:
    """Decode one image file and run :func:`selective_search` on it (raises ImageDecodeError)."""
    from ..data.images import load_image

    return selective_search(load_image(path), preset, max_boxes)


def _work(task: tuple[int, str]) -> tuple[int, np.ndarray | None, str | None, float]:
    """``(position, path)`` -> ``(position, boxes or None, error message or None, seconds)``."""
    pos, path = task
    t0 = time.perf_counter()
    try:
        boxes = compute_one(path, _WORKER["preset"], _WORKER["max_boxes"])
    except ImageDecodeError as e:
        return pos, None, str(e).splitlines()[0] if str(e) else type(e).__name__, time.perf_counter() - t0
    return pos, boxes, None, time.perf_counter() - t0


def _pool_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def resolve_workers(workers: int, n_tasks: int) -> int:
    """``workers <= 0`` -> ``os.cpu_count()``; never more than the number of tasks (>= 1)."""
    w = int(workers) if workers and workers > 0 else (os.cpu_count() or 1)
    return max(1, min(w, max(n_tasks, 1)))


def _run_tasks(records: Sequence[ImageRecord], preset: Preset, max_boxes: int, workers: int,
               parts: PartsDir, keys: Sequence[str], *, skip_bad_images: bool, show_progress: bool,
               desc: str, on_skip: Callable[[str, str], None] | None = None) -> tuple[list[str], list[float]]:
    """Compute ``records`` and save each to ``parts`` as it finishes.

    Returns:
        ``(skipped ids, seconds per computed image)``.

    Raises:
        ImageDecodeError: an image failed to decode and ``skip_bad_images`` is False
            (images finished before it stay saved).
    """
    skipped: list[str] = []
    seconds: list[float] = []
    if not records:
        return skipped, seconds
    tasks = [(n, str(r.path)) for n, r in enumerate(records)]
    nproc = resolve_workers(workers, len(tasks))
    bar = progress_bar(total=len(tasks), desc=desc, unit="img",
                       disable=None if show_progress else True)

    def handle(result: tuple[int, np.ndarray | None, str | None, float]) -> None:
        pos, boxes, err, dt = result
        rec = records[pos]
        if err is not None:
            if not skip_bad_images:
                raise ImageDecodeError(err)
            if on_skip is not None:
                on_skip(rec.image_id, err)
            else:
                logger.warning("skipping image %s: %s", rec.image_id, err)
            skipped.append(rec.image_id)
        else:
            parts.save(keys[pos], boxes)
            seconds.append(dt)
        bar.update(1)
        if seconds:
            bar.set_postfix_str(f"{np.mean(seconds):.2f} s/img/core", refresh=False)

    try:
        if nproc == 1:
            _init_worker_inline(preset, max_boxes)
            for task in tasks:
                handle(_work(task))
        else:
            ctx = _pool_context()
            with ctx.Pool(nproc, initializer=_init_worker, initargs=(preset, max_boxes)) as pool:
                for result in pool.imap_unordered(_work, tasks, chunksize=1):
                    handle(result)
    finally:
        bar.close()
    return skipped, seconds


def _init_worker_inline(preset: Preset, max_boxes: int) -> None:
    _WORKER["preset"] = preset
    _WORKER["max_boxes"] = max_boxes


# ---------------------------------------------------------------------------
# Public entry point


def compute_proposals(dataset: Dataset, preset: str | Preset = "fast", max_boxes: int = 2000, *,
                      workers: int = 0, out: str | Path | None = None,
                      cache_dir: str | Path | None = None,
                      shard: str | tuple[int, int] | None = None, skip_bad_images: bool = False,
                      progress: bool = True, on_skip: Callable[[str, str], None] | None = None) -> ProposalStore:
    """Selective-search proposals for every image of ``dataset``, computing only what is missing.

    Args:
        dataset: the split (records with ``image_id`` and ``path``).
        preset: preset name or :class:`~sppdet.proposals.presets.Preset`.
        max_boxes: cap on boxes per image (the first in rank order).
        workers: processes; ``0``: ``os.cpu_count()`` (under torchrun: the cores
            divided among the ranks of this machine); ``1``: in this process.
        out: the store file; default :func:`~sppdet.proposals.store.default_store_path`
            under ``cache_dir`` (default :func:`~sppdet.utils.io.default_cache_dir`).
        shard: ``"i/N"`` or ``(i, N)``: compute only shard ``i`` of ``N`` (1-based).
        skip_bad_images: skip undecodable images with a warning (they are listed
            in ``store.skipped``) instead of raising.
        progress: show a progress bar (images/s, ETA, s/img/core).
        on_skip: with ``skip_bad_images``, called as ``on_skip(image_id, message)`` for each
            skipped image instead of logging a warning (for callers that report it themselves).

    Under torchrun (a process group of ``W > 1`` ranks is up, see
    :mod:`sppdet.utils.dist`) and without ``shard``, rank ``r`` computes shard
    ``r+1`` of ``W`` with its own workers, rank 0 merges the shards into the one
    store (the same boxes and ids as one process), and every rank returns it.

    Returns:
        The store (for a shard: the shard's store, or the merged store once all
        shards are present).  Boxes: ndarray[N, 4] float32, original pixels.

    Raises:
        ImageDecodeError: an image cannot be decoded (message names the file)
            and ``skip_bad_images`` is False (under torchrun: on every rank, or
            DistributedError naming the failed rank).
        ProposalStoreError: a malformed ``shard``.
    """
    from ..utils import dist

    if shard is None and dist.get_world_size() > 1:
        return _compute_ranked(dataset, preset, max_boxes, workers=workers, out=out, cache_dir=cache_dir,
                               skip_bad_images=skip_bad_images, progress=progress, on_skip=on_skip)
    return _compute(dataset, preset, max_boxes, workers=workers, out=out, cache_dir=cache_dir, shard=shard,
                    skip_bad_images=skip_bad_images, progress=progress, on_skip=on_skip)


def _store_path(dataset: Dataset, p: Preset, max_boxes: int, out: str | Path | None,
                cache_dir: str | Path | None) -> Path:
    return Path(out) if out is not None else default_store_path(
        cache_dir if cache_dir is not None else default_cache_dir(), dataset, p.key(), max_boxes)


def _compute_ranked(dataset: Dataset, preset: str | Preset, max_boxes: int, *, workers: int,
                    out: str | Path | None, cache_dir: str | Path | None, skip_bad_images: bool,
                    progress: bool, on_skip: Callable[[str, str], None] | None = None) -> ProposalStore:
    """:func:`compute_proposals` on every rank of a process group: shard, merge on rank 0, share.

    1. rank ``r`` runs shard ``r+1`` of ``W`` (shard file + the shared ``.parts``
       sidecar, so an interrupted run resumes; no automatic merge);
    2. rank 0 runs the one-process call, which merges the complete shard set
       (or, when an older store covered some images, takes them from it and the
       sidecar) and computes only what is still missing -- nothing, normally;
    3. every rank loads the merged store.

    Each step ends in a collective error check (:func:`~sppdet.utils.dist.raise_if_any`),
    so a failure on one rank raises on all of them instead of leaving them waiting.
    """
    from ..errors import SppdetError
    from ..utils import dist
    from ..utils.dist import DistributedError

    p = get_preset(preset)
    rank, world = dist.get_rank(), dist.get_world_size()
    path = _store_path(dataset, p, max_boxes, out, cache_dir)
    workers = dist.per_rank_workers(workers)
    if rank == 0:  # the shared sidecar is (re)created once, before any rank writes into it
        PartsDir(path, make_settings(p, max_boxes, dataset)).open()
    dist.barrier()
    err: BaseException | None = None
    written = None
    try:
        part = _compute(dataset, p, max_boxes, workers=workers, out=path, shard=(rank + 1, world), merge=False,
                        skip_bad_images=skip_bad_images, progress=progress, on_skip=on_skip)
        written = str(part.path) if part.path != path else None  # None: the full store already had them
    except SppdetError as e:
        err = e
    dist.raise_if_any(err)
    written_by = dist.all_gather_object(written)
    if rank == 0:
        try:
            for r, f in enumerate(written_by):
                if f is not None and not Path(f).is_file():
                    raise DistributedError(
                        f"{f}: rank {r} wrote this shard but rank 0 cannot see it; the store folder "
                        "(--out / --cache) must be on a filesystem shared by every node")
            store = _compute(dataset, p, max_boxes, workers=workers, out=path, shard=None,
                             skip_bad_images=skip_bad_images, progress=progress)
            # shard files of this world size are merged or superseded by the complete store now
            for f in find_shards(path).get(world, {}).values():
                f.unlink(missing_ok=True)
        except SppdetError as e:
            err = e
    dist.raise_if_any(err)
    if rank != 0:
        try:
            store = ProposalStore.load(path)
        except SppdetError as e:  # e.g. a node-local folder: rank 0 wrote the store elsewhere
            err = e
    dist.raise_if_any(err)
    return store


def _compute(dataset: Dataset, preset: str | Preset = "fast", max_boxes: int = 2000, *,
             workers: int = 0, out: str | Path | None = None, cache_dir: str | Path | None = None,
             shard: str | tuple[int, int] | None = None, merge: bool = True, skip_bad_images: bool = False,
             progress: bool = True, on_skip: Callable[[str, str], None] | None = None) -> ProposalStore:
    """:func:`compute_proposals` in this process only (``merge=False``: a shard never merges the set)."""
    p = get_preset(preset)
    shard_spec = parse_shard(shard)
    settings = make_settings(p, max_boxes, dataset)
    path = _store_path(dataset, p, max_boxes, out, cache_dir)
    records = list(dataset.records)
    keys = [image_key(r) for r in records]

    existing = load_if_valid(path, settings)
    if existing is None:
        found = find_shards(path)
        if len(found) == 1:
            (n, files), = found.items()
            if len(files) == n and shard_spec is None:
                logger.info("%s: all %d shards present; merging them", path, n)
                merge_shards(path, settings)
                existing = load_if_valid(path, settings)

    if shard_spec is not None:
        i, n = shard_spec
        positions = list(range(i - 1, len(records), n))
        target_path = shard_path(path, i, n)
        settings = dict(settings, shard=[i, n])
    else:
        positions = list(range(len(records)))
        target_path = path

    # What is already known: a valid store (same key per image), a shard file, then the sidecar.
    known: dict[int, np.ndarray] = {}
    sources = [existing] + ([load_if_valid(target_path, settings)] if shard_spec is not None else [])
    for src in sources:
        if src is None:
            continue
        for pos in positions:
            rid = records[pos].image_id
            if pos not in known and rid in src and src.key_of(rid) == keys[pos]:
                known[pos] = src[rid]
    if existing is not None and all(pos in known for pos in positions):
        same = existing.ids == [records[pos].image_id for pos in positions] and not existing.skipped
        if same or shard_spec is not None:
            logger.info("%s: proposals for all %d images are cached", path, len(positions))
            return existing

    parts = PartsDir(path, settings).open()
    todo: list[int] = []
    for pos in positions:
        if pos in known:
            continue
        boxes = parts.load(keys[pos]) if parts.has(keys[pos]) else None
        if boxes is not None:
            known[pos] = boxes
        else:
            todo.append(pos)
    if known and todo:
        logger.info("resuming: %d of %d images already done, %d to compute", len(known), len(positions),
                    len(todo))

    t0 = time.perf_counter()
    todo_records = [records[pos] for pos in todo]
    todo_keys = [keys[pos] for pos in todo]
    nproc = resolve_workers(workers, len(todo))
    where = f" (shard {shard_spec[0]}/{shard_spec[1]})" if shard_spec else ""
    skipped, seconds = _run_tasks(todo_records, p, max_boxes, nproc, parts, todo_keys,
                                  skip_bad_images=skip_bad_images, show_progress=progress,
                                  desc=f"selective search {p.name}{where}", on_skip=on_skip)
    wall = time.perf_counter() - t0
    if seconds:
        logger.info("selective search (%s): %d images in %.1f s with %d process(es): %.2f img/s, "
                    "%.3f s/img/core", p.name, len(seconds), wall, nproc, len(seconds) / max(wall, 1e-9),
                    float(np.mean(seconds)))
    skipped_set = set(skipped)
    for pos in todo:
        if records[pos].image_id in skipped_set:
            continue
        boxes = parts.load(keys[pos])
        if boxes is None:  # vanished or corrupt since written: compute it here
            boxes = compute_one(records[pos].path, p, max_boxes)
        known[pos] = boxes

    done = [pos for pos in positions if pos in known]
    store = ProposalStore([records[pos].image_id for pos in done], [known[pos] for pos in done], settings,
                          image_keys=[keys[pos] for pos in done], skipped=skipped, indices=done)
    store.save(target_path)
    if shard_spec is None:
        parts.remove()
        logger.info("proposals: %s (%d images, %.0f boxes/img)", target_path, len(store), store.mean_boxes)
        return store
    i, n = shard_spec
    logger.info("proposals shard %d/%d: %s (%d images)", i, n, target_path, len(store))
    shards = find_shards(path).get(n, {})
    if merge and len(shards) == n:
        logger.info("all %d shards present; merging into %s", n, path)
        return merge_shards(path, make_settings(p, max_boxes, dataset))
    return store


def load_splits(root: str | Path, splits: str, *, skip_bad_images: bool = False, **kw: Any) -> Dataset:
    """Load ``splits`` (one name, or several joined by ``,`` or ``+``) as one dataset.

    Several splits are concatenated in the given order; an image id listed in
    more than one split is kept once (first occurrence).  The name of the
    combined split is the names joined by ``+``.
    """
    from ..data import load_dataset

    names = [s for s in str(splits).replace("+", ",").split(",") if s.strip()]
    if len(names) <= 1:
        return load_dataset(root, names[0] if names else str(splits), skip_bad_images=skip_bad_images, **kw)
    parts = [load_dataset(root, s.strip(), skip_bad_images=skip_bad_images, **kw) for s in names]
    if any(d.classes != parts[0].classes for d in parts) and kw.get("classes") is None:
        # Re-read with the union of the discovered classes so labels agree across splits.
        classes = sorted({c for d in parts for c in d.classes})
        parts = [load_dataset(root, s.strip(), skip_bad_images=skip_bad_images, **dict(kw, classes=classes))
                 for s in names]
    seen: set[str] = set()
    records = []
    for d in parts:
        for r in d.records:
            if r.image_id not in seen:
                seen.add(r.image_id)
                records.append(r)
    return Dataset(name=parts[0].name, split="+".join(s.strip() for s in names), classes=parts[0].classes,
                   records=records, root=parts[0].root)
