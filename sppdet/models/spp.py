"""Spatial pyramid pooling: window projection, scale choice and exact pyramid max pooling.

Coordinates
-----------
Windows arrive as float ``(x1, y1, x2, y2)`` boxes in pixels of the (scaled)
network input, 0-based and continuous (DESIGN §3: a box covering pixel
columns 0..9 has ``x1 = 0, x2 = 10``; pixel ``k`` is the interval
``[k, k + 1)`` with centre ``k + 0.5``).  Conv5 cells are addressed by
inclusive, 0-based integer ranges ``(x1, y1, x2, y2)`` (LongTensor), so a
window that covers cell columns 3..5 has ``x1 = 3, x2 = 5``.

Projection (the paper's appendix)
---------------------------------
He et al. pad every layer by ``floor(p / 2)`` so that the response at
conv5 cell ``x'`` has its receptive field centred at ``S * x'`` in the image,
and project a window by::

    left/top     x' = floor(x / S) + 1
    right/bottom x' = ceil(x / S) - 1

In that frame the rule keeps exactly the cells whose receptive-field centres
lie *strictly inside* the window: ``floor(x/S) + 1`` is the first ``x'`` with
``S x' > x``, and ``ceil(x/S) - 1`` the last with ``S x' < x``.  The formula
is only meaningful together with the network geometry, so sppdet states the
geometry explicitly: a backbone reports ``center_offset``, the continuous
image coordinate of the centre of cell 0 (cell ``i`` is centred at
``S * i + center_offset``).  The paper's ``x`` is then the continuous
coordinate minus ``center_offset`` and ``x'`` is the 0-based cell index::

    x1_cell = floor((x1 - offset) / S) + 1
    x2_cell = ceil((x2 - offset) / S) - 1

For sppdet's ZF-5 (``floor(p/2)`` padding, exactly the paper's deployment
network) cell ``i`` is centred on pixel ``S i``, i.e. ``offset = 0.5``; VGG16
(2x2 pooling without padding) has ``offset = 8.0``; Lite0 (TensorFlow "same"
padding) ``15.5``.  (Reading the formula instead as "1-based pixels in,
1-based cells out" would shift every projected window by about half a cell.)
The cell range is then clamped to the map; a window too small to contain a
cell centre (``x2_cell < x1_cell``) is collapsed onto the single cell nearest
its centre (of two equally near, the higher index), so a projected window is
never empty.

Pooling
-------
A projected window of ``w = x2 - x1 + 1`` cells is divided, at pyramid level
``n``, into ``n`` bins per axis; bin ``i`` spans cells
``[floor(i w / n), ceil((i + 1) w / n))`` of the window (the paper's
``[floor((i-1) w/n), ceil(i w/n)]`` in 1-based form).  Bins are never empty
and may overlap by one cell.  Each bin is max-pooled per channel.

Feature layout (fixed): level-major in the order the levels are given, then
channel, then bin row (y), then bin column (x).  For levels ``(4, 2, 1)`` and
``C`` channels the feature is ``[C*16 | C*4 | C*1]`` and element
``c * 16 + 4 * by + bx`` of the first block is the max over bin ``(by, bx)``
of channel ``c``.  This equals ``torchvision.ops.roi_pool(...).flatten(1)``
per level, concatenated.

Implementations (all exact; see :func:`spp_pool`)
------------------------------------------------
* ``numpy`` (CPU, no autograd): a 2-D sparse table (range-maximum table) of
  the map, ``T[a, b][y, x] = max(X[y : y + 2^a, x : x + 2^b])``; any bin is
  the max of four table lookups.  Only the finest level of every nested
  family is looked up: a level ``m`` that divides another level ``n`` is the
  max of ``n/m x n/m`` groups of level-``n`` bins (the union of those bins is
  exactly the level-``m`` bin), so ``(4, 2, 1)`` costs 16 bins, not 21.
* ``torch``: the same algorithm in torch ops (any device, differentiable by
  autograd; gradients reach the arg-max element as with ``roi_pool``).
* ``roi_pool``: ``torchvision.ops.roi_pool`` per level on integer boxes.  It
  computes the bin edges in float32 (``floor(i * float(w/n))``), which equals
  the exact rule above for levels 1-6, 8-10, 12 and 16 but not always for 7,
  11, 13, 14, 15 (its last bin can reach one cell past the window), so it is
  only chosen where it is exact.
"""

