"""``sppdet bench {proposals,features}``: the benchmarks (speed; never run by tests).

The argument parsers live here; the measurements are library code in :mod:`sppdet.bench`
(``sppdet.bench.proposals.run`` / ``sppdet.bench.features.run``), which these commands only call.
"""

from __future__ import annotations

import importlib

from ..bench.proposals import STOCK


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: proposals, features",
                       description="Speed benchmarks. Figures and the commands that produced them "
                                   "are recorded in docs/PROPOSALS.md and docs/FEATURES.md.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    _register_proposals(bsub)
    _register_features(bsub)


def _run(name: str, args) -> int:
    return importlib.import_module(f"sppdet.bench.{name}").run(args)


def _register_proposals(sub) -> None:
    p = sub.add_parser(
        "proposals", help="selective-search presets: s/img/core, boxes/img, recall",
        description="Benchmark selective-search presets on a dataset (single process, one thread, "
                    "presets interleaved per image).  The stock OpenCV fast mode is included as "
                    f"'{STOCK}' (its own order, no cap) unless --no-stock.")
    p.add_argument("--data", required=True, metavar="ROOT", help="VOC-format dataset root")
    p.add_argument("--split", required=True, metavar="S", help="split(s), e.g. trainval,test")
    p.add_argument("--presets", default="fast,quality", metavar="LIST",
                   help="comma-separated preset names (default: fast,quality)")
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL BASE KEY=V ...'",
                   help="also benchmark a preset with overridden settings, e.g. "
                        "--variant 'fast300 fast max_sides=300 ks=50,100' (repeatable)")
    p.add_argument("--no-stock", action="store_true", help=f"leave out {STOCK}")
    p.add_argument("--max-boxes", type=int, default=2000, metavar="N", help="cap per image (default 2000)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N images")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only images at positions I-1, I-1+N, ... (after --limit), e.g. to fill a "
                        "--run-cache from two processes")
    p.add_argument("--run-cache", default=None, metavar="DIR",
                   help="tuning mode: compute every distinct run (and the stock mode) once per image, "
                        "cache it in DIR and combine the presets from it (boxes identical); times are "
                        "then ESTIMATES (sum of the runs' CPU seconds, no wall time)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plots", default=None, metavar="DIR", help="recall plots of all presets to DIR")
    p.set_defaults(func=lambda args: _run("proposals", args))




def _register_features(sub) -> None:
    p = sub.add_parser(
        "features", help="SPP vs R-CNN mode s/image, SPP pooling vs roi_pool, memory, disk",
        description="Benchmark feature extraction: SPP mode against R-CNN mode on the same images, windows "
                    "and backbone (ratio measured in one run), the exact CPU pooling against torchvision's "
                    "roi_pool, peak memory at the largest scale and the conv5 cache's disk use.")
    p.add_argument("--data", metavar="ROOT", help="VOC-format dataset root (needed unless --pool-only)")
    p.add_argument("--split", default="test", metavar="S", help="split to take images from (default test)")
    p.add_argument("--backbone", default="zf5", help="zf5, vgg16 or lite0 (default zf5)")
    p.add_argument("--weights", default=None, help="backbone weights (default: the backbone's default)")
    p.add_argument("--scale", type=int, default=688, help="SPP single scale (default 688)")
    p.add_argument("--max-side", type=int, default=2000, help="cap on the longer side (default 2000)")
    p.add_argument("--pyramid", default="4,2,1", help="pyramid levels (default 4,2,1)")
    p.add_argument("--windows", type=int, default=2000, help="windows per image (default 2000)")
    p.add_argument("--windows-from", choices=("ss", "random"), default="ss",
                   help="selective search (topped up with random windows) or random windows")
    p.add_argument("--images", type=int, default=1, help="images for SPP vs R-CNN (default 1)")
    p.add_argument("--rcnn-windows", type=int, default=0,
                   help="run R-CNN mode on only this many windows and scale the time up (default: all)")
    p.add_argument("--rcnn-batch", type=int, default=32, help="R-CNN windows per forward batch")
    p.add_argument("--repeat", type=int, default=5, help="rounds of the pooling benchmark (default 5)")
    p.add_argument("--pool-map", default="256,43,57", help="C,H,W of the pooling benchmark's map")
    p.add_argument("--memory-scale", type=int, default=1200, help="scale of the peak-memory check (0: skip)")
    p.add_argument("--disk-split", default=None, help="split for the disk report (default: --split)")
    p.add_argument("--disk-limit", type=int, default=0, help="only the first N images of the disk split")
    p.add_argument("--pool-only", action="store_true", help="only the pooling benchmark")
    p.add_argument("--no-rcnn", action="store_true", help="skip R-CNN mode")
    p.add_argument("--no-disk", action="store_true", help="skip the disk report")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto for the per-image part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=lambda args: _run("features", args))
