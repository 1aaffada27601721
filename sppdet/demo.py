"""The demo: synthetic data -> train -> evaluate -> detect -> report, all under one folder.

Re-running reuses what is done: the dataset is regenerated only when missing
or damaged, training stages are skipped when their outputs exist, proposals
and conv5 maps come from the demo's cache folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import config_from_sets

log = logging.getLogger(__name__)

#: Synthetic images for the demo when --images is not given ...
DEMO_IMAGES = 400
#: ... of which this fraction is the test split (150 of 400; 250 train).
DEMO_TEST_FRACTION = 0.375
#: Test images the demo runs `detect` on.
DEMO_DETECT_IMAGES = 4


def run_demo(out: Path, *, images: int | None = None, seed: int = 0, config: str = "demo_lite0",
             overrides: list[str] | None = None, device: str | None = None,
             workers: int | None = None) -> str:
    """Run the demo into ``out``; returns the summary printed by ``sppdet demo``."""
    from .data.synthetic import SYNTHETIC_CLASSES, make_synthetic
    from .detect import Detector, detect_images
    from .eval_checkpoint import evaluate_checkpoint
    from .train.pipeline import train

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the class list is the generator's: a small dataset may lack a class in one split
    base = {"cache_dir": str((out / "cache").resolve()), "data": {"classes": list(SYNTHETIC_CLASSES)}}
    cfg = config_from_sets(config, list(overrides or []), base=base, device=device, workers=workers)

    n = images or DEMO_IMAGES
    data = out / "data"
    log.info("demo 1/4: synthetic dataset (%d images) in %s", n, data)
    make_synthetic(data, num_images=n, seed=seed, test_fraction=DEMO_TEST_FRACTION)
    t_data = time.perf_counter() - t0

    log.info("demo 2/4: training %s", config)
    t = time.perf_counter()
    ckpt = train(cfg, out / "run", data_root=str(data))
    t_train = time.perf_counter() - t

    log.info("demo 3/4: evaluating on the test split")
    t = time.perf_counter()
    ev = evaluate_checkpoint(ckpt, data, cfg.data.test_split, metric="voc07", results_dir=out / "results",
                             report_dir=out / "report", device=device or cfg.device, cache_dir=cfg.cache_dir)
    t_eval = time.perf_counter() - t

    log.info("demo 4/4: detect on %d test images", DEMO_DETECT_IMAGES)
    t = time.perf_counter()
    test_ids = [r.path for r in ev.dataset.records[:DEMO_DETECT_IMAGES]]
    det = Detector.from_checkpoint(ckpt, device=device or cfg.device, cache_dir=cfg.cache_dir)
    n_det = sum(len(r) for _, r in detect_images(det, test_ids, out / "detections", threshold=0.0)
                if not isinstance(r, Exception))
    t_detect = time.perf_counter() - t
    total = time.perf_counter() - t0

    lines = [
        "",
        f"sppdet demo finished in {total / 60:.1f} min "
        f"(data {t_data:.0f} s, train {t_train:.0f} s, eval {t_eval:.0f} s, detect {t_detect:.0f} s)",
        f"test mAP (VOC07 11-point): {ev.result.mAP:.4f} on {len(ev.dataset)} images",
        "per-class AP: " + ", ".join(f"{c} {a:.3f}" for c, a in ev.result.ap.items()),
        f"dataset:     {data}",
        f"checkpoint:  {ckpt}",
        f"results:     {out / 'results'} (VOC comp4 files)",
        f"report:      {ev.report}",
        f"detections:  {out / 'detections'} ({n_det} boxes with score >= 0 on {len(test_ids)} images)",
        f"try:         sppdet detect --checkpoint {ckpt} {test_ids[0] if test_ids else 'IMAGE'}",
    ]
    return "\n".join(lines)
