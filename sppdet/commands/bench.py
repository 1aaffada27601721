"""``sppdet bench {proposals,features,scale,gpu}``: the benchmarks (speed; never run by tests).

The argument parsers live here; the measurements are library code in :mod:`sppdet.bench`
(``sppdet.bench.<name>.run``), which these commands only call.  ``scale`` reads the config here
(its name, device and splits) and hands the library plain values.
"""

from __future__ import annotations

import importlib

from ..bench.proposals import STOCK


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: proposals, features, scale, gpu",
                       description="Speed benchmarks. Figures and the commands that produced them "
                                   "are recorded in docs/PROPOSALS.md, docs/FEATURES.md and docs/DISTRIBUTED.md.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    _register_proposals(bsub)
    _register_features(bsub)
    _register_scale(bsub)
    _register_gpu(bsub)


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


def _register_scale(sub) -> None:
    from .common import add_config_options

    p = sub.add_parser(
        "scale", help="training + test stages on the first N images for several N; a VOC-sized projection",
        description="For each N of --images: a subset of the first N images of --split and of --test-split "
                    "(split files written under --out, the dataset's Annotations/ and JPEGImages/ linked, nothing "
                    "written into the dataset), `sppdet train` and `sppdet eval` on it in fresh processes with a "
                    "cache of its own (OUT/n<N>/cache). Prints one JSON object: seconds per stage, peak RSS and "
                    "cache size per N, how linear the time is (seconds per image per N, their spread, R^2 of a "
                    "least-squares line), and the projection to --project-images images.")
    add_config_options(p)
    p.add_argument("--data", required=True, metavar="ROOT", help="VOC-format dataset root")
    p.add_argument("--images", required=True, metavar="LIST", help="image counts, e.g. 25,50,100 (at least two)")
    p.add_argument("--split", default=None, metavar="S", help="training split (default: the config's, trainval)")
    p.add_argument("--test-split", default=None, metavar="S", help="test split (default: the config's, test)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the subsets, runs, caches, logs and scale.json go (default runs/bench-scale-<config>); "
                        "OUT/n<N> must not exist yet")
    p.add_argument("--project-images", type=int, default=9963, metavar="N",
                   help="project to this many images in all (default 9963 = VOC 2007 trainval 5011 + test 4952)")
    p.add_argument("--train-fraction", type=float, default=None, metavar="F",
                   help="share of the projected images that are training images (default 5011/9963)")
    p.add_argument("--device", default=None, metavar="D", help="auto, cpu, cuda or cuda:N (default: the config's)")
    p.set_defaults(func=_run_scale)


def _run_scale(args) -> int:
    from ..bench import scale
    from ..errors import ConfigError
    from ..utils.device import resolve_device
    from .common import config_from_args

    cfg = config_from_args(args)
    if cfg.data.format != "voc":
        raise ConfigError(f"data.format {cfg.data.format!r}: bench scale takes VOC-format data only")
    if args.project_images < 1 or (args.train_fraction is not None and not 0 < args.train_fraction < 1):
        raise ConfigError("--project-images must be >= 1 and --train-fraction between 0 and 1")
    device = str(resolve_device(args.device or cfg.device))
    return scale.run(args, config_name=cfg.name, device=device, train_split=cfg.data.train_split,
                     test_split=cfg.data.test_split, classes=cfg.data.classes or None)


def _register_gpu(sub) -> None:
    p = sub.add_parser(
        "gpu", help="test-path seconds per image on a device (conv5 1 and 5 scales, pooling, fc7+SVM) vs the paper",
        description="Seconds per image of ZF-5 (random He weights, nothing downloaded) on --device, CUDA "
                    "synchronised around each timing: conv5 at one scale and at five, SPP pooling of --windows "
                    "windows, fc6+fc7+SVM scoring, and the whole test path after proposals, beside the paper's "
                    "figures (0.053 s, 0.293 s, 0.089 s on a 2014 GPU). scripts/bench_gpu.sh runs it.")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto")
    p.add_argument("--data", default=None, metavar="ROOT", help="VOC root to take images from (default: random images)")
    p.add_argument("--split", default="test", metavar="S", help="split of --data (default test)")
    p.add_argument("--images", type=int, default=5, metavar="N", help="images (default 5)")
    p.add_argument("--image-size", default="500x375", metavar="WxH", help="size of the random images (default 500x375)")
    p.add_argument("--windows", type=int, default=2000, metavar="N", help="windows per image (default 2000)")
    p.add_argument("--scale", type=int, default=688, help="the single scale (default 688)")
    p.add_argument("--scales", default="480,576,688,864,1200", metavar="LIST", help="the five scales")
    p.add_argument("--max-side", type=int, default=2000, help="cap on the longer side (default 2000)")
    p.add_argument("--pyramid", default="6,3,2,1", help="pyramid levels (default the paper's 6,3,2,1)")
    p.add_argument("--fc-dims", default="4096,4096", metavar="LIST", help="fc6,fc7 widths (default 4096,4096)")
    p.add_argument("--classes", type=int, default=20, help="SVMs (default 20)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per image and measurement (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=lambda args: _run("gpu", args))