from __future__ import annotations

import functools
import threading
from typing import Sequence

import numpy as np
import torch
import torchvision
from torch import nn

#: Pyramid levels used by default: {4, 2, 1} = 21 bins.
DEFAULT_LEVELS: tuple[int, ...] = (4, 2, 1)
#: The paper's detection pyramid: {6, 3, 2, 1} = 50 bins.
PAPER_DETECTION_LEVELS: tuple[int, ...] = (6, 3, 2, 1)
#: Sparse tables larger than this are built channel chunk by channel chunk.
DEFAULT_MAX_TABLE_BYTES = 32 * 2**20

_IMPLS = ("auto", "numpy", "torch", "roi_pool")


def num_bins(levels: Sequence[int]) -> int:
    """Number of bins of a pyramid: ``sum(n * n)`` (21 for (4, 2, 1))."""
    return int(sum(int(n) ** 2 for n in levels))


def feature_dim(channels: int, levels: Sequence[int]) -> int:
    """Length of a pooled feature: ``channels * num_bins(levels)``."""
    return int(channels) * num_bins(levels)


def window_feature_dim(channels: int, levels: Sequence[int], context: float = 0.0,
                       context_levels: Sequence[int] = (2, 1)) -> int:
    """Length of a window feature: the window's pyramid, plus the enlarged window's when ``context``."""
    d = feature_dim(channels, levels)
    if context:
        d += feature_dim(channels, context_levels)
    return d


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    lv = tuple(int(n) for n in levels)
    if not lv or any(n <= 0 for n in lv):
        raise ValueError(f"pyramid levels must be positive integers, got {levels!r}")
    return lv


# ---------------------------------------------------------------------------
# Projection and scale choice


def project_windows(boxes: torch.Tensor | np.ndarray, stride: int, fmap_h: int, fmap_w: int,
                    offset: float = 0.5) -> torch.Tensor:
    """Project windows onto conv5 cells with the paper's rule (see the module docstring).

    Args:
        boxes (Tensor[N, 4] or ndarray[N, 4]): ``(x1, y1, x2, y2)`` in pixels of the
            network input (the resized image), 0-based continuous.
        stride: ``S``, the product of all strides up to the map (16 for ZF-5/VGG16).
        fmap_h, fmap_w: size of the feature map in cells.
        offset: continuous input coordinate of the centre of cell 0's receptive
            field (``Backbone.center_offset``; 0.5 for ZF-5).

    Returns:
        LongTensor[N, 4]: inclusive 0-based cell ranges ``(x1, y1, x2, y2)`` with
        ``0 <= x1 <= x2 < fmap_w`` and ``0 <= y1 <= y2 < fmap_h`` (never empty),
        on the device of ``boxes`` (CPU for numpy input).
    """
    if fmap_h <= 0 or fmap_w <= 0:
        raise ValueError(f"empty feature map {fmap_h}x{fmap_w}")
    b = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes)
    b = b.detach().to(torch.float64).reshape(-1, 4)
    s = float(stride)
    u = b - float(offset)                       # the paper's frame: cell i centred at S * i
    lo = torch.floor(u[:, 0:2] / s) + 1         # x1, y1: first centre strictly inside
    hi = torch.ceil(u[:, 2:4] / s) - 1          # x2, y2: last centre strictly inside
    limit = torch.tensor([fmap_w - 1, fmap_h - 1], dtype=torch.float64, device=b.device)
    lo = torch.minimum(torch.clamp(lo, min=0), limit)
    hi = torch.minimum(torch.clamp(hi, min=0), limit)
    # too small to contain a cell centre: the single cell nearest the window centre
    centre = torch.floor((0.5 * (u[:, 0:2] + u[:, 2:4])) / s + 0.5)     # ties: the higher cell
    centre = torch.minimum(torch.clamp(centre, min=0), limit)
    empty = hi < lo
    lo = torch.where(empty, centre, lo)
    hi = torch.where(empty, centre, hi)
    return torch.cat([lo, hi], dim=1).to(torch.int64)


