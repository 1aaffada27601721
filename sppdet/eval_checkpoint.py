"""``sppdet eval``: detect on a split with a trained checkpoint, write VOC results files, score them.

The scores are computed from the results files as written (the same code
path as ``sppdet evaluate``), so both commands print the same mAP.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build import eval_dataset
from .data.records import Dataset
from .detect import Detections, Detector
from .features.cache_admin import check_conv5_space
from .evaluation.voc import EvalResult, evaluate_voc_results, read_voc_results, write_voc_results

log = logging.getLogger(__name__)


@dataclass
class CheckpointEvaluation:
    result: EvalResult
    dataset: Dataset
    detections: dict[str, Detections]
    results_dir: Path | None
    report: Path | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    #: the false-positive breakdown (:mod:`sppdet.evaluation.errors`, VOC metrics only), as JSON
    errors: dict[str, Any] | None = None


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
        results_dir: where the ``comp4_det_<split>_<class>.txt`` files (and the same detections as
            COCO results, ``coco_det_<split>.json``, with their ids in ``coco_gt_<split>.json``) go; default: ``<report_dir>/results``
            with a report, else a temporary folder removed after scoring (``results_dir`` of the
            returned evaluation is then ``None``).  Nothing is written next to the checkpoint.
        report_dir: also write an HTML report there.
        cache_dir: proposals and conv5 maps (default ``$SPPDET_CACHE``, else ``~/.cache/sppdet``;
            never the cache folder the checkpoint records).
        use_bbox_reg: apply the box regressors (False: score the raw proposals).
        test_overrides: changes to the checkpoint's ``test`` settings (``{"nms": 0.2}``).

    Under a process group (torchrun) this is collective: every rank calls it with the same
    arguments.  Proposals, conv5 maps and detection are sharded over the ranks
    (:meth:`Detector.detect_dataset`) and the detections gathered on rank 0, which alone
    writes the results files and the report and scores them -- the same files and scores
    as one process.  Every rank returns the scores (the other ranks without the PR
    curves, and with only their own images' detections); an error on any rank is raised
    on all of them.
    """
    from .errors import SppdetError
    from .utils import dist

    det = Detector.from_checkpoint(checkpoint, device=device, cache_dir=cache_dir, test_overrides=test_overrides)
    det.use_bbox_reg = use_bbox_reg and det.model.bbox_reg is not None
    ds = eval_dataset(det.config, data_root, split, det.classes, data_format=data_format, annotations=annotations)
    check_conv5_space(det.extractor, ds, (False, True) if det.model.test.flip else (False,))
    t = time.perf_counter()
    store = det.dataset_proposals(ds, workers=workers, show_progress=show_progress)
    dets = det.detect_dataset(ds, workers=workers, show_progress=show_progress, proposals=store)
    t_detect = time.perf_counter() - t
    out = None
    if results_dir is not None or report_dir is not None:
        out = Path(results_dir).expanduser() if results_dir is not None else Path(report_dir).expanduser() / "results"

    def score_and_report() -> CheckpointEvaluation:
        if out is None:
            with tempfile.TemporaryDirectory(prefix="sppdet-results-") as tmp:
                result = _score(det, ds, dets, Path(tmp), split, metric)
        else:
            result = _score(det, ds, dets, out, split, metric)
        timings = {"detect_seconds": round(t_detect, 3), "images": len(dets),
                   "per_image": {k: round(v, 4) for k, v in det.timer.per_image().items()}}
        log.info("%s/%s: mAP %.4f (%s) over %d images, %.2f s per image", ds.root, split, result.mAP, metric,
                 len(dets), t_detect / max(len(dets), 1))
        ev = CheckpointEvaluation(result, ds, dets, out, None, timings)
        b = None
        if metric in ("voc07", "voc12"):
            from .evaluation.errors import error_breakdown_from_detections

            b = error_breakdown_from_detections(ds, dets, det.classes, metric=metric)
            log.info("%s", b.summary())
            ev.errors = b.to_json()
        if report_dir:
            ev.report = write_eval_report(ev, det, Path(report_dir).expanduser(), checkpoint, report_examples,
                                          proposals=store, breakdown=b)
        return ev

    if dist.get_world_size() <= 1:
        return score_and_report()
    # torchrun: every rank detected its share and rank 0 holds all the detections now; rank 0
    # alone writes the results files, scores them and writes the report, the others wait
    ev: CheckpointEvaluation | None = None
    err: BaseException | None = None
    if dist.is_main():
        try:
            ev = score_and_report()
        except SppdetError as e:
            err = e
    dist.raise_if_any(err)
    # the scores (without the PR curves), the timings and the report's path on every rank
    shared = dist.broadcast_object((_without_curves(ev.result), ev.timings, ev.report, ev.errors)
                                   if ev is not None else None)
    if ev is not None:
        return ev
    light, timings, report, errors = shared
    return CheckpointEvaluation(light, ds, dets, out, report, timings, errors)


