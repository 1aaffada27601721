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
                    "line. Images that cannot be decoded are reported and skipped; the exit status is 2 "
                    "if any was.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, folders, or glob patterns")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="model.pt written by sppdet train")
    p.add_argument("--out", default="detections", metavar="DIR", help="output folder (default: ./detections)")
    p.add_argument("--threshold", type=float, default=0.0, metavar="T",
                   help="keep detections scoring at least T (SVM margin; 0 = the SVM decision boundary)")
    p.add_argument("--no-draw", action="store_true", help="write JSON only")
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
    for path, result in detect_images(det, paths, out, threshold=args.threshold, draw=not args.no_draw):
        if isinstance(result, Exception):
            failed += 1
            print(f"sppdet: error: {result}", file=sys.stderr)
            continue
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in result[:5])
        more = f" (+{len(result) - 5} more)" if len(result) > 5 else ""
        print(f"{path}: {len(result)} detection{'s' if len(result) != 1 else ''}"
              + (f": {found}{more}" if result else ""))
    print(f"results in {out}/ ({len(paths) - failed} images" + (f", {failed} failed)" if failed else ")"))
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
