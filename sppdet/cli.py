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
)


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


def verbosity(args: argparse.Namespace) -> int:
    """0 with ``-q`` (warnings), 1 by default and with ``-v`` (progress), 2 with ``-vv`` (debug)."""
    return 0 if args.quiet else max(1, args.verbose)


def main(argv: list[str] | None = None) -> int:
    from .utils.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbosity(args))
    try:
        rc = args.func(args)
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
    logging.shutdown()
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
