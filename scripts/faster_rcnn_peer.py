#!/usr/bin/env python
"""A Faster R-CNN peer for sppdet: torchvision's ``FasterRCNN`` on sppdet's own ImageNet-pretrained
EfficientNet-Lite0 (stride 16, the packaged weights, offline), trained end to end for a wall-clock
budget and scored with sppdet's own VOC07 evaluator (the results files and code ``sppdet eval``
uses: same difficult handling, same mAP).

    python scripts/faster_rcnn_peer.py --data ../shared/data/voc2007_sub --minutes 45 --out runs/frcnn

prints one JSON line on stdout::

    {"mAP": 0.xx, "per_class": {"<class>": 0.xx, ...}, "train_s": ..., "iterations": ...,
     "test_s_per_image": ...}

and writes, only under ``--out``: ``results/comp4_det_<split>_<class>.txt`` (score them again with
``sppdet evaluate --data ROOT --split S --results OUT/results``), ``result.json`` (the JSON line plus
the settings), ``error_breakdown.json`` (sppdet.evaluation.errors) and, with ``--save``, ``model.pt``.

Settings for a CPU (flags change them): shorter image side 600 (longer <= 1000), one stride-16
map with anchors of 32..512 px and ratios 0.5/1/2, RPN 256 anchors per image, 2000 -> 1000
proposals in training and 1000 -> 300 at test time, 128 RoIs per image (25% foreground), RoIAlign
7x7, two fc layers of 1024, batch 2, SGD momentum 0.9, weight decay 1e-4, lr 0.01 after a linear
warm-up and divided by 10 after 75% of the budget, horizontal flip; Lite0's BatchNorm statistics
and affine parameters frozen (batches of 1-2 images), its stem and first three blocks frozen;
difficult objects left out of training, as py-faster-rcnn does.  Test-time NMS 0.3, at most 100
detections per image with score >= 0.001.

On 20-class VOC data use ``--freeze-blocks 16 --lr 0.0025`` (all of Lite0 frozen, as sppdet keeps
its conv layers, and a learning rate for batches of 2): on voc2007_sub it reached mAP 0.466 in 30.7
CPU minutes; ``--freeze-blocks 16`` at lr 0.01 0.317, the defaults 0.068 in 40 (docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

# the checkout's sppdet, also when another copy is installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

log = logging.getLogger("faster_rcnn_peer")


class Lite0Body(nn.Module):
    """sppdet's Lite0 (``build_backbone("lite0")``) as a torchvision detection backbone: normalised
    images Tensor[B, 3, H, W] -> Tensor[B, 320, ceil(H/16), ceil(W/16)]; ``out_channels`` = 320.

    BatchNorm stays in eval mode (its running statistics are used and not updated; sppdet's
    Lite0 then folds it into the convolutions) and its affine parameters are frozen, as
    torchvision's FrozenBatchNorm2d does for ResNets; the stem and the first ``freeze_blocks``
    blocks are frozen altogether.
    """

    def __init__(self, freeze_blocks: int = 3, weights: str | None = None) -> None:
        super().__init__()
        from sppdet.models.backbones import build_backbone

        self.net = build_backbone("lite0", weights)
        self.out_channels = self.net.out_channels
        self.stride = self.net.stride
        frozen = [self.net._conv_stem, self.net._bn0, *self.net._blocks[:freeze_blocks]]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)
        for m in self.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)
        # the classifier part of the ImageNet network is not used for detection
        for m in (self.net._conv_head, self.net._bn1, self.net._fc):
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()                     # BatchNorm statistics frozen
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(num_classes: int, args) -> nn.Module:
    """torchvision's FasterRCNN with :class:`Lite0Body`; ``num_classes`` foreground classes."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    body = Lite0Body(args.freeze_blocks)
    mean, std = list(body.net.mean), list(body.net.std)
    anchors = AnchorGenerator(sizes=(tuple(args.anchor_sizes),), aspect_ratios=((0.5, 1.0, 2.0),))
    roi = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        body, num_classes=num_classes + 1, min_size=args.min_size, max_size=args.max_size,
        image_mean=mean, image_std=std, rpn_anchor_generator=anchors, box_roi_pool=roi,
        rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=300,
        rpn_batch_size_per_image=256, box_batch_size_per_image=128, box_positive_fraction=0.25,
        box_score_thresh=0.001, box_nms_thresh=args.test_nms, box_detections_per_img=100)


