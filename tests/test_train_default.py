"""`sppdet train --data ROOT` without --config trains the bundled default (issue 15, item 4)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sppdet.cli import build_parser, main
from sppdet.commands import train as train_cmd


def _run_capturing(monkeypatch, argv):
    """Run the train command's function with the pipeline replaced by a recorder."""
    import sppdet.train.pipeline as pipeline

    seen = {}

    def fake_train(cfg, out, data_root=None, **kw):
        seen.update(cfg=cfg, out=Path(out), data_root=data_root)
        return Path(out) / "model.pt"

    monkeypatch.setattr(pipeline, "train", fake_train)
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    return seen


def test_train_without_config_uses_voc07_lite0_and_says_why(monkeypatch, caplog, capsys, tmp_path):
    from sppdet.config import load_config

    with caplog.at_level(logging.INFO, logger="sppdet"):
        seen = _run_capturing(monkeypatch, ["train", "--data", str(tmp_path / "voc")])
    assert train_cmd.DEFAULT_CONFIG == "voc07_lite0"
    want = load_config("voc07_lite0")
    assert seen["cfg"].to_dict() == want.to_dict()        # exactly the bundled config, nothing else changed
    assert seen["cfg"].features.backbone == "lite0"
    assert seen["data_root"] == str(tmp_path / "voc")
    assert seen["out"] == Path("runs") / "voc07_lite0"
    lines = [r.getMessage() for r in caplog.records if "no --config" in r.getMessage()]
    assert len(lines) == 1 and "voc07_lite0" in lines[0] and "GPU" in lines[0] and "CPU" in lines[0]
    assert [r.levelno for r in caplog.records if "no --config" in r.getMessage()] == [logging.INFO]
    assert "checkpoint:" in capsys.readouterr().out


def test_train_with_config_is_unchanged_and_silent(monkeypatch, caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="sppdet"):
        seen = _run_capturing(monkeypatch, ["train", "--config", "demo_lite0", "--data", str(tmp_path),
                                            "--set", "seed=3"])
    assert seen["cfg"].name == "demo_lite0" and seen["cfg"].seed == 3
    assert not [r for r in caplog.records if "no --config" in r.getMessage()]


def test_train_default_takes_overrides(monkeypatch, tmp_path):
    seen = _run_capturing(monkeypatch, ["train", "--data", str(tmp_path), "--set", "finetune.min_iterations=7",
                                        "--out", str(tmp_path / "run")])
    assert seen["cfg"].name == "voc07_lite0" and seen["cfg"].finetune.min_iterations == 7
    assert seen["out"] == tmp_path / "run"


def test_train_without_config_or_data_is_a_one_line_error(capsys):
    assert main(["-q", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sppdet: error:") and "--data" in err[0] and "--config" in err[0]
