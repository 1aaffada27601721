"""``sppdet eval``: detect on a split with a trained checkpoint, write VOC results files, score them.

The scores are computed from the results files as written (the same code
path as ``sppdet evaluate``), so both commands print the same mAP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .data import load_dataset
from .data.records import Dataset
from .detect import Detections, Detector
from .evaluation.voc import EvalResult, evaluate_voc_results, read_voc_results, write_voc_results

log = logging.getLogger(__name__)


@dataclass
class CheckpointEvaluation:
    result: EvalResult
    dataset: Dataset
    detections: dict[str, Detections]
    results_dir: Path
    report: Path | None = None
    timings: dict[str, Any] = field(default_factory=dict)


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, split: str, *, metric: str = "voc07",
                        results_dir: str | Path | None = None, report_dir: str | Path | None = None,
                        device: str = "auto", cache_dir: str | Path | None = None, use_bbox_reg: bool = True,
                        data_format: str | None = None, annotations: str | None = None,
                        workers: int | None = None, show_progress: bool = True,
                        report_examples: int = 8,
                        test_overrides: dict[str, Any] | None = None) -> CheckpointEvaluation:
    """Detect on ``split`` of ``data_root`` and score the detections.

    Args:
        checkpoint: ``model.pt`` from ``sppdet train``.
        metric: ``voc07`` | ``voc12`` | ``coco``.
        results_dir: where the ``comp4_det_<split>_<class>.txt`` files go
            (default: ``<checkpoint folder>/results/<split>``).
        report_dir: also write an HTML report there.
        use_bbox_reg: apply the box regressors (False: score the raw proposals).
        test_overrides: changes to the checkpoint's ``test`` settings (``{"nms": 0.2}``).
    """
    det = Detector.from_checkpoint(checkpoint, device=device, cache_dir=cache_dir, test_overrides=test_overrides)
    det.use_bbox_reg = use_bbox_reg and det.bbox_reg is not None
    fmt = data_format or det.cfg.data.format
    ann = annotations or det.cfg.data.coco_annotations.get(split)
    ds = load_dataset(data_root, split, format=fmt, classes=det.classes, coco_annotations=ann,
                      skip_bad_images=det.cfg.data.skip_bad_images)
    t = time.perf_counter()
    dets = det.detect_dataset(ds, workers=workers, show_progress=show_progress)
    t_detect = time.perf_counter() - t
    out = Path(results_dir) if results_dir else Path(checkpoint).resolve().parent / "results" / split
    write_voc_results(out, split, det.classes, {i: dets[i] for i in (r.image_id for r in ds) if i in dets})
    if metric == "coco":
        from .evaluation.coco import evaluate_coco, voc_results_to_detections

        raw = read_voc_results(out, split, det.classes, image_ids=[r.image_id for r in ds])
        result = evaluate_coco(ds, voc_results_to_detections(raw, det.classes))
    else:
        result = evaluate_voc_results(ds, out, metric)
    timings = {"detect_seconds": round(t_detect, 3), "images": len(dets),
               "per_image": {k: round(v, 4) for k, v in det.timer.per_image().items()}}
    log.info("%s/%s: mAP %.4f (%s) over %d images, %.2f s per image", ds.root, split, result.mAP, metric,
             len(dets), t_detect / max(len(dets), 1))
    ev = CheckpointEvaluation(result, ds, dets, out, None, timings)
    if report_dir:
        ev.report = write_eval_report(ev, det, Path(report_dir), checkpoint, report_examples)
    return ev


def write_eval_report(ev: CheckpointEvaluation, det: Detector, out: Path, checkpoint, n_examples: int) -> Path:
    """HTML report (:func:`sppdet.report.write_eval_report`): figures, AP table, PR curves, drawn
    detections vs ground truth, proposal recall, timings, config."""
    from .checkpoint import load_checkpoint
    from .proposals import compute_proposals, get_preset
    from .report import write_eval_report as write

    # the proposals the detector scored: the store detect_dataset used, read back from the cache
    preset = get_preset(det.cfg.proposals.mode, **det.cfg.proposals.overrides)
    store = compute_proposals(ev.dataset, preset, det.cfg.proposals.max_boxes, workers=det.cfg.proposals.workers,
                              cache_dir=det.cache_dir, skip_bad_images=True, progress=False)
    stats = load_checkpoint(checkpoint).get("stats", {})
    facts = {"checkpoint": str(checkpoint), "data": str(ev.dataset.root), "split": ev.dataset.split,
             "images": len(ev.dataset), "backbone": det.cfg.features.backbone,
             "mode": det.cfg.features.mode, "box regression": "on" if det.use_bbox_reg else "off",
             "results files": str(ev.results_dir)}
    facts.update({k: f"{v:.4f}" for k, v in ev.result.extra.items()})
    return write(out, result=ev.result, dataset=ev.dataset, detections=ev.detections, classes=det.classes,
                 title=f"sppdet evaluation: {det.cfg.name} on {ev.dataset.split}", facts=facts,
                 train_stats=stats, test_per_image=ev.timings.get("per_image", {}), proposals=store,
                 config_yaml=det.cfg.to_yaml(), n_examples=n_examples)