def _without_curves(result: EvalResult) -> EvalResult:
    """``result`` with its per-class PR curves dropped (AP and object counts kept): small to send."""
    import numpy as np

    from .evaluation.voc import ClassResult

    empty = np.zeros(0)
    return EvalResult(result.metric, result.mAP, dict(result.ap),
                      {c: ClassResult(r.ap, empty, empty, r.npos) for c, r in result.per_class.items()},
                      dict(result.extra), result.curve)


def coco_results_names(split: str) -> tuple[str, str]:
    """The COCO results file and its index (images, categories, ground truth) ``eval`` writes."""
    return f"coco_det_{split}.json", f"coco_gt_{split}.json"


def _score(det: Detector, ds: Dataset, dets: dict[str, Detections], out: Path, split: str,
           metric: str) -> EvalResult:
    """Write the results files into ``out`` and score them as written (as ``sppdet evaluate`` does).

    Beside the VOC files go the same detections as a COCO results JSON and its index
    (:func:`sppdet.evaluation.coco.write_coco_results`; names: :func:`coco_results_names`).
    """
    from .evaluation.coco import write_coco_results

    ordered = {i: dets[i] for i in (r.image_id for r in ds) if i in dets}
    write_voc_results(out, split, det.classes, ordered)
    res_name, idx_name = coco_results_names(split)
    write_coco_results(out, ds, ordered, results_name=res_name, index_name=idx_name)
    if metric == "coco":
        from .evaluation.coco import evaluate_coco, voc_results_to_detections

        raw = read_voc_results(out, split, det.classes, image_ids=[r.image_id for r in ds])
        result = evaluate_coco(ds, voc_results_to_detections(raw, det.classes))
    else:
        result = evaluate_voc_results(ds, out, metric)
    return result


def write_eval_report(ev: CheckpointEvaluation, det: Detector, out: Path, checkpoint, n_examples: int,
                      proposals: Any = None, breakdown: Any = None) -> Path:
    """HTML report (:func:`sppdet.report.write_eval_report`): figures, AP table, PR curves, drawn
    detections vs ground truth, proposal recall, timings, config.

    ``proposals``: the store the detector scored (default: read back from the cache, which is
    collective under a process group -- pass it when only rank 0 writes the report).
    """
    from .report import write_eval_report as write

    store = proposals
    if store is None:   # the proposals the detector scored: the store detect_dataset used, from the cache
        from .proposals import compute_proposals

        store = compute_proposals(ev.dataset, det.preset, det.max_boxes, workers=det.workers,
                                  cache_dir=det.cache_dir, skip_bad_images=True, progress=False)
    stats = det.model.stats
    facts = {"checkpoint": str(checkpoint), "data": str(ev.dataset.root), "split": ev.dataset.split,
             "images": len(ev.dataset), "backbone": det.model.features.backbone,
             "mode": det.model.features.mode, "box regression": "on" if det.use_bbox_reg else "off",
             "results files": str(ev.results_dir)}
    facts.update({k: f"{v:.4f}" for k, v in ev.result.extra.items()})
    return write(out, result=ev.result, dataset=ev.dataset, detections=ev.detections, classes=det.classes,
                 title=f"sppdet evaluation: {det.config.name} on {ev.dataset.split}", facts=facts,
                 train_stats=stats, test_per_image=ev.timings.get("per_image", {}), proposals=store,
                 config_yaml=det.config.to_yaml(), n_examples=n_examples, breakdown=breakdown)
