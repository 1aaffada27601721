"""A self-contained HTML evaluation report: figures, AP table, PR curves, example detections, timings, config.

Everything the report shows lives inside its folder: every ``src``/``href`` in
``index.html`` is a path relative to ``index.html`` itself (percent-encoded),
so the folder renders wherever it is opened from, moved or copied, whatever
the working directory was when it was written.  File names of drawn examples
never come raw from image ids (an id may be ``../../x`` or an absolute path):
they are an index plus a sanitised slug.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np

from .utils.io import atomic_write_text

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1240px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} .big{font-size:2em;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:12px} .grid figure{margin:0} .grid img{max-width:300px;border:1px solid #ccc}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
.figs figure{margin:0} .figs img{width:100%;height:auto;border:1px solid #e3e3e3}
.side{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
.grid figure.wide{flex-basis:100%} .grid figure.wide img{max-width:840px;width:100%}
figcaption{font-size:.85em;color:#555} pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}
.muted{color:#777} summary{cursor:pointer;color:#444}
"""

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_file_name(text: str, index: int, suffix: str, max_len: int = 48) -> str:
    """``<index>_<slug><suffix>``: the slug keeps ASCII letters, digits, ``_`` and ``-`` of ``text``
    (every other run of characters, dots and separators included, becomes one ``_``; at most
    ``max_len`` characters from its end), so the name is one plain path component, unique by its index."""
    slug = _UNSAFE.sub("_", str(text))[-max_len:].strip("_") or "image"
    return f"{index:03d}_{slug}{suffix}"


def _src(path: str | Path, out: Path) -> str:
    """``path`` (absolute, or relative to the working directory, as written) as a URL relative to
    ``out`` (the folder of index.html); it must lie inside ``out``."""
    target = Path(os.path.abspath(path))
    base = Path(os.path.abspath(out))
    try:
        rel = target.relative_to(base)
    except ValueError:
        raise ValueError(f"{path}: a report only shows files inside its folder {out}") from None
    return quote(rel.as_posix(), safe="/")


def _img(path: str | Path, out: Path, alt: str = "", link: bool = True) -> str:
    src = html.escape(_src(path, out), quote=True)
    tag = f"<img src=\"{src}\" alt=\"{html.escape(alt, quote=True)}\" loading=\"lazy\">"
    return f"<a href=\"{src}\">{tag}</a>" if link else tag


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], css_class: str = "") -> str:
    out = [f"<table class='{css_class}'>" if css_class else "<table>"]
    if any(header):
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.4f}</td>' if math.isfinite(v) else '<td class="num">-</td>')
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num">{v}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def error_table_header(metric: str) -> tuple[str, ...]:
    """Column headers of the error-breakdown table, in order (rows: :func:`error_table_rows`)."""
    return ("class", "objects (N)", "TP in top N", "FP in top N", "localisation", "similar class", "other class",
            "background", f"AP ({metric})", f"AP ({metric}), localisation fixed")


def error_table_rows(errors: Mapping[str, Any]) -> list[tuple]:
    """Rows of :func:`error_table_header` from an error breakdown's JSON: all classes first, then
    every class that has non-difficult objects."""
    from .evaluation.errors import ERROR_TYPES

    def nan(v):
        return float("nan") if v is None else float(v)

    o = errors["overall"]
    rows = [("all classes", sum(v["npos"] for v in errors["per_class"].values()), o["tp"], o["fp"],
             *(o["counts"][k] for k in ERROR_TYPES), nan(o["mAP"]), nan(o["mAP_loc_fixed"]))]
    for c, v in errors["per_class"].items():
        if v["npos"] > 0:
            rows.append((c, v["npos"], v["tp"], v["fp"], *(v["counts"][k] for k in ERROR_TYPES), nan(v["ap"]),
                         nan(v["ap_loc_fixed"])))
    return rows


