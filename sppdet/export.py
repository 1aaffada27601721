"""Export the network part of a trained detector as TorchScript (and ONNX where ``onnx`` exists).

``sppdet export --checkpoint CKPT --out DIR`` writes into ``DIR``:

* ``backbone.torchscript.pt``: ``backbone(x) -> fmap``.  ``x`` is Tensor[1, 3, H, W] float32,
  the RGB image resized for one scale (below) and normalised as ``(pixel / 255 - mean) / std``;
  ``fmap`` is the conv5 map Tensor[1, C, h, w] float32 (``h, w`` as the backbone makes them,
  e.g. ``ceil(H / 16)`` for Lite0 and ZF-5, ``floor(H / 16)`` for VGG16).
* ``head.torchscript.pt``: ``head(fmap, windows, factor) -> (scores, boxes)``:

  - ``fmap``: the backbone's map of the image at one scale;
  - ``windows``: Tensor[N, 4] ``(x1, y1, x2, y2)`` in pixels of the ORIGINAL image, 0-based
    continuous (DESIGN §3: a box over pixel columns 0..9 has ``x1 = 0, x2 = 10``), any float
    dtype (computed in float64, as sppdet does);
  - ``factor``: the resize factor of that scale (resized size = factor * original size);
  - ``scores``: Tensor[N, K] float32, the per-class SVM margins (0 = the decision boundary);
  - ``boxes``: Tensor[N, K, 4] float32, each class's regressed box in original-image pixels,
    not clipped (the windows themselves, repeated, when the detector has no regressors).

  The head scales the windows by ``factor``, projects them onto conv5 cells with the paper's
  rule (``floor((x1 - offset) / S) + 1``, ``ceil((x2 - offset) / S) - 1``, clamped; a window
  holding no cell centre becomes the cell nearest its centre; :func:`sppdet.models.spp.project_windows`),
  rounds the map to the conv5 cache's dtype (float16 by default: the Python detector pools the
  cached float16 maps, and max pooling commutes with that rounding), max-pools the pyramid,
  runs fc6/fc7 (when the SVMs score fc7), the SVMs and the box regressors.  ``head.pool(fmap,
  windows, factor)`` returns the pooled feature Tensor[N, D] float32 alone (layout of
  :mod:`sppdet.models.spp`: level-major, then channel, then bin row, then bin column).

* ``export.json``: what a user needs to run the two files without sppdet: classes, scales,
  ``max_side``, the resize and scale-choice rules, normalisation, stride, centre offset,
  pyramid, feature scales, the test-time settings and the proposal settings.

Pooling is ``torchvision.ops.roi_pool`` with a 1 x 1 output on each bin's own integer cell
box: for an integer box ``roi_pool`` covers exactly cells ``x1 .. x2`` (its ``floor(0 * w)``
and ``ceil(1 * w)`` are exact), so every bin is sppdet's bin ``[floor(i w / n), ceil((i + 1) w / n))``
computed in integer arithmetic here -- bit-identical to :func:`sppdet.models.spp.spp_pool`,
unlike ``roi_pool`` with an ``n x n`` output, whose float32 bin edges are off for some widths
at levels 7, 11, 13, 14 and 15.  Loading the head needs ``import torchvision`` first (it
registers the ``roi_pool`` operator).

Not exported, by design: selective search (OpenCV's ``ximgproc``, run it as sppdet does:
``export.json`` names the preset and the proposal cap), resizing (OpenCV, rule in
``export.json``), the per-window scale choice of multi-scale detectors (a window goes to the
scale whose ``factor^2 * area`` is closest to ``224^2``, ties to the first scale: call the head
once per scale on that scale's windows), the mirrored view (``test.flip``: run both on the
mirrored image with mirrored windows ``x -> W - x``, mirror the boxes back, average) and NMS
(per class, IoU ``test.nms``; :func:`sppdet.detect.postprocess`).

ONNX (``--format onnx`` or ``all``): the same two networks through ``torch.onnx.export``'s
TorchScript-based exporter (``roi_pool`` becomes ``MaxRoiPool`` with a 1 x 1 output, whose
rounding is the same); it needs the ``onnx`` package, and without it the command stops with a
one-line error before writing anything.  The ONNX path has not been run in sppdet's tests (they
run without ``onnx``); a failure there is a one-line error, never a half-written file.
"""

