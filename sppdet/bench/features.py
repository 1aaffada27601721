"""``sppdet bench features``: SPP mode vs R-CNN mode, the pooling kernel, memory and disk.

Four measurements, all in one process (the memory one in a fresh child):

1. **Pooling** (``--pool-map C,H,W``, default the ZF-5 map of a ~688x917 image):
   2000 random windows pooled by ``torchvision.ops.roi_pool`` at every pyramid
   level (the baseline) and by sppdet's exact CPU path, on a float32 map and on
   the float16 map the cache stores; the methods alternate within each of
   ``--repeat`` rounds and the speed-up is the median of the per-round ratios.
   Outputs are compared for bit equality.
2. **Per image** (``--images`` images of ``--data/--split``, ``--windows`` windows
   each from selective search, topped up with random windows): SPP mode (conv
   pass + pooling, timed separately, no disk cache) before and after R-CNN mode
   (crop-warp-forward of every window) on the same image, windows and backbone;
   the ratio divides R-CNN seconds by the mean of the two SPP runs.  The
   baseline pooling (roi_pool) of the same windows on the same map is timed too.
3. **Peak memory** of extracting one image at ``--memory-scale`` (1200) in a
   fresh process: the RSS high-water mark (``VmHWM``, reset just before) during
   the extraction against the RSS before it (backbone built, image decoded).
4. **Disk**: conv5 maps (float16) of ``--disk-split`` against one float32 feature
   per window (``windows x D x 4`` bytes).

Run it on a quiet machine; the figures it printed for docs/FEATURES.md are
recorded there with the command line and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SppdetError


# ---------------------------------------------------------------------------
# helpers


def _levels(text: str) -> tuple[int, ...]:
    try:
        lv = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        lv = ()
    if not lv or any(v <= 0 for v in lv):
        raise SppdetError(f"--pyramid {text!r}: expected positive integers like 4,2,1")
    return lv


def random_cells(rng: np.random.Generator, n: int, H: int, W: int) -> torch.Tensor:
    """Windows on a map: uniform first corner, uniform extent to the map's edge (inclusive cells)."""
    x1 = rng.integers(0, W, n)
    y1 = rng.integers(0, H, n)
    x2 = np.minimum(x1 + rng.integers(0, W, n), W - 1)
    y2 = np.minimum(y1 + rng.integers(0, H, n), H - 1)
    return torch.from_numpy(np.stack([x1, y1, x2, y2], 1).astype(np.int64))


def random_windows(rng: np.random.Generator, n: int, width: int, height: int, min_size: float = 16.0) -> np.ndarray:
    """Random image windows (continuous coords) at least ``min_size`` px (or the image) on a side."""
    ms = min(min_size, width, height)
    w = rng.uniform(ms, width, n)
    h = rng.uniform(ms, height, n)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)


def _median(v: list[float]) -> float:
    return float(statistics.median(v)) if v else float("nan")


# ---------------------------------------------------------------------------
# 1. pooling


def bench_pooling(C: int, H: int, W: int, n: int, levels: tuple[int, ...], repeat: int, seed: int) -> dict[str, Any]:
    """roi_pool (per level) vs sppdet's CPU pooling on float32 and float16 maps, interleaved."""
    from ..models.spp import spp_pool

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    fmap = torch.relu(torch.randn(C, H, W, generator=gen))
    f16 = fmap.half()
    cells = random_cells(rng, n, H, W)
    t: dict[str, list[float]] = {"roi_pool": [], "sppdet_f32": [], "sppdet_f16": []}
    ratios32, ratios16 = [], []
    same32 = same16 = True
    for r in range(max(1, repeat)):
        t0 = time.perf_counter()
        base = spp_pool(fmap, cells, levels, impl="roi_pool")
        t1 = time.perf_counter()
        ours = spp_pool(fmap, cells, levels, impl="numpy")
        t2 = time.perf_counter()
        ours16 = spp_pool(f16, cells, levels, impl="numpy")
        t3 = time.perf_counter()
        t["roi_pool"].append(t1 - t0)
        t["sppdet_f32"].append(t2 - t1)
        t["sppdet_f16"].append(t3 - t2)
        ratios32.append((t1 - t0) / (t2 - t1))
        ratios16.append((t1 - t0) / (t3 - t2))
        if r == 0:
            same32 = bool(torch.equal(base, ours))
            same16 = bool(torch.equal(spp_pool(f16.float(), cells, levels, impl="roi_pool"), ours16.float()))
    return {"map": [C, H, W], "windows": n, "levels": list(levels), "rounds": max(1, repeat),
            "seconds_median": {k: _median(v) for k, v in t.items()},
            "speedup_f32_median": _median(ratios32), "speedup_f16_median": _median(ratios16),
            "speedup_f32_min": min(ratios32), "speedup_f16_min": min(ratios16),
            "identical_f32": same32, "identical_f16": same16}