def _errors_section(errors: Mapping[str, Any], out: Path, figure: Path | None, json_file: Path | None) -> str:
    o = errors["overall"]
    fr = o["fractions"]
    share = ", ".join(f"{name} {fr[k]:.0%}" for k, name in (("localisation", "localisation"),
                                                            ("similar", "similar classes"),
                                                            ("other", "other classes"),
                                                            ("background", "background"))
                      if fr.get(k) is not None)
    parts = ["<section id='errors'><h2>Where the false positives are</h2>",
             "<p>Each class's top N detections (N = its objects that are not difficult; matched as the VOC "
             "devkit does) hold the false positives counted here: <b>localisation</b> (overlap 0.1-0.5 with "
             "an object of the class, or a duplicate detection), <b>similar class</b> (overlap &ge; 0.1 with "
             "an object of a class in the same VOC group: animals, vehicles, furniture), <b>other class</b> "
             "(overlap &ge; 0.1 with any other object), <b>background</b> (the rest). "
             "<i>AP, localisation fixed</i>: the AP had every localisation error been corrected.</p>",
             "<p>" + (html.escape(f"{o['fp']} false positives: {share}") if o["fp"] else "no false positives")
             + "</p>"]
    if figure is not None:
        parts.append(f"<figure>{_img(figure, out, 'false positives by type')}</figure>")
    parts.append(_table(error_table_rows(errors), error_table_header(errors["metric"]), "errors"))
    if json_file is not None:
        src = html.escape(_src(json_file, out), quote=True)
        parts.append(f"<p class='muted'>as JSON: <a href=\"{src}\">{html.escape(Path(json_file).name)}</a></p>")
    parts.append("</section>")
    return "\n".join(parts)


