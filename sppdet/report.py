"""A self-contained HTML evaluation report: AP table, PR curves, example detections, timings, config."""

from __future__ import annotations

import datetime as _dt
import html
import logging
from pathlib import Path
from typing import Any, Sequence

from .utils.io import atomic_write_text

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} .big{font-size:2em;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:12px} .grid figure{margin:0} .grid img{max-width:340px;border:1px solid #ccc}
figcaption{font-size:.85em;color:#555} pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}
.muted{color:#777}
"""


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.4f}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def write_report(out_dir: str | Path, *, title: str, metric: str, mean_ap: float, ap: dict[str, float],
                 npos: dict[str, int] | None = None, pr_images: Sequence[Path] = (),
                 examples: Sequence[tuple[Path, str]] = (), timings: dict[str, Any] | None = None,
                 config_yaml: str = "", facts: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/index.html`` (images referenced by relative paths inside ``out_dir``).

    Args:
        title: heading.
        metric, mean_ap, ap: the evaluation (per-class AP by class name).
        npos: ground-truth objects per class (non-difficult), shown beside AP.
        pr_images: PR-curve PNGs already written inside ``out_dir``.
        examples: (image path inside out_dir, caption) of drawn detections.
        timings: {"train": {stage: seconds}, "test_per_image": {stage: seconds}, ...}.
        config_yaml: the resolved config.
        facts: extra key/value lines (checkpoint, data, split, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>sppdet report, {_dt.datetime.now():%Y-%m-%d %H:%M}</p>",
             f"<p><span class='big'>{mean_ap:.4f}</span> mAP ({html.escape(metric)})</p>"]
    if facts:
        parts.append(_table([(k, v) for k, v in facts.items()], ["", ""]))
    parts.append("<h2>Average precision per class</h2>")
    rows = [(c, float(a)) + ((int(npos.get(c, 0)),) if npos else ()) for c, a in ap.items()]
    parts.append(_table(rows, ["class", "AP"] + (["objects"] if npos else [])))
    if pr_images:
        parts.append("<h2>Precision-recall curves</h2><div class='grid'>")
        for p in pr_images:
            rel = Path(p).relative_to(out) if Path(p).is_absolute() else Path(p)
            parts.append(f"<figure><img src='{html.escape(rel.as_posix())}'></figure>")
        parts.append("</div>")
    if examples:
        parts.append("<h2>Detections (coloured) and ground truth (dashed white)</h2><div class='grid'>")
        for p, cap in examples:
            rel = Path(p).relative_to(out) if Path(p).is_absolute() else Path(p)
            parts.append(f"<figure><img src='{html.escape(rel.as_posix())}'>"
                         f"<figcaption>{html.escape(cap)}</figcaption></figure>")
        parts.append("</div>")
    if timings:
        parts.append("<h2>Timing</h2>")
        for section, values in timings.items():
            if not isinstance(values, dict) or not values:
                continue
            rows = []
            for k, v in values.items():
                if isinstance(v, dict):
                    sec = v.get("seconds")
                    rows.append((k, float(sec) if sec is not None else "", "reused" if v.get("reused") else ""))
                elif isinstance(v, (int, float)):
                    rows.append((k, float(v), ""))
            parts.append(f"<h3>{html.escape(section)}</h3>" + _table(rows, ["stage", "seconds", ""]))
    if config_yaml:
        parts.append("<h2>Configuration</h2><pre>" + html.escape(config_yaml) + "</pre>")
    parts.append("</body></html>")
    index = out / "index.html"
    atomic_write_text(index, "\n".join(parts))
    log.info("report written to %s", index)
    return index
