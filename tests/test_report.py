"""The HTML report renders wherever it is opened: every src/href is a file inside its folder."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from sppdet.cli import main
from sppdet.data.records import ImageRecord
from sppdet.detect import Detections
from sppdet.report import draw_examples, safe_file_name, write_report


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.links.append((tag, k, v))


def html_links(index: Path) -> list[tuple[str, str, str]]:
    p = _Links()
    p.feed(index.read_text(encoding="utf-8"))
    p.close()
    return p.links


def assert_links_resolve_inside(index: Path) -> int:
    """Every src/href of ``index`` is a relative URL naming an existing file inside its folder
    (resolved against the HTML file, as a browser does, not against the working directory)."""
    folder = index.parent.resolve()
    links = html_links(index)
    for tag, attr, url in links:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, (tag, attr, url)
        assert not url.startswith("/"), f"absolute path in {attr}: {url}"
        target = (index.parent / unquote(parts.path)).resolve()
        assert target.is_file(), f"{index}: {tag} {attr}={url!r} does not exist ({target})"
        assert target.is_relative_to(folder), f"{index}: {attr}={url!r} points outside {folder}"
    return len(links)


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_report_links_are_relative_to_the_html_file(tmp_path, monkeypatch):
    """Written with a RELATIVE out_dir from one working directory, read from another: the old
    report wrote the cwd-relative path ("rep/pr/x.png") into the HTML, which the browser resolved
    against the HTML file's folder (rep/rep/pr/x.png) and showed broken images."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = Path("nested") / "rep"
    pr = [_png(out / "pr" / "overview_pr.png"), _png(out / "pr" / "pr_a b#1?.png")]
    ex = [(_png(out / "examples" / "000_x.jpg"), "<b>x</b> & y")]
    fig = [(_png((work / out / "figures" / "ap.png").resolve()), "absolute path inside out")]
    index = write_report(out, title="t <script>", metric="voc07", mean_ap=0.5, ap={"a<b": 0.5},
                         npos={"a<b": 3}, pr_images=pr, examples=ex, figures=fig,
                         tables=[("Proposals", [("recall@0.5", 0.9)], ["", ""])],
                         facts={"data": "<img src=x>"}, config_yaml="a: <b>")
    monkeypatch.chdir(tmp_path)
    index = work / index
    assert assert_links_resolve_inside(index) == 2 * (len(pr) + len(ex) + len(fig))  # img + its link
    text = index.read_text()
    # everything put into the HTML is escaped: no tag comes from a title, caption, fact or class name
    assert "<script>" not in text and "<b>" not in text and "<img src=x>" not in text
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in text and "a&lt;b" in text


def test_report_refuses_an_image_outside_its_folder(tmp_path):
    outside = _png(tmp_path / "elsewhere.png")
    with pytest.raises(ValueError, match="inside its folder"):
        write_report(tmp_path / "rep", title="t", metric="voc07", mean_ap=0.0, ap={}, pr_images=[outside])


@pytest.mark.parametrize("text", ["../../x", "/etc/passwd", "a/../../b", "..", ".", "", "C:\\x\\..\\y",
                                  "<img src=x onerror=alert(1)>", "ünï cödé"])
def test_safe_file_name_is_one_plain_component(text):
    name = safe_file_name(text, 7, ".jpg")
    assert name.startswith("007_") and name.endswith(".jpg")
    assert "/" not in name and "\\" not in name and ".." not in name[:-4]
    assert name.isascii() and all(ch.isalnum() or ch in "_-" for ch in name[:-4])


def test_examples_from_hostile_ids_stay_in_the_report_folder(tmp_path, monkeypatch):
    """Split ids like absolute paths or ../../x become index-prefixed slugs inside examples/; no
    file appears anywhere else, no input is overwritten, and the captions are escaped in the HTML."""
    data = tmp_path / "data"
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"do not overwrite")
    ids = [str(victim.with_suffix("")), "../../victim", "x/../../../victim", "..", "<script>alert(1)</script>",
           "same", "same"]
    recs = []
    for i, rid in enumerate(ids):
        p = _png(data / f"img{i}.png", (i * 30, 90, 60))
        recs.append(ImageRecord(rid, p, 8, 8, np.array([[1, 1, 6, 6]], np.float32), np.array([0])))
    dets = {r.image_id: Detections(np.array([[0, 0, 5, 5]], np.float32), np.array([0.5], np.float32),
                                   np.array([0])) for r in recs}
    before = {p for p in tmp_path.rglob("*")}
    monkeypatch.chdir(data)
    out = Path("rep")
    examples = draw_examples(out / "examples", recs, dets, ["thing"], n=len(recs))
    index = write_report(out, title="t", metric="voc07", mean_ap=0.0, ap={"thing": 0.0}, examples=examples)
    new = {p for p in tmp_path.rglob("*")} - before
    rep = (data / "rep").resolve()
    assert new and all(p.resolve().is_relative_to(rep) or p.resolve() == rep for p in new), sorted(new)
    assert victim.read_bytes() == b"do not overwrite"
    names = [f.name for f, _ in examples]
    assert len(names) == len(set(names)) == len(ids)            # unique, none dropped
    assert assert_links_resolve_inside(data / index) == 2 * len(ids)
    assert "<script>" not in (data / index).read_text()


