"""The checkpoint: one file holding everything a trained detector needs (DESIGN §3).

Contents (a dict of tensors and plain Python values, saved with ``torch.save``
and loaded with ``torch.load(..., weights_only=True)``: loading never runs
code from the file):

- ``format`` / ``version``: ``"sppdet-checkpoint"`` / :data:`VERSION`.
- ``config``: the resolved config (nested dicts), ``classes``: class names.
- ``backbone``: ``{"name", "weights", "weights_id"}``: ``weights`` is the
  config's reference (``None`` = packaged/default weights, ``"random"``, or a
  path); ``backbone_state`` holds the weights themselves whenever they cannot
  be rebuilt from that reference (random init, a user's file, or conv layers
  fine-tuned end to end), so a checkpoint is self-contained.
- ``head``: fc6/fc7/classifier state (absent without fine-tuning) and
  ``head_dims``; ``svm``: SVM weights, biases and feature scale;
  ``bbox_reg``: regressor weights (absent when disabled).
- ``feature_dim``, ``stats``: training statistics (timings, mAP if measured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .utils.io import atomic_path

FORMAT = "sppdet-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (``payload`` without format/version keys)."""
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; one-line :class:`CheckpointError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, unsafe globals, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable sppdet checkpoint ({reason[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sppdet checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {data.get('version')} is not supported (this sppdet reads {VERSION})")
    for key in ("config", "classes", "backbone", "svm"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint is missing '{key}'")
    return data
