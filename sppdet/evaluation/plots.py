"""Precision-recall curve plots (matplotlib's Agg canvas: no display, no pyplot global state)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .voc import EvalResult

log = logging.getLogger(__name__)


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _envelope(prec: np.ndarray) -> np.ndarray:
    """The monotone precision envelope (NaN-ignoring backwards max), as VOCap.m integrates."""
    return np.fmax.accumulate(prec[::-1])[::-1]


def plot_pr_curves(result: EvalResult, out_dir: str | Path, *, prefix: str = "pr") -> list[Path]:
    """Write one PR-curve PNG per class and one overview PNG with every class.

    Args:
        result: scores with per-class curves (``result.per_class``); classes
            without ground truth (``npos == 0``) get no plot.
        out_dir: the folder (created if needed).
        prefix: file names are ``<prefix>_<class>.png`` (class name with characters
            other than letters, digits, ``-_.`` replaced by ``_``; an index is added
            when two names collide) and ``overview_<prefix>.png``.

    Each class plot shows the raw cumulative precision/recall in ranking order
    and, dashed, its monotone envelope (the curve VOC2010+ AP integrates).

    Returns:
        the files written, the overview first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {c: r for c, r in result.per_class.items() if r.npos > 0}
    files: list[Path] = []

    fig, ax = _figure(8.4, 5.2)
    from matplotlib import colormaps

    colours = colormaps["tab20" if len(curves) > 10 else "tab10"].colors
    for i, (c, r) in enumerate(curves.items()):
        if len(r.rec):
            ap = r.ap
            ax.plot(np.nan_to_num(r.rec), np.nan_to_num(r.prec), lw=1.3, color=colours[i % len(colours)],
                    label=f"{c} ({ap:.3f})" if math.isfinite(ap) else c)
    mean = f"{result.mAP:.4f}" if math.isfinite(result.mAP) else "-"
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02),
           title=f"PR curves ({result.metric}), mAP {mean}")
    if result.curve:
        fig.text(0.5, 0.005, result.curve, ha="center", va="bottom", fontsize=7, color="0.35")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    overview = out / f"overview_{prefix}.png"
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, overview)
    files.append(overview)

    used: set[str] = set()
    for i, (c, r) in enumerate(curves.items()):
        fig, ax = _figure(4.2, 3.6)
        rec, prec = np.nan_to_num(r.rec), np.nan_to_num(r.prec)
        if len(rec):
            ax.plot(rec, prec, lw=1.5, label="precision")
            ax.plot(rec, _envelope(prec), "--", lw=1, label="envelope")
            ax.legend(fontsize=7, loc="lower left")
        else:
            ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
        title = f"{c}: AP {r.ap:.3f} ({r.npos} objects)" if math.isfinite(r.ap) else f"{c} ({r.npos} objects)"
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02), title=title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{prefix}_{_safe(c)}"
        if name.lower() in used:
            name = f"{name}_{i}"
        used.add(name.lower())
        f = out / f"{name}.png"
        _save(fig, f)
        files.append(f)
    log.info("wrote %d PR-curve plots to %s", len(files), out)
    return files


def _save(fig, path: Path) -> None:
    """``fig.savefig`` into memory, then an atomic write (a full disk is a one-line error naming ``path``)."""
    import io

    from ..utils.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buf.getvalue())
