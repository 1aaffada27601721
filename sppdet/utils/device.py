"""Device selection."""

from __future__ import annotations

import torch

from ..errors import SppdetError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Under torchrun (a process group is up) ``auto`` and ``cuda`` mean this rank's
    GPU, ``cuda:LOCAL_RANK``; an explicit ``cuda:K`` is kept.
    """
    name = (name or "auto").lower()
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SppdetError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
        if name == "cuda":
            from .dist import get_local_rank, is_initialized

            if is_initialized():
                return torch.device("cuda", get_local_rank())
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise SppdetError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
