"""Several processes under ``torchrun``: one ``torch.distributed`` process group, rank helpers.

``torchrun --nproc_per_node=N -m sppdet <command> ...`` starts N copies of the
same command line with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment.  :func:`launch` (called once by :func:`sppdet.cli.main`) reads
them, initialises the default process group (``nccl`` when the command runs
on CUDA, ``gloo`` on the CPU), restricts logging, progress bars and stdout to
rank 0, and destroys the group at exit, also on an error.  Without those
variables (a plain ``sppdet ...``) nothing is initialised and every helper
below answers as for one process: rank 0 of 1, :func:`shard` returns the whole
sequence, the gather functions return ``[obj]``.

Only the command and pipeline levels call these helpers (DESIGN §4): a
dataset-level entry point (e.g. :func:`sppdet.proposals.compute_proposals`)
asks :func:`get_world_size` and splits its images with :func:`shard`; the
per-image functions below it never know about ranks.

Errors: a rank that fails inside a distributed stage must not leave the
others waiting in a collective.  Stages catch their :class:`SppdetError`,
call :func:`raise_if_any` (one ``all_gather_object`` of the messages), and
then every rank raises together.  A rank that fails outside any collective
simply exits with status 2; ``torchrun`` then stops the other ranks.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sys
from typing import Any, Iterator, Sequence, TypeVar

import torch

from ..errors import SppdetError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variables torchrun sets for every worker (those without a default are required).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: Seconds a collective waits for the other ranks before failing (``SPPDET_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 1800


class DistributedError(SppdetError):
    """The process group cannot be set up, or another rank failed."""


# ---------------------------------------------------------------------------
# The launch environment


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"${name}={value!r}: expected an integer (set by torchrun)") from None


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from a torchrun environment, or ``None`` outside one.

    Raises:
        DistributedError: the variables are present but inconsistent (one line).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK", rank)
    assert rank is not None and world is not None and local is not None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"$RANK={rank}, $WORLD_SIZE={world}, $LOCAL_RANK={local}: "
                               "expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return rank, world, local


def launched() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE > 1``)."""
    w = env_world()
    return w is not None and w[1] > 1


# ---------------------------------------------------------------------------
# Rank queries (valid with or without a process group)


def is_initialized() -> bool:
    """True when the default process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """The rank on this machine (``$LOCAL_RANK``; 0 without a process group)."""
    return int(os.environ.get("LOCAL_RANK", get_rank())) if is_initialized() else 0


def get_local_world_size() -> int:
    """Processes on this machine (``$LOCAL_WORLD_SIZE``; 1 without a process group)."""
    if not is_initialized():
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, shows progress and prints."""
    return get_rank() == 0


def rank_device(name: str | None) -> torch.device:
    """The device of this rank for ``--device name``: ``cuda``/``auto`` become ``cuda:LOCAL_RANK``.

    Without a process group this is :func:`sppdet.utils.device.resolve_device`.
    An explicit ``cuda:K`` is kept as given.
    """
    from .device import resolve_device

    return resolve_device(name)


