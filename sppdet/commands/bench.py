"""``sppdet bench {proposals,features}``: the benchmarks (speed; never run by tests)."""

from __future__ import annotations

import importlib

#: Benchmark modules; each has ``register(subparsers)`` like a command.
BENCHES = ("proposals", "features")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: proposals, features",
                       description="Speed benchmarks. Figures and the commands that produced them "
                                   "are recorded in docs/PROPOSALS.md and docs/FEATURES.md.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    for name in BENCHES:
        try:
            mod = importlib.import_module(f"sppdet.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sppdet.bench.{name}":
                continue
            raise
        mod.register(bsub)