def test_eval_report_with_a_relative_dir_from_another_cwd(tiny_demo, tmp_path, monkeypatch):
    """`sppdet eval --report DIR` with DIR relative, run from another working directory: every
    link resolves; the report shows AP bars, the fine-tuning curve, proposal recall and stage times."""
    demo = tiny_demo["out"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ckpt = os.path.relpath(demo / "run" / "model.pt", work)       # relative inputs too
    data = os.path.relpath(demo / "data", work)
    assert main(["-q", "eval", "--checkpoint", ckpt, "--data", data, "--split", "test",
                 "--results", "res", "--report", "sub/report", "--workers", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    index = work / "sub" / "report" / "index.html"
    n = assert_links_resolve_inside(index)
    srcs = {v for tag, k, v in html_links(index) if k == "src"}
    for fig in ("ap_per_class", "finetune_curve", "proposal_recall", "stage_seconds"):
        assert f"figures/{fig}.png" in srcs, fig
    assert any(s.startswith("examples/") for s in srcs) and any(s.startswith("pr/") for s in srcs)
    assert n == 2 * len(srcs) + 1        # each image links to itself, plus the error breakdown's JSON
    assert ("a", "href", "error_breakdown.json") in html_links(index)
    text = index.read_text()
    assert "recall@0.5" in text and "average recall" in text


def test_demo_report_renders_and_recall_matches_a_reference(tiny_demo):
    """The demo (default relative --out) writes a report whose links resolve; its proposal
    recall@0.5 equals a slow reference over the proposals the eval scored."""
    from sppdet.boxes import box_iou
    from sppdet.data import load_dataset
    from sppdet.detect import Detector
    from sppdet.proposals import compute_proposals

    demo = tiny_demo["out"]
    index = demo / "report" / "index.html"
    assert "report:      sppdet-demo/report/index.html" in tiny_demo["summary"]
    assert assert_links_resolve_inside(index) > 0

    # the demo's cache: eval/detect use the caller's cache, never the one a checkpoint records
    det = Detector.from_checkpoint(demo / "run" / "model.pt", device="cpu", cache_dir=demo / "cache")
    ds = load_dataset(demo / "data", "test", classes=det.classes)
    store = compute_proposals(ds, det.preset, det.max_boxes, workers=1, cache_dir=det.cache_dir, progress=False)
    hits, total = 0, 0
    for r in ds.records:
        props = store[r.image_id]
        for g, diff in zip(r.boxes, r.difficult):
            if diff:
                continue
            total += 1
            best = max(float(box_iou(g[None], p[None])[0, 0]) for p in props)
            hits += best >= 0.5
    text = index.read_text()
    row = text.split("<td>recall@0.5</td>")[1].split("</td>")[0]
    assert float(row.split(">")[-1]) == pytest.approx(hits / total, abs=5e-5)


def test_training_records_the_finetune_curve(tiny_demo, tmp_path, monkeypatch):
    """RUN/finetune_log.json and the checkpoint's stats hold the curve, also when a rerun reuses
    the fine-tuning stage (the curve comes from the stage's file)."""
    import shutil

    import torch

    from sppdet.config import load_config
    from sppdet.train.pipeline import train

    run = tiny_demo["out"] / "run"
    log = json.loads((run / "finetune_log.json").read_text())
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["stats"]["finetune"] == log
    curve = log["curve"]
    assert curve["iteration"] == list(range(1, 31))               # 30 iterations, one point each
    assert len(curve["loss"]) == len(curve["accuracy"]) == len(curve["lr"]) == 30
    assert log["loss"] == pytest.approx(np.mean(curve["loss"]))   # the final running mean of <= 100

    again = tmp_path / "run"
    shutil.copytree(run, again)
    (again / "finetune_log.json").unlink()
    monkeypatch.chdir(tiny_demo["cwd"])            # the same inputs as the demo's: sppdet-demo/data
    train(load_config(run / "config.yaml"), again, data_root="sppdet-demo/data", show_progress=False)
    assert json.loads((again / "timings.json").read_text())["finetune"]["reused"]
    assert json.loads((again / "finetune_log.json").read_text()) == log
    assert torch.load(again / "model.pt", weights_only=True)["stats"]["finetune"] == log


class _ErrorsTable(HTMLParser):
    """The cells of <table class='errors'> inside <section id='errors'>, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.in_section = self.in_table = self.in_cell = False
        self.rows: list[list[str]] = []
        self.section_seen = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and a.get("id") == "errors":
            self.in_section = self.section_seen = True
        elif tag == "table" and self.in_section and a.get("class") == "errors":
            self.in_table = True
        elif tag == "tr" and self.in_table:
            self.rows.append([])
        elif tag in ("td", "th") and self.in_table:
            self.in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.in_cell = False
        elif tag == "table":
            self.in_table = False
        elif tag == "section":
            self.in_section = False

    def handle_data(self, data):
        if self.in_cell:
            self.rows[-1][-1] += data


def errors_table(index: Path) -> tuple[list[str], list[dict[str, str]]]:
    p = _ErrorsTable()
    p.feed(index.read_text(encoding="utf-8"))
    p.close()
    assert p.section_seen, f"{index}: no error-breakdown section"
    header, *rows = p.rows
    return header, [dict(zip(header, r)) for r in rows]


def test_report_error_section_escapes_and_sums(tmp_path):
    from sppdet.data.records import Dataset
    from sppdet.evaluation.errors import error_breakdown_from_detections

    recs = [ImageRecord("a", tmp_path / "a.png", 64, 64, np.array([[0, 0, 20, 20], [30, 30, 60, 60]], np.float32),
                        np.array([0, 1]))]
    ds = Dataset("t", "test", ["a<b", "cat"], recs)
    dets = {"a": Detections(np.array([[0, 0, 20, 20], [30, 30, 60, 60], [5, 0, 25, 20]], np.float32),
                            np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 0, 1]))}
    b = error_breakdown_from_detections(ds, dets).to_json()
    index = write_report(tmp_path / "rep", title="t", metric="voc07", mean_ap=0.5, ap={"a<b": 1.0, "cat": 0.0},
                         errors=b)
    text = index.read_text()
    assert "<b>" not in text.replace("<b>localisation", "").replace("<b>similar class", "") \
        .replace("<b>other class", "").replace("<b>background", "")
    header, rows = errors_table(index)
    assert [r["class"] for r in rows] == ["all classes", "a<b", "cat"]
    types = ["localisation", "similar class", "other class", "background"]
    for r in rows:
        assert sum(int(r[t]) for t in types) == int(r["FP in top N"])
    # a<b: top 1 = the TP; cat: its top 1 detection overlaps the a<b object only: "other class"
    assert rows[1]["TP in top N"] == "1" and rows[1]["FP in top N"] == "0"
    assert rows[2]["FP in top N"] == "1" and rows[2]["other class"] == "1"


def test_eval_report_error_breakdown_sums_to_the_devkit_false_positives(tiny_demo):
    """The demo's report has the error-breakdown section; per class, its four types add up to the
    false positives among the class's top N detections, N its non-difficult objects, as the devkit
    evaluator counts them on the results files the demo wrote; the overall row adds up the classes;
    the JSON beside it holds the same numbers."""
    from sppdet.data import load_dataset
    from sppdet.evaluation.voc import evaluate_voc_results

    demo = tiny_demo["out"]
    index = demo / "report" / "index.html"
    srcs = {v for tag, k, v in html_links(index) if k == "src"}
    assert "figures/error_breakdown.png" in srcs
    header, rows = errors_table(index)
    types = ["localisation", "similar class", "other class", "background"]
    assert rows[0]["class"] == "all classes" and len(rows) > 1
    ds = load_dataset(demo / "data", "test", classes=[r["class"] for r in rows[1:]])
    ev = evaluate_voc_results(ds, demo / "results")
    total = {t: 0 for t in types + ["FP in top N", "TP in top N"]}
    for r in rows[1:]:
        c = r["class"]
        cr = ev.per_class[c]
        n = min(cr.npos, len(cr.fp))
        assert int(r["objects (N)"]) == cr.npos
        assert sum(int(r[t]) for t in types) == int(r["FP in top N"]) == (int(cr.fp[n - 1]) if n else 0), c
        assert int(r["TP in top N"]) == (int(cr.tp[n - 1]) if n else 0), c
        assert float(r["AP (voc07)"]) == pytest.approx(cr.ap, abs=5e-5)
        for t in total:
            total[t] += int(r[t])
    for t, v in total.items():
        assert int(rows[0][t]) == v, t
    data = json.loads((demo / "report" / "error_breakdown.json").read_text())
    assert data["overall"]["fp"] == total["FP in top N"]
    assert {c: v["fp"] for c, v in data["per_class"].items()} == {r["class"]: int(r["FP in top N"]) for r in rows[1:]}
