"""Bad inputs through the CLI: one table, one row per thing a demanding user might feed sppdet.

Every row must end the same way (docs/SAFETY.md): exit status 2, ONE line on stderr
(``sppdet: error: ...``) naming the file or option and what is wrong, no traceback, and no
file outside the output folders given on the command line created or changed (the input
tree is hashed before and after).  Add a row for every new failure mode.

The rows run in-process (``sppdet.cli.main``); a few also run as ``python -m sppdet`` to see
the real exit status and stderr.  A full disk is simulated by making the writes of chosen
files fail with ``OSError(ENOSPC)`` (the file objects that sppdet's writers open).

Below the table: the guarantees that are not an exit status (a truncated image reported
once, output-name clashes named, stale temp files removed, the run folder's config.yaml
kept with its model.pt, UTF-8 byte-order marks, Pillow's bomb warning logged) and the check
that every numeric config setting is range-checked.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import fnmatch
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TINY_TRAIN
from sppdet.cli import main
from sppdet.data.records import VOC_CLASSES
from test_cli_evaluate import FIXTURE, make_voc, write_gt_results

# ---------------------------------------------------------------------------
# Helpers


def snapshot(*roots: Path, exclude: tuple[Path, ...] = ()) -> dict[str, tuple[int, str]]:
    """path -> (size, sha1) of every file under ``roots`` (folders in ``exclude`` left out)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if any(p == e or e in p.parents for e in exclude) or not p.is_file():
                continue
            out[str(p)] = (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


class _FullDisk:
    """A writable file object whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk_for(monkeypatch, pattern: str) -> None:
    """Writes of files whose name matches ``pattern`` (fnmatch) fail with ENOSPC, through every
    module of sppdet that opens files for writing itself."""
    import sppdet.features.conv5_cache
    import sppdet.utils.io

    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and fnmatch.fnmatch(Path(str(file)).name, pattern):
            return _FullDisk(f)
        return f

    for mod in (sppdet.utils.io, sppdet.features.conv5_cache):
        monkeypatch.setattr(mod, "open", fake_open, raising=False)


# ---------------------------------------------------------------------------
# The context a row builds its files in


@dataclass
class Ctx:
    tmp: Path                 # everything of this row; outputs go under tmp/out only
    run: dict | None          # the session's tiny trained detector (shared: never written to)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def voc(self) -> Path:
        """A 4-image VOC root (cat/dog) in tmp/voc."""
        root = self.tmp / "voc"
        if not root.exists():
            make_voc(root)
        return root

    def results(self) -> Path:
        """Ground-truth results files for the VOC root (all 20 VOC classes), in tmp/res."""
        return write_gt_results({k: v[2] for k, v in FIXTURE.items()}, self.tmp / "res", "test", VOC_CLASSES)

    def victim(self) -> Path:
        """A folder outside the dataset with an image and an annotation an id might point at."""
        v = self.tmp / "victim"
        if not v.exists():
            v.mkdir()
            src = self.voc()
            shutil.copy(src / "JPEGImages" / "img001.jpg", v / "img001.jpg")
            shutil.copy(src / "Annotations" / "img001.xml", v / "img001.xml")
        return v

    def tiny_data(self) -> Path:
        """A copy of the tiny detector's test data (so rows can change its split file)."""
        dst = self.tmp / "tiny_data"
        if not dst.exists():
            shutil.copytree(self.run["data"], dst)
        return dst

    def split(self, root: Path, lines: list[str], name: str = "test", bom: bool = False) -> Path:
        f = root / "ImageSets" / "Main" / f"{name}.txt"
        f.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(x + "\n" for x in lines).encode("utf-8"))
        return root

    def ckpt(self, tamper: Callable[[dict], None] | None = None, raw: bytes | None = None) -> Path:
        """The tiny detector's checkpoint, changed by ``tamper`` (or replaced by ``raw`` bytes), in tmp/ck."""
        p = self.tmp / "ck" / "model.pt"
        p.parent.mkdir(parents=True, exist_ok=True)
        if raw is not None:
            p.write_bytes(raw)
        elif tamper is None:
            shutil.copy(self.run["checkpoint"], p)
        else:
            d = torch.load(self.run["checkpoint"], weights_only=True)
            tamper(d)
            torch.save(d, p)
        return p

    def eval_args(self, ck: Path, data: Path, *extra: str) -> list[str]:
        return ["eval", "--checkpoint", str(ck), "--data", str(data), "--split", "test", "--device", "cpu",
                "--results", str(self.out / "res"), "--cache", str(self.out / "cache"), "--workers", "1", *extra]

    def detect_args(self, ck: Path, *inputs: Path, out: Path | None = None) -> list[str]:
        return ["detect", "--checkpoint", str(ck), *map(str, inputs), "--out", str(out or self.out / "det"),
                "--device", "cpu", "--cache", str(self.out / "cache")]

    def copy_run(self) -> tuple[Path, Path]:
        """A copy of the tiny run folder and its cache in tmp/out (retraining reuses every stage)."""
        run, cache = self.out / "run", self.out / "cache"
        if not run.exists():
            shutil.copytree(self.run["run"], run)
            shutil.copytree(self.run["cache"], cache)
        return run, cache

    def retrain_args(self, *extra: str) -> list[str]:
        run, cache = self.copy_run()
        return ["train", "--config", "demo_lite0", "--data", str(self.run["data"]), "--out", str(run),
                "--cache", str(cache), *TINY_TRAIN, *extra]