from __future__ import annotations

import copy
import json
import logging
import typing
import warnings
from pathlib import Path
from typing import Any, List, Tuple

import torch
import torchvision
from torch import nn

from . import __version__
from .boxes import MAX_LOG_SCALE
from .errors import SppdetError
from .models.backbones import Backbone
from .models.detector import SPPDetector
from .utils.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "sppdet-export"
VERSION = 1
FORMATS = ("torchscript", "onnx", "all")
#: File names written into the output folder.
FILES = {"backbone": "backbone.torchscript.pt", "head": "head.torchscript.pt",
         "backbone_onnx": "backbone.onnx", "head_onnx": "head.onnx", "meta": "export.json"}
#: Windows per fc/SVM batch (as :func:`sppdet.models.heads.fc7_features`, so the matmuls are the same).
CHUNK = 4096


class ExportError(SppdetError):
    """The checkpoint cannot be exported as asked (format, mode, missing package, output folder)."""


# ---------------------------------------------------------------------------
# the head: projection + SPP (roi_pool per bin) + fc + SVMs + regressors


def _bins(start: torch.Tensor, end: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inclusive cell ranges [N, n] of ``n`` bins over ``[start, end]`` (:func:`sppdet.models.spp.bin_edges`)."""
    w = (end - start + 1).unsqueeze(1)
    i = torch.arange(n, dtype=torch.int64, device=start.device).unsqueeze(0)
    first = start.unsqueeze(1) + torch.div(i * w, n, rounding_mode="floor")
    last = start.unsqueeze(1) - torch.div(-(i + 1) * w, n, rounding_mode="floor") - 1
    return first, last


class ExportedHead(nn.Module):
    """Scriptable test-time head of an :class:`~sppdet.models.detector.SPPDetector` (see the module
    docstring for the contract).  Built by :func:`build_head`."""

    def __init__(self, model: SPPDetector) -> None:
        super().__init__()
        f = model.features
        bb = model.backbone
        self.stride = int(bb.stride)
        self.offset = float(bb.center_offset)
        self.levels: List[int] = [int(n) for n in f.pyramid]
        self.context = float(f.context or 0.0)
        self.context_levels: List[int] = [int(n) for n in f.context_pyramid]
        self.round_half = f.cache_dtype == "float16"
        self.on_fc7 = model.svm_features == "fc7"
        layers: List[nn.Module] = []
        if self.on_fc7:
            if model.head is None:
                raise ExportError("this checkpoint scores fc7 features but holds no fc layers")
            for m in model.head.hidden:
                if isinstance(m, nn.Linear):
                    lin = nn.Linear(m.in_features, m.out_features)
                    lin.load_state_dict(m.state_dict())
                    layers.append(lin)
                elif isinstance(m, nn.ReLU):
                    layers.append(nn.ReLU())
                elif not isinstance(m, nn.Dropout):        # dropout is the identity at test time
                    raise ExportError(f"fc head layer {type(m).__name__} is not exportable")
        self.hidden = nn.Sequential(*layers)
        self.chunk = CHUNK
        self.svm_scale = float(model.svms.scale)
        self.register_buffer("svm_W", torch.from_numpy(model.svms.W.copy()))
        self.register_buffer("svm_b", torch.from_numpy(model.svms.b.copy()))
        reg = model.bbox_reg
        self.has_reg = reg is not None
        K = model.svms.num_classes
        D = int(model.feature_dim) if reg is None else reg.dim
        self.num_classes = K
        if reg is not None:
            self.reg_scale = float(reg.scale)
            self.register_buffer("reg_W", torch.from_numpy(reg.W.transpose(1, 0, 2).reshape(reg.dim, K * 4).copy()))
            self.register_buffer("reg_b", torch.from_numpy(reg.b.copy()))
            self.register_buffer("reg_mean", torch.from_numpy(reg.mean.copy()))
            self.register_buffer("reg_std", torch.from_numpy(reg.std.copy()))
        else:
            self.reg_scale = 1.0
            self.register_buffer("reg_W", torch.zeros(D, K * 4))
            self.register_buffer("reg_b", torch.zeros(K, 4))
            self.register_buffer("reg_mean", torch.zeros(K, 4))
            self.register_buffer("reg_std", torch.ones(K, 4))
        self.max_log_scale = float(MAX_LOG_SCALE)

    # ------------------------------------------------------------ geometry
    def cells(self, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inclusive conv5 cell ranges LongTensor[N, 4] of windows (float64 [N, 4], scaled-image pixels)."""
        s = float(self.stride)
        u = boxes - self.offset
        lo = torch.floor(u[:, 0:2] / s) + 1
        hi = torch.ceil(u[:, 2:4] / s) - 1
        limit = torch.tensor([w - 1, h - 1], dtype=torch.float64, device=boxes.device)
        lo = torch.minimum(torch.clamp(lo, min=0.0), limit)
        hi = torch.minimum(torch.clamp(hi, min=0.0), limit)
        centre = torch.floor((0.5 * (u[:, 0:2] + u[:, 2:4])) / s + 0.5)
        centre = torch.minimum(torch.clamp(centre, min=0.0), limit)
        empty = hi < lo
        lo = torch.where(empty, centre, lo)
        hi = torch.where(empty, centre, hi)
        return torch.cat([lo, hi], dim=1).to(torch.int64)

    def pyramid(self, fmap: torch.Tensor, cells: torch.Tensor, levels: List[int]) -> torch.Tensor:
        """SPP of cell ranges (LongTensor[N, 4]) on fmap (Tensor[1, C, h, w]): Tensor[N, C * sum(n^2)]."""
        N = cells.shape[0]
        C = fmap.shape[1]
        x1, y1, x2, y2 = cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3]
        parts: List[torch.Tensor] = []
        for n in levels:
            bx0, bx1 = _bins(x1, x2, n)                       # [N, n] (columns)
            by0, by1 = _bins(y1, y2, n)                       # [N, n] (rows)
            rois = torch.stack([torch.zeros(N, n, n, dtype=torch.int64, device=cells.device),
                                bx0.unsqueeze(1).expand(N, n, n), by0.unsqueeze(2).expand(N, n, n),
                                bx1.unsqueeze(1).expand(N, n, n), by1.unsqueeze(2).expand(N, n, n)], dim=3)
            pooled = torchvision.ops.roi_pool(fmap, rois.reshape(N * n * n, 5).to(fmap.dtype), [1, 1], 1.0)
            parts.append(pooled.reshape(N, n, n, C).permute(0, 3, 1, 2).reshape(N, C * n * n))
        return torch.cat(parts, dim=1)

    @torch.jit.export
    def pool(self, fmap: torch.Tensor, windows: torch.Tensor, factor: float) -> torch.Tensor:
        """Pooled window features Tensor[N, D] float32 (what sppdet's extractor computes)."""
        m = fmap.to(torch.float32)
        if self.round_half:         # the Python detector pools its float16 conv5 cache
            m = m.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)
        b = windows.to(device=m.device, dtype=torch.float64).reshape(-1, 4) * factor
        h, w = m.shape[2], m.shape[3]
        feat = self.pyramid(m, self.cells(b, h, w), self.levels)
        if self.context > 0.0:
            c = 0.5 * (b[:, 0:2] + b[:, 2:4])
            half = 0.5 * self.context * (b[:, 2:4] - b[:, 0:2])
            big = torch.cat([c - half, c + half], dim=1)
            feat = torch.cat([feat, self.pyramid(m, self.cells(big, h, w), self.context_levels)], dim=1)
        return feat

    @torch.jit.export
    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """SVM scores Tensor[N, K] of pooled features (Tensor[N, D] float32)."""
        x = pooled
        if self.on_fc7:
            outs: List[torch.Tensor] = []
            for j in range(0, pooled.shape[0], self.chunk):
                outs.append(self.hidden(pooled[j:j + self.chunk]))
            x = torch.cat(outs) if len(outs) > 0 else pooled.new_zeros((0, self.svm_W.shape[0]))
        return (x * self.svm_scale) @ self.svm_W + self.svm_b

    @torch.jit.export
    def regress(self, pooled: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Per-class boxes Tensor[N, K, 4] float32 of windows (original pixels) from pooled features."""
        p = windows.to(device=pooled.device, dtype=torch.float64).reshape(-1, 4)
        N = p.shape[0]
        K = self.num_classes
        if not self.has_reg:
            return p.to(torch.float32).unsqueeze(1).expand(N, K, 4).contiguous()
        z = ((pooled * self.reg_scale) @ self.reg_W).reshape(N, K, 4) + self.reg_b
        d = (z * self.reg_std + self.reg_mean).to(torch.float64)
        pw = (p[:, 2] - p[:, 0]).unsqueeze(1)
        ph = (p[:, 3] - p[:, 1]).unsqueeze(1)
        px = p[:, 0].unsqueeze(1) + 0.5 * pw
        py = p[:, 1].unsqueeze(1) + 0.5 * ph
        cx = px + d[:, :, 0] * pw
        cy = py + d[:, :, 1] * ph
        bw = pw * torch.exp(torch.clamp(d[:, :, 2], max=self.max_log_scale))
        bh = ph * torch.exp(torch.clamp(d[:, :, 3], max=self.max_log_scale))
        out = torch.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], dim=2)
        return out.to(torch.float32)

    def forward(self, fmap: torch.Tensor, windows: torch.Tensor, factor: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores Tensor[N, K], boxes Tensor[N, K, 4]) of windows in original-image pixels."""
        pooled = self.pool(fmap, windows, factor)
        return self.score(pooled), self.regress(pooled, windows)


def build_head(model: SPPDetector) -> torch.jit.ScriptModule:
    """The scripted :class:`ExportedHead` of a detector (SPP mode only)."""
    if model.features.mode != "spp":
        raise ExportError(f"features.mode {model.features.mode!r}: only SPP-mode detectors can be exported "
                          "(R-CNN mode warps every window through the backbone)")
    return _script(ExportedHead(model))


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of an inference module: eval mode, no parameter asks for gradients
    (so outputs are plain tensors), without torch's deprecation notice."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


# ---------------------------------------------------------------------------
# the backbone


_SCRIPT_CLASSES: dict[type, type] = {}


def _resolved_copy(backbone: Backbone) -> nn.Module:
    """A deep copy whose sppdet classes carry resolved annotations (``from __future__ import
    annotations`` leaves class-level annotations as strings, which TorchScript cannot read)."""
    m = copy.deepcopy(backbone).cpu().eval()
    for sub in m.modules():
        cls = type(sub)
        if not cls.__module__.startswith("sppdet."):
            continue
        if cls not in _SCRIPT_CLASSES:
            _SCRIPT_CLASSES[cls] = type(cls.__name__, (cls,), {"__annotations__": dict(typing.get_type_hints(cls)),
                                                               "__module__": cls.__module__})
        sub.__class__ = _SCRIPT_CLASSES[cls]
    return m


class _ConvBN(nn.Module):
    """``conv_bn`` of :mod:`sppdet.models.efficientnet_lite` in eval mode with its padding fixed:
    the BatchNorm folded exactly as ``conv_bn`` folds it, the TensorFlow-SAME padding of an
    even-sized input (what every stride-2 layer of Lite0 sees after its pad-to-16)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, stride: int = 1, dilation: int = 1,
                 same: bool = False) -> None:
        super().__init__()
        from .models.efficientnet_lite import _tf_pads

        with torch.no_grad():
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            self.register_buffer("weight", (conv.weight * scale.reshape(-1, 1, 1, 1)).detach().clone())
            self.register_buffer("bias", (bn.bias - bn.running_mean * scale).detach().clone())
        k = int(conv.kernel_size[0])
        self.stride, self.dilation, self.groups = int(stride), int(dilation), int(conv.groups)
        p = _tf_pads(32, k, self.stride, self.dilation) if same else (0, 0)     # even n: the same for all
        self.asym = p[0] != p[1]
        self.fpad: List[int] = [p[0], p[1], p[0], p[1]]
        self.cpad: List[int] = [0, 0] if self.asym else [p[0], p[0]]
        # a 1x1 convolution on the CPU is one matrix product, as in efficientnet_lite.conv_bn
        # (pointwise_conv: the same bits for any number of threads)
        self.pointwise = k == 1 and self.groups == 1 and self.stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise and not x.is_cuda:
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
            y = torch.addmm(self.bias, rows, self.weight.reshape(self.weight.shape[0], c).t())
            return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)
        if self.asym:
            x = torch.nn.functional.pad(x, self.fpad)
        return torch.nn.functional.conv2d(x, self.weight, self.bias, [self.stride, self.stride], self.cpad,
                                          [self.dilation, self.dilation], self.groups)


class _MBConv(nn.Module):
    def __init__(self, blk: nn.Module, stride: int | None = None, dilation: int = 1) -> None:
        super().__init__()
        s = blk.stride if stride is None else stride
        self.has_expand = blk.expand != 1
        self.expand = _ConvBN(blk._expand_conv, blk._bn0) if self.has_expand else nn.Identity()
        self.dw = _ConvBN(blk._depthwise_conv, blk._bn1, s, dilation, same=True)
        self.project = _ConvBN(blk._project_conv, blk._bn2)
        self.has_skip = bool(blk.has_skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = torch.nn.functional.relu6(self.expand(h))
        h = torch.nn.functional.relu6(self.dw(h))
        h = self.project(h)
        if self.has_skip:
            return h + x
        return h


class _Lite0(nn.Module):
    """EfficientNet-Lite0's detection ``forward`` (:class:`sppdet.models.efficientnet_lite.EfficientNetLite0`)
    in scriptable form: its Python code derives the TensorFlow-SAME padding from the input size, which
    TorchScript cannot compile and tracing would freeze; after the pad to a multiple of 16 that padding
    is one constant per layer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        from .models.efficientnet_lite import C4_END

        self.variant = str(net.variant)
        self.stem = _ConvBN(net._conv_stem, net._bn0, 2, same=True)
        self.c4 = nn.ModuleList([_MBConv(b) for b in net._blocks[:C4_END]])
        tail = [_MBConv(net._blocks[C4_END], stride=1)] + [_MBConv(b, dilation=2) for b in net._blocks[C4_END + 1:]]
        self.tail = nn.ModuleList(tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2], x.shape[3]
        ph, pw = (16 - H % 16) % 16, (16 - W % 16) % 16
        if ph > 0 or pw > 0:
            x = torch.nn.functional.pad(x, [0, pw, 0, ph])
        h = torch.nn.functional.relu6(self.stem(x))
        for blk in self.c4:
            h = blk(h)
        if self.variant == "c4":
            return h
        t = h
        for blk in self.tail:
            t = blk(t)
        if self.variant == "dilated":
            return t
        return torch.cat([h, t], dim=1)


#: Input sizes the exported backbone is checked on against the Python backbone (bit-exact).
CHECK_SIZES = ((67, 93), (48, 80), (101, 35))


def build_backbone_module(backbone: Backbone) -> torch.jit.ScriptModule:
    """The backbone as TorchScript: ZF-5 and VGG16 scripted as they are; Lite0 (whose
    TensorFlow-SAME padding is computed from the input size in Python) as :class:`_Lite0`, the
    same layers with that padding fixed.  Either way the result is checked bit-exactly against
    the Python backbone at a few odd input sizes.

    Raises:
        ExportError: the backbone cannot be expressed in TorchScript.
    """
    from .models.efficientnet_lite import EfficientNetLite0

    try:
        if isinstance(backbone, EfficientNetLite0):
            scripted = _script(_Lite0(copy.deepcopy(backbone).cpu().eval()))
        else:
            scripted = _script(_resolved_copy(backbone))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"backbone {backbone.name}: TorchScript cannot compile it ({reason[:160]})") from None
    ref = copy.deepcopy(backbone).cpu().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in CHECK_SIZES:
            x = torch.randn(1, 3, *hw, generator=gen)
            a, b = ref(x), scripted(x)
            if a.shape != b.shape or not torch.equal(a, b):
                raise ExportError(f"backbone {backbone.name}: the TorchScript module differs from the Python "
                                  f"network on a {hw[0]}x{hw[1]} input")
    return scripted


