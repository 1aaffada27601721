"""Several processes for conv5 features and ``eval``: 2 gloo ranks against 1 process, bit for bit.

A tiny detector is trained once (synthetic images, one small scale, 150 windows, 30
fine-tuning iterations); then the conv5 cache and the results files of ``eval`` with
2 ranks (``torchrun``, and the library calls under a 2-process group) are compared
with those one process writes.  Every spawned job has a time limit and
``SPPDET_DIST_TIMEOUT`` (see tests/test_distributed.py, whose helpers these are).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sppdet.cli import main
from sppdet.utils import dist

from test_distributed import _run_two, torchrun

TINY = [
    "--set", "features.scales=[224]", "--set", "features.max_side=320",
    "--set", "proposals.max_boxes=150", "--set", "proposals.workers=1",
    "--set", "finetune.iterations=30", "--set", "finetune.fc_dims=[64, 64]",
    "--set", "finetune.batch_size=32",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of demo_lite0 (with test.flip: plain and mirrored maps) trained in seconds."""
    from sppdet.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("disteval")
    data = make_synthetic(root / "data", num_images=10, seed=5)      # 5 test images: 3 + 2 per rank
    run = root / "run"
    assert main(["-q", "train", "--config", "demo_lite0", "--data", str(data), "--out", str(run),
                 "--cache", str(root / "train-cache"), "--device", "cpu", *TINY]) == 0
    return {"data": data, "ckpt": run / "model.pt", "root": root}


@pytest.fixture(scope="module")
def one_process(trained):
    """`sppdet eval --json` in this process (torch's default threads): cache, results files, output."""
    import contextlib
    import io

    cache, results = trained["root"] / "one-cache", trained["root"] / "one-results"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["-q", *eval_args(trained, cache, results)]) == 0
    return {"cache": cache, "results": results, "json": json.loads(buf.getvalue())}