def _write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _annotation(ctx: Ctx, text: str) -> Path:
    root = ctx.voc()
    (root / "Annotations" / "img002.xml").write_text(text)
    return root


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


_LOL = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
ENTITY_BOMB = f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l0 "lol">{_LOL}]><annotation><object><name>&l9;</name>' \
              "</object></annotation>"
XXE = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation><object>' \
      "<name>&x;</name></object></annotation>"


def _drop_svm_w(d):
    del d["svm"]["W"]


def _wide_svm_w(d):
    d["svm"]["W"] = torch.zeros(d["svm"]["W"].shape[0] + 1, d["svm"]["W"].shape[1])


def _double_svm_w(d):
    d["svm"]["W"] = d["svm"]["W"].double()


def _short_fc6(d):
    d["head"]["hidden.0.weight"] = d["head"]["hidden.0.weight"][:, :-1].clone()


def _extra_class(d):
    d["classes"] = d["classes"] + ["unicorn"]


def _zip_pickle(ctx: Ctx) -> Path:
    p = ctx.tmp / "ck" / "evil.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "sppdet-checkpoint", "x": Evil()}, p)
    return p


# ---------------------------------------------------------------------------
# The table


@dataclass
class Row:
    id: str
    argv: Callable[[Ctx], list[str]]
    needle: str                     # expected in the one error line
    run: bool = False               # needs the session's trained detector
    enospc: str | None = None       # file-name pattern whose writes fail as on a full disk
    subprocess: bool = False        # also run as `python -m sppdet`
    errors: int = 1                 # error lines (detect: one per unreadable image + a summary)


