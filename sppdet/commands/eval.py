"""``sppdet eval``: detect on a split with a checkpoint and score it."""

from __future__ import annotations

import json

from .common import add_runtime_options, add_test_overrides, test_overrides_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="detect on a split with a trained checkpoint and score it",
        description="Runs the detector over a split (proposals and conv5 maps cached and reused), writes "
                    "VOC results files comp4_det_<split>_<class>.txt, scores them with the devkit-exact "
                    "evaluator (the same code as `sppdet evaluate`) and prints the per-class AP table. "
                    "Beside the VOC files it writes the same detections as COCO results, coco_det_<split>.json "
                    "([{image_id, category_id, bbox: [x, y, w, h], score}], for pycocotools' COCO.loadRes), "
                    "and coco_gt_<split>.json: the split as a COCO instances file (images with file_name and "
                    "sppdet_image_id, categories, ground truth) that those ids refer to. COCO-format data keeps "
                    "its own image and category ids; other data numbers images 1, 2, ... in split order and "
                    "classes 1, 2, ... in class order. bbox = [x1, y1, x2 - x1, y2 - y1] of sppdet's 0-based "
                    "continuous pixel boxes. Under torchrun (torchrun --nproc_per_node=N -m sppdet eval ...) proposals, "
                    "conv5 maps and detection are sharded over the ranks and rank 0 alone writes and scores the "
                    "results files: the same files and mAP as one process (docs/DISTRIBUTED.md).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="model.pt written by sppdet train")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset root")
    p.add_argument("--split", default="test", metavar="S", help="split to evaluate (default: test)")
    p.add_argument("--metric", default="voc07", choices=("voc07", "voc12", "coco"))
    p.add_argument("--results", default=None, metavar="DIR",
                   help="where to write the results files (default: REPORT/results with --report, else "
                        "they are scored in a temporary folder and not kept)")
    p.add_argument("--report", default=None, metavar="DIR", help="write an HTML report into DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-bbox-reg", action="store_true", help="score the proposals without box regression")
    p.add_argument("--format", default=None, choices=("voc", "coco"), help="dataset format (default: as trained)")
    p.add_argument("--annotations", default=None, metavar="JSON", help="COCO instances file (--format coco)")
    add_runtime_options(p)
    add_test_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval_checkpoint import evaluate_checkpoint
    from ..evaluation.voc import format_ap_table

    ev = evaluate_checkpoint(args.checkpoint, args.data, args.split, metric=args.metric,
                             results_dir=args.results, report_dir=args.report, device=args.device or "auto",
                             cache_dir=args.cache, use_bbox_reg=not args.no_bbox_reg, data_format=args.format,
                             annotations=args.annotations, workers=args.workers,
                             test_overrides=test_overrides_from_args(args))
    if args.json:
        out = ev.result.to_json()
        out.update({"results": str(ev.results_dir) if ev.results_dir else None, "images": len(ev.detections),
                    "seconds_per_image": ev.timings.get("per_image", {})})
        if ev.report:
            out["report"] = str(ev.report)
        if ev.errors:
            out["errors"] = ev.errors
        print(json.dumps(out))
    else:
        print(format_ap_table(ev.result, list(ev.result.ap)))
        print(f"results files: {ev.results_dir}" if ev.results_dir else
              "results files: not kept (pass --results DIR to keep them)")
        per = ev.timings.get("per_image", {})
        if per:
            print("seconds per image: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
        if ev.errors and ev.errors["overall"]["fp"]:
            o = ev.errors["overall"]
            shares = ", ".join(f"{k} {v:.0%}" for k, v in o["fractions"].items() if v is not None)
            fixed = o.get("mAP_loc_fixed")
            print(f"top-ranked false positives ({o['fp']}): {shares}"
                  + (f"; mAP with localisation errors fixed {fixed:.4f}" if fixed is not None else ""))
        if ev.report:
            print(f"report: {ev.report}")
    return 0