def files_of(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def maps_of(folder: Path) -> dict[str, Path]:
    """The conv5 map files under ``folder`` (not the cache's bookkeeping: ``uses/``, the lock)."""
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*.npz")) if p.is_file()}


def assert_same_conv5_cache(a: Path, b: Path) -> int:
    """The same map files under both folders, each holding the same arrays, bit for bit.

    Compares every member of every ``.npz`` (the ``.npy`` bytes: header, dtype, shape,
    values) and the decoded arrays; returns the number of map files.
    """
    fa, fb = maps_of(a), maps_of(b)
    assert fa.keys() == fb.keys()
    assert fa, f"no conv5 maps under {a}"
    for name in fa:
        with zipfile.ZipFile(fa[name]) as za, zipfile.ZipFile(fb[name]) as zb:
            assert za.namelist() == zb.namelist() == ["fmap.npy", "factor.npy", "size.npy", "key.npy"]
            for m in za.namelist():
                assert za.read(m) == zb.read(m), (name, m)
        with np.load(fa[name], allow_pickle=False) as x, np.load(fb[name], allow_pickle=False) as y:
            for k in x.files:
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                assert x[k].tobytes() == y[k].tobytes(), (name, k)
    return len(fa)


def conv5_dir(cache: Path) -> Path:
    (d,) = [p for p in (cache / "features").iterdir() if p.is_dir()]
    return d


def eval_args(trained, cache: Path, results: Path) -> list[str]:
    return ["eval", "--checkpoint", str(trained["ckpt"]), "--data", str(trained["data"]), "--split", "test",
            "--cache", str(cache), "--results", str(results), "--json", "--device", "cpu"]


# ---------------------------------------------------------------------------
# torchrun -m sppdet eval


def test_torchrun_eval_equals_one_process(trained, one_process, tmp_path):
    """Same checkpoint in: the same conv5 cache, proposal store, results files and mAP out."""
    one_cache, one_res, one = one_process["cache"], one_process["results"], one_process["json"]
    assert one["images"] == 5 and one["mAP"] > 0

    two_cache, two_res, report = tmp_path / "c2", tmp_path / "r2", tmp_path / "report"
    res = torchrun(*eval_args(trained, two_cache, two_res), "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, res.stdout          # rank 0 alone prints
    two = json.loads(lines[0])
    for k in ("metric", "mAP", "ap", "npos", "images"):
        assert two[k] == one[k], k
    assert "[rank 1/2] INFO" not in res.stderr and "[rank 0/2] INFO" in res.stderr
    assert (report / "index.html").is_file()    # written by rank 0

    # results files (VOC comp4 files, COCO results and index): byte-identical
    f1, f2 = files_of(one_res), files_of(two_res)
    assert f1.keys() == f2.keys() and any(n.startswith("comp4_det_test_") for n in f1)
    assert sum(p.stat().st_size for n, p in f1.items() if n.startswith("comp4")) > 0
    for name in f1:
        assert f1[name].read_bytes() == f2[name].read_bytes(), name
    # one conv5 cache (plain and mirrored maps of every image), the same as one process wrote
    assert assert_same_conv5_cache(conv5_dir(one_cache), conv5_dir(two_cache)) == 2 * 5
    (s1,), (s2,) = (list((c / "proposals").rglob("*.npz")) for c in (one_cache, two_cache))
    assert s1.relative_to(one_cache) == s2.relative_to(two_cache)
    from sppdet.proposals import ProposalStore
    from test_distributed import assert_same_store

    assert_same_store(ProposalStore.load(s1), ProposalStore.load(s2))


def test_torchrun_train_writes_the_one_process_conv5_cache(trained, tmp_path):
    """The features stage of `train` (plain and mirrored training maps) under 2 ranks."""
    cache = tmp_path / "cache"
    res = torchrun("-q", "train", "--config", "demo_lite0", "--data", str(trained["data"]), "--out",
                   str(tmp_path / "run"), "--cache", str(cache), "--device", "cpu", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").is_file()
    assert assert_same_conv5_cache(conv5_dir(trained["root"] / "train-cache"), conv5_dir(cache)) == 2 * 5


# ---------------------------------------------------------------------------
# The library calls under a 2-process group (what `train` and `eval` call)


def _features_and_eval_on_rank(rank: int, out_dir: Path, ckpt: str, data: str, cache: str) -> dict:
    from sppdet.data import load_dataset
    from sppdet.detect import Detector
    from sppdet.eval_checkpoint import evaluate_checkpoint
    from sppdet.features.extractor import rank_thread_share

    threads = torch.get_num_threads()
    with rank_thread_share() as share:
        inside = torch.get_num_threads()
    det = Detector.from_checkpoint(ckpt, device="cpu", cache_dir=cache)
    ds = load_dataset(data, "test", classes=det.classes)
    stats = det.extractor.precompute(ds.records, progress=False)
    after = torch.get_num_threads()
    ev = evaluate_checkpoint(ckpt, data, "test", results_dir=out_dir / "lib-results", device="cpu",
                             cache_dir=cache, show_progress=False)
    return {"threads": threads, "share": share, "inside": inside, "after": after, "stats": stats,
            "computed_here": det.extractor.stats["computed"], "mAP": ev.result.mAP, "ap": ev.result.ap,
            "npos": ev.result.npos, "images": ev.timings["images"], "own": sorted(ev.detections)}


def test_precompute_and_evaluate_checkpoint_in_a_process_group(trained, one_process, tmp_path):
    """Each rank computes its positions (r, r+2, ...) of the maps not cached yet, with its share of
    the cores; every rank returns the summed counts and the same scores; the cache and the results
    files equal one process's."""
    from sppdet.data import load_dataset
    from sppdet.detect import Detector

    ref = one_process["json"]
    two_cache = tmp_path / "c2"
    det = Detector.from_checkpoint(trained["ckpt"], device="cpu", cache_dir=two_cache)
    ds = load_dataset(trained["data"], "test", classes=det.classes)
    # an interrupted earlier run left the map of position 3 (rank 1's): it is reused, not redone
    det.extractor.precompute([ds.records[3]], progress=False)

    r0, r1 = _run_two(_features_and_eval_on_rank, tmp_path, str(trained["ckpt"]), str(trained["data"]),
                      str(two_cache))
    share = max(1, (os.cpu_count() or 1) // 2)
    for r in (r0, r1):
        assert r["share"] == r["inside"] == min(r["threads"], share) and r["after"] == r["threads"]
        assert r["stats"] == {"images": 5, "computed": 4, "cached": 1}
        assert r["mAP"] == ref["mAP"] and r["ap"] == ref["ap"] and r["npos"] == ref["npos"]
        assert r["images"] == 5
    assert r0["computed_here"] == 3 and r1["computed_here"] == 1     # positions 0, 2, 4 | 1 (3 was cached)
    ids = [rec.image_id for rec in ds.records]
    assert r0["own"] == sorted(ids) and r1["own"] == sorted(ids[1::2])  # rank 0 holds all detections
    assert_same_conv5_cache(conv5_dir(one_process["cache"]), conv5_dir(two_cache))
    f1, f2 = files_of(one_process["results"]), files_of(tmp_path / "lib-results")
    assert f1.keys() == f2.keys()
    for name in f1:
        assert f1[name].read_bytes() == f2[name].read_bytes(), name


def _errors_on_rank(rank: int, out_dir: Path, ckpt: str, data: str, cache: str) -> dict:
    from sppdet.data import load_dataset
    from sppdet.detect import Detector
    from sppdet.errors import ImageDecodeError, SppdetError

    det = Detector.from_checkpoint(ckpt, device="cpu", cache_dir=cache)
    ds = load_dataset(data, "test", classes=det.classes)
    out: dict = {}
    try:
        det.extractor.precompute(ds.records, progress=False)
        out["precompute"] = None
    except SppdetError as e:
        out["precompute"] = [type(e).__name__, str(e)]
    out["skipped"] = det.extractor.precompute(ds.records, progress=False, skip_bad_images=True)
    # detection fails on rank 1 only (after the proposals): every rank raises, none waits
    del ds.records[1]
    if rank == 1:
        def broken(*a, **k):
            raise ImageDecodeError("/x/img.jpg: cannot decode the image (test)")
        det.detect_item = broken
    try:
        det.detect_dataset(ds, show_progress=False, skip_bad_images=False)
        out["detect"] = None
    except SppdetError as e:
        out["detect"] = [type(e).__name__, str(e)]
    dist.barrier()
    return out


def test_errors_on_one_rank_raise_on_every_rank_and_keep_the_work(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    from sppdet.data import load_dataset

    ds = load_dataset(data, "test")
    bad = ds.records[1].path                                 # position 1: rank 1's (1, 3)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    cache = tmp_path / "cache"
    r0, r1 = _run_two(_errors_on_rank, tmp_path, str(trained["ckpt"]), str(data), str(cache))
    assert r1["precompute"][0] == "ImageDecodeError" and bad.name in r1["precompute"][1]
    assert r0["precompute"][0] == "DistributedError"
    assert r0["precompute"][1].startswith("rank 1 of 2 failed: ") and bad.name in r0["precompute"][1]
    # the second call finds the maps rank 0 wrote before the error (positions 0, 2, 4); rank 1
    # stopped at its first image, so it computes position 3 now and skips the bad one
    for r in (r0, r1):
        assert r["skipped"] == {"images": 5, "computed": 1, "cached": 3, "failed": 1}
    assert r1["detect"] == ["ImageDecodeError", "/x/img.jpg: cannot decode the image (test)"]
    assert r0["detect"] == ["DistributedError", "rank 1 of 2 failed: /x/img.jpg: cannot decode the image (test)"]


# ---------------------------------------------------------------------------
# GPUs (nccl): only where there are two


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices (nccl, one rank per GPU)")
def test_torchrun_eval_on_two_gpus_equals_one_gpu(trained, tmp_path, capsys):
    args = [a if a != "cpu" else "cuda" for a in eval_args(trained, tmp_path / "c1", tmp_path / "r1")]
    capsys.readouterr()
    assert main(["-q", *args]) == 0
    one = json.loads(capsys.readouterr().out)
    args = [a if a != "cpu" else "cuda" for a in eval_args(trained, tmp_path / "c2", tmp_path / "r2")]
    res = torchrun(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][0])
    assert two["mAP"] == one["mAP"] and two["ap"] == one["ap"]
    f1, f2 = files_of(tmp_path / "r1"), files_of(tmp_path / "r2")
    assert f1.keys() == f2.keys()
    for name in f1:
        assert f1[name].read_bytes() == f2[name].read_bytes(), name