ROWS = [
    # ---- ids and names that point outside the dataset root (item 1 and 3 of issue 12)
    Row("split id is an absolute path (eval --report)",
        lambda c: c.eval_args(c.ckpt(), c.split(c.tiny_data(), [str(c.victim() / "img001"), "000003"]),
                              "--report", str(c.out / "report")),
        "image id '/", run=True, subprocess=True),
    Row("split id climbs out with ../ (eval --report)",
        lambda c: c.eval_args(c.ckpt(), c.split(c.tiny_data(), ["000003", "../../victim/img001"]),
                              "--report", str(c.out / "report")),
        "test.txt:2: image id '../../victim/img001' contains a path separator", run=True),
    Row("split id is ..",
        lambda c: ["evaluate", "--data", str(c.split(c.voc(), [".."])), "--split", "test", "--results",
                   str(c.results())],
        "test.txt:1: image id '..' is '..'"),
    Row("split id with a NUL character",
        lambda c: ["evaluate", "--data", str(c.split(c.voc(), ["img001", "img\x00002"])), "--split", "test",
                   "--results", str(c.results())],
        "test.txt:2: image id 'img\\x00002' contains a NUL character"),
    Row("split id with a backslash",
        lambda c: ["evaluate", "--data", str(c.split(c.voc(), ["..\\..\\victim\\img001"])), "--split", "test",
                   "--results", str(c.results())],
        "contains a path separator"),
    Row("--split names a path",
        lambda c: ["evaluate", "--data", str(c.voc()), "--split", "../../victim/x", "--results", str(c.results())],
        "--split '../../victim/x': contains a path separator"),
    Row("COCO file_name outside the image folder",
        lambda c: ["evaluate", "--format", "coco", "--data", str(c.voc() / "JPEGImages"), "--split", "test",
                   "--results", str(c.results()), "--annotations", str(_write(c.tmp / "coco.json", json.dumps({
                       "images": [{"id": 1, "file_name": "../../victim/img001.jpg", "width": 64, "height": 48}],
                       "annotations": [], "categories": [{"id": 1, "name": "cat"}]})))],
        "file_name '../../victim/img001.jpg' contains a '..' component"),
    # ---- writes over the inputs (item 2)
    Row("detect --out is the input folder",
        lambda c: c.detect_args(c.ckpt(), c.voc() / "JPEGImages", out=c.voc() / "JPEGImages"),
        "is the folder of the input", run=True, subprocess=True),
    Row("detect --out is the folder of an input file",
        lambda c: c.detect_args(c.ckpt(), c.voc() / "JPEGImages" / "img001.jpg", out=c.voc() / "JPEGImages" / "."),
        "sppdet never writes next to its inputs", run=True),
    # ---- a full disk (item 4)
    Row("disk full writing the checkpoint",
        lambda c: c.retrain_args(), "model.pt: no space left on device", run=True, enospc=".model.pt.*"),
    Row("disk full writing a stage output",
        lambda c: c.retrain_args("--set", "svm.C=0.01"), "svm.pt: no space left on device", run=True,
        enospc=".svm.pt.*"),
    Row("disk full writing the proposal cache",
        lambda c: ["proposals", "--data", str(c.voc()), "--split", "test", "--cache", str(c.out / "cache"),
                   "--workers", "1"], "no space left on device", enospc="*.np[yz]"),
    Row("disk full writing the conv5 cache",            # features/<backbone>/<kk>/<hex key>.npz
        lambda c: c.eval_args(c.ckpt(), c.run["data"]), ".npz: no space left on device", run=True,
        enospc=".[0-9a-f][0-9a-f][0-9a-f][0-9a-f]*.npz.tmp*"),
    Row("disk full writing results files",
        lambda c: c.eval_args(c.ckpt(), c.run["data"]), "comp4_det_test_checker.txt: no space left on device",
        run=True, enospc=".comp4_det_*"),
    Row("disk full writing detect's JSON",
        lambda c: c.detect_args(c.ckpt(), c.run["data"] / "JPEGImages" / "000001.jpg"),
        "000001.json: no space left on device", run=True, enospc=".000001.json.*"),
    # ---- tampered checkpoints, refused at load time (item 4)
    Row("checkpoint with a missing tensor", lambda c: c.eval_args(c.ckpt(_drop_svm_w), c.run["data"]),
        "tensor svm.W is missing", run=True, subprocess=True),
    Row("checkpoint tensor of the wrong shape", lambda c: c.eval_args(c.ckpt(_wide_svm_w), c.run["data"]),
        "svm.W has shape [33, 5], expected [32, 5]", run=True),
    Row("checkpoint fc6 of the wrong shape",
        lambda c: c.detect_args(c.ckpt(_short_fc6), c.run["data"] / "JPEGImages"),
        "head.hidden.0.weight has shape", run=True),
    Row("checkpoint tensor of the wrong dtype", lambda c: c.eval_args(c.ckpt(_double_svm_w), c.run["data"]),
        "svm.W has dtype float64, expected float32", run=True),
    Row("checkpoint class list longer than its tensors", lambda c: c.eval_args(c.ckpt(_extra_class), c.run["data"]),
        "cls_score.weight has shape [6, 32], expected [7, 32]", run=True),
    # ---- not checkpoints (item 6)
    Row("checkpoint is a pickle payload", lambda c: c.eval_args(c.ckpt(raw=pickle.dumps(Evil())), c.voc()),
        "contains Python objects; refusing to load it", subprocess=True),
    Row("checkpoint is a torch zip naming a function", lambda c: c.eval_args(_zip_pickle(c), c.voc()),
        "contains Python objects; refusing to load it"),
    Row("checkpoint is random bytes", lambda c: c.eval_args(c.ckpt(raw=os.urandom(4096)), c.voc()),
        "not an sppdet checkpoint"),
    Row("checkpoint is truncated",
        lambda c: c.eval_args(c.ckpt(raw=Path(c.run["checkpoint"]).read_bytes()[:5000]), c.voc()),
        "truncated or corrupt", run=True),
    Row("checkpoint file missing", lambda c: c.eval_args(c.tmp / "none.pt", c.voc()), "no such checkpoint file"),
    # ---- settings (item 8): refused when the config is loaded, before any stage
    *[Row(f"--set {kv}", lambda c, kv=kv: ["train", "--config", "demo_lite0", "--data", str(c.voc()), "--out",
                                           str(c.out / "run"), "--cache", str(c.out / "cache"), "--set", kv],
          kv.split("=")[0] + ": must be")
      for kv in ("finetune.lr=-1", "finetune.lr=.nan", "finetune.lr=.inf", "finetune.lr=0", "finetune.batch_size=0",
                 "features.max_side=0", "finetune.iterations=-1", "finetune.min_iterations=-5",
                 "test.nms=1.5", "svm.neg_iou=-0.1", "bbox_reg.min_iou=2", "svm.C=0")],
    Row("unknown config key",
        lambda c: ["train", "--config", "demo_lite0", "--data", str(c.voc()), "--set", "finetune.lrr=0.1"],
        "unknown key 'lrr'", subprocess=True),
    Row("config value of the wrong type",
        lambda c: ["train", "--config", "demo_lite0", "--data", str(c.voc()), "--set", "svm.C=abc"],
        "svm.C: expected a number"),
    Row("config file missing", lambda c: ["train", "--config", str(c.tmp / "nope.yaml")], "no such config file"),
    Row("config split name is a path",
        lambda c: ["train", "--config", "demo_lite0", "--data", str(c.voc()), "--set", "data.train_split=../x"],
        "data.train_split: '../x' contains a path separator"),
    # ---- results files (item 8 and already handled)
    Row("results file with an inf score",
        lambda c: ["evaluate", "--data", str(c.voc()), "--split", "test", "--results",
                   str(_write(c.results() / "comp4_det_test_cat.txt", "img001 inf 1 1 30 40\n").parent)],
        "comp4_det_test_cat.txt:1: score is infinite"),
    Row("results file with a -inf score",
        lambda c: ["evaluate", "--data", str(c.voc()), "--split", "test", "--results",
                   str(_write(c.results() / "comp4_det_test_cat.txt", "img001 0.5 1 1 30 40\nimg002 -inf 1 1 9 9\n").parent)],
        "comp4_det_test_cat.txt:2: score is infinite"),
    Row("results file with a NaN score",
        lambda c: ["evaluate", "--data", str(c.voc()), "--split", "test", "--results",
                   str(_write(c.results() / "comp4_det_test_cat.txt", "img001 nan 1 1 30 40\n").parent)],
        "score is NaN"),
    Row("malformed results line",
        lambda c: ["evaluate", "--data", str(c.voc()), "--split", "test", "--results",
                   str(_write(c.results() / "comp4_det_test_dog.txt", "img001 0.5 1 2 3\n").parent)],
        "comp4_det_test_dog.txt:1: expected"),
    Row("results folder missing",
        lambda c: ["evaluate", "--data", str(c.voc()), "--split", "test", "--results", str(c.tmp / "nores")],
        "results folder not found"),
    # ---- datasets (already handled)
    Row("missing split file",
        lambda c: ["evaluate", "--data", str(c.voc()), "--split", "val", "--results", str(c.results())],
        "val.txt: split file not found (available splits: test)"),
    Row("missing dataset folder",
        lambda c: ["evaluate", "--data", str(c.tmp / "nodata"), "--split", "test", "--results", str(c.tmp)],
        "dataset folder not found"),
    Row("non-VOC XML (object without a box)",
        lambda c: ["evaluate", "--data", str(_annotation(c, "<annotation><object><name>cat</name></object>"
                                                            "</annotation>")),
                   "--split", "test", "--results", str(c.results())],
        "img002.xml: object 0 (cat) has no <bndbox>"),
    Row("annotation that is not XML",
        lambda c: ["evaluate", "--data", str(_annotation(c, "{\"not\": \"xml\"}")), "--split", "test",
                   "--results", str(c.results())],
        "img002.xml: cannot parse XML"),
    Row("entity-expansion XML",
        lambda c: ["evaluate", "--data", str(_annotation(c, ENTITY_BOMB)), "--split", "test", "--results",
                   str(c.results())],
        "img002.xml: cannot parse XML (limit on input amplification"),
    Row("external-entity XML",
        lambda c: ["evaluate", "--data", str(_annotation(c, XXE)), "--split", "test", "--results", str(c.results())],
        "img002.xml: cannot parse XML (undefined entity"),
    Row("corrupt image in the dataset",
        lambda c: ["evaluate", "--data", str(_write(c.voc() / "JPEGImages" / "img003.jpg", b"\xff\xd8\xff\xe0junk").parents[1]),
                   "--split", "test", "--results", str(c.results())],
        "img003.jpg: cannot read image header"),
    Row("disguised file in the dataset (text saved as .jpg)",
        lambda c: ["evaluate", "--data", str(_write(c.voc() / "JPEGImages" / "img003.jpg", "hello").parents[1]),
                   "--split", "test", "--results", str(c.results())],
        "img003.jpg: not a recognised image format"),
    Row("detect on a disguised file",
        lambda c: c.detect_args(c.ckpt(), _write(c.tmp / "in" / "photo.jpg", "#!/bin/sh\necho hi\n")),
        "photo.jpg: not a recognised image format", run=True, errors=2),
    Row("detect on nothing",
        lambda c: c.detect_args(c.ckpt(), c.tmp / "empty_dir_*.png"), "no image files found", run=True),
]


