"""Global flags and the options every command shares."""

from __future__ import annotations

import logging

import pytest

from sppdet.cli import build_parser, verbosity
from sppdet.utils.log import setup_logging


@pytest.mark.parametrize("flags, level", [([], logging.INFO), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
                                          (["-q"], logging.WARNING)])
def test_verbosity_flags_as_the_readme_says(flags, level):
    """README: ``-q`` warnings only, ``-vv`` debug; progress messages (INFO) by default."""
    args = build_parser().parse_args([*flags, "evaluate", "--data", "d", "--split", "s", "--results", "r"])
    setup_logging(verbosity(args))
    handlers = [h for h in logging.getLogger().handlers if getattr(h, "_sppdet", False)]
    assert len(handlers) == 1 and handlers[0].level == level


@pytest.mark.parametrize("command", ["train", "eval", "detect", "proposals", "recall"])
def test_runtime_options_are_the_same_everywhere(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    opts = {o: a for a in sub._actions for o in a.option_strings}
    for flag in ("--cache", "--workers"):
        assert flag in opts, (command, flag)
        assert opts[flag].default is None          # None: the config's / checkpoint's value
    assert opts["--set"].metavar in ("KEY=VALUE", "test.KEY=VALUE")


def test_proposals_and_recall_take_a_training_config(tmp_path, capsys):
    """`sppdet proposals --config C` computes the store `sppdet train --config C` reads."""
    from sppdet import build
    from sppdet.cli import main
    from sppdet.config import load_config
    from sppdet.data.synthetic import make_synthetic
    from sppdet.proposals import default_store_path
    from sppdet.proposals.runner import load_splits

    data = make_synthetic(tmp_path / "data", num_images=4, seed=1)
    cache = tmp_path / "cache"
    sets = ["--set", "proposals.max_boxes=40", "--set", "proposals.overrides.max_sides=[64]"]
    assert main(["-q", "proposals", "--config", "demo_lite0", "--data", str(data), "--cache", str(cache),
                 "--workers", "1", *sets]) == 0
    cfg = load_config("demo_lite0", {"proposals": {"max_boxes": 40, "overrides": {"max_sides": [64]}}})
    train_set = build.dataset_from_config(cfg.data, cfg.data.train_split, data)
    want = default_store_path(cache, load_splits(data, cfg.data.train_split), build.preset(cfg).key(), 40)
    assert want == default_store_path(cache, train_set, build.preset(cfg).key(), 40)
    assert want.is_file(), sorted(str(p) for p in cache.rglob("*.npz"))
    assert str(want) in capsys.readouterr().out


def test_tilde_is_expanded_in_every_path_option(monkeypatch, tmp_path):
    from sppdet.cli import expand_user_paths

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = build_parser()
    args = expand_user_paths(parser.parse_args(
        ["detect", "--checkpoint", "~/run/model.pt", "~/a.jpg", "b.jpg", "--out", "~/det", "--cache", "~/c"]))
    assert args.checkpoint == f"{tmp_path}/run/model.pt" and args.out == f"{tmp_path}/det"
    assert args.inputs == [f"{tmp_path}/a.jpg", "b.jpg"] and args.cache == f"{tmp_path}/c"
    args = expand_user_paths(parser.parse_args(["train", "--config", "~/c.yaml", "--data", "~/voc", "--out", "~/r"]))
    assert (args.config, args.data, args.out) == (f"{tmp_path}/c.yaml", f"{tmp_path}/voc", f"{tmp_path}/r")
    args = expand_user_paths(parser.parse_args(["evaluate", "--data", "d", "--split", "s", "--results", "~/res",
                                                "--plots", "~/p"]))
    assert (args.data, args.results, args.plots) == ("d", f"{tmp_path}/res", f"{tmp_path}/p")
