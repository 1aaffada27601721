"""``sppdet bench proposals``: speed, boxes and recall of each selective-search preset.

Every image is processed by every preset in one process with one OpenCV
thread, the presets interleaved (the order rotates from image to image), so
the ratios between presets hold even when the machine's load changes during
the run.  Reported per preset: wall and CPU seconds per image (one core),
the ratio to OpenCV's stock fast mode, boxes per image, recall at IoU 0.5
and 0.7 and AR (IoU 0.5:0.95), with all boxes and with the first 500.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from ..errors import SppdetError

#: Name of OpenCV's untouched ``switchToSelectiveSearchFast`` in the table.
STOCK = "opencv-stock-fast"


def run(args: argparse.Namespace) -> int:
    import cv2

    from ..data.images import load_image
    from ..proposals.presets import get_preset, parse_override
    from ..proposals.recall import compute_recall, plot_recall
    from ..proposals.runner import load_splits
    from ..proposals.selective_search import opencv_selective_search, selective_search
    from ..utils.progress import progress

    names = [s.strip() for s in args.presets.split(",") if s.strip()]
    presets = {n: get_preset(n) for n in names}
    for text in args.variant:
        words = text.split()
        if len(words) < 2:
            raise SppdetError(f"--variant {text!r}: expected 'LABEL BASE KEY=VALUE ...'")
        label, base, *sets = words
        presets[label] = get_preset(base, **dict(parse_override(t) for t in sets))
        names.append(label)
    dataset = load_splits(args.data, args.split)
    records = dataset.records[: args.limit] if args.limit and args.limit > 0 else dataset.records
    if args.shard:
        from ..proposals.store import parse_shard

        si, sn = parse_shard(args.shard)
        records = records[si - 1::sn]
    if not records:
        raise SppdetError(f"--data {args.data} --split {args.split}: no images")
    methods = ([] if args.no_stock else [STOCK]) + names
    cv2.setNumThreads(1)
    import torch  # noqa: F401  (imported by the ranking step on first use: import it outside the timing)
    import torchvision  # noqa: F401

    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    boxes: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    load0 = os.getloadavg()
    cache = None
    if args.run_cache:
        from ..proposals.store import image_key
        from ..proposals.tuning import STOCK_FAST_RUN, RunCache, selective_search_cached

        cache = RunCache(args.run_cache)
    for i, rec in enumerate(progress(records, desc="bench proposals", unit="img")):
        if cache is not None:
            decoded: list[np.ndarray] = []

            def image() -> np.ndarray:
                if not decoded:
                    decoded.append(load_image(rec.path))
                return decoded[0]

            key = image_key(rec)
            for m in methods:
                if m == STOCK:
                    b, sec = cache.get(key, image, STOCK_FAST_RUN)
                else:
                    b, sec = selective_search_cached(cache, key, image, rec.width, rec.height, presets[m],
                                                     args.max_boxes)
                wall[m].append(float("nan"))
                cpu[m].append(sec)
                boxes[m][rec.image_id] = b
            continue
        image = load_image(rec.path)
        for j in range(len(methods)):
            m = methods[(i + j) % len(methods)]
            t0, c0 = time.perf_counter(), time.process_time()
            if m == STOCK:
                b = opencv_selective_search(image, "fast")
            else:
                b = selective_search(image, presets[m], args.max_boxes)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
            boxes[m][rec.image_id] = b
    load1 = os.getloadavg()
    sub = type(dataset)(name=dataset.name, split=dataset.split, classes=dataset.classes,
                        records=list(records), root=dataset.root)
    results = {m: compute_recall(sub, boxes[m]) for m in methods}
    ref = STOCK if STOCK in methods else methods[0]
    rows = []
    for m in methods:
        r = results[m]
        rows.append({
            "preset": m,
            "key": presets[m].key() if m in presets else None,
            "runs": presets[m].num_runs if m in presets else 12,
            "s_per_img_wall": float(np.mean(wall[m])),
            "s_per_img_cpu": float(np.mean(cpu[m])),
            "time_ratio_vs_" + ref: float(np.sum(cpu[m]) / max(np.sum(cpu[ref]), 1e-12)),
            "boxes_per_img": r.mean_boxes,
            "recall@0.5": r.recall_50,
            "recall@0.7": r.recall_70,
            "AR": r.average_recall,
            "recall@0.5_first500": r.recall_at(0.5, 500),
            "AR_first500": float(r.recall_at_k[list(r.max_boxes_list).index(500)].mean()),
            "AR_first100": float(r.recall_at_k[list(r.max_boxes_list).index(100)].mean()),
        })
    plots = [str(p) for p in plot_recall(results, args.plots)] if args.plots else []
    info = {"dataset": f"{dataset.name}/{dataset.split}", "images": len(records),
            "objects": results[methods[0]].num_gt, "max_boxes": args.max_boxes,
            "opencv": cv2.__version__, "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
            "timing": "estimated from cached runs" if cache is not None else "measured, interleaved"}
    if cache is not None:
        info["run_cache"] = {"dir": str(args.run_cache), "computed": cache.computed, "reused": cache.reused}
    if args.json:
        print(json.dumps({"benchmark": "proposals", **info, "results": rows, "plots": plots}))
        return 0
    print(f"# {info['dataset']}: {info['images']} images, {info['objects']} objects (difficult excluded), "
          f"max_boxes {args.max_boxes}, OpenCV {info['opencv']}, one thread, presets interleaved")
    print(f"# load average before {load0[0]:.2f}, after {load1[0]:.2f} ({os.cpu_count()} cores)")
    if cache is not None:
        print(f"# TIMES ESTIMATED from the run cache {args.run_cache} ({cache.computed} runs computed, "
              f"{cache.reused} reused): CPU s = sum of each preset's runs; no wall time")
    head = (f"| preset | runs | s/img/core (wall) | s/img/core (CPU) | CPU vs {ref} | boxes/img | "
            f"recall@0.5 | recall@0.7 | AR | recall@0.5 first 500 | AR first 100 |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(f"| {r['preset']} | {r['runs']} | {r['s_per_img_wall']:.3f} | {r['s_per_img_cpu']:.3f} | "
              f"{r['time_ratio_vs_' + ref]:.2f} | {r['boxes_per_img']:.0f} | {r['recall@0.5']:.3f} | "
              f"{r['recall@0.7']:.3f} | {r['AR']:.3f} | {r['recall@0.5_first500']:.3f} | "
              f"{r['AR_first100']:.3f} |")
    for p in plots:
        print(f"plot: {p}")
    return 0
