"""``sppdet evaluate``: score VOC results files (comp4_det_<split>_<class>.txt) from any detector."""

from __future__ import annotations

import json

from ..errors import SppdetError


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score VOC results files (comp4_det_<split>_<class>.txt) from any detector",
        description="Reads comp4_det_<split>_<class>.txt files (lines '<image_id> <score> <xmin> <ymin> "
                    "<xmax> <ymax>', 1-based VOC coordinates) and scores them against a split exactly as "
                    "the official PASCAL VOC devkit does (voc07: 11-point AP; voc12: area under the "
                    "precision envelope), or with pycocotools (coco: AP@[.5:.95], AP50, AP75, APs/m/l). "
                    "Classes without ground truth in the split are shown as '-' and left out of the mean.")
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="dataset root (VOC layout; with --format coco: the image folder)")
    p.add_argument("--split", required=True, metavar="S", help="split name (ImageSets/Main/<S>.txt)")
    p.add_argument("--results", required=True, metavar="DIR", help="folder with the results files")
    p.add_argument("--metric", default="voc07", choices=("voc07", "voc12", "coco"),
                   help="voc07 (default), voc12 or coco")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="score only these classes, in this order (default: every class of the dataset: "
                        "the 20 VOC classes when all object names are VOC classes, else the names found)")
    p.add_argument("--format", default="voc", choices=("voc", "coco"), help="dataset format (default voc)")
    p.add_argument("--annotations", default=None, metavar="JSON", help="COCO instances file (--format coco)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write a PR-curve PNG per class and an overview PNG into DIR")
    p.set_defaults(func=run)


def _parse_classes(text: str | None, available: list[str]) -> list[str]:
    if text is None:
        return list(available)
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise SppdetError(f"--classes {text!r}: no class names given")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise SppdetError(f"--classes: {', '.join(dup)} given twice")
    unknown = [c for c in names if c not in available]
    if unknown:
        raise SppdetError(f"--classes: unknown class{'es' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(the dataset's classes: {', '.join(available)})")
    return names


def run(args) -> int:
    from ..data import load_dataset
    from ..evaluation.voc import evaluate_voc_results, format_ap_table

    if args.format == "coco" and not args.annotations:
        raise SppdetError("--annotations: a COCO instances JSON is required with --format coco")
    ds = load_dataset(args.data, args.split, format=args.format, coco_annotations=args.annotations)
    classes = _parse_classes(args.classes, ds.classes)
    if args.metric == "coco":
        from ..evaluation.coco import evaluate_coco, voc_results_to_detections
        from ..evaluation.voc import read_voc_results

        raw = read_voc_results(args.results, args.split, classes, image_ids=[r.image_id for r in ds])
        result = evaluate_coco(ds, voc_results_to_detections(raw, ds.classes), classes=classes)
    else:
        result = evaluate_voc_results(ds, args.results, args.metric, classes=classes)
    plots = []
    if args.plots:
        from ..evaluation.plots import plot_pr_curves

        plots = plot_pr_curves(result, args.plots)
    if args.json:
        out = result.to_json()
        out.update({"split": args.split, "images": len(ds), "results": str(args.results)})
        if args.plots:
            out["plots"] = [str(f) for f in plots]
        print(json.dumps(out, allow_nan=False))
    else:
        print(format_ap_table(result, classes))
        if args.plots:
            print(f"PR plots: {args.plots} ({len(plots)} files)")
    return 0
