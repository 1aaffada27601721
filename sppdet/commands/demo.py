"""``sppdet demo``: the whole system on the embedded synthetic default, offline, on a CPU."""

from __future__ import annotations

from pathlib import Path

from .common import add_runtime_options


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="make a synthetic dataset, train, evaluate, detect, write a report (offline)",
        description="The main job on the embedded default: makes the synthetic VOC-format dataset "
                    "(sppdet make-synthetic), trains configs/demo_lite0.yaml on its trainval split "
                    "(EfficientNet-Lite0 with its packaged ImageNet weights), evaluates on the test split "
                    "(VOC07 mAP), detects on a few test images and writes an HTML report. Everything goes "
                    "under --out; re-running reuses what is done.")
    p.add_argument("--out", default="sppdet-demo", metavar="DIR", help="output folder (default: ./sppdet-demo)")
    from ..demo import DEMO_IMAGES, DEMO_TEST_FRACTION

    test_pct = round(100 * DEMO_TEST_FRACTION, 1)
    p.add_argument("--images", type=int, default=None, metavar="N",
                   help=f"synthetic images, {100 - test_pct:g}%% trainval / {test_pct:g}%% test "
                        f"(default {DEMO_IMAGES})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed (default 0)")
    p.add_argument("--config", default="demo_lite0", metavar="C", help="config (default: demo_lite0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    add_runtime_options(p, cache=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    summary = run_demo(Path(args.out), images=args.images, seed=args.seed, config=args.config,
                       overrides=args.overrides, device=args.device, workers=args.workers)
    print(summary)
    return 0