def image_tensor(path, device) -> torch.Tensor:
    """RGB image file -> Tensor[3, H, W] float in [0, 1] (normalisation is the model's)."""
    from sppdet.data.images import load_image

    arr = load_image(path)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0).to(device)


def training_sample(rec, flip: bool, device):
    """(image, target) of a training record; difficult objects left out; mirrored when ``flip``."""
    from sppdet.boxes import flip_boxes

    img = image_tensor(rec.path, device)
    keep = ~rec.difficult
    boxes = np.asarray(rec.boxes[keep], dtype=np.float32).reshape(-1, 4)
    if flip:
        img = img.flip(-1)
        boxes = flip_boxes(boxes, img.shape[-1])
    labels = torch.as_tensor(rec.labels[keep] + 1, dtype=torch.int64)      # 0 is background
    return img, {"boxes": torch.as_tensor(boxes, dtype=torch.float32).to(device), "labels": labels.to(device)}


def lr_factor(it: int, progress: float, args) -> float:
    """Linear warm-up from 0.001 over ``warmup_iters``, then 1, then 0.1 once ``progress`` (the
    share of the budget used) reaches ``decay_at``."""
    f = 0.1 if progress >= args.decay_at else 1.0
    if it < args.warmup_iters:
        a = it / max(args.warmup_iters, 1)
        f *= 0.001 * (1 - a) + a
    return f


