"""``sppdet bench gpu``: the test path's seconds per image on one device, beside the paper's.

The paper (SPPnet, ECCV 2014, Table 9; ZF-5, one 2014 GPU): conv5 0.053 s/image at one scale
(s = 688) and 0.293 s at five, fc layers 0.089 s, so 0.142 s / 0.382 s per image after
proposals.  Measured here on ``--device`` (CUDA synchronised around every timing), with ZF-5 of
``random`` (He) weights -- speed does not depend on the values; nothing is downloaded -- on the
first ``--images`` images of ``--data/--split`` or on random images of ``--image-size``:

* ``conv5_1scale`` / ``conv5_5scales``: one backbone pass per scale (:meth:`FeatureExtractor.conv_maps`,
  nothing cached), resize included;
* ``spp_pool``: pooling ``--windows`` random windows from those maps (pyramid ``--pyramid``,
  default the paper's {6,3,2,1});
* ``fc7_svm``: fc6, fc7 (``--fc-dims``) and the 20 linear SVMs on those windows
  (:meth:`SPPDetector.score`);
* ``test_path_1scale`` / ``test_path_5scales``: :meth:`Detector.detect_item` on given windows --
  conv5, pooling, fc7, SVMs, box regression, NMS: everything after proposals.

Every figure is the median over the images of each image's mean over ``--repeat`` runs, after
one warm-up pass (cuDNN's algorithm choice and first allocations are not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import SppdetError

#: The paper's figures (seconds per image, ZF-5, 2014 GPU).
PAPER = {"conv5_1scale": 0.053, "conv5_5scales": 0.293, "fc7_svm": 0.089,
         "test_path_1scale": 0.053 + 0.089, "test_path_5scales": 0.293 + 0.089}
FIVE_SCALES = (480, 576, 688, 864, 1200)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> tuple[float, Any]:
    """Mean seconds of ``repeat`` calls of ``fn`` (synchronised), and its last result."""
    out = None
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(max(1, repeat)):
        out = fn()
    _sync(device)
    return (time.perf_counter() - t0) / max(1, repeat), out


def _images(args) -> list[tuple[str, np.ndarray]]:
    if args.data:
        from ..data.images import load_image
        from ..data.voc import load_voc

        ds = load_voc(args.data, args.split)
        return [(r.image_id, load_image(r.path)) for r in ds.records[:max(1, args.images)]]
    try:
        w, h = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise SppdetError(f"--image-size {args.image_size!r}: expected WxH, e.g. 500x375") from None
    rng = np.random.default_rng(args.seed)
    return [(f"random{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for i in range(max(1, args.images))]


def _levels(text: str) -> tuple[int, ...]:
    try:
        lv = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        lv = ()
    if not lv or any(v <= 0 for v in lv):
        raise SppdetError(f"{text!r}: expected positive integers like 6,3,2,1")
    return lv


def build_detector(device: torch.device, scales: tuple[int, ...], pyramid: tuple[int, ...], fc_dims: list[int],
                   num_classes: int, max_side: int, seed: int):
    """A ZF-5 detector with random weights: backbone (He init), fc head, SVMs, box regressors."""
    from ..config import FeatureConfig, TestConfig
    from ..detect import Detector
    from ..features import FeatureExtractor
    from ..models.backbones import build_backbone
    from ..models.bbox_reg import BBoxRegressors
    from ..models.detector import SPPDetector
    from ..models.heads import FCHead
    from ..models.svm import LinearSVMs
    from ..proposals.presets import get_preset

    torch.manual_seed(seed)
    bb = build_backbone("zf5", "random")
    ex = FeatureExtractor(bb, scales=scales, max_side=max_side, pyramid=pyramid, device=device, cache_dir=None,
                          memory_cache=0)
    D = ex.feature_dim
    head = FCHead(D, fc_dims, num_classes, 0.5).eval()
    rng = np.random.default_rng(seed)
    svms = LinearSVMs(rng.normal(0, 0.01, (head.out_dim, num_classes)).astype(np.float32),
                      np.zeros(num_classes, np.float32), 1.0)
    reg = BBoxRegressors.identity(num_classes, D)
    classes = [f"class{k}" for k in range(num_classes)]
    feats = FeatureConfig(backbone="zf5", weights="random", scales=list(scales), max_side=max_side,
                          pyramid=list(pyramid), flip=False)
    model = SPPDetector(classes=classes, backbone=bb, features=feats, svms=svms, head=head, bbox_reg=reg,
                        svm_features="fc7", test=TestConfig(), feature_dim=D, backbone_weights="random")
    model.to(device)
    det = Detector(model, ex, preset=get_preset("fast"), max_boxes=2000, workers=1,
                   cache_dir=Path(tempfile.gettempdir()), skip_bad_images=False)
    return det


def _random_windows(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    from .features import random_windows

    return random_windows(rng, n, width, height)


def measure(args) -> dict[str, Any]:
    from ..utils.device import resolve_device

    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pyramid = _levels(args.pyramid)
    five = _levels(args.scales)
    fc_dims = list(_levels(args.fc_dims))
    images = _images(args)
    rng = np.random.default_rng(args.seed)
    det1 = build_detector(device, (args.scale,), pyramid, fc_dims, args.classes, args.max_side, args.seed)
    det5 = build_detector(device, five, pyramid, fc_dims, args.classes, args.max_side, args.seed)
    rows = []
    with torch.no_grad():
        for k, (image_id, img) in enumerate(images):
            H, W = img.shape[:2]
            boxes = _random_windows(rng, args.windows, W, H)
            row: dict[str, Any] = {"image": image_id, "size": [W, H], "windows": len(boxes)}
            for name, det in (("1scale", det1), ("5scales", det5)):
                ex = det.extractor
                if k == 0:                                   # warm-up
                    maps = ex.conv_maps(None, img)
                    det.model.score(ex.pooled(maps, boxes, W))
                    det.detect_item((None, img), boxes, W, H)
                t_conv, maps = timed(lambda: ex.conv_maps(None, img), device, args.repeat)
                row[f"conv5_{name}"] = t_conv
                row[f"map_{name}"] = [list(m.shape) for _, m in maps]
                t_pool, pooled = timed(lambda: ex.pooled(maps, boxes, W), device, args.repeat)
                row[f"spp_pool_{name}"] = t_pool
                if name == "1scale":
                    row["fc7_svm"], _ = timed(lambda: det.model.score(pooled), device, args.repeat)
                row[f"test_path_{name}"], _ = timed(lambda: det.detect_item((None, img), boxes, W, H), device,
                                                    args.repeat)
            rows.append(row)
    keys = ["conv5_1scale", "conv5_5scales", "spp_pool_1scale", "spp_pool_5scales", "fc7_svm",
            "test_path_1scale", "test_path_5scales"]
    med = {k: float(statistics.median(r[k] for r in rows)) for k in keys}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": dev_name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "backbone": "zf5 (random He weights)", "scale": args.scale, "scales": list(five),
            "pyramid": list(pyramid), "fc_dims": fc_dims, "classes": args.classes, "windows": args.windows,
            "images": len(rows), "repeat": args.repeat, "data": args.data or f"random {args.image_size}",
            "seconds_per_image": med, "paper_seconds_per_image": PAPER,
            "ratio_to_paper": {k: med[k] / PAPER[k] for k in PAPER}, "per_image": rows,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def format_table(res: dict[str, Any]) -> str:
    s, paper = res["seconds_per_image"], res["paper_seconds_per_image"]
    lines = [f"device {res['device']} ({res['device_name']}), ZF-5 random weights, {res['windows']} windows, "
             f"pyramid {res['pyramid']}, fc {res['fc_dims']}, {res['images']} image(s) x {res['repeat']}",
             f"{'seconds per image':<36}{'measured':>10}{'paper (2014 GPU)':>18}{'x paper':>9}"]
    names = {"conv5_1scale": f"conv5, 1 scale (s={res['scale']})", "conv5_5scales": "conv5, 5 scales",
             "spp_pool_1scale": "SPP pooling, 1 scale", "spp_pool_5scales": "SPP pooling, 5 scales",
             "fc7_svm": "fc6 + fc7 + SVM scoring", "test_path_1scale": "test path after proposals, 1 scale",
             "test_path_5scales": "test path after proposals, 5 scales"}
    for k, label in names.items():
        p = paper.get(k)
        lines.append(f"{label:<36}{s[k]:>10.4f}{(f'{p:.3f}' if p else '-'):>18}"
                     f"{(f'{s[k] / p:.2f}' if p else '-'):>9}")
    lines.append("(paper totals after proposals = conv5 + fc: 0.142 s at 1 scale, 0.382 s at 5 scales)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    res = measure(args)
    if args.json:
        print(json.dumps(res, default=float))
    else:
        print(format_table(res))
    return 0