def write_report(out_dir: str | Path, *, title: str, metric: str, mean_ap: float, ap: dict[str, float],
                 npos: dict[str, int] | None = None, pr_images: Sequence[Path] = (),
                 examples: Sequence[tuple[Path, str]] = (), timings: dict[str, Any] | None = None,
                 config_yaml: str = "", facts: dict[str, Any] | None = None,
                 figures: Sequence[tuple[Path, str]] = (),
                 tables: Sequence[tuple[str, Sequence[Sequence[Any]], Sequence[str]]] = (),
                 errors: Mapping[str, Any] | None = None, errors_figure: Path | None = None,
                 errors_json: Path | None = None) -> Path:
    """Write ``out_dir/index.html``; every image it shows is referenced relative to it.

    Args:
        title: heading.
        metric, mean_ap, ap: the evaluation (per-class AP by class name).
        npos: ground-truth objects per class (non-difficult), shown beside AP.
        figures: (PNG, caption) shown first, "at a glance" (AP bars, fine-tuning curve, ...).
        tables: (heading, rows, header) shown beside the AP table (e.g. proposal recall).
        pr_images: PR-curve PNGs.
        examples: (image, caption) of drawn detections.
        timings: {section: {stage: seconds or {"seconds", "reused", "total_seconds"}}}.
        config_yaml: the resolved config.
        facts: extra key/value lines (checkpoint, data, split, ...).
        errors: the false-positive breakdown,
            :meth:`sppdet.evaluation.errors.ErrorBreakdown.to_json`, shown as its own section
            (``id="errors"``: the figure ``errors_figure``, a table with one row per class and one for
            all classes, a link to ``errors_json``).

    Every image path (absolute, or relative to the working directory) must lie inside
    ``out_dir``; it is written into the HTML relative to ``out_dir``.

    Raises:
        ValueError: an image outside ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>sppdet report, {_dt.datetime.now():%Y-%m-%d %H:%M}</p>",
             f"<p><span class='big'>{mean_ap:.4f}</span> mAP ({html.escape(metric)})</p>"]
    if facts:
        parts.append(_table([(k, v) for k, v in facts.items()], ["", ""]))
    if figures:
        parts.append("<h2>At a glance</h2><div class='figs'>")
        for p, cap in figures:
            parts.append(f"<figure>{_img(p, out, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<div class='side'><div><h2>Average precision per class</h2>")
    rows = [(c, float(a)) + ((int(npos.get(c, 0)),) if npos else ()) for c, a in ap.items()]
    parts.append(_table(rows, ["class", "AP"] + (["objects"] if npos else [])) + "</div>")
    for heading, trows, header in tables:
        parts.append(f"<div><h2>{html.escape(heading)}</h2>{_table(trows, header)}</div>")
    parts.append("</div>")
    if errors:
        parts.append(_errors_section(errors, out, errors_figure, errors_json))
    if pr_images:
        parts.append("<h2>Precision-recall curves</h2><div class='grid'>")
        for p in pr_images:
            wide = " class='wide'" if Path(p).name.startswith("overview") else ""
            parts.append(f"<figure{wide}>{_img(p, out, Path(p).stem)}</figure>")
        parts.append("</div>")
    if examples:
        parts.append("<h2>Detections (coloured) and ground truth (dashed white)</h2><div class='grid'>")
        for p, cap in examples:
            parts.append(f"<figure>{_img(p, out, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>")
        parts.append("</div>")
    if timings:
        parts.append("<h2>Timing</h2><div class='side'>")
        for section, values in timings.items():
            if not isinstance(values, dict) or not values:
                continue
            rows = []
            for k, v in values.items():
                if isinstance(v, dict):
                    sec, tot = v.get("seconds"), v.get("total_seconds")
                    rows.append((k, float(sec) if sec is not None else "", float(tot) if tot is not None else "",
                                 "reused" if v.get("reused") else ""))
                elif isinstance(v, (int, float)):
                    rows.append((k, float(v), "", ""))
            header = ["stage", "this run", "all runs", ""] if any(isinstance(v, dict) for v in values.values()) \
                else ["stage", "seconds", "", ""]
            parts.append(f"<div><h3>{html.escape(section)}</h3>{_table(rows, header)}</div>")
        parts.append("</div>")
    if config_yaml:
        parts.append("<h2>Configuration</h2><details><summary>the resolved config</summary><pre>"
                     + html.escape(config_yaml) + "</pre></details>")
    parts.append("</body></html>")
    index = out / "index.html"
    atomic_write_text(index, "\n".join(parts) + "\n")
    log.info("report written to %s", index)
    return index


# --------------------------------------------------------------- evaluation report


def draw_examples(out_dir: str | Path, records: Sequence[Any], detections: Mapping[str, Any],
                  classes: list[str], n: int, *, min_score: float = 0.0) -> list[tuple[Path, str]]:
    """Draw detections (score >= ``min_score``) and ground truth of the ``n`` records with the most
    objects into ``out_dir`` as ``<index>_<slug>.jpg`` (see :func:`safe_file_name`).

    Returns:
        (image file, caption) per drawn example.  A target that would be one of the input images
        is skipped (the report never overwrites an input).
    """
    from .data.images import load_image
    from .visualize import draw_detections, save_image

    out = Path(out_dir)
    inputs = {os.path.abspath(r.path) for r in records}
    recs = sorted(records, key=lambda r: (-r.num_objects, r.image_id))
    drawn: list[tuple[Path, str]] = []
    for r in recs:
        if len(drawn) >= n:
            break
        d = detections.get(r.image_id)
        if d is None:
            continue
        f = out / safe_file_name(Path(str(r.image_id)).name or str(r.image_id), len(drawn), ".jpg")
        if os.path.abspath(f) in inputs:
            log.warning("%s: not drawn (it is an input image)", f)
            continue
        keep = d.scores >= min_score
        img = draw_detections(load_image(r.path), d.boxes[keep], d.labels[keep], d.scores[keep], classes,
                              gt_boxes=r.boxes, gt_labels=r.labels)
        save_image(img, f)
        drawn.append((f, f"{r.image_id}: {int(keep.sum())} detections (score >= {min_score:g}), "
                         f"{r.num_objects} objects"))
    return drawn


def _stage_seconds(train_timings: Mapping[str, Any]) -> dict[str, float]:
    """Seconds per training stage (all runs of it: what it cost even when this run reused it)."""
    out = {}
    for k, v in train_timings.items():
        if isinstance(v, dict):
            sec = v.get("total_seconds", v.get("seconds"))
            if isinstance(sec, (int, float)) and math.isfinite(sec):
                out[k] = float(sec)
    return out


def write_eval_report(out_dir: str | Path, *, result, dataset, detections: Mapping[str, Any],
                      classes: list[str], title: str, facts: dict[str, Any] | None = None,
                      train_stats: Mapping[str, Any] | None = None,
                      test_per_image: Mapping[str, float] | None = None,
                      proposals: Mapping[str, np.ndarray] | None = None,
                      config_yaml: str = "", n_examples: int = 8, breakdown=None) -> Path:
    """The evaluation report of a detector on a split.

    Args:
        out_dir: the report folder (``index.html``, ``figures/``, ``pr/``, ``examples/``).
        result: the :class:`~sppdet.evaluation.voc.EvalResult`.
        dataset: the evaluated split; detections: image id -> Detections.
        train_stats: the checkpoint's ``stats`` (``timings`` per stage; ``finetune`` with its
            ``curve``), for the fine-tuning curve and the training stage times.
        test_per_image: test-time seconds per image and stage.
        proposals: image id -> proposals the detector scored (recall against the ground truth).
    """
    from .evaluation.plots import (plot_ap_bars, plot_finetune_curve, plot_pr_curves, plot_recall_vs_iou,
                                   plot_stage_seconds)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = out / "figures"
    train_stats = train_stats or {}
    figures: list[tuple[Path, str]] = []
    tables: list[tuple[str, list, list]] = []
    facts = dict(facts or {})
    npos = result.npos or None

    if result.ap:
        figures.append((plot_ap_bars(result.ap, figs / "ap_per_class.png", npos=npos, metric=result.metric,
                                     mean_ap=result.mAP), f"AP per class ({result.metric}; objects in brackets)"))
    ft = train_stats.get("finetune") or {}
    curve = ft.get("curve")
    if curve and curve.get("iteration"):
        figures.append((plot_finetune_curve(curve, figs / "finetune_curve.png"),
                        f"fine-tuning: final loss {ft.get('loss', float('nan')):.3f}, "
                        f"batch accuracy {ft.get('accuracy', float('nan')):.3f} (training split)"))
    if proposals is not None:
        from .proposals.recall import compute_recall

        rr = compute_recall(dataset, proposals)
        if rr.num_gt:
            figures.append((plot_recall_vs_iou(rr.best_iou, figs / "proposal_recall.png",
                                               average_recall=rr.average_recall),
                            f"proposal recall on {dataset.split}: {rr.num_gt} objects, "
                            f"{rr.mean_boxes:.0f} boxes per image"))
            tables.append(("Proposals", [("recall@0.5", float(rr.recall_50)), ("recall@0.7", float(rr.recall_70)),
                                         ("average recall (0.5:0.95)", float(rr.average_recall)),
                                         ("boxes per image", f"{rr.mean_boxes:.1f}"),
                                         ("objects (not difficult)", rr.num_gt)], ["", ""]))
    train_sec = _stage_seconds(train_stats.get("timings", {}))
    test_sec = {k: float(v) for k, v in (test_per_image or {}).items()}
    if train_sec or test_sec:
        figures.append((plot_stage_seconds({"training: seconds per stage": train_sec,
                                            "test: seconds per image": test_sec}, figs / "stage_seconds.png"),
                        "where the time goes: training stages (all runs) and test time per image in this "
                        "evaluation (proposals and conv5 maps found in the cache cost ~0)"))

    errors = errors_figure = errors_json = None
    if result.per_class:
        errors, errors_figure, errors_json = _error_breakdown(out, figs, result, dataset, detections, classes,
                                                                breakdown)

    pr = plot_pr_curves(result, out / "pr") if result.per_class else []
    examples = draw_examples(out / "examples", dataset.records, detections, classes, n_examples)
    timings = {"training (seconds per stage)": {k: v for k, v in train_stats.get("timings", {}).items()
                                                if isinstance(v, dict)},
               "test (seconds per image)": dict(test_per_image or {})}
    return write_report(out, title=title, metric=result.metric, mean_ap=result.mAP, ap=result.ap, npos=npos,
                        pr_images=pr, examples=examples, timings=timings, config_yaml=config_yaml, facts=facts,
                        figures=figures, tables=tables, errors=errors, errors_figure=errors_figure,
                        errors_json=errors_json)


#: The error breakdown's JSON in a report folder.
ERRORS_JSON = "error_breakdown.json"


def _error_breakdown(out: Path, figs: Path, result, dataset, detections: Mapping[str, Any], classes: list[str],
                     breakdown=None):
    """The false-positive breakdown of the detections (:mod:`sppdet.evaluation.errors`): ``breakdown``
    when given, else computed here from the detections and the split the report is given (the same
    detections, in the same order, as the results files ``sppdet eval`` scores): (its JSON, the
    figure, ``out/error_breakdown.json``)."""
    import dataclasses
    import json

    from .evaluation.errors import error_breakdown_from_detections
    from .evaluation.plots import plot_error_breakdown

    metric = result.metric if result.metric in ("voc07", "voc12") else "voc07"
    scored = [c for c in classes if c in result.per_class] or list(classes)
    b = breakdown
    if b is None:
        b = error_breakdown_from_detections(dataset, detections, classes, metric=metric)
        log.info("%s", b.summary())
    b = dataclasses.replace(b, per_class={c: b.per_class[c] for c in scored})
    data = b.to_json()
    js = out / ERRORS_JSON
    atomic_write_text(js, json.dumps(data, indent=1) + "\n")
    return data, plot_error_breakdown(b, figs / "error_breakdown.png"), js