def _ids(rows):
    return [r.id for r in rows]


def _prepare(row: Row, tmp_path: Path, request) -> tuple[Ctx, list[str], list[Path], dict]:
    ctx = Ctx(tmp_path, request.getfixturevalue("tiny_run") if row.run else None)
    argv = row.argv(ctx)
    watched = [tmp_path] + ([ctx.run["data"], ctx.run["run"]] if ctx.run else [])
    return ctx, argv, watched, snapshot(*watched, exclude=(ctx.out,))


@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_bad_input_is_one_line_exit_2_and_touches_no_input(row, tmp_path, request, capsys, monkeypatch):
    ctx, argv, watched, before = _prepare(row, tmp_path, request)
    if row.enospc:
        fill_disk_for(monkeypatch, row.enospc)
    capsys.readouterr()
    rc = main(["-q", *argv])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert rc == 2, err
    assert lines and lines[-1].startswith("sppdet: error: "), err
    errors = [ln for ln in lines if ln.startswith("sppdet: error: ")]
    assert len(errors) == row.errors and row.needle in errors[0], err
    assert "Traceback" not in err and "weights_only" not in err
    # nothing outside the output folder was created or changed (inputs, the victim folder, the shared run)
    assert snapshot(*watched, exclude=(ctx.out,)) == before
    # and no temp file was left behind anywhere
    assert not [p for p in tmp_path.rglob(".*.tmp*") if p.is_file()]


