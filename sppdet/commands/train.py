"""``sppdet train``: every training stage, resumable."""

from __future__ import annotations

from pathlib import Path

from .common import add_config_options, add_runtime_options, config_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a detector (proposals, features, fine-tuning, SVMs, box regression)",
        description="Runs proposals -> conv5 features -> fc fine-tuning -> SVMs with hard-negative mining -> "
                    "box regression, and writes RUN/model.pt. Each stage is skipped when its output for the "
                    "same inputs exists, so rerunning a killed run resumes it.")
    add_config_options(p)
    p.add_argument("--data", metavar="ROOT", help="dataset root (overrides data.root in the config)")
    p.add_argument("--out", metavar="RUN", help="run folder (default: runs/<config name>)")
    add_runtime_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.pipeline import train

    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / (Path(args.config).stem if args.config else cfg.name)
    ckpt = train(cfg, out, data_root=args.data)
    print(f"checkpoint: {ckpt}")
    return 0
