"""Evaluation figures: PR curves, AP bars, fine-tuning curve, proposal recall, stage times, error breakdown.

All drawn on matplotlib's Agg canvas (no display, no pyplot global state).
"""

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


def _finish(fig, out_file: str | Path) -> Path:
    """Lay out ``fig`` and write it to ``out_file`` (its folder made); returns the path."""
    fig.tight_layout()
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, out)
    return out


def _save(fig, path: Path) -> None:
    """``fig.savefig`` into memory, then an atomic write (a full disk is a one-line error naming ``path``)."""
    import io

    from ..utils.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buf.getvalue())


def plot_ap_bars(ap: dict[str, float], out_file: str | Path, *, npos: dict[str, int] | None = None,
                 metric: str = "", mean_ap: float | None = None) -> Path:
    """A horizontal bar per class (its AP, value printed), classes sorted by AP, the mean dashed.

    Classes whose AP is not a number (no ground truth) are listed with an empty bar.
    """
    items = sorted(ap.items(), key=lambda kv: (-(kv[1] if math.isfinite(kv[1]) else -1.0), kv[0]))
    fig, ax = _figure(6.4, max(3.6, 0.3 * len(items) + 1.1))
    names = [c if not npos else f"{c} ({npos.get(c, 0)})" for c, _ in items][::-1]
    vals = [v if math.isfinite(v) else 0.0 for _, v in items][::-1]
    bars = ax.barh(range(len(vals)), vals, color="#4c78a8", height=0.7)
    for b, (_, v) in zip(bars, items[::-1]):
        ax.text(min(b.get_width(), 1.0) + 0.01, b.get_y() + b.get_height() / 2,
                f"{v:.3f}" if math.isfinite(v) else "n/a", va="center", fontsize=8)
    if mean_ap is not None and math.isfinite(mean_ap):
        ax.axvline(mean_ap, color="#e45756", ls="--", lw=1, label=f"mean {mean_ap:.4f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlim=(0, 1.12), xlabel=f"AP{f' ({metric})' if metric else ''}",
           title="AP per class" + (" (objects)" if npos else ""))
    ax.grid(axis="x", alpha=0.3)
    return _finish(fig, out_file)


