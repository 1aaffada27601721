"""Evaluation: devkit-exact VOC AP (voc07 / voc12), COCO metrics (pycocotools), PR plots.

Public API::

    VOCEvaluator(dataset, metric="voc07", iou=0.5)      .reset() / .process(...) / .evaluate()
    evaluate_voc_results(dataset, results_dir, metric="voc07", *, classes=None) -> EvalResult
    write_voc_results(out_dir, split, classes, detections) -> list[Path]
    read_voc_results(results_dir, split, classes, *, allow_missing=False, image_ids=None) -> dict
    evaluate_coco(dataset, detections, classes=None) -> EvalResult        (sppdet.evaluation.coco)
    plot_pr_curves(result, out_dir) -> list[Path]                         (sppdet.evaluation.plots)
    format_ap_table(result, classes=None) -> str
    error_breakdown_from_detections(dataset, detections, classes, metric=...)  (sppdet.evaluation.errors)
    voc_ap(rec, prec, metric), eval_class(...), matlab_colon(a, d, b)     (the devkit's pieces)

See :mod:`sppdet.evaluation.voc` for how the MATLAB devkit is reproduced.
"""

from .voc import (
    ELEVEN_POINTS,
    METRICS,
    ClassResult,
    EvalResult,
    ResultsError,
    VOCEvaluator,
    eval_class,
    evaluate_detections,
    evaluate_voc_results,
    format_ap_table,
    matlab_colon,
    read_results_file,
    read_voc_results,
    voc_ap,
    write_voc_results,
)

__all__ = [
    "ELEVEN_POINTS", "METRICS", "ClassResult", "EvalResult", "ResultsError", "VOCEvaluator", "eval_class",
    "evaluate_detections", "evaluate_voc_results", "format_ap_table", "matlab_colon", "read_results_file",
    "read_voc_results", "voc_ap", "write_voc_results",
]
