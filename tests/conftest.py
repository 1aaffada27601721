"""Shared pytest fixtures.  Fixtures generate their data into tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SPPDET_PROGRESS", "0")

#: Real VOC-format sets for development (absent on a user's fresh clone).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of ../shared/data/<name>, or skip the test when it is absent."""
    p = SHARED_DATA / name
    if not (p / "ImageSets" / "Main").is_dir():
        pytest.skip(f"{p} not available (only on development machines)")
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder, never the user's ~/.cache/sppdet."""
    monkeypatch.setenv("SPPDET_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def single_thread():
    """One intra-op torch thread for tests of many small ops: OpenMP oversubscription on a
    busy 2-core machine makes them several times slower, not faster (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: Settings of the smallest detector worth training: 4 synthetic images, one small scale,
#: 50 windows per image, 5 fine-tuning iterations of 32 windows through 32-wide fc layers.
TINY_TRAIN = [
    "--set", "features.scales=[160]", "--set", "features.max_side=320", "--set", "features.flip=false",
    "--set", "proposals.max_boxes=50", "--set", "proposals.workers=1",
    "--set", "finetune.iterations=5", "--set", "finetune.fc_dims=[32, 32]", "--set", "finetune.batch_size=32",
]

#: Settings that make a detector train in seconds (the demo config on tiny images, few windows).
TINY_SETTINGS = [
    "features.scales=[224]", "features.max_side=320", "proposals.max_boxes=150",
    "finetune.iterations=30", "finetune.fc_dims=[64, 64]", "finetune.batch_size=32",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A detector trained once per test session (about 15 s on a CPU): a dict with ``data`` (the
    synthetic VOC root: 2 trainval + 2 test images), ``run`` (the run folder), ``checkpoint``,
    ``cache`` and ``args`` (the ``sppdet train`` argv that made it).  Shared: copy before changing."""
    from sppdet.cli import main
    from sppdet.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("tiny_run")
    data = make_synthetic(root / "data", num_images=4, seed=5)
    run, cache = root / "run", root / "cache"
    args = ["-q", "train", "--config", "demo_lite0", "--data", str(data), "--out", str(run),
            "--cache", str(cache), *TINY_TRAIN]
    assert main(args) == 0
    return {"data": data, "run": run, "checkpoint": run / "model.pt", "cache": cache, "args": args}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """``sppdet demo`` run as a user runs it: from a working directory, with the default (relative)
    ``--out sppdet-demo``, on 12 images with :data:`TINY_SETTINGS`.  Returns the working directory
    (the demo's folder is ``<it>/sppdet-demo``) and the demo's printed summary."""
    import contextlib
    import io

    from sppdet.cli import main

    root = tmp_path_factory.mktemp("tiny_demo")
    args = ["-q", "demo", "--images", "12", "--seed", "5", "--workers", "1"]
    for s in TINY_SETTINGS:
        args += ["--set", s]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(args) == 0
    return {"cwd": root, "out": root / "sppdet-demo", "summary": buf.getvalue()}