def plot_finetune_curve(curve: dict, out_file: str | Path) -> Path:
    """Fine-tuning loss (left axis) and mini-batch accuracy (right axis) against the iteration.

    Args:
        curve: ``{"iteration": [...], "loss": [...], "accuracy": [...], "lr": [...]}`` as
            :func:`sppdet.train.finetune.finetune` records it (each point the mean over a block
            of iterations); learning-rate steps are marked with a dotted line.
    """
    it = np.asarray(curve["iteration"], dtype=np.float64)
    loss = np.asarray(curve["loss"], dtype=np.float64)
    acc = np.asarray(curve["accuracy"], dtype=np.float64)
    fig, ax = _figure(6.4, 3.6)
    ax.plot(it, loss, color="#4c78a8", lw=1.4, label="loss")
    ax.set(xlabel="iteration", ylabel="cross-entropy loss", xlim=(0, max(float(it[-1]) if len(it) else 1.0, 1.0)),
           title=f"Fine-tuning ({int(it[-1]) if len(it) else 0} iterations, mean of every {curve.get('every', 1)})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(it, acc, color="#f58518", lw=1.4, label="batch accuracy")
    ax2.set(ylabel="mini-batch accuracy", ylim=(0, 1.02))
    lr = np.asarray(curve.get("lr", []), dtype=np.float64)
    for j in np.flatnonzero(np.diff(lr) != 0) if len(lr) > 1 else []:
        ax.axvline((it[j] + it[j + 1]) / 2, color="0.4", ls=":", lw=1)
        ax.text((it[j] + it[j + 1]) / 2, ax.get_ylim()[1] * 0.97, f" lr {lr[j + 1]:.2g}", fontsize=7,
                va="top", color="0.3")
    # the axes say which line is which (coloured labels), no legend to cover the lines
    for a, colour in ((ax, "#4c78a8"), (ax2, "#f58518")):
        a.yaxis.label.set_color(colour)
        a.tick_params(axis="y", colors=colour)
    return _finish(fig, out_file)


def plot_recall_vs_iou(best_iou: np.ndarray, out_file: str | Path, *, label: str = "proposals",
                       average_recall: float | None = None) -> Path:
    """Proposal recall against the IoU threshold (fraction of objects whose best IoU is >= t).

    Args:
        best_iou (ndarray[G]): each ground-truth object's best IoU with any proposal of its image
            (:attr:`sppdet.proposals.recall.RecallResult.best_iou`).
    """
    best = np.asarray(best_iou, dtype=np.float64)
    t = np.linspace(0.0, 1.0, 101)
    rec = np.array([np.mean(best >= x - 1e-9) for x in t]) if len(best) else np.zeros_like(t)
    fig, ax = _figure(6.4, 3.6)
    ax.plot(t, rec, color="#54a24b", lw=1.6, label=label)
    for x in (0.5, 0.7):
        r = float(np.mean(best >= x - 1e-9)) if len(best) else 0.0
        ax.plot([x], [r], "o", color="#54a24b", ms=4)
        ax.annotate(f"{r:.3f} at {x}", (x, r), textcoords="offset points", fontsize=8,
                    xytext=(6, -12) if r > 0.9 else (6, 4))      # below the point near the top edge
    ax.axvspan(0.5, 1.0, color="0.92", zorder=0)
    ar = "" if average_recall is None or not math.isfinite(average_recall) else f" {average_recall:.3f}"
    ax.text(0.75, 0.04, f"AR{ar}: mean recall over IoU 0.5:0.95", ha="center", fontsize=8, color="0.3")
    ax.set(xlabel="IoU threshold", ylabel="recall", xlim=(0, 1), ylim=(0, 1.02),
           title=f"Proposal recall ({len(best)} objects)")
    ax.grid(alpha=0.3)
    return _finish(fig, out_file)


def plot_stage_seconds(panels: dict[str, dict[str, float]], out_file: str | Path) -> Path:
    """Horizontal bars of seconds per stage, slowest on top, one panel (row) per entry of ``panels``
    (e.g. ``{"training (s)": {...}, "test (s per image)": {...}}``); empty panels are left out."""
    panels = {k: v for k, v in panels.items() if v}
    n = max(len(panels), 1)
    rows = max((len(v) for v in panels.values()), default=1)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, max(3.6, n * (0.3 * rows + 1.0))), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, values) in enumerate(panels.items()):
        ax = fig.add_subplot(n, 1, i + 1)
        items = sorted(values.items(), key=lambda kv: kv[1])
        vals = [float(v) for _, v in items]
        bars = ax.barh(range(len(items)), vals, color="#72b7b2", height=0.7)
        top = max(vals) if vals else 1.0
        for b, v in zip(bars, vals):
            ax.text(b.get_width() + top * 0.01, b.get_y() + b.get_height() / 2,
                    f"{v:.3g}", va="center", fontsize=8)
        ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=8)
        ax.set(xlim=(0, top * 1.22 if top > 0 else 1.0), title=title, xlabel="seconds")
        ax.grid(axis="x", alpha=0.3)
    return _finish(fig, out_file)


#: Colours of the error types (sppdet.evaluation.errors.ERROR_TYPES), in stacking order.
ERROR_COLOURS = {"localisation": "#4c78a8", "similar": "#f58518", "other": "#e45756", "background": "#9d9d9d"}


def plot_error_breakdown(breakdown, out_file: str | Path) -> Path:
    """One stacked horizontal bar per class (and one for all classes, on top): the shares of the
    false positives among its top-N detections by type (localisation, similar class, other class,
    background), the number of false positives and N printed beside it.

    Args:
        breakdown: a :class:`sppdet.evaluation.errors.ErrorBreakdown`; classes without
            non-difficult objects are left out (they have no top N).
    """
    from .errors import ERROR_NAMES, ERROR_TYPES

    rows = [(c, r.counts, r.fp, r.considered) for c, r in breakdown.per_class.items() if r.npos > 0]
    overall = ("all classes", breakdown.counts, breakdown.fp,
               sum(r.considered for r in breakdown.per_class.values() if r.npos > 0))
    rows = [overall] + rows
    fig, ax = _figure(6.8, max(3.0, 0.28 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]                  # the overall bar on top
    left = np.zeros(len(rows))
    for k in ERROR_TYPES:
        share = np.array([cnt[k] / fp if fp else 0.0 for _, cnt, fp, _ in rows])
        ax.barh(y, share, left=left, color=ERROR_COLOURS[k], height=0.72, label=ERROR_NAMES[k])
        left += share
    for yy, (_, _, fp, n) in zip(y, rows):
        ax.text(1.01, yy, f"{fp}/{n}" if fp else f"0/{n}, no FP", va="center", fontsize=7)
    ax.set_yticks(y, [name for name, *_ in rows], fontsize=8)
    ax.set(xlim=(0, 1.17), xlabel="share of the false positives among the top N detections (N = objects)",
           )
    ax.set_title("False positives by type (FP / N at the right)", pad=20)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _finish(fig, out_file)