def per_rank_workers(workers: int) -> int:
    """``workers <= 0`` (all cores) -> this machine's cores divided among its ranks (>= 1)."""
    if workers and workers > 0:
        return int(workers)
    return max(1, (os.cpu_count() or 1) // max(get_local_world_size(), 1))


# ---------------------------------------------------------------------------
# Setting up and tearing down


def _backend_for(device: str | None) -> tuple[str, torch.device | None]:
    """``("nccl", cuda:LOCAL_RANK)`` when ``device`` resolves to CUDA, else ``("gloo", None)``."""
    name = (device or "cpu").lower()
    if name == "cpu" or not torch.cuda.is_available():
        if name.startswith("cuda"):
            raise DistributedError(f"--device {device}: CUDA is not available on this machine "
                                   "(use cpu or auto)")
        return "gloo", None
    env = env_world()
    local = env[2] if env else 0
    if name.startswith("cuda:"):
        return "nccl", torch.device(name)
    if local >= torch.cuda.device_count():
        raise DistributedError(f"$LOCAL_RANK={local}: only {torch.cuda.device_count()} CUDA device(s) here; "
                               "start at most that many processes per node (--nproc_per_node)")
    return "nccl", torch.device("cuda", local)


def init(device: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from the torchrun environment, once.

    Args:
        device: the command's ``--device`` (``None``: the command runs on the CPU);
            CUDA -> backend ``nccl`` and ``torch.cuda.set_device(LOCAL_RANK)``,
            else ``gloo``.
        timeout_s: collective timeout (default ``$SPPDET_DIST_TIMEOUT`` or 1800 s).

    Returns:
        True when a group of more than one process is (now) up; False outside torchrun
        or with ``WORLD_SIZE=1`` (nothing is initialised then).

    Raises:
        DistributedError: the rendezvous or the backend failed (one line naming the
            master address and the backend).
    """
    if is_initialized():
        return get_world_size() > 1
    env = env_world()
    if env is None or env[1] <= 1:
        return False
    rank, world, _ = env
    if not torch.distributed.is_available():
        raise DistributedError("torchrun: this PyTorch build has no torch.distributed")
    backend, dev = _backend_for(device)
    if dev is not None:
        torch.cuda.set_device(dev)
    if timeout_s is None:
        timeout_s = float(os.environ.get("SPPDET_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world,
                                             timeout=_dt.timedelta(seconds=timeout_s),
                                             **({"device_id": dev} if dev is not None else {}))
    except Exception as e:  # rendezvous / backend errors come in many types
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DistributedError(f"torch.distributed: cannot set up the {backend} process group "
                               f"(rank {rank} of {world}, master {where}): {msg[:300]}") from None
    logger.debug("process group up: backend %s, rank %d of %d, master %s", backend, rank, world, where)
    return True


def shutdown() -> None:
    """Destroy the default process group if it is up (safe to call twice)."""
    if is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # pragma: no cover - teardown must not hide the command's result
            logger.warning("torch.distributed: destroying the process group failed: %s",
                           " ".join(str(e).split()) or type(e).__name__)


def configure_output(verbosity: int) -> None:
    """Rank 0 keeps its log level and stdout; other ranks log WARNING and up and print nothing.

    With ``verbosity >= 2`` (``-vv``) every rank keeps its level and its stdout.
    Log lines are prefixed with ``[rank r/N]`` when there are several ranks.
    """
    rank, world = get_rank(), get_world_size()
    if world <= 1:
        return
    root = logging.getLogger()
    for h in root.handlers:
        if getattr(h, "_sppdet", False):
            fmt = h.formatter._fmt if h.formatter is not None else "%(levelname)s: %(message)s"  # type: ignore[attr-defined]
            h.setFormatter(logging.Formatter(f"[rank {rank}/{world}] {fmt}"))
            if rank != 0 and verbosity < 2:
                h.setLevel(max(h.level, logging.WARNING))
    if rank != 0 and verbosity < 2:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed at exit


@contextlib.contextmanager
def launch(distributed: bool = True, *, device: str | None = None, verbosity: int = 1,
           command: str = "") -> Iterator[bool]:
    """The CLI's process-group session: set up, yield whether this rank runs the command, tear down.

    Outside torchrun (or with one process) this does nothing and yields True.
    Under torchrun with ``WORLD_SIZE > 1``:

    * ``distributed=True``: the process group is initialised (:func:`init`), output is
      restricted to rank 0 (:func:`configure_output`) and every rank yields True;
      the group is destroyed on exit, normal or not.
    * ``distributed=False`` (a command that cannot use several ranks yet): no group is
      set up; rank 0 yields True and runs the command as one process, the other
      ranks yield False (they should return 0 at once) -- same results, no
      duplicated work, no collective that could wait forever.
    """
    env = env_world()
    if env is None or env[1] <= 1:
        yield True
        return
    rank, world, _ = env
    if not distributed:
        if rank == 0:
            logger.warning("sppdet %s does not use several processes yet: rank 0 runs it alone, "
                           "ranks 1-%d stay idle", command or "command", world - 1)
        yield rank == 0
        return
    init(device)
    ok = False
    try:
        configure_output(verbosity)
        yield True
        ok = True
    finally:
        if ok:  # every rank done with its collectives before any rank tears its group down
            with contextlib.suppress(Exception):
                barrier()
        shutdown()
        if sys.stdout is not sys.__stdout__ and rank != 0:
            with contextlib.suppress(Exception):
                sys.stdout.close()
            sys.stdout = sys.__stdout__


# ---------------------------------------------------------------------------
# Work splitting and collectives (each is a no-op for one process)


def shard(seq: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This rank's part of ``seq``: items ``rank, rank + world, rank + 2 world, ...`` (deterministic).

    Every item lands on exactly one rank; the ranks' parts differ in length by at most one.
    """
    r = get_rank() if rank is None else int(rank)
    w = get_world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard: rank {r} of world {w}")
    return list(seq[r::w])


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if get_world_size() > 1:
        torch.distributed.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable) ``obj``, in rank order, on every rank."""
    world = get_world_size()
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``dst``; ``None`` on the other ranks."""
    world = get_world_size()
    if world <= 1:
        return [obj]
    out: list[Any] | None = [None] * world if get_rank() == dst else None
    torch.distributed.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() <= 1:
        return obj
    box = [obj if get_rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_tensors(tensor: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
    """Every rank's tensor (same dtype and trailing dims; the first dim may differ), in rank order,
    on rank ``dst`` (on the device ``tensor`` is on); ``None`` on the other ranks.

    Tensors travel through the backend (padded to the longest first dimension),
    not through pickle.
    """
    world = get_world_size()
    if world <= 1:
        return [tensor]
    dev = tensor.device
    if torch.distributed.get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = tensor.to(dev).contiguous()
    sizes = all_gather_object(int(t.shape[0]) if t.dim() else 1)
    if t.dim() == 0:
        t = t.reshape(1)
    longest = max(sizes)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    if get_rank() != dst:
        return None
    out = [p[:n] for p, n in zip(parts, sizes)]
    if tensor.dim() == 0:
        out = [p.reshape(()) for p in out]
    return [p.to(tensor.device) for p in out]


def raise_if_any(error: BaseException | None) -> None:
    """Collective error check: call on every rank after a stage, with the stage's error or ``None``.

    Re-raises this rank's own error; otherwise, when another rank failed, raises
    :class:`DistributedError` naming the first failed rank and its message; returns
    when every rank succeeded.  One ``all_gather_object``: no rank is left waiting.
    """
    msg = None if error is None else (str(error).splitlines()[0] if str(error) else type(error).__name__)
    messages = all_gather_object(msg)
    if error is not None:
        raise error
    for r, m in enumerate(messages):
        if m is not None:
            raise DistributedError(f"rank {r} of {len(messages)} failed: {m}")
