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

There are no public PyTorch ZF-5 weights: the network is randomly
initialised (deterministically) unless a state_dict with these module names
is given (``conv1.weight``, ``conv1.bias``, ..., ``conv5.bias``).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone


class ZF5(Backbone):
    """ZF-5 up to relu5: Tensor[B, 3, H, W] -> Tensor[B, 256, ceil(H/16), ceil(W/16)]."""

    name = "zf5"
    out_channels = 256
    stride = 16
    center_offset = 0.5
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    #: receptive field of a conv5 cell, in input pixels
    receptive_field = 139

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=3)
        self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(96, 256, kernel_size=5, stride=2, padding=2)
        self.norm2 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.pool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(384, 256, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, 3, H, W] (normalised) -> relu5 map Tensor[B, 256, ceil(H/16), ceil(W/16)]."""
        x = self.pool1(self.norm1(self.relu(self.conv1(x))))
        x = self.pool2(self.norm2(self.relu(self.conv2(x))))
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        return self.relu(self.conv5(x))