SUBPROCESS_ROWS = [r for r in ROWS if r.subprocess]


@pytest.mark.parametrize("row", SUBPROCESS_ROWS, ids=_ids(SUBPROCESS_ROWS))
def test_bad_input_as_a_real_process(row, tmp_path, request):
    ctx, argv, watched, before = _prepare(row, tmp_path, request)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), SPPDET_PROGRESS="0")
    r = subprocess.run([sys.executable, "-m", "sppdet", "-q", *argv], capture_output=True, text=True,
                       timeout=300, env=env)
    lines = error_lines(r.stderr)
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("sppdet: error: ") and row.needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(*watched, exclude=(ctx.out,)) == before


def test_settings_are_refused_before_any_stage_runs(tmp_path):
    """A nonsense setting fails at once: no run folder, no cache, nothing computed."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    rc = main(["-q", "train", "--config", "demo_lite0", "--data", str(make_voc(tmp_path / "voc")), "--out", str(out),
               "--cache", str(cache), "--set", "finetune.lr=-1"])
    assert rc == 2 and not out.exists() and not cache.exists()


# ---------------------------------------------------------------------------
# Guarantees that are not an exit status


def test_failed_retrain_keeps_config_yaml_with_its_model(tiny_run, tmp_path, monkeypatch, capsys):
    """A retrain with other settings that dies writing model.pt leaves RUN/config.yaml and RUN/model.pt
    as they were: the pair still belongs together."""
    ctx = Ctx(tmp_path, tiny_run)
    argv = ctx.retrain_args("--set", "test.nms=0.25")
    run = ctx.out / "run"
    before = snapshot(run / "model.pt", run / "config.yaml")
    fill_disk_for(monkeypatch, ".model.pt.*")
    assert main(["-q", *argv]) == 2
    assert "model.pt: no space left on device" in capsys.readouterr().err
    assert snapshot(run / "model.pt", run / "config.yaml") == before
    assert "nms: 0.25" not in (run / "config.yaml").read_text()
    # with room on the disk the same command writes both, and they agree
    monkeypatch.undo()
    assert main(["-q", *argv]) == 0
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["config"]["test"]["nms"] == 0.25 and "nms: 0.25" in (run / "config.yaml").read_text()


def test_truncated_image_is_reported_once(tiny_run, tmp_path, capsys):
    src = tiny_run["data"] / "JPEGImages"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src / "000001.jpg", inp / "good.jpg")
    (inp / "cut.jpg").write_bytes((src / "000002.jpg").read_bytes()[:1500])   # header intact, pixels cut
    capsys.readouterr()
    rc = main(["-q", "detect", "--checkpoint", str(tiny_run["checkpoint"]), str(inp), "--out", str(tmp_path / "det"),
               "--device", "cpu", "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("cut.jpg") == 1 and "truncated" in err, err
    assert (tmp_path / "det" / "good.json").is_file() and not (tmp_path / "det" / "cut.json").exists()


def test_detect_output_name_clashes_are_named(tiny_run, tmp_path, caplog):
    src = tiny_run["data"] / "JPEGImages" / "000001.jpg"
    a, b = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"
    own = tmp_path / "c" / "x_1.jpg"
    for p in (a, b, own):
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, p)
    out = tmp_path / "det"
    with caplog.at_level("WARNING", logger="sppdet"):
        rc = main(["-q", "detect", "--checkpoint", str(tiny_run["checkpoint"]), str(a), str(b), str(own),
                   "--out", str(out), "--device", "cpu", "--cache", str(tmp_path / "cache"), "--no-draw"])
    assert rc == 0
    # x_1 belongs to the input called x_1: the second x becomes x_2, and nothing is overwritten
    assert json.loads((out / "x.json").read_text())["image"] == str(a)
    second = json.loads((out / "x_2.json").read_text())
    assert second["image"] == str(b) and second["output_name"] == "x_2"
    third = json.loads((out / "x_1.json").read_text())
    assert third["image"] == str(own) and "output_name" not in third
    msgs = [r.getMessage() for r in caplog.records if "output name" in r.getMessage()]
    assert len(msgs) == 1 and str(b) in msgs[0] and str(a) in msgs[0] and "x_2" in msgs[0]


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path):
    from sppdet.utils import io

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3 * 24 * 3600
    files = {
        "dead": tmp_path / f".a.npz.tmp{dead.pid}.abcd1234.npz",       # a killed process's: removed
        "live": tmp_path / f".b.npz.tmp{os.getpid()}.abcd1234.npz",    # a live process's: kept
        "legacy": tmp_path / ".c.npz.k2j4h5g6.npz",                    # old pid-less form, 3 days old: removed
        "user": tmp_path / ".hidden",                                   # not ours: kept
        "data": tmp_path / "d.npz",                                     # not a temp file: kept
    }
    for p in files.values():
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    io._cleaned.discard(str(tmp_path))
    io.atomic_write_bytes(tmp_path / "new.bin", b"y")
    left = {k for k, p in files.items() if p.exists()}
    assert left == {"live", "user", "data"}
    assert (tmp_path / "new.bin").read_bytes() == b"y"
    # a fresh temp file of a dead process (written after this process started) is left alone
    fresh = tmp_path / f".e.npz.tmp{dead.pid}.abcd1234.npz"
    fresh.write_bytes(b"x")
    assert io.remove_stale_temp_files(tmp_path) == []


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    """Library level: each atomic writer turns ENOSPC into DiskFullError naming the file, the old
    content survives and no temp file is left."""
    import numpy as np

    from sppdet.checkpoint import save_checkpoint
    from sppdet.errors import DiskFullError
    from sppdet.utils import io

    writers = {
        "a.json": lambda p: io.atomic_write_json(p, {"a": 1}),
        "a.npy": lambda p: io.atomic_save_npy(p, np.zeros(3)),
        "a.npz": lambda p: io.atomic_save_npz(p, x=np.zeros(3)),
        "a.pt": lambda p: save_checkpoint(p, {"x": torch.zeros(1000)}),
    }
    for name in writers:
        (tmp_path / name).write_bytes(b"old")
    fill_disk_for(monkeypatch, ".a.*")
    for name, write in writers.items():
        with pytest.raises(DiskFullError) as e:
            write(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: no space left on device"), str(e.value)
        assert (tmp_path / name).read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)


def test_run_log_on_a_full_disk_is_one_line(tmp_path, capsys):
    """train.log's handler: a full disk is one warning line, then silence (not a traceback per record)."""
    import logging

    from sppdet.utils.log import add_log_file

    handler = add_log_file(tmp_path / "train.log")
    handler.stream = _FullDisk(handler.stream)
    log = logging.getLogger("sppdet.test")
    try:
        for i in range(3):
            log.warning("record %d", i)
    finally:
        logging.getLogger("sppdet").removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count("train.log: no space left on device") == 1, err