# ---------------------------------------------------------------------------
# metadata and the command's entry point


def metadata(model: SPPDetector, *, checkpoint: str | Path, proposals: dict[str, Any] | None = None,
             files: dict[str, str]) -> dict[str, Any]:
    """The ``export.json`` contents (JSON-ready)."""
    bb, f, t = model.backbone, model.features, model.test
    return {
        "format": FORMAT, "version": VERSION, "sppdet_version": __version__,
        "checkpoint": str(checkpoint),
        "classes": list(model.classes),
        "files": files,
        "backbone": {"name": bb.name, "weights_id": bb.weights_id, "out_channels": int(bb.out_channels),
                     "stride": int(bb.stride), "center_offset": float(bb.center_offset)},
        "input": {
            "layout": "Tensor[1, 3, H, W] float32, RGB",
            "normalisation": "(pixel / 255 - mean) / std per channel",
            "mean": [float(v) for v in bb.mean], "std": [float(v) for v in bb.std],
            "resize": "factor = scale / min(H, W); if max(H, W) * factor > max_side: factor = max_side / max(H, W); "
                      "size round(H * factor) x round(W * factor) (at least 1), cv2.INTER_AREA when factor < 1 "
                      "else cv2.INTER_LINEAR, unchanged when the size is unchanged",
        },
        "scales": [int(s) for s in f.scales], "max_side": int(f.max_side),
        "scale_choice": "one scale: all windows; several: per window the scale whose factor^2 * area (original "
                        "pixels) is closest to 224^2, ties to the first; call the head once per scale",
        "pyramid": [int(n) for n in f.pyramid],
        "context": float(f.context or 0.0), "context_pyramid": [int(n) for n in f.context_pyramid],
        "conv5_rounding": f.cache_dtype,
        "feature_dim": int(model.feature_dim),
        "svm_features": model.svm_features,
        "svm_feature_scale": float(model.svms.scale),
        "bbox_reg": model.bbox_reg is not None,
        "bbox_reg_feature_scale": float(model.bbox_reg.scale) if model.bbox_reg is not None else None,
        "head": {
            "inputs": {"fmap": "the backbone's Tensor[1, C, h, w] at one scale",
                       "windows": "Tensor[N, 4] (x1, y1, x2, y2) in original-image pixels, 0-based continuous",
                       "factor": "float, that scale's resize factor"},
            "outputs": {"scores": "Tensor[N, K] float32 SVM margins",
                        "boxes": "Tensor[N, K, 4] float32 per-class boxes in original-image pixels, not clipped"},
            "methods": {"pool": "(fmap, windows, factor) -> Tensor[N, D] pooled features",
                        "score": "(pooled) -> scores", "regress": "(pooled, windows) -> boxes"},
            "load": "import torchvision before torch.jit.load (registers roi_pool)",
        },
        "test": {"nms": float(t.nms), "max_per_image": int(t.max_per_image), "score_threshold": t.score_threshold,
                 "box_voting": t.box_voting, "flip": bool(t.flip)},
        "proposals": {"method": "selective search (OpenCV ximgproc), not exported", **(proposals or {})},
        "not_exported": ["proposals", "resizing", "per-window scale choice", "flip averaging",
                         "clipping, NMS, box voting"],
    }


