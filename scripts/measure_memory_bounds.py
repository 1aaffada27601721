"""Peak memory of the three stages of issue 14 item 3 on a synthetic stream of N images.

    PYTHONPATH=. SPPDET_PROGRESS=0 nice -n 19 python scripts/measure_memory_bounds.py 100 400

Prints, per N, tracemalloc peaks (numpy allocations are traced) of: box-regression pairs held
all then concatenated (the former stage) vs the capped stream; the SVM negative caches with no
budget vs a small one (largest ``cache_bytes`` seen); the training windows' stored arrays in
the former dense layout vs the compact one.
"""

from __future__ import annotations

import sys
import tracemalloc

import numpy as np

from sppdet.data.records import ImageRecord
from sppdet.train.bbox_reg import select_regression_pairs, train_bbox_regressors, train_bbox_regressors_on_windows
from sppdet.train.svm import HardNegativeMiner, SVMParams, WindowSet
from sppdet.train.windows import build_windows

K, D, PROPS = 20, 1024, 2000


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        g = int(rng.integers(1, 4))
        xy = rng.uniform(0, 300, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(40, 150, (g, 2))], 1).astype(np.float32)
        rec = ImageRecord(f"i{i}", f"i{i}.jpg", 500, 500, gt, rng.integers(0, K, g))
        wh = np.concatenate([gt[:, 2:] - gt[:, :2]] * 2, 1)
        j = rng.integers(0, g, 60)
        props = np.concatenate([gt[j] + rng.normal(0, 0.08, (len(j), 4)) * wh[j], rng.uniform(0, 450, (PROPS - len(j), 4))])
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
        out.append(build_windows(i, rec, props.astype(np.float32), K))
    return out


def feature_fn(i, idx, flip):
    rng = np.random.default_rng([int(i), 7])
    table = rng.random((PROPS + 4, D), dtype=np.float32)
    return table[np.asarray(idx)]


def peak(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    p = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return p / 2 ** 20


def bbox_old(ws):
    parts = []
    for w in ws:
        is_prop = np.flatnonzero(w.gt_labels < 0)
        idx, tb, lab = select_regression_pairs(w.boxes[is_prop], w.record.boxes, w.record.labels, 0.6)
        if len(idx):
            win = is_prop[idx]
            parts.append((feature_fn(w.index, win, False).astype(np.float32), w.boxes[win], tb, lab))
    npairs = sum(len(p[3]) for p in parts)
    train_bbox_regressors(*[np.concatenate([p[i] for p in parts]) for i in range(4)], K, lam=1000.0)
    return npairs


def main(ns):
    for n in ns:
        ws = images(n)
        npairs = [0]
        a = peak(lambda: npairs.__setitem__(0, bbox_old(ws)))
        b = peak(lambda: train_bbox_regressors_on_windows(feature_fn, ws, K, max_pairs_per_class=200, progress=False))
        print(f"N={n}: bbox-reg {npairs[0]} pairs, D={D}: all held {a:.1f} MiB, cap 200/class {b:.1f} MiB")
        # SVM caches: 3 classes, 256-d random features, every proposal a candidate negative
        rng = np.random.default_rng(1)
        sets = []
        for i in range(n):
            f = rng.normal(size=(202, 256)).astype(np.float32)     # negatives like the positives:
            iou = np.zeros((202, 3), np.float32)                    # they stay hard, the caches grow
            iou[0, 0] = iou[1, 1] = 1
            sets.append(WindowSet(f, np.array([0, 1] + [-1] * 200), iou))
        for gb in (0.0, 2 / 1024):
            m = HardNegativeMiner(3, SVMParams(cache_memory_gb=gb, retrain_images=10), 1.25, n)
            for s in sets:
                m.add_positives(s)
            most = 0
            for i, s in enumerate(sets):
                m.mine_image(i, s)
                most = max(most, m.cache_bytes())
            print(f"N={n}: svm caches, budget {'none' if not gb else f'{gb * 1024:.0f} MiB'}: "
                  f"largest {most / 2 ** 20:.2f} MiB")
        dense = sum(len(w) * (16 + 8 + 4 * K + 4 + 8 + 8) for w in ws)
        compact = sum(w.nbytes for w in ws)
        print(f"N={n}: windows ({PROPS} proposals a image, K={K}): dense {dense / 2 ** 20:.2f} MiB "
              f"({dense / sum(map(len, ws)):.0f} B/window), compact {compact / 2 ** 20:.2f} MiB "
              f"({compact / sum(map(len, ws)):.1f} B/window)")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 400])
