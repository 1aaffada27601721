"""The class-specific box regressors of a trained detector (the test-time half; fitting is
in :mod:`sppdet.train.bbox_reg`).

For class ``k`` a linear map from a proposal's (scaled) pooled conv5 feature ``x`` to
the correction ``t = (dx, dy, log dw, log dh)`` (:func:`sppdet.boxes.encode`).
Boxes are float ``(x1, y1, x2, y2)``, 0-based continuous pixels of the original image.
"""

from __future__ import annotations

import numpy as np
import torch

from ..boxes import MAX_LOG_SCALE, decode


class BBoxRegressors:
    """K class-specific linear box regressors.

    ``deltas_k(x) = ((scale * x) @ W[k] + b[k]) * std[k] + mean[k]``, applied to a box
    with :func:`sppdet.boxes.decode`.

    Attributes:
        W (ndarray[K, D, 4] float32), b (ndarray[K, 4] float32): weights in z-scored target space.
        mean, std (ndarray[K, 4] float32): per-class target normalisation.
        scale (float): factor applied to raw features.
    """

    def __init__(self, W: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: float) -> None:
        self.W = np.ascontiguousarray(np.asarray(W, dtype=np.float32))
        K = self.W.shape[0]
        if self.W.ndim != 3 or self.W.shape[2] != 4:
            raise ValueError(f"BBoxRegressors.W: expected [K, D, 4], got {self.W.shape}")
        self.b = np.asarray(b, dtype=np.float32).reshape(K, 4)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(K, 4)
        self.std = np.asarray(std, dtype=np.float32).reshape(K, 4)
        self.scale = float(scale)
        # [D, K*4] for one matmul over all classes.
        self._W_flat = np.ascontiguousarray(self.W.transpose(1, 0, 2).reshape(self.W.shape[1], K * 4))
        self._device_params: dict[str, tuple] = {}   # device -> (the arrays, their copies there)

    @classmethod
    def identity(cls, num_classes: int, dim: int) -> "BBoxRegressors":
        """Regressors that leave every box unchanged."""
        K = int(num_classes)
        return cls(np.zeros((K, dim, 4)), np.zeros((K, 4)), np.zeros((K, 4)), np.ones((K, 4)), 1.0)

    @property
    def num_classes(self) -> int:
        return int(self.W.shape[0])

    @property
    def dim(self) -> int:
        return int(self.W.shape[1])

    def _features(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(features, torch.Tensor):
            features = features.detach().float().cpu().numpy()
        return np.asarray(features, dtype=np.float32).reshape(-1, self.dim)

    def deltas_all(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted deltas of every class: features (ndarray[N, D], raw) -> ndarray[N, K, 4] float32."""
        x = self._features(features) * np.float32(self.scale)
        K = self.num_classes
        z = (x @ self._W_flat).reshape(len(x), K, 4) + self.b
        return z * self.std + self.mean

    def predict_all(self, features: np.ndarray | torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """Every class's refinement of every box.

        Args:
            features (ndarray[N, D] or Tensor[N, D]): raw pooled conv5 features of the boxes.
            boxes (ndarray[N, 4]): ``(x1, y1, x2, y2)`` boxes (proposals) with positive size.

        Returns:
            ndarray[N, K, 4] float32: refined ``(x1, y1, x2, y2)`` boxes, not clipped.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        d = self.deltas_all(features)
        N, K = d.shape[:2]
        if N == 0:
            return np.zeros((0, K, 4), np.float32)
        rep = np.repeat(boxes, K, axis=0)
        return decode(rep, d.reshape(N * K, 4)).reshape(N, K, 4).astype(np.float32)

    def _params_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``W_flat [D, K*4], b, std, mean [K, 4]`` (float32) on ``device``: on the CPU views of the
        arrays, elsewhere copied there once and kept (again when one of the arrays is replaced)."""
        arrays = (self._W_flat, self.b, self.std, self.mean)
        if device.type == "cpu":
            return tuple(torch.from_numpy(a) for a in arrays)
        key = str(device)
        got = self._device_params.get(key)
        if got is None or any(a is not b for a, b in zip(got[0], arrays)):
            got = (arrays, tuple(torch.from_numpy(a).to(device) for a in arrays))
            self._device_params[key] = got
        return got[1]

    def predict_all_tensor(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """:meth:`predict_all` in torch on the features' device (no transfer to the host).

        Args:
            features (Tensor[N, D]): raw pooled conv5 features (any float dtype).
            boxes (Tensor[N, 4]): the windows, on the same device (float64 keeps the decode exact
                as :meth:`predict_all` does it).

        Returns:
            Tensor[N, K, 4] float32 on that device: the same arithmetic as :meth:`predict_all`
            (float32 matmul, float64 decode), equal to it up to the matmul's summation order.
        """
        dev = features.device
        W, b, std, mean = self._params_on(dev)
        K = self.num_classes
        x = features.detach().to(torch.float32).reshape(-1, self.dim) * self.scale
        N = len(x)
        if N == 0:
            return torch.zeros((0, K, 4), dtype=torch.float32, device=dev)
        d = ((x @ W).reshape(N, K, 4) + b) * std + mean          # [N, K, 4] float32
        return _decode_tensor(boxes.to(device=dev, dtype=torch.float64).reshape(N, 1, 4),
                              d.to(torch.float64)).to(torch.float32)

    def predict(self, features: np.ndarray | torch.Tensor, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Refine each box with the regressor of its own class.

        Args:
            features (ndarray[N, D] or Tensor[N, D]): raw pooled conv5 features of the boxes.
            boxes (ndarray[N, 4]): ``(x1, y1, x2, y2)`` boxes with positive size.
            labels (ndarray[N]): class index of each box.

        Returns:
            ndarray[N, 4] float32: refined boxes, not clipped (the caller clips).
        """
        x = self._features(features) * np.float32(self.scale)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(len(boxes))
        deltas = np.zeros((len(boxes), 4), np.float64)
        for k in np.unique(labels):
            m = labels == k
            deltas[m] = (x[m] @ self.W[k] + self.b[k]) * self.std[k] + self.mean[k]
        return decode(boxes, deltas).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        """Tensors (float32) ``W [K, D, 4]``, ``b``, ``mean``, ``std [K, 4]`` and float ``scale``."""
        return {"W": torch.from_numpy(self.W.copy()), "b": torch.from_numpy(self.b.copy()),
                "mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy()),
                "scale": float(self.scale)}

    @classmethod
    def from_state_dict(cls, d: dict) -> "BBoxRegressors":
        """Inverse of :meth:`state_dict`."""
        def arr(v):
            return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        try:
            scale = d["scale"]
            return cls(arr(d["W"]), arr(d["b"]), arr(d["mean"]), arr(d["std"]),
                       float(scale.item()) if isinstance(scale, torch.Tensor) else float(scale))
        except KeyError as e:
            raise ValueError(f"BBoxRegressors state dict lacks {e}") from None

    def __repr__(self) -> str:
        return f"BBoxRegressors(K={self.num_classes}, D={self.dim}, scale={self.scale:.6g})"


def _decode_tensor(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """:func:`sppdet.boxes.decode` in torch (broadcasting ``p [..., 4]`` against ``d [..., 4]``)."""
    pw, ph = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
    px, py = p[..., 0] + 0.5 * pw, p[..., 1] + 0.5 * ph
    cx, cy = px + d[..., 0] * pw, py + d[..., 1] * ph
    w = pw * torch.exp(torch.clamp(d[..., 2], max=MAX_LOG_SCALE))
    h = ph * torch.exp(torch.clamp(d[..., 3], max=MAX_LOG_SCALE))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