def _onnx_available() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("--format onnx needs the onnx package (pip install onnx); TorchScript export works "
                          "without it (--format torchscript)") from None


def _export_onnx(backbone: Backbone, model: SPPDetector, out: Path) -> None:
    """ONNX files of the backbone and the head (TorchScript-based exporter, dynamic sizes)."""
    x = torch.zeros(1, 3, 64, 96)
    bb = copy.deepcopy(backbone).cpu().eval()
    with torch.no_grad():
        fmap = bb(x)
    with atomic_path(out / FILES["backbone_onnx"]) as tmp:
        torch.onnx.export(bb, (x,), str(tmp), input_names=["image"], output_names=["fmap"], dynamo=False,
                          dynamic_axes={"image": {2: "H", 3: "W"}, "fmap": {2: "h", 3: "w"}}, opset_version=17)
    head = ExportedHead(model).eval()
    windows = torch.tensor([[0.0, 0.0, 60.0, 40.0], [10.0, 5.0, 30.0, 35.0]], dtype=torch.float64)
    factor = torch.tensor(1.0, dtype=torch.float64)

    class _Head(nn.Module):       # ONNX takes tensors only: the factor is a 0-d float64 tensor
        def __init__(self, h: ExportedHead) -> None:
            super().__init__()
            self.h = h

        def forward(self, fmap: torch.Tensor, windows: torch.Tensor, factor: torch.Tensor):
            pooled = self.h.pool(fmap, windows * factor, 1.0)
            return self.h.score(pooled), self.h.regress(pooled, windows)

    with atomic_path(out / FILES["head_onnx"]) as tmp:
        torch.onnx.export(_Head(head), (fmap, windows, factor), str(tmp), dynamo=False, opset_version=17,
                          input_names=["fmap", "windows", "factor"], output_names=["scores", "boxes"],
                          dynamic_axes={"fmap": {2: "h", 3: "w"}, "windows": {0: "N"}, "scores": {0: "N"},
                                        "boxes": {0: "N"}})