def choose_scales(boxes_orig: torch.Tensor | np.ndarray, scale_factors: Sequence[float],
                  target: float = 224.0) -> torch.Tensor:
    """Per window, the scale whose scaled window area is closest to ``target ** 2``.

    Args:
        boxes_orig (Tensor[N, 4] or ndarray[N, 4]): ``(x1, y1, x2, y2)`` in pixels of
            the original image, 0-based continuous.
        scale_factors: resize factor of each scale (scaled size = factor * original).
        target: side of the reference square (224 in the paper).

    Returns:
        LongTensor[N]: index into ``scale_factors``; ties go to the lower index.
    """
    b = torch.as_tensor(np.asarray(boxes_orig) if not isinstance(boxes_orig, torch.Tensor) else boxes_orig)
    b = b.detach().to(torch.float64).reshape(-1, 4).cpu()
    if len(scale_factors) == 0:
        raise ValueError("choose_scales: no scales given")
    f = torch.as_tensor([float(x) for x in scale_factors], dtype=torch.float64)
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    diff = (area[:, None] * f[None, :] ** 2 - float(target) ** 2).abs()
    if len(b) == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.argmin(diff, dim=1)       # argmin returns the first of equal minima


# ---------------------------------------------------------------------------
# Bin layout


def bin_edges(start: torch.Tensor, end: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive bin ranges of ``n`` bins over inclusive cell ranges ``[start, end]``.

    Args:
        start, end (LongTensor[N]): first and last cell of each window along one axis.
        n: bins per axis.

    Returns:
        (first, last) LongTensor[N, n]: bin ``i`` covers cells ``first[:, i] .. last[:, i]``,
        i.e. ``start + floor(i w / n)`` to ``start + ceil((i + 1) w / n) - 1`` with
        ``w = end - start + 1`` (exact integer arithmetic).
    """
    w = (end - start + 1)[:, None]
    i = torch.arange(n, device=start.device, dtype=torch.int64)[None, :]
    first = start[:, None] + torch.div(i * w, n, rounding_mode="floor")
    last = start[:, None] - torch.div(-(i + 1) * w, n, rounding_mode="floor") - 1   # ceil - 1
    return first, last


def _plan_levels(levels: tuple[int, ...]) -> tuple[list[int], dict[int, int]]:
    """Split levels into looked-up ("base") levels and levels derived from a base level.

    Level ``m`` is derived from the smallest base level ``n > m`` with ``n % m == 0``.
    """
    uniq = sorted(set(levels), reverse=True)
    base: list[int] = []
    source: dict[int, int] = {}
    for n in uniq:
        src = [b for b in base if b % n == 0]
        if src:
            source[n] = min(src)
        else:
            base.append(n)
    return base, source


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """``floor(log2(v))`` for positive integer tensors, exactly (via frexp)."""
    return (torch.frexp(v.to(torch.float64))[1] - 1).to(torch.int64)


def _base_queries(cells: torch.Tensor, base: list[int]):
    """Row/column ranges of every base-level bin: four LongTensors [N, K], K = sum(n^2)."""
    x1, y1, x2, y2 = cells.unbind(1)
    ys, ye, xs, xe = [], [], [], []
    N = len(cells)
    for n in base:
        bx0, bx1 = bin_edges(x1, x2, n)
        by0, by1 = bin_edges(y1, y2, n)
        ys.append(by0[:, :, None].expand(N, n, n).reshape(N, n * n))
        ye.append(by1[:, :, None].expand(N, n, n).reshape(N, n * n))
        xs.append(bx0[:, None, :].expand(N, n, n).reshape(N, n * n))
        xe.append(bx1[:, None, :].expand(N, n, n).reshape(N, n * n))
    return torch.cat(ys, 1), torch.cat(ye, 1), torch.cat(xs, 1), torch.cat(xe, 1)


def _table_rows(cells: torch.Tensor, base: list[int], H: int, W: int):
    """Flat sparse-table row indices of the four corner lookups of every base bin.

    Returns ``(rows [4, N*K] int64, A, B)`` where the table has ``A x B`` blocks
    of ``H x W`` rows (row ``((a * B + b) * H + y) * W + x``).
    """
    ys, ye, xs, xe = _base_queries(cells, base)
    a = _floor_log2(ye - ys + 1)
    b = _floor_log2(xe - xs + 1)
    A = int(a.max()) + 1 if a.numel() else 1
    B = int(b.max()) + 1 if b.numel() else 1
    y_hi = ye - (1 << a) + 1
    x_hi = xe - (1 << b) + 1
    blk = (a * B + b) * H
    rows = torch.stack([((blk + ys) * W + xs), ((blk + ys) * W + x_hi),
                        ((blk + y_hi) * W + xs), ((blk + y_hi) * W + x_hi)]).reshape(4, -1)
    return rows, A, B


# ---------------------------------------------------------------------------
# numpy sparse-table implementation (CPU, no autograd)


_scratch = threading.local()


def _scratch_array(n: int, dtype: np.dtype) -> np.ndarray:
    """A reusable 1-D work array of at least ``n`` elements (one per thread).

    Re-using the sparse table's memory avoids faulting in tens of MiB of fresh
    pages on every call, which costs as much as the pooling itself on small
    VMs.  At most ``max_table_bytes`` (plus the window buffers) stay allocated.
    """
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < n:
        _scratch.buf = None                       # free the old one first
        buf = _scratch.buf = np.empty(n, dtype=dtype)
    return buf[:n]


def _table_numpy(X: np.ndarray, A: int, B: int) -> np.ndarray:
    """Sparse table of ``X`` (ndarray[H, W, C]): ndarray[A, B, H, W, C] (a scratch view).

    ``T[a, b, y, x] = max(X[y : y + 2**a, x : x + 2**b])`` where that block fits
    in the map; other entries are left uninitialised and never read.  The result
    lives in the thread's scratch memory: valid until the next call.
    """
    H, W, C = X.shape
    T = _scratch_array(A * B * H * W * C, X.dtype).reshape(A, B, H, W, C)
    T[0, 0] = X
    for a in range(1, A):
        s, hh = 1 << (a - 1), H - (1 << a) + 1
        np.maximum(T[a - 1, 0, :hh], T[a - 1, 0, s:s + hh], out=T[a, 0, :hh])
    for a in range(A):
        hh = H - (1 << a) + 1
        for b in range(1, B):
            s, ww = 1 << (b - 1), W - (1 << b) + 1
            np.maximum(T[a, b - 1, :hh, :ww], T[a, b - 1, :hh, s:s + ww], out=T[a, b, :hh, :ww])
    return T


def _f16_keys(bits: np.ndarray) -> np.ndarray:
    """float16 bit patterns (int16) <-> order-preserving int16 keys (an involution).

    Non-negative floats keep their bits; for negative ones the 15 magnitude bits
    are flipped, so that integer order equals float order (``-0.0 < +0.0``).
    Lets the CPU path work on 2-byte integers when the map is float16 (exact).
    """
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))


def _spp_numpy(fmap: torch.Tensor, cells: torch.Tensor, levels: tuple[int, ...],
               max_table_bytes: int, chunk_windows: int = 64) -> torch.Tensor:
    C, H, W = fmap.shape
    N = len(cells)
    base, source = _plan_levels(levels)
    rows, A, B = _table_rows(cells, base, H, W)
    K = sum(n * n for n in base)
    rows_np = rows.numpy().reshape(4, N, K)
    X = fmap.detach().to("cpu").permute(1, 2, 0).numpy()        # [H, W, C] view
    half = X.dtype == np.float16
    if half:        # exact max on order-preserving int16 keys: half the memory traffic
        X = _f16_keys(np.ascontiguousarray(X).view(np.int16))
    elif X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    offsets, off = [], 0
    for n in levels:
        offsets.append(off)
        off += C * n * n
    out = np.empty((N, off), dtype=X.dtype)
    per_channel = A * B * H * W * X.dtype.itemsize
    cchunk = int(max(1, min(C, max_table_bytes // max(per_channel, 1))))
    cw = max(1, int(chunk_windows))
    for c0 in range(0, C, cchunk):
        c1 = min(C, c0 + cchunk)
        cc = c1 - c0
        T = _table_numpy(np.ascontiguousarray(X[:, :, c0:c1]), A, B).reshape(-1, cc)
        vbuf = np.empty((cw * K, cc), dtype=X.dtype)
        tbuf = np.empty_like(vbuf)
        for w0 in range(0, N, cw):
            w1 = min(N, w0 + cw)
            nw = w1 - w0
            v, t = vbuf[:nw * K], tbuf[:nw * K]
            np.take(T, rows_np[0, w0:w1].reshape(-1), axis=0, out=v, mode="clip")
            for r in rows_np[1:]:
                np.take(T, r[w0:w1].reshape(-1), axis=0, out=t, mode="clip")
                np.maximum(v, t, out=v)
            v3 = v.reshape(nw, K, cc)
            grids: dict[int, np.ndarray] = {}
            k0 = 0
            for n in base:
                grids[n] = v3[:, k0:k0 + n * n].reshape(nw, n, n, cc)
                k0 += n * n
            for n, o in zip(levels, offsets):
                if n in grids:
                    g = grids[n]
                else:       # union of k x k finer bins = one coarser bin (exact)
                    src = grids[source[n]]
                    k = source[n] // n
                    g = src[:, 0::k, 0::k].copy()
                    for p in range(k):
                        for q in range(k):
                            if p or q:
                                np.maximum(g, src[:, p::k, q::k], out=g)
                dst = out[w0:w1, o + c0 * n * n:o + c1 * n * n].reshape(nw, cc, n, n)
                dst[...] = g.transpose(0, 3, 1, 2)
        del T
    if half:
        out = _f16_keys(out).view(np.float16)
    res = torch.from_numpy(out)
    return res if res.dtype == fmap.dtype else res.to(fmap.dtype)


# ---------------------------------------------------------------------------
# torch sparse-table implementation (any device, autograd)


def _spp_torch(fmap: torch.Tensor, cells: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    C, H, W = fmap.shape
    N = len(cells)
    base, source = _plan_levels(levels)
    rows, A, B = _table_rows(cells, base, H, W)
    K = sum(n * n for n in base)
    X = fmap.permute(1, 2, 0)                        # [H, W, C] view
    col: list[torch.Tensor] = [X]                    # T[a, 0]
    for a in range(1, A):
        s, hh = 1 << (a - 1), H - (1 << a) + 1
        col.append(torch.maximum(col[a - 1][:hh], col[a - 1][s:s + hh]))
    blocks = []
    for a in range(A):
        t = col[a]
        row = [t]
        for b in range(1, B):
            s, ww = 1 << (b - 1), W - (1 << b) + 1
            t = torch.maximum(t[:, :ww], t[:, s:s + ww])
            row.append(t)
        for t in row:
            blocks.append(nn.functional.pad(t, (0, 0, 0, W - t.shape[1], 0, H - t.shape[0])))
    table = torch.stack(blocks).reshape(-1, C)      # [A*B*H*W, C]
    rows = rows.to(fmap.device)
    vals = table.index_select(0, rows[0])
    for r in rows[1:]:
        vals = torch.maximum(vals, table.index_select(0, r))
    vals = vals.reshape(N, K, C)
    grids: dict[int, torch.Tensor] = {}
    k0 = 0
    for n in base:
        grids[n] = vals[:, k0:k0 + n * n].reshape(N, n, n, C)
        k0 += n * n
    parts = []
    for n in levels:
        if n in grids:
            g = grids[n]
        else:
            src = source[n]
            k = src // n
            g = grids[src].reshape(N, n, k, n, k, C).amax(dim=(2, 4))
        parts.append(g.permute(0, 3, 1, 2).reshape(N, C * n * n))
    return torch.cat(parts, 1)


# ---------------------------------------------------------------------------
# roi_pool route


@functools.lru_cache(maxsize=None)
def roi_pool_is_exact(n: int, max_cells: int) -> bool:
    """Whether ``torchvision.ops.roi_pool``'s float32 bin edges equal the exact rule.

    Checks every window width ``1..max_cells`` at ``n`` bins, emulating the kernel's
    ``floor(float(i) * (float(w) / float(n)))`` and ``ceil(float(i + 1) * ...)``.
    """
    w = np.arange(1, max_cells + 1, dtype=np.int64)[:, None]
    i = np.arange(n, dtype=np.int64)[None, :]
    size = w.astype(np.float32) / np.float32(n)
    f_start = np.floor(i.astype(np.float32) * size).astype(np.int64)
    f_end = np.ceil((i + 1).astype(np.float32) * size).astype(np.int64)
    return bool(np.array_equal(f_start, (i * w) // n) and np.array_equal(f_end, -((-(i + 1) * w) // n)))


def _spp_roi_pool(fmap: torch.Tensor, cells: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    N = len(cells)
    rois = torch.cat([torch.zeros(N, 1, dtype=fmap.dtype, device=fmap.device),
                      cells.to(fmap.device, fmap.dtype)], dim=1)
    return torch.cat([torchvision.ops.roi_pool(fmap[None], rois, (n, n), 1.0).reshape(N, -1)
                      for n in levels], dim=1)


# ---------------------------------------------------------------------------
# Public entry points


def spp_pool(fmap: torch.Tensor, cells: torch.Tensor, levels: Sequence[int] = DEFAULT_LEVELS, *,
             impl: str = "auto", max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES) -> torch.Tensor:
    """Spatial pyramid max pooling of many windows of one feature map.

    Args:
        fmap (Tensor[C, H, W]): the feature map (any float dtype, CPU or CUDA).
        cells (LongTensor[N, 4]): inclusive 0-based cell ranges ``(x1, y1, x2, y2)``
            from :func:`project_windows` (``0 <= x1 <= x2 < W``, ``0 <= y1 <= y2 < H``).
        levels: bins per axis of each pyramid level, e.g. ``(4, 2, 1)``.
        impl: ``auto`` (below), ``numpy``, ``torch`` or ``roi_pool``.  ``auto`` uses
            the numpy sparse table on CPU without autograd, the torch sparse table on
            CPU with autograd, and on CUDA ``roi_pool`` where it is exact for these
            levels and this map size (else the torch sparse table).  All give the
            same values.
        max_table_bytes: the numpy path builds its sparse table in channel chunks so
            that one chunk stays below this size.

    Returns:
        Tensor[N, C * sum(n * n)] of ``fmap``'s dtype and device, in the layout
        described in the module docstring (level-major, then channel, then bin).
    """
    lv = _check_levels(levels)
    if fmap.dim() != 3:
        raise ValueError(f"spp_pool: expected a [C, H, W] map, got shape {tuple(fmap.shape)}")
    C, H, W = fmap.shape
    cells = torch.as_tensor(cells).to(torch.int64).reshape(-1, 4).cpu()
    N = len(cells)
    if N == 0:
        return fmap.new_zeros((0, feature_dim(C, lv)))
    bad = (cells[:, 0] < 0) | (cells[:, 1] < 0) | (cells[:, 2] >= W) | (cells[:, 3] >= H) | \
        (cells[:, 2] < cells[:, 0]) | (cells[:, 3] < cells[:, 1])
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise ValueError(f"spp_pool: cell range {cells[j].tolist()} is empty or outside the {H}x{W} map")
    if impl not in _IMPLS:
        raise ValueError(f"spp_pool: impl must be one of {_IMPLS}, got {impl!r}")
    needs_grad = torch.is_grad_enabled() and fmap.requires_grad
    if impl == "auto":
        if fmap.is_cuda:
            exact = all(roi_pool_is_exact(n, max(H, W)) for n in lv)
            impl = "roi_pool" if exact and fmap.dtype in (torch.float32, torch.float64) else "torch"
        elif needs_grad or fmap.dtype not in (torch.float16, torch.float32, torch.float64):
            impl = "torch"
        else:
            impl = "numpy"
    if impl == "numpy":
        if needs_grad:
            raise ValueError("spp_pool: impl='numpy' has no autograd; use 'torch' or 'auto'")
        return _spp_numpy(fmap, cells, lv, max_table_bytes).to(fmap.device)
    if impl == "torch":
        return _spp_torch(fmap, cells.to(fmap.device), lv)
    return _spp_roi_pool(fmap, cells, lv)


def spp_pool_whole(maps: torch.Tensor, levels: Sequence[int] = DEFAULT_LEVELS) -> torch.Tensor:
    """Pyramid pooling of whole maps (R-CNN mode: every window has its own map).

    Args:
        maps (Tensor[B, C, H, W]): one feature map per window.
        levels: as in :func:`spp_pool`.

    Returns:
        Tensor[B, C * sum(n * n)]: what :func:`spp_pool` gives for each map with the
        window ``(0, 0, W - 1, H - 1)``; differentiable.
    """
    lv = _check_levels(levels)
    Bn, C, H, W = maps.shape
    zero = torch.zeros(1, dtype=torch.int64)
    parts = []
    for n in lv:
        y0, y1 = bin_edges(zero, zero + H - 1, n)
        x0, x1 = bin_edges(zero, zero + W - 1, n)
        cols = []
        for i in range(n):
            for j in range(n):
                blk = maps[:, :, int(y0[0, i]):int(y1[0, i]) + 1, int(x0[0, j]):int(x1[0, j]) + 1]
                cols.append(blk.amax(dim=(2, 3)))
        parts.append(torch.stack(cols, dim=2).reshape(Bn, C * n * n))
    return torch.cat(parts, 1)


class SpatialPyramidPooling(nn.Module):
    """``nn.Module`` wrapper of :func:`spp_pool`.

    Args:
        levels: bins per axis of each level (default ``(4, 2, 1)``).

    Shape:
        forward(fmap: Tensor[C, H, W], cells: LongTensor[N, 4]) -> Tensor[N, C * sum(n*n)]
    """

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS) -> None:
        super().__init__()
        self.levels = _check_levels(levels)

    @property
    def num_bins(self) -> int:
        return num_bins(self.levels)

    def output_dim(self, channels: int) -> int:
        return feature_dim(channels, self.levels)

    def forward(self, fmap: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return spp_pool(fmap, cells, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def resize_factor(height: int, width: int, scale: float, max_side: float) -> float:
    """Factor that brings the shorter side to ``scale`` with the longer side at most ``max_side``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image {width}x{height}")
    f = float(scale) / min(height, width)
    if max(height, width) * f > max_side:
        f = float(max_side) / max(height, width)
    return f


__all__ = [
    "DEFAULT_LEVELS", "PAPER_DETECTION_LEVELS", "num_bins", "feature_dim", "project_windows",
    "choose_scales", "bin_edges", "spp_pool", "spp_pool_whole", "SpatialPyramidPooling",
    "roi_pool_is_exact", "resize_factor",
]
