"""Options shared by several subcommands, and the one place that turns them into a config.

One override grammar for every command: ``--set section.key=value`` with the value read as
YAML (``--set finetune.lr=0.01``, ``--set features.scales=[480,688]``,
``--set proposals.overrides.ks=[50,100]``); ``eval`` and ``detect`` accept the ``test``
section only (the rest is fixed by training).  The runtime options (``--device``,
``--cache``, ``--workers``) are declared here once.
"""

from __future__ import annotations

import argparse

from ..config import Config, config_from_sets, deep_update, parse_override
from ..errors import ConfigError


def add_config_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="C",
                   help="YAML config file, or the name of a bundled one (demo_lite0, voc07_zf5, "
                        "voc07_zf5_paper, voc07_vgg16, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set finetune.lr=0.01 (repeatable)")


def add_runtime_options(p: argparse.ArgumentParser, *, device: bool = True, cache: bool = True,
                        workers: bool = True) -> None:
    """``--device``, ``--cache``, ``--workers`` (the ones a command has)."""
    if device:
        p.add_argument("--device", default=None, metavar="D",
                       help="auto, cpu, cuda or cuda:N (default: the config's / checkpoint's, auto)")
    if cache:
        p.add_argument("--cache", default=None, metavar="DIR",
                       help="cache folder for proposals and conv5 maps (default: $SPPDET_CACHE, else "
                            "~/.cache/sppdet; eval and detect never use the folder a checkpoint records)")
    if workers:
        p.add_argument("--workers", type=int, default=None, metavar="N",
                       help="processes for selective search (default: the config's, 0 = all cores)")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file with --set overrides and the runtime flags applied (strictly checked)."""
    return config_from_sets(getattr(args, "config", None), getattr(args, "overrides", None) or [],
                            device=getattr(args, "device", None), cache=getattr(args, "cache", None),
                            workers=getattr(args, "workers", None))


def add_test_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="test.KEY=VALUE",
                   help="change a test-time setting of the checkpoint, e.g. --set test.nms=0.2, "
                        "--set test.box_voting=0.5, --set test.flip=true, --set \"test.scales=[480,688,1200]\" "
                        "(test at other scales than the training ones; repeatable; only test.*)")


def test_overrides_from_args(args: argparse.Namespace) -> dict | None:
    """The ``test`` section updates given with ``--set test.KEY=VALUE`` (other sections are fixed by training)."""
    out: dict = {}
    for text in getattr(args, "overrides", []) or []:
        d = parse_override(text)
        if set(d) != {"test"} or not isinstance(d["test"], dict):
            raise ConfigError(f"--set {text!r}: only test.* settings can change after training "
                              "(e.g. test.nms=0.2)")
        out = deep_update(out, d["test"])
    return out or None
