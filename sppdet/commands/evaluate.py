"""``sppdet evaluate``: score VOC results files from any detector."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score VOC results files (comp4_det_<split>_<class>.txt) from any detector",
        description="Reads comp4_det_<split>_<class>.txt files (lines '<image_id> <score> <xmin> <ymin> "
                    "<xmax> <ymax>', 1-based VOC coordinates) and scores them against a split exactly as "
                    "the official PASCAL VOC devkit does (voc07: 11-point AP; voc12: area under the "
                    "precision envelope), or with pycocotools (coco).")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset root (VOC layout, or COCO images)")
    p.add_argument("--split", required=True, metavar="S", help="split name (ImageSets/Main/<S>.txt)")
    p.add_argument("--results", required=True, metavar="DIR", help="folder with the results files")
    p.add_argument("--metric", default="voc07", choices=("voc07", "voc12", "coco"))
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class list (default: the 20 VOC classes when all names are VOC classes, "
                        "else the classes found in the annotations)")
    p.add_argument("--format", default="voc", choices=("voc", "coco"), help="dataset format")
    p.add_argument("--annotations", default=None, metavar="JSON", help="COCO instances file (--format coco)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PR-curve PNGs into DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import load_dataset
    from ..evaluation.voc import evaluate_voc_results, format_ap_table, read_voc_results

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    ds = load_dataset(args.data, args.split, format=args.format, classes=classes,
                      coco_annotations=args.annotations)
    if args.metric == "coco":
        from ..evaluation.coco import evaluate_coco
        from ..boxes import voc_to_internal
        import numpy as np

        raw = read_voc_results(args.results, args.split, ds.classes)
        dets: dict = {}
        for k, c in enumerate(ds.classes):
            ids, scores, boxes = raw[c]
            for iid, s, b in zip(ids, scores, boxes):
                d = dets.setdefault(iid, {"boxes": [], "scores": [], "labels": []})
                d["boxes"].append(voc_to_internal(*b))
                d["scores"].append(s)
                d["labels"].append(k)
        dets = {i: {k: np.asarray(v) for k, v in d.items()} for i, d in dets.items()}
        result = evaluate_coco(ds, dets)
    else:
        result = evaluate_voc_results(ds, args.results, args.metric)
    if args.plots and result.per_class:
        from ..evaluation.plots import plot_pr_curves

        plot_pr_curves(result, args.plots)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_ap_table(result, list(result.ap)))
        if args.plots and not result.per_class:
            print("(no PR plots for the coco metric)")
    return 0
