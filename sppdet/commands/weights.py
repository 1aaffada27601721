"""``sppdet weights fetch vgg16|zf5`` and ``sppdet weights list``: ImageNet weights one command away."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="fetch or list the ImageNet weights of vgg16 and zf5",
        description="Fetch the ImageNet weights of the paper's backbones into the usual caches (the only "
                    "sppdet step that uses the network; training and detection read local files only), "
                    "or list what is present. See docs/WEIGHTS.md.",
    )
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True
    f = wsub.add_parser(
        "fetch", help="download (where needed), check and convert",
        description="vgg16: torchvision's VGG16_Weights.IMAGENET1K_V1 into torch hub's cache (SHA-256 prefix "
                    "checked). zf5: pytorchcv's ImageNet ZFNet from its model store into ~/.torch/models "
                    "(SHA-1 checked), converted to sppdet's zf5-zfnet conv1-5 and fc6/fc7 files in torch hub's "
                    "cache; then features.weights: imagenet works for zf5. Files already present and intact "
                    "are not downloaded again.")
    f.add_argument("names", nargs="+", metavar="NAME", choices=("vgg16", "zf5"), help="vgg16 and/or zf5")
    f.set_defaults(func=run_fetch)
    ls = wsub.add_parser("list", help="where each weight file goes and whether it is present",
                         description="Print each file 'sppdet weights fetch' writes, its size, and whether it "
                                     "is present.")
    ls.set_defaults(func=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    from ..models.weights import fetch

    for name in dict.fromkeys(args.names):
        for path in fetch(name):
            print(f"{name}: {path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..models.weights import weight_files

    for name, what, path in weight_files():
        state = f"present, {path.stat().st_size / 2**20:.1f} MiB" if path.is_file() else "absent"
        print(f"{name:6s} {what:48s} {state:22s} {path}")
    return 0
