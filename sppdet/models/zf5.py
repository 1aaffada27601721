"""ZF-5: the five-layer network SPPnet's detection results use (He et al., Table 1).

Layers (ReLU after every convolution; LRN across 5 channels, alpha 1e-4,
beta 0.75, k 1 as in Caffe; LRN before pooling, in the order of the paper's
table):

=======  ===================  ======  =====================================
layer    filters              stride  padding (floor(p/2), the paper's rule)
=======  ===================  ======  =====================================
conv1    96 x 7x7             2       3
pool1    3x3 max (+LRN)       2       1
conv2    256 x 5x5            2       2
pool2    3x3 max (+LRN)       2       1
conv3    384 x 3x3            1       1
conv4    384 x 3x3            1       1
conv5    256 x 3x3            1       1
=======  ===================  ======  =====================================

Receptive-field arithmetic (J = cumulative stride, R = receptive field size,
c = pixel index of the centre of cell 0; a layer of kernel k, stride s,
padding p maps ``c -> c + ((k - 1)/2 - p) * J``, ``R -> R + (k - 1) * J``,
``J -> J * s``):

=======  ====  =====  ===
after    J     R      c
=======  ====  =====  ===
input    1     1      0
conv1    2     7      0
pool1    4     11     0
conv2    8     27     0
pool2    16    43     0
conv3    16    75     0
conv4    16    107    0
conv5    16    139    0
=======  ====  =====  ===

Every layer pads ``(k - 1) / 2``, so ``c`` stays 0: conv5 cell ``(i, j)`` is
centred on input pixel ``(16 i, 16 j)`` (0-based pixel indices), i.e. at
continuous coordinate ``16 i + 0.5`` -- ``center_offset = 0.5``, exactly the
geometry the paper's projection rule assumes.  Each stride-2 layer maps
``n`` to ``ceil(n / 2)`` cells, so the conv5 map of an ``H x W`` input is
``ceil(H/16) x ceil(W/16)`` (688 x 917 -> 43 x 58).

The ``zfnet`` layout (pytorchcv's ZFNet, the network of ``weights: imagenet``)
-----------------------------------------------------------------------------
The only public ImageNet-trained PyTorch weights of this architecture are
pytorchcv's ``zfnet`` (``sppdet weights fetch zf5``; docs/WEIGHTS.md).  It has
the same filters but other padding, pooling and LRN, so loading its weights
into the layout above would shift every receptive field and rescale every
activation.  ``ZF5(layout="zfnet")`` reproduces it exactly (the same module
names, so the same state_dict keys; ``name = "zf5-zfnet"``):

=======  ===================  ======  =========================================
layer    filters              stride  padding
=======  ===================  ======  =========================================
conv1    96 x 7x7 (+LRN)      2       1
pool1    3x3 max              2       0, ceil_mode (a partial last window)
conv2    256 x 5x5 (+LRN)     2       0
pool2    3x3 max              2       0, ceil_mode
conv3    384 x 3x3            1       1
conv4    384 x 3x3            1       1
conv5    256 x 3x3            1       1
=======  ===================  ======  =========================================

LRN there is ``F.local_response_norm(x, 5)`` with ``k = 2`` (alpha 1e-4, beta
0.75), after the ReLU and before the pool as above; ImageNet's pool5 (3x3/2,
ceil) of a 224 x 224 input's 13 x 13 conv5 map is 6 x 6 (fc6: 9216 inputs).
Receptive fields (same rule as above):

=======  ====  =====  ===
after    J     R      c
=======  ====  =====  ===
input    1     1      0
conv1    2     7      2
pool1    4     11     4
conv2    8     27     12
pool2    16    43     20
conv5    16    139    20
=======  ====  =====  ===

so conv5 cell ``i`` is centred on pixel ``16 i + 20``: ``center_offset =
20.5`` (the projection rule follows it).  The map of an ``H x W`` input has
``f(H) x f(W)`` cells with ``f(n) = g(floor((g(floor((n - 5) / 2) + 1) - 5) / 2)
+ 1)``, ``g(m) = ceil((m - 3) / 2) + 1`` (688 -> 42, 224 -> 13); inputs
smaller than 31 pixels have no conv5 cell.

Weights: random (deterministic) unless given; a state_dict with the module
names ``conv1.weight``, ``conv1.bias``, ..., ``conv5.bias`` loads into either
layout, and the files ``sppdet weights fetch zf5`` writes say which layout
they belong to (:mod:`sppdet.models.weights`).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone

#: Per layout: conv1/conv2 padding, pool padding and ceil_mode, LRN k, center_offset, backbone name.
LAYOUTS = {
    "paper": {"pad1": 3, "pad2": 2, "pool_pad": 1, "ceil": False, "lrn_k": 1.0, "center_offset": 0.5,
              "name": "zf5"},
    "zfnet": {"pad1": 1, "pad2": 0, "pool_pad": 0, "ceil": True, "lrn_k": 2.0, "center_offset": 20.5,
              "name": "zf5-zfnet"},
}


class ZF5(Backbone):
    """ZF-5 up to relu5: Tensor[B, 3, H, W] -> Tensor[B, 256, h, w].

    Args:
        layout: ``"paper"`` (``floor(p/2)`` padding; ``h = ceil(H/16)``) or
            ``"zfnet"`` (pytorchcv's ZFNet, whose ImageNet weights exist; see above).
    """

    name = "zf5"
    out_channels = 256
    stride = 16
    center_offset = 0.5
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    #: receptive field of a conv5 cell, in input pixels
    receptive_field = 139

    def __init__(self, layout: str = "paper") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"ZF5 layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        spec = LAYOUTS[layout]
        self.name = spec["name"]          # before Backbone.__init__, which derives arch_id from it
        super().__init__()
        self.layout = layout
        self.center_offset = float(spec["center_offset"])
        k = float(spec["lrn_k"])
        self.conv1 = nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=spec["pad1"])
        self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=k)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=spec["pool_pad"], ceil_mode=spec["ceil"])
        self.conv2 = nn.Conv2d(96, 256, kernel_size=5, stride=2, padding=spec["pad2"])
        self.norm2 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=k)
        self.pool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=spec["pool_pad"], ceil_mode=spec["ceil"])
        self.conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(384, 256, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, 3, H, W] (normalised) -> relu5 map Tensor[B, 256, h, w]."""
        x = self.pool1(self.norm1(self.relu(self.conv1(x))))
        x = self.pool2(self.norm2(self.relu(self.conv2(x))))
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        return self.relu(self.conv5(x))
