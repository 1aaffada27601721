"""``sppdet detect``: detections on images as JSON and drawn copies."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import add_runtime_options, add_test_overrides, test_overrides_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "detect", help="detect objects in images (JSON + drawn images)",
        description="Runs a trained detector on image files, folders or glob patterns. For every image it "
                    "writes OUT/<name>.json (boxes in original pixels, 0-based continuous (x1, y1, x2, y2), "
                    "class names, SVM scores) and OUT/<name>.jpg with the boxes drawn, and prints a summary "
                    "line. Images are streamed: the next ones are decoded and their proposals computed in "
                    "--workers background threads while one is scored (a progress bar shows images/s); "
                    "proposals are cached for a rerun on the same files. Images that cannot be decoded are "
                    "reported once and skipped; the exit status is 2 if any was. --format coco also writes "
                    "OUT/coco_det.json, the kept detections as COCO results ([{image_id, category_id, "
                    "bbox: [x, y, w, h], score}], bbox = [x1, y1, x2 - x1, y2 - y1]), and OUT/coco_images.json, "
                    "the index its ids refer to (image_id = the image's 1-based position among the inputs, "
                    "with its file_name; category_id = class index + 1, with its name), which pycocotools "
                    "loads as COCO(...) for .loadRes.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, folders, or glob patterns")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="model.pt written by sppdet train")
    p.add_argument("--out", default="detections", metavar="DIR", help="output folder (default: ./detections)")
    p.add_argument("--threshold", type=float, default=0.0, metavar="T",
                   help="keep detections scoring at least T (SVM margin; 0 = the SVM decision boundary)")
    p.add_argument("--no-draw", action="store_true", help="write JSON only")
    p.add_argument("--format", default="json", choices=("json", "coco"),
                   help="json: one JSON file per image (default); coco: also OUT/coco_det.json (COCO results) "
                        "and OUT/coco_images.json (their image and category ids)")
    add_runtime_options(p)
    add_test_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..detect import Detector, detect_images
    from ..errors import SppdetError
    from ..utils.io import refuse_output_over_inputs

    paths = _expand(args.inputs)
    refuse_output_over_inputs(args.out, paths)        # before the seconds the detector takes to load
    det = Detector.from_checkpoint(args.checkpoint, device=args.device or "auto", cache_dir=args.cache,
                                   test_overrides=test_overrides_from_args(args))
    if args.workers is not None:
        if args.workers < 0:
            raise SppdetError(f"--workers {args.workers}: must be >= 0 (0: all cores)")
        det.workers = args.workers
    out = Path(args.out)
    failed = 0
    coco = args.format == "coco"
    for path, result in detect_images(det, paths, out, threshold=args.threshold, draw=not args.no_draw,
                                      coco=coco):
        if isinstance(result, Exception):
            failed += 1
            print(f"sppdet: error: {result}", file=sys.stderr)
            continue
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in result[:5])
        more = f" (+{len(result) - 5} more)" if len(result) > 5 else ""
        print(f"{path}: {len(result)} detection{'s' if len(result) != 1 else ''}"
              + (f": {found}{more}" if result else ""))
    print(f"results in {out}/ ({len(paths) - failed} images" + (f", {failed} failed)" if failed else ")"))
    if coco:
        from ..detect import COCO_INDEX, COCO_RESULTS

        print(f"COCO results: {out / COCO_RESULTS} (image and category ids: {out / COCO_INDEX})")
    if failed:
        print(f"sppdet: error: {failed} of {len(paths)} images could not be read (listed above)", file=sys.stderr)
        return 2
    return 0


def _expand(inputs):
    from ..detect import iter_image_paths
    from ..errors import SppdetError

    paths = iter_image_paths(inputs)
    if not paths:
        raise SppdetError(f"{' '.join(inputs)}: no image files found")
    return paths
