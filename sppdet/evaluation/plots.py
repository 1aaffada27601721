"""Precision-recall curve plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .voc import EvalResult


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def plot_pr_curves(result: EvalResult, out_dir: str | Path, *, prefix: str = "pr") -> list[Path]:
    """One PNG per class (``<prefix>_<class>.png``) and an overview (``<prefix>_all.png``).

    Curves are the raw cumulative precision/recall in detection order and, dashed,
    the monotone envelope that the VOC2010+ AP integrates.  Returns the files, the
    overview first.
    """
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    curves = {c: r for c, r in result.per_class.items() if r.npos > 0}

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    for c, r in curves.items():
        ap = result.ap.get(c, float("nan"))
        if len(r.rec):
            ax.plot(np.nan_to_num(r.rec), np.nan_to_num(r.prec), lw=1.5, label=f"{c} ({ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02),
           title=f"PR curves, mAP {result.mAP:.4f} ({result.metric})")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="lower left", ncol=2 if len(curves) > 10 else 1)
    overview = out / f"{prefix}_all.png"
    fig.tight_layout()
    fig.savefig(overview)
    plt.close(fig)
    files.append(overview)

    for c, r in curves.items():
        fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=100)
        rec, prec = np.nan_to_num(r.rec), np.nan_to_num(r.prec)
        if len(rec):
            ax.plot(rec, prec, lw=1.5, label="precision")
            env = np.maximum.accumulate(prec[::-1])[::-1]
            ax.plot(rec, env, "--", lw=1, label="envelope")
        ap = result.ap.get(c, float("nan"))
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02),
               title=f"{c}: AP {ap:.3f}" if math.isfinite(ap) else c)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        f = out / f"{prefix}_{_safe(c)}.png"
        fig.savefig(f)
        plt.close(fig)
        files.append(f)
    return files
