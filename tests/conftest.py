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