def test_byte_order_marks_are_stripped(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc")
    res = write_gt_results({k: v[2] for k, v in FIXTURE.items()}, tmp_path / "res", "test", VOC_CLASSES)
    args = ["-q", "evaluate", "--data", str(voc), "--split", "test", "--results", str(res), "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    Ctx(tmp_path, None).split(voc, list(FIXTURE), bom=True)
    for f in res.glob("*.txt"):
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["ap"] == plain["ap"] and plain["mAP"] == pytest.approx(1.0)


def test_decompression_bomb_warning_is_one_logged_line(tmp_path):
    """Over Pillow's pixel limit (but under twice it): one sppdet warning naming the file, not
    Pillow's raw DecompressionBombWarning."""
    voc = make_voc(tmp_path / "voc")
    res = write_gt_results({k: v[2] for k, v in FIXTURE.items()}, tmp_path / "res", "test", VOC_CLASSES)
    code = ("import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 64 * 48 - 1; from sppdet.cli import main; "
            f"sys.exit(main(['evaluate', '--data', {str(voc)!r}, '--split', 'test', '--results', {str(res)!r}]))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), SPPDET_PROGRESS="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "DecompressionBombWarning" not in r.stderr and "warnings.warn" not in r.stderr, r.stderr
    hits = [ln for ln in r.stderr.splitlines() if "very large image" in ln]
    assert len(hits) == 1 and "img001.jpg" in hits[0], r.stderr


# ---------------------------------------------------------------------------
# Every numeric setting is range-checked by config validation

#: (key, a value that must be refused) for every numeric field of every config section.
BAD_SETTINGS = {
    "seed": -1,
    "features.scales": [0], "features.pyramid": [], "features.context_pyramid": [-1], "finetune.fc_dims": [0],
    "proposals.max_boxes": 0, "proposals.workers": -1,
    "features.max_side": 0, "features.rcnn_context": -1, "features.rcnn_size": 0, "features.rcnn_batch": 0,
    "features.memory_cache": -1, "features.pooled_memory_gb": math.nan, "features.context": 0.5,
    "finetune.dropout": 1.0, "finetune.iterations": -1, "finetune.iterations_per_image": math.inf,
    "finetune.min_iterations": -1, "finetune.max_iterations": 0, "finetune.batch_size": 0,
    "finetune.images_per_batch": 0, "finetune.fg_fraction": 0.0, "finetune.fg_iou": 1.5,
    "finetune.bg_iou_low": -0.1, "finetune.bg_iou_high": 1.2, "finetune.lr": math.nan,
    "finetune.lr_step_fraction": 1.5, "finetune.momentum": 1.0, "finetune.weight_decay": -1e-4,
    "finetune.conv_lr_mult": -1.0, "finetune.fc8_init_std": 0.0,
    "svm.C": -1.0, "svm.pos_weight": 0.0, "svm.bias_multiplier": math.inf, "svm.feature_norm": 0.0,
    "svm.neg_iou": 1.5, "svm.hard_threshold": math.nan, "svm.evict_threshold": math.inf,
    "svm.retrain_images": -1, "svm.retrain_limit": -1, "svm.max_negatives_first": -1, "svm.passes": 0,
    "svm.tol": 0.0, "svm.max_iter": 0, "svm.neg_overlap_dedupe": 1.5,
    "svm.cache_memory_gb": -1.0, "svm.max_positives_per_class": -1,
    "bbox_reg.min_iou": 0.0, "bbox_reg.lam": -1.0, "bbox_reg.max_pairs_per_class": -1,
    "test.nms": 0.0, "test.max_per_image": 0, "test.score_threshold": math.inf, "test.box_voting": 1.5,
    "test.batch_images": 0, "test.scales": [0],
}


def _numeric_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        else:
            args = set(typing.get_args(tp))
            inner = {a2 for a in args for a2 in typing.get_args(a)}     # optional lists of numbers
            if {int, float} & ({tp} | args | inner):     # numbers, optional numbers, lists of them
                yield prefix + f.name


def test_every_numeric_setting_has_a_refused_value():
    from sppdet.config import Config

    assert sorted(_numeric_fields(Config)) == sorted(BAD_SETTINGS), "add a row for the new setting"


@pytest.mark.parametrize("key", sorted(BAD_SETTINGS))
def test_every_numeric_setting_is_range_checked(key):
    from sppdet.config import load_config, parse_override
    from sppdet.errors import ConfigError

    value = BAD_SETTINGS[key]
    with pytest.raises(ConfigError) as e:
        load_config("demo_lite0", parse_override(f"{key}={value!r}".replace("nan", ".nan").replace("inf", ".inf")))
    assert str(e.value).startswith(key.split(".")[-1]) or key in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
