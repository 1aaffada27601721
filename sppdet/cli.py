"""The ``sppdet`` console script: argparse subcommands, kept thin.

Each subcommand lives in :mod:`sppdet.commands.<name>` and exposes
``register(subparsers)``, which adds its parser and sets ``func``.  User-input
problems raise :class:`~sppdet.errors.SppdetError`; they are printed here as
one line (``sppdet: error: ...``) with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from .errors import SppdetError

#: Subcommand modules, in the order ``sppdet --help`` lists them.
COMMANDS = (
    "demo",
    "make_synthetic",
    "proposals",
    "recall",
    "train",
    "eval",
    "evaluate",
    "detect",
    "bench",
    "weights",
    "export",
    "cache",
)

#: Commands that use several processes under torchrun (see docs/DISTRIBUTED.md); any other
#: command launched by torchrun runs on rank 0 alone while the other ranks return at once.
DISTRIBUTED = frozenset({"proposals", "train", "eval"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sppdet",
        description="SPPnet object detection: selective search, one conv pass per image, "
                    "spatial pyramid pooling, SVMs, box regression.",
    )
    parser.add_argument("--version", action="version", version=f"sppdet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="progress messages are on by default; -vv adds debug output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"sppdet.commands.{name}").register(sub)
    return parser


#: Options that name files or folders: a leading ``~`` is expanded once, here, for every command.
PATH_OPTIONS = ("config", "data", "out", "checkpoint", "results", "report", "cache", "plots", "proposals",
                "annotations", "inputs")


def expand_user_paths(args: argparse.Namespace) -> argparse.Namespace:
    """``~`` and ``~user`` at the start of every path option (and of each ``detect`` input)."""
    def expand(v):
        return os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v

    for name in PATH_OPTIONS:
        v = getattr(args, name, None)
        if isinstance(v, list):
            setattr(args, name, [expand(x) for x in v])
        elif v is not None:
            setattr(args, name, expand(v))
    return args


def verbosity(args: argparse.Namespace) -> int:
    """0 with ``-q`` (warnings), 1 by default and with ``-v`` (progress), 2 with ``-vv`` (debug)."""
    return 0 if args.quiet else max(1, args.verbose)


def main(argv: list[str] | None = None) -> int:
    from .utils import dist
    from .utils.log import setup_logging

    parser = build_parser()
    args = expand_user_paths(parser.parse_args(argv))
    level = verbosity(args)
    setup_logging(level)
    try:
        with dist.launch(args.command in DISTRIBUTED, device=getattr(args, "device", None),
                         verbosity=level, command=args.command) as runs_here:
            rc = args.func(args) if runs_here else 0
    except SppdetError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sppdet: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sppdet: interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sppdet ... | head`
        return 0
    except (OSError, RuntimeError) as e:
        # a full disk in a write that does not go through utils.io's atomic writers
        # (torch wraps the OSError of a file object in a RuntimeError)
        from .utils.io import disk_full_cause

        full = disk_full_cause(e)
        if full is None:
            raise
        print(f"sppdet: error: {full.filename or 'a file being written'}: no space left on device", file=sys.stderr)
        return 2
    logging.shutdown()
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
