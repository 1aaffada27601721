"""Box conventions and box arithmetic.

Every box inside sppdet is float ``(x1, y1, x2, y2)`` in pixels of the
original image, 0-based and continuous: a box covering pixel columns 0..9 has
``x1 = 0`` and ``x2 = 10``, so its width is ``x2 - x1``.  VOC files (1-based,
inclusive) are converted at the edges only, with :func:`voc_to_internal` and
:func:`internal_to_voc`.

Functions take and return numpy arrays (the stages store boxes as float32
numpy arrays); IoU and NMS are delegated to ``torchvision.ops``.
"""

from __future__ import annotations

import numpy as np

# torch / torchvision are imported inside the functions that need them: the data layer and the
# CLI's parser import this module, and `sppdet --help` should not wait seconds for torch

# ---------------------------------------------------------------------------
# Conversions at the edges


def voc_to_internal(xmin, ymin, xmax, ymax):
    """VOC 1-based inclusive pixel coordinates -> internal 0-based continuous.

    A VOC box ``xmin=1, xmax=10`` covers pixel columns 1..10 (1-based), i.e.
    0..9 0-based, i.e. the continuous interval ``[0, 10)``.
    """
    return xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)


def internal_to_voc(boxes: np.ndarray) -> np.ndarray:
    """Internal boxes (ndarray[N, 4]) -> VOC 1-based inclusive (float, not rounded)."""
    out = np.asarray(boxes, dtype=np.float64).copy().reshape(-1, 4)
    out[:, 0] += 1.0
    out[:, 1] += 1.0
    return out


# ---------------------------------------------------------------------------
# Basic arithmetic


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of boxes (ndarray[N, 4], x1 <= x2, y1 <= y2) -> ndarray[N]."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (ndarray[N, 4]) and ``b`` (ndarray[M, 4]) -> ndarray[N, M].

    Continuous convention (no +1).  Computed by ``torchvision.ops.box_iou`` in
    float64; empty inputs give an empty (N, M) matrix.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    import torch
    import torchvision

    return torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip boxes (ndarray[N, 4]) to the image ``[0, width] x [0, height]``."""
    out = np.asarray(boxes).copy().reshape(-1, 4)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    return out


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror boxes (ndarray[N, 4]) horizontally in an image of the given width."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def valid_boxes(boxes: np.ndarray, min_size: float = 0.0) -> np.ndarray:
    """Mask (ndarray[N] bool) of boxes whose width and height are both > ``min_size``."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression (``torchvision.ops.nms``).

    Args:
        boxes (ndarray[N, 4]): ``(x1, y1, x2, y2)``.
        scores (ndarray[N]): higher is better.
        iou_threshold: boxes overlapping a kept box by IoU > this are dropped.

    Returns:
        ndarray[K] int64: indices of the kept boxes, by decreasing score.
    """
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.int64)
    import torch
    import torchvision

    keep = torchvision.ops.nms(
        torch.as_tensor(np.asarray(boxes), dtype=torch.float32),
        torch.as_tensor(np.asarray(scores), dtype=torch.float32),
        float(iou_threshold),
    )
    return keep.numpy().astype(np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Per-class NMS (``torchvision.ops.batched_nms``): boxes of different labels never suppress each other."""
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.int64)
    import torch
    import torchvision

    keep = torchvision.ops.batched_nms(
        torch.as_tensor(np.asarray(boxes), dtype=torch.float32),
        torch.as_tensor(np.asarray(scores), dtype=torch.float32),
        torch.as_tensor(np.asarray(labels), dtype=torch.int64),
        float(iou_threshold),
    )
    return keep.numpy().astype(np.int64)


# ---------------------------------------------------------------------------
# Box regression targets (R-CNN parameterisation)


def encode(proposals: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Regression targets ``(dx, dy, log dw, log dh)`` from proposals to target boxes.

    Args:
        proposals (ndarray[N, 4]): source boxes, positive width and height.
        targets (ndarray[N, 4]): the boxes to regress to.

    Returns:
        ndarray[N, 4] float64: ``dx = (tx - px) / pw``, ``dy = (ty - py) / ph``,
        ``dw = log(tw / pw)``, ``dh = log(th / ph)`` with centres and sizes in
        the continuous convention (``w = x2 - x1``).
    """
    p = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    t = np.asarray(targets, dtype=np.float64).reshape(-1, 4)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    px, py = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    tw, th = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    tx, ty = t[:, 0] + 0.5 * tw, t[:, 1] + 0.5 * th
    return np.stack([(tx - px) / pw, (ty - py) / ph, np.log(tw / pw), np.log(th / ph)], axis=1)


#: Largest log-scale change applied when decoding (as in torchvision: log(1000/16)).
MAX_LOG_SCALE = float(np.log(1000.0 / 16))


def decode(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Apply regression deltas (ndarray[N, 4]) to proposals (ndarray[N, 4]); inverse of :func:`encode`."""
    p = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    d = np.asarray(deltas, dtype=np.float64).reshape(-1, 4)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    px, py = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    cx, cy = px + d[:, 0] * pw, py + d[:, 1] * ph
    w = pw * np.exp(np.minimum(d[:, 2], MAX_LOG_SCALE))
    h = ph * np.exp(np.minimum(d[:, 3], MAX_LOG_SCALE))
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)
