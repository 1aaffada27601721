"""Evaluation: devkit-exact VOC AP (voc07 / voc12), COCO metrics, PR plots.

See :mod:`sppdet.evaluation.voc` for how the MATLAB devkit is reproduced.
"""

from .voc import (
    METRICS,
    ClassResult,
    EvalResult,
    ResultsError,
    VOCEvaluator,
    eval_class,
    evaluate_detections,
    evaluate_voc_results,
    format_ap_table,
    read_voc_results,
    voc_ap,
    write_voc_results,
)

__all__ = [
    "METRICS", "ClassResult", "EvalResult", "ResultsError", "VOCEvaluator", "eval_class",
    "evaluate_detections", "evaluate_voc_results", "format_ap_table", "read_voc_results", "voc_ap",
    "write_voc_results",
]