def export_detector(model: SPPDetector, out_dir: str | Path, *, checkpoint: str | Path = "",
                    fmt: str = "torchscript", proposals: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the exported networks and ``export.json`` into ``out_dir``.

    Args:
        model: the detector (its networks are copied to the CPU; ``model`` is not changed).
        out_dir: the output folder (created; files of the names in :data:`FILES` are replaced).
        checkpoint: the source file (recorded in ``export.json``; never overwritten).
        fmt: ``torchscript``, ``onnx`` or ``all``.
        proposals: proposal settings to record (preset, max_boxes).

    Returns:
        ``{"backbone", "head", ..., "meta"}`` -> written paths.

    Raises:
        ExportError: unknown format, R-CNN mode, ``onnx`` missing, an output file that is the
            checkpoint, or a backbone TorchScript cannot express.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose torchscript, onnx or all")
    out = Path(out_dir)
    want_ts, want_onnx = fmt in ("torchscript", "all"), fmt in ("onnx", "all")
    names = ["meta"] + (["backbone", "head"] if want_ts else []) + (["backbone_onnx", "head_onnx"] if want_onnx else [])
    if checkpoint:
        ck = Path(checkpoint).resolve()
        for k in names:
            if (out / FILES[k]).resolve() == ck:
                raise ExportError(f"{out / FILES[k]}: is the checkpoint being exported; choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if want_onnx:
        _onnx_available()
    head = build_head(model)
    backbone = build_backbone_module(model.backbone) if want_ts else None
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if want_ts:
        for key, mod in (("backbone", backbone), ("head", head)):
            with atomic_path(out / FILES[key]) as tmp:
                mod.save(str(tmp))
            written[key] = out / FILES[key]
    if want_onnx:
        try:
            _export_onnx(model.backbone, model, out)
        except ExportError:
            raise
        except Exception as e:      # an operator the exporter cannot express, an onnx version problem, ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{out}: ONNX export failed ({reason[:200]})"
                              + ("; the TorchScript files are written" if want_ts else "")) from None
        written["backbone_onnx"] = out / FILES["backbone_onnx"]
        written["head_onnx"] = out / FILES["head_onnx"]
    meta = metadata(model, checkpoint=checkpoint, proposals=proposals,
                    files={k: p.name for k, p in written.items()})
    atomic_write_text(out / FILES["meta"], json.dumps(meta, indent=1) + "\n")
    written["meta"] = out / FILES["meta"]
    log.info("exported %s to %s", ", ".join(p.name for p in written.values()), out)
    return written


__all__ = ["ExportedHead", "ExportError", "build_head", "build_backbone_module", "metadata", "export_detector",
           "FILES", "FORMATS"]
