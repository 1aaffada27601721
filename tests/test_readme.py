"""The README's examples run as written: its Python snippet against a demo folder, its commands parse."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced code blocks whose info string is ``lang`` ("" for none)."""
    blocks, current, info = [], None, ""
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def readme_commands(text: str) -> list[str]:
    """Every complete `sppdet ...` command: lines of ```bash blocks, and inline code spans with
    options outside tables that are not templates (no ``[``, ``...``, ``|``, ``KEY``-style
    placeholders; "`sppdet bench`" in a sentence names a command group, not a command)."""
    cmds = []
    for block in fenced_blocks(text, "bash"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("sppdet "):
                cmds.append(line)
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            continue
        for span in re.findall(r"`(sppdet [^`]+)`", line):
            if " --" in span and not re.search(r"\[|\.\.\.|\||\b[A-Z]{2,}\b", span):
                cmds.append(span)
    return cmds


def test_readme_python_snippet_runs_as_written(tiny_demo, monkeypatch):
    """Run from the folder `sppdet demo` ran in (its default --out, sppdet-demo), unmodified."""
    # the API example (the export and COCO snippets need their own files: tests/test_export.py
    # runs the export one)
    blocks = [b for b in fenced_blocks(README.read_text(encoding="utf-8"), "python") if "sppdet-demo/" in b]
    assert blocks, "README has no python example"
    monkeypatch.chdir(tiny_demo["cwd"])
    from sppdet.detect import Detector

    classes = Detector.from_checkpoint("sppdet-demo/run/model.pt", device="cpu").classes
    for code in blocks:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
        for line in buf.getvalue().splitlines():        # "<class> <score> [x1, y1, x2, y2]"
            name, score, box = line.split(" ", 2)
            assert name in classes and float(score) >= 0 and len(eval(box)) == 4, line


def test_readme_demo_paths_are_what_the_demo_prints(tiny_demo):
    """The README's demo output names the files a demo with the default --out writes."""
    text = README.read_text(encoding="utf-8")
    printed = dict(line.split(":", 1) for line in tiny_demo["summary"].splitlines() if ":  " in line)
    block = next(b for b in fenced_blocks(text, "") if "sppdet demo finished" in b)
    shown = dict(line.split(":", 1) for line in block.splitlines() if ":  " in line)
    for key in ("dataset", "checkpoint", "results", "report"):
        assert shown[key].strip() == printed[key].strip(), key
        path = shown[key].split()[0]
        assert (tiny_demo["cwd"] / path).exists(), path
    for code in fenced_blocks(text, "python"):
        for path in re.findall(r"\"(sppdet-demo/[^\"]+)\"", code):
            assert (tiny_demo["cwd"] / path).exists(), f"README python example: {path} not written by the demo"


def test_readme_commands_parse():
    from sppdet.cli import build_parser

    text = README.read_text(encoding="utf-8")
    cmds = readme_commands(text)
    assert len(cmds) >= 8, cmds
    for cmd in cmds:
        parser = build_parser()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                args = parser.parse_args(shlex.split(cmd)[1:])
            except SystemExit:
                pytest.fail(f"README command does not parse: {cmd}\n{err.getvalue()}")
        assert callable(args.func), cmd
    targets = set(re.findall(r"^([a-z]+):", (README.parent / "Makefile").read_text(), flags=re.M))
    for target in re.findall(r"^make ([a-z]+)", "\n".join(fenced_blocks(text, "bash")), flags=re.M):
        assert target in targets, f"make {target}"


def test_readme_links_to_files_that_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert "docs/report_screenshot.png" in local
    for t in local:
        assert (README.parent / t).exists(), f"README links to a missing file: {t}"