# ---------------------------------------------------------------------------
# 2. per image


def _windows_for(image: np.ndarray, n: int, source: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    H, W = image.shape[:2]
    ss = 0
    if source == "ss":
        from ..proposals.selective_search import selective_search

        boxes = selective_search(image, "fast", n)
        ss = len(boxes)
        if len(boxes) < n:
            boxes = np.concatenate([boxes, random_windows(rng, n - len(boxes), W, H)])
    else:
        boxes = random_windows(rng, n, W, H)
    return boxes[:n].astype(np.float32), ss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spp_once(ex, image: np.ndarray, boxes: np.ndarray) -> tuple[float, float, list]:
    _sync(ex.device)
    t0 = time.perf_counter()
    maps = ex.conv_maps(None, image)                 # no id, array: computed, not cached
    _sync(ex.device)
    t1 = time.perf_counter()
    with torch.no_grad():
        ex.pooled(maps, boxes, image.shape[1])
    _sync(ex.device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, maps


def bench_images(bb, records, *, scale: int, max_side: int, levels, n_windows: int, source: str,
                 rcnn: bool, rcnn_windows: int, rcnn_batch: int, device: str, seed: int,
                 log=print) -> dict[str, Any]:
    """SPP (before and after) and R-CNN mode on the same image, windows and backbone."""
    from ..data.images import load_image
    from ..features import FeatureExtractor
    from ..models.spp import project_windows, spp_pool

    rng = np.random.default_rng(seed)
    common = dict(scales=(scale,), max_side=max_side, pyramid=levels, device=device, cache_dir=None,
                  memory_cache=0)
    spp_ex = FeatureExtractor(bb, **common)
    rcnn_ex = FeatureExtractor(bb, mode="rcnn", rcnn_batch=rcnn_batch, **common)
    # warm-up: first-call allocations and kernel selection are not part of either mode
    warm = load_image(records[0].path)
    _spp_once(spp_ex, warm, random_windows(rng, 16, warm.shape[1], warm.shape[0]))
    rcnn_ex.features((None, warm), random_windows(rng, 4, warm.shape[1], warm.shape[0]))
    rows = []
    for rec in records:
        image = load_image(rec.path)
        boxes, n_ss = _windows_for(image, n_windows, source, rng)
        conv_a, pool_a, maps = _spp_once(spp_ex, image, boxes)
        f, m = maps[0]
        cells = project_windows(boxes.astype(np.float64) * f, bb.stride, m.shape[1], m.shape[2], bb.center_offset)
        mf = m.float()
        _sync(spp_ex.device)
        t0 = time.perf_counter()
        spp_pool(mf, cells, levels, impl="roi_pool")
        _sync(spp_ex.device)
        roi = time.perf_counter() - t0
        row = {"image": rec.image_id, "size": [int(image.shape[1]), int(image.shape[0])],
               "map": list(m.shape), "windows": len(boxes), "selective_search_windows": n_ss,
               "spp_conv_s": [conv_a], "spp_pool_s": [pool_a], "roi_pool_baseline_s": roi}
        log(f"{rec.image_id}: SPP conv {conv_a:.3f} s, pool {pool_a:.4f} s (roi_pool {roi:.3f} s)")
        if rcnn:
            k = len(boxes) if rcnn_windows <= 0 else min(rcnn_windows, len(boxes))
            t0 = time.perf_counter()
            rcnn_ex.features((None, image), boxes[:k])
            _sync(rcnn_ex.device)
            secs = time.perf_counter() - t0
            row["rcnn_windows_run"] = k
            row["rcnn_s"] = secs * len(boxes) / k
            row["rcnn_extrapolated"] = k < len(boxes)
            log(f"{rec.image_id}: R-CNN {secs:.1f} s for {k} windows")
            conv_b, pool_b, _ = _spp_once(spp_ex, image, boxes)
            row["spp_conv_s"].append(conv_b)
            row["spp_pool_s"].append(pool_b)
            log(f"{rec.image_id}: SPP again conv {conv_b:.3f} s, pool {pool_b:.4f} s")
        spp_total = float(np.mean(np.add(row["spp_conv_s"], row["spp_pool_s"])))
        row["spp_total_s"] = spp_total
        if rcnn:
            row["speedup"] = row["rcnn_s"] / spp_total
            row["speedup_with_roi_pool"] = row["rcnn_s"] / (float(np.mean(row["spp_conv_s"])) + roi)
        rows.append(row)
    out: dict[str, Any] = {"backbone": bb.name, "scale": scale, "windows": n_windows, "windows_from": source,
                           "images": rows,
                           "spp_conv_s_per_image": float(np.mean([np.mean(r["spp_conv_s"]) for r in rows])),
                           "spp_pool_s_per_image": float(np.mean([np.mean(r["spp_pool_s"]) for r in rows])),
                           "spp_total_s_per_image": float(np.mean([r["spp_total_s"] for r in rows])),
                           "roi_pool_baseline_s_per_image": float(np.mean([r["roi_pool_baseline_s"] for r in rows]))}
    if rcnn:
        out["rcnn_s_per_image"] = float(np.mean([r["rcnn_s"] for r in rows]))
        out["speedup"] = out["rcnn_s_per_image"] / out["spp_total_s_per_image"]
        out["speedup_min_image"] = float(min(r["speedup"] for r in rows))
        out["speedup_with_roi_pool"] = float(np.mean([r["speedup_with_roi_pool"] for r in rows]))
    return out


# ---------------------------------------------------------------------------
# 3. peak memory (fresh process)


def _status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _memory_child(q, backbone: str, weights: str | None, path: str, scale: int, max_side: int, threads: int) -> None:
    import logging

    logging.disable(logging.WARNING)
    if threads > 0:
        torch.set_num_threads(threads)
    from ..data.images import load_image
    from ..features import FeatureExtractor
    from ..models.backbones import build_backbone

    bb = build_backbone(backbone, weights)
    image = load_image(path)
    ex = FeatureExtractor(bb, scales=(scale,), max_side=max_side, cache_dir=None, memory_cache=0)
    # ru_maxrss survives fork+exec on Linux (it would report the parent's peak): use the
    # current mm's high-water mark VmHWM, reset just before the extraction
    before = _status_mib("VmRSS")
    exact = before is not None and _reset_peak()
    if not exact:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (f, m), = ex.conv_maps(None, image)
    after = _status_mib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put({"image_size": [int(image.shape[1]), int(image.shape[0])],
           "input_size": [int(round(image.shape[1] * f)), int(round(image.shape[0] * f))],
           "map": list(m.shape), "rss_before_mib": before, "peak_rss_mib": after,
           "extraction_peak_increase_mib": after - before,
           "method": "VmHWM after clear_refs" if exact else "ru_maxrss (upper bound)"})


def bench_memory(backbone: str, weights: str | None, path: str, scale: int, max_side: int,
                 threads: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(q, backbone, weights, str(path), scale, max_side, threads))
    p.start()
    try:
        res = q.get(timeout=900)
    finally:
        p.join(timeout=60)
    res["scale"] = scale
    res["max_side"] = max_side
    return res


# ---------------------------------------------------------------------------
# 4. disk


def bench_disk(bb, dataset, *, scale: int, max_side: int, levels, n_windows: int, device: str) -> dict[str, Any]:
    from ..features import FeatureExtractor

    with tempfile.TemporaryDirectory(prefix="sppdet-bench-") as tmp:
        ex = FeatureExtractor(bb, scales=(scale,), max_side=max_side, pyramid=levels, device=device,
                              cache_dir=Path(tmp), memory_cache=0)
        ex.precompute(dataset, progress=True)
        rep = ex.disk_report(dataset, n_windows)
    per_img = rep["conv5_cache_bytes"] / max(rep["images"], 1)
    # the paper's set: VOC 2007 trainval + test = 5011 + 4952 images
    rep["voc07_estimate_conv5_gb"] = per_img * 9963 / 1e9
    rep["voc07_estimate_per_window_gb"] = 9963 * n_windows * rep["feature_dim"] * 4 / 1e9
    rep["scale"] = scale
    return rep


# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    levels = _levels(args.pyramid)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        C, H, W = (int(v) for v in args.pool_map.split(","))
    except ValueError:
        raise SppdetError(f"--pool-map {args.pool_map!r}: expected C,H,W like 256,43,57") from None
    say = (lambda *a: None) if args.json else (lambda msg: print(msg, flush=True))
    load = os.getloadavg()
    result: dict[str, Any] = {"load_average_start": [round(v, 2) for v in load], "threads": torch.get_num_threads(),
                              "cpus": os.cpu_count()}
    say(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads {torch.get_num_threads()}")

    pool = bench_pooling(C, H, W, args.windows, levels, args.repeat, args.seed)
    result["pooling"] = pool
    s = pool["seconds_median"]
    say(f"\npooling {args.windows} windows on a {C}x{H}x{W} map, levels {levels}, {pool['rounds']} rounds (median):")
    say(f"  roi_pool (baseline)    {s['roi_pool']:.4f} s")
    say(f"  sppdet float32 map     {s['sppdet_f32']:.4f} s   x{pool['speedup_f32_median']:.1f} "
        f"(min x{pool['speedup_f32_min']:.1f})  identical: {pool['identical_f32']}")
    say(f"  sppdet float16 map     {s['sppdet_f16']:.4f} s   x{pool['speedup_f16_median']:.1f} "
        f"(min x{pool['speedup_f16_min']:.1f})  identical: {pool['identical_f16']}")

    if not args.pool_only:
        if not args.data:
            raise SppdetError("--data: needed for the per-image benchmark (or use --pool-only)")
        from ..data.voc import load_voc
        from ..models.backbones import build_backbone

        ds = load_voc(args.data, args.split)
        if len(ds) == 0:
            raise SppdetError(f"{args.data}: split {args.split!r} has no images")
        from ..utils.device import resolve_device

        bb = build_backbone(args.backbone, args.weights)
        device = str(resolve_device(args.device))
        recs = ds.records[:max(1, args.images)]
        per = bench_images(bb, recs, scale=args.scale, max_side=args.max_side, levels=levels,
                           n_windows=args.windows, source=args.windows_from, rcnn=not args.no_rcnn,
                           rcnn_windows=args.rcnn_windows, rcnn_batch=args.rcnn_batch, device=device,
                           seed=args.seed, log=say)
        result["per_image"] = per
        say(f"\nper image ({bb.name}, s={args.scale}, {args.windows} windows from {args.windows_from}, "
            f"{len(recs)} image(s)):")
        say(f"  SPP conv               {per['spp_conv_s_per_image']:.3f} s")
        say(f"  SPP pooling            {per['spp_pool_s_per_image']:.4f} s  (roi_pool would take "
            f"{per['roi_pool_baseline_s_per_image']:.3f} s)")
        say(f"  SPP total              {per['spp_total_s_per_image']:.3f} s")
        if "rcnn_s_per_image" in per:
            extra = " (extrapolated)" if any(r.get("rcnn_extrapolated") for r in per["images"]) else ""
            say(f"  R-CNN mode             {per['rcnn_s_per_image']:.1f} s{extra}")
            say(f"  speed-up SPP vs R-CNN  x{per['speedup']:.0f} (worst image x{per['speedup_min_image']:.0f}; "
                f"with roi_pool pooling x{per['speedup_with_roi_pool']:.0f})")
        if args.memory_scale > 0:
            mem = bench_memory(args.backbone, args.weights, str(recs[0].path), args.memory_scale, args.max_side,
                               args.threads)
            result["memory"] = mem
            say(f"\npeak memory, one image at s={args.memory_scale} ({mem['input_size'][0]}x{mem['input_size'][1]} "
                f"input, map {mem['map']}): +{mem['extraction_peak_increase_mib']:.0f} MiB over "
                f"{mem['rss_before_mib']:.0f} MiB (peak RSS {mem['peak_rss_mib']:.0f} MiB)")
        if not args.no_disk:
            dsplit = args.disk_split or args.split
            dds = ds if dsplit == args.split else load_voc(args.data, dsplit)
            if args.disk_limit > 0:
                dds.records = dds.records[:args.disk_limit]
            disk = bench_disk(bb, dds, scale=args.scale, max_side=args.max_side, levels=levels,
                              n_windows=args.windows, device=device)
            result["disk"] = disk
            say(f"\ndisk, {disk['images']} images of {dsplit} at s={args.scale}: conv5 maps (float16) "
                f"{disk['conv5_cache_bytes'] / 2**20:.1f} MiB vs per-window features "
                f"{disk['per_window_bytes'] / 2**20:.0f} MiB ({args.windows} x {disk['feature_dim']} x 4 B per image): "
                f"x{disk['ratio']:.0f}; VOC07 trainval+test estimate {disk['voc07_estimate_conv5_gb']:.1f} GB vs "
                f"{disk['voc07_estimate_per_window_gb']:.0f} GB")
    load = os.getloadavg()
    result["load_average_end"] = [round(v, 2) for v in load]
    say(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    return 0
