"""Same bits whatever the number of threads: Lite0's conv5 maps and fc-layer training.

The demo's figures are promised to 4 decimals on any load and thread count; these
tests pin the two places where the thread count used to leak into the last bits
(oneDNN's 1x1 convolutions, MKL's matrix products without strict reproducibility).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sppdet  # noqa: F401  (sets MKL_CBWR before the first matrix product)
from sppdet.models.backbones import build_backbone
from sppdet.models.efficientnet_lite import pointwise_conv


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_matches_conv2d(channels_last, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 7, 9, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 24, 1, 1, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64) if bias else None
    ref = torch.empty(2, 40, 7, 9, dtype=torch.float64)          # slow reference: per pixel
    for n in range(2):
        for i in range(7):
            for j in range(9):
                v = w[:, :, 0, 0] @ x[n, :, i, j]
                ref[n, :, i, j] = v + b if b is not None else v
    out = pointwise_conv(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, F.conv2d(x, w, b), rtol=1e-12, atol=1e-12)


def test_pointwise_conv_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pointwise_conv, (x, w, b))


def test_lite0_conv5_same_bits_for_1_and_2_threads(restore_threads):
    bb = build_backbone("lite0", "random").eval()
    img = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    x = bb.preprocess(img)[None].contiguous(memory_format=torch.channels_last)
    out = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        with torch.no_grad():
            out[t] = bb(x).contiguous()
    assert out[1].abs().sum() > 0
    assert torch.equal(out[1], out[2])


def test_fc_training_same_bits_for_1_and_2_threads(restore_threads):
    def train(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(2048, 256), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 6))
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            x = torch.randn(128, 2048, generator=g).abs()
            y = torch.randint(0, 6, (128,), generator=g)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(train(1), train(2))
