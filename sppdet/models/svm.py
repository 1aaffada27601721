"""The per-class linear SVMs of a trained detector (the test-time half; training is in
:mod:`sppdet.train.svm`).

Scores of a trained model: ``s = (scale * x) @ W + b`` with ``W`` (float32 [D, K]),
``b`` (float32 [K]) and ``scale`` (float).
"""

from __future__ import annotations

import numpy as np
import torch

#: Bias of a class that had no positive example: its SVM is ``W = 0, b = NO_POSITIVES_BIAS``,
#: i.e. every window scores this (far below any real score; finite so that sorting,
#: arithmetic and float32 storage stay well-defined).
NO_POSITIVES_BIAS: float = -1.0e6


class LinearSVMs:
    """K linear SVMs on scaled features: ``scores = (scale * x) @ W + b``.

    Attributes:
        W (ndarray[D, K] float32): weights, one column per class.
        b (ndarray[K] float32): biases (``NO_POSITIVES_BIAS`` for classes without positives).
        scale (float): factor applied to raw features before ``W``.
    """

    def __init__(self, W: np.ndarray, b: np.ndarray, scale: float) -> None:
        self.W = np.ascontiguousarray(np.asarray(W, dtype=np.float32))
        self.b = np.asarray(b, dtype=np.float32).reshape(-1)
        if self.W.ndim != 2 or self.W.shape[1] != len(self.b):
            raise ValueError(f"LinearSVMs: W [D, K] and b [K] do not match: {self.W.shape}, {self.b.shape}")
        self.scale = float(scale)
        self._device_params: dict[tuple, tuple] = {}   # (device, dtype) -> (W, b, W there, b there)

    @property
    def num_classes(self) -> int:
        return int(self.W.shape[1])

    @property
    def dim(self) -> int:
        return int(self.W.shape[0])

    def decision_function(self, features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Scores of raw features.

        Args:
            features (ndarray[N, D] or Tensor[N, D]): raw (unscaled) features.

        Returns:
            Scores [N, K] of the same kind: a float32 ndarray for an ndarray; a tensor on
            the features' device (float32, or float64 for float64 input) for a tensor.
        """
        if isinstance(features, torch.Tensor):
            dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
            x = features.to(dtype)
            W, b = self._params_on(x.device, dtype)
            return (x * self.scale) @ W + b
        x = np.asarray(features, dtype=np.float32).reshape(-1, self.dim)
        return ((x * np.float32(self.scale)) @ self.W + self.b).astype(np.float32, copy=False)

    def _params_on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``W``, ``b`` as tensors on ``device``: on the CPU views of the arrays (as before), on
        an accelerator copied there once and kept (no host-to-device copy per scored image; a
        new ``W`` or ``b`` array assigned later is copied again, a change made in place is not)."""
        if device.type == "cpu":
            return (torch.from_numpy(self.W).to(dtype=dtype), torch.from_numpy(self.b).to(dtype=dtype))
        key = (str(device), dtype)
        got = self._device_params.get(key)
        if got is None or got[0] is not self.W or got[1] is not self.b:
            got = (self.W, self.b, torch.from_numpy(self.W).to(device=device, dtype=dtype),
                   torch.from_numpy(self.b).to(device=device, dtype=dtype))
            self._device_params[key] = got
        return got[2], got[3]

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        """``{"W": Tensor[D, K] float32, "b": Tensor[K] float32, "scale": float}`` (weights_only-safe)."""
        return {"W": torch.from_numpy(self.W.copy()), "b": torch.from_numpy(self.b.copy()), "scale": float(self.scale)}

    @classmethod
    def from_state_dict(cls, d: dict) -> "LinearSVMs":
        """Inverse of :meth:`state_dict` (accepts tensors or arrays)."""
        try:
            W, b, scale = d["W"], d["b"], d["scale"]
        except KeyError as e:
            raise ValueError(f"LinearSVMs state dict lacks {e}") from None
        W = W.detach().cpu().numpy() if isinstance(W, torch.Tensor) else np.asarray(W)
        b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
        scale = float(scale.item()) if isinstance(scale, torch.Tensor) else float(scale)
        return cls(W, b, scale)

    def __repr__(self) -> str:
        return f"LinearSVMs(D={self.dim}, K={self.num_classes}, scale={self.scale:.6g})"