def train(model: nn.Module, records, args, device) -> tuple[float, int, list[float]]:
    """SGD for ``args.minutes`` of wall clock (or ``args.max_iterations``); returns (seconds,
    iterations, the mean loss of every 20 iterations)."""
    from sppdet.utils.progress import progress as bar

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    budget = args.minutes * 60.0 if args.minutes else math.inf
    limit = args.max_iterations or math.inf
    if not math.isfinite(budget) and not math.isfinite(limit):
        raise SystemExit("faster_rcnn_peer: give --minutes M or --max-iterations N")
    usable = [r for r in records if (~r.difficult).any()] or list(records)
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    it, losses, curve = 0, [], []
    total = int(limit) if math.isfinite(limit) else None
    pbar = bar(total=total, desc="faster r-cnn", unit="it")
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget or it >= limit:
            break
        frac = max(elapsed / budget if math.isfinite(budget) else 0.0, it / limit if math.isfinite(limit) else 0.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(it, frac, args)
        imgs, targets = [], []
        for _ in range(args.batch_size):
            if not order:
                order = list(rng.permutation(len(usable)))
            img, tgt = training_sample(usable[order.pop()], bool(rng.random() < 0.5), device)
            imgs.append(img)
            targets.append(tgt)
        loss_dict = model(imgs, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise SystemExit(f"faster_rcnn_peer: non-finite loss at iteration {it}: "
                             + ", ".join(f"{k} {float(v):.4g}" for k, v in loss_dict.items()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        opt.step()
        it += 1
        losses.append(float(loss.detach()))
        pbar.update(1)
        if it % 20 == 0:
            curve.append(float(np.mean(losses[-20:])))
            log.info("iteration %d: loss %.3f (mean of 20; last: %s), lr %.4g, %.0f s", it, curve[-1],
                     ", ".join(f"{k.replace('loss_', '')} {float(v):.3f}" for k, v in loss_dict.items()),
                     opt.param_groups[0]["lr"], time.perf_counter() - t0)
    pbar.close()
    return time.perf_counter() - t0, it, curve


@torch.inference_mode()
def detect(model: nn.Module, dataset, device) -> tuple[dict, float]:
    """image id -> {"boxes" [M, 4] original pixels, "scores" [M], "labels" [M] 0-based}; seconds."""
    from sppdet.utils.progress import progress as bar

    model.eval()
    out = {}
    t0 = time.perf_counter()
    for rec in bar(dataset.records, desc="test", unit="img"):
        o = model([image_tensor(rec.path, device)])[0]
        out[rec.image_id] = {"boxes": o["boxes"].cpu().numpy().astype(np.float64),
                             "scores": o["scores"].cpu().numpy().astype(np.float64),
                             "labels": o["labels"].cpu().numpy().astype(np.int64) - 1}
    return out, time.perf_counter() - t0


def load_splits(root, train_split: str, test_split: str):
    """(training split, test split) with one class list: VOC's 20 when every class of both splits is
    a VOC class, else the sorted names found in either (sppdet's own discovery, over both splits)."""
    from sppdet.data import load_dataset
    from sppdet.data.records import VOC_CLASSES

    found = set(load_dataset(root, train_split).classes) | set(load_dataset(root, test_split).classes)
    classes = list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)
    return load_dataset(root, train_split, classes=classes), load_dataset(root, test_split, classes=classes)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="ROOT", help="VOC-format dataset root")
    p.add_argument("--out", required=True, metavar="DIR", help="everything is written here (only here)")
    p.add_argument("--train-split", default="trainval")
    p.add_argument("--test-split", default="test")
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget")
    p.add_argument("--max-iterations", type=int, default=None, help="stop after this many iterations")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--min-size", type=int, default=600, help="shorter image side (default 600)")
    p.add_argument("--max-size", type=int, default=1000, help="longer image side at most (default 1000)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--decay-at", type=float, default=0.75, help="lr / 10 after this share of the budget")
    p.add_argument("--clip-grad", type=float, default=10.0,
                   help="clip the gradient's norm to this (0: off; default 10, a guard against early spikes)")
    p.add_argument("--anchor-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--freeze-blocks", type=int, default=3, help="Lite0 blocks frozen after the stem")
    p.add_argument("--test-nms", type=float, default=0.3)
    p.add_argument("--test-limit", type=int, default=None, help="score the first N test images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true", help="also write OUT/model.pt")
    args = p.parse_args(argv)
    if args.minutes is None and args.max_iterations is None:
        p.error("give --minutes M (wall-clock budget) or --max-iterations N")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from sppdet.data.records import Dataset
    from sppdet.errors import SppdetError
    from sppdet.evaluation.errors import error_breakdown_from_results
    from sppdet.evaluation.voc import evaluate_voc_results, write_voc_results

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out = Path(args.out).expanduser()
    try:
        train_set, test_set = load_splits(args.data, args.train_split, args.test_split)
    except SppdetError as e:
        print(f"faster_rcnn_peer: error: {e}", file=sys.stderr)
        return 2
    if args.test_limit:
        test_set = Dataset(test_set.name, test_set.split, test_set.classes, test_set.records[: args.test_limit],
                           test_set.root)
    log.info("%s: %d training images (%s), %d test images (%s), %d classes", args.data, len(train_set),
             args.train_split, len(test_set), args.test_split, len(train_set.classes))
    model = build_model(len(train_set.classes), args).to(device)
    train_s, iterations, curve = train(model, train_set.records, args, device)
    log.info("trained %d iterations in %.0f s", iterations, train_s)
    dets, test_s = detect(model, test_set, device)
    results = out / "results"
    write_voc_results(results, test_set.split, test_set.classes,
                      {r.image_id: dets[r.image_id] for r in test_set.records})
    ev = evaluate_voc_results(test_set, results, "voc07")
    res = ev.to_json()
    line = {"mAP": res["mAP"], "per_class": res["ap"], "train_s": round(train_s, 1), "iterations": iterations,
            "test_s_per_image": round(test_s / max(len(test_set), 1), 4)}
    from sppdet.utils.io import atomic_write_text

    errors = error_breakdown_from_results(test_set, results)
    log.info("%s", errors.summary())
    atomic_write_text(out / "error_breakdown.json", json.dumps(errors.to_json(), indent=1) + "\n")
    settings = {k: v for k, v in vars(args).items()}
    atomic_write_text(out / "result.json", json.dumps({**line, "npos": res.get("npos"), "loss_curve": curve,
                                                       "settings": settings}, indent=1) + "\n")
    if args.save:
        torch.save({"classes": train_set.classes, "state_dict": model.state_dict(), "settings": settings},
                   out / "model.pt")
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
