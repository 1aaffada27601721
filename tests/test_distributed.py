"""Several processes: sppdet.utils.dist on a 2-process gloo group, ``torchrun -m sppdet proposals``.

Every test that starts processes has a wall-clock limit (subprocess timeout, or a
join deadline after which the processes are killed) and sets
``SPPDET_DIST_TIMEOUT`` so that no collective can wait long: a bug fails the test
instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp

from sppdet.data import load_dataset
from sppdet.proposals import ProposalStore, compute_proposals
from sppdet.proposals.store import PartsDir, find_shards, image_key, make_settings
from sppdet.utils import dist

from test_proposal_store import PRESET, write_voc

REPO = Path(__file__).resolve().parents[1]

#: ``sppdet proposals`` options giving ``PRESET`` (the cheap settings of test_proposal_store).
PRESET_ARGS = ["--set", "proposals.overrides.ks=[100]", "--set", "proposals.overrides.colour_spaces=[hsv]",
               "--set", "proposals.overrides.strategies=[cfst]", "--set", "proposals.overrides.max_sides=[64]",
               "--set", "proposals.overrides.min_box_size=2", "--set", "proposals.overrides.extra_runs=[]",
               "--max-boxes", "50", "--workers", "1"]

LIMIT_S = 120  # per spawned job; a hang fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in dist.ENV_VARS:  # never inherit an outer launch
        env.pop(k, None)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               SPPDET_PROGRESS="0", SPPDET_DIST_TIMEOUT="60", OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=2 -m sppdet ARGV`` with a time limit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "sppdet", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, env=child_env(), cwd=REPO)


def assert_same_store(a: ProposalStore, b: ProposalStore) -> None:
    """Same ids in the same order, bit-identical boxes, same keys and dataset positions."""
    assert a.ids == b.ids
    assert a.image_keys == b.image_keys
    np.testing.assert_array_equal(a.indices, b.indices)
    for i in a.ids:
        x, y = a[i], b[i]
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# ---------------------------------------------------------------------------
# One process: the helpers answer as rank 0 of 1


def test_helpers_without_a_process_group(monkeypatch):
    for k in dist.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    assert not dist.is_initialized() and dist.get_rank() == 0 and dist.get_world_size() == 1
    assert dist.is_main() and not dist.launched() and dist.env_world() is None
    assert dist.shard(list("abcde")) == list("abcde")
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.gather_object(3) == [3]
    assert dist.broadcast_object("x") == "x"
    t = torch.arange(3)
    assert dist.gather_tensors(t)[0] is t
    dist.raise_if_any(None)
    with pytest.raises(KeyError):
        dist.raise_if_any(KeyError("own error comes back"))
    dist.barrier()
    with dist.launch(True) as runs:  # no torchrun: nothing set up, the command runs
        assert runs and not dist.is_initialized()


def test_shard_splits_every_item_onto_exactly_one_rank():
    items = [f"id{i}" for i in range(11)]
    for world in (1, 2, 3, 4, 11, 13):
        parts = [dist.shard(items, r, world) for r in range(world)]
        # the obvious reference: item k goes to rank k mod world, in order
        for r in range(world):
            assert parts[r] == [items[k] for k in range(len(items)) if k % world == r]
        assert sorted(sum(parts, [])) == sorted(items)
        lengths = [len(p) for p in parts]
        assert max(lengths) - min(lengths) <= 1
    assert dist.shard(range(5), 1, 2) == [1, 3]
    with pytest.raises(ValueError):
        dist.shard(items, 2, 2)


def test_env_world_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.env_world() == (1, 2, 1) and dist.launched()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(dist.DistributedError, match="RANK"):
        dist.env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(dist.DistributedError, match=r"\$RANK='x'"):
        dist.env_world()


def test_init_failure_is_one_line(monkeypatch):
    """An unreachable master: a DistributedError naming the master, not a traceback or a hang."""
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(dist.DistributedError, match="cannot set up the gloo process group") as e:
        dist.init(None, timeout_s=3)
    assert "127.0.0.1" in str(e.value) and "\n" not in str(e.value)
    assert not dist.is_initialized()
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------
# Two gloo processes (torch.multiprocessing)


def _run_two(fn, tmp_path: Path, *args) -> list[dict]:
    """Run ``fn(rank, out_dir, *args)`` on 2 gloo ranks; returns each rank's JSON result."""
    port = free_port()
    ctx = tmp_mp.start_processes(_rank_main, args=(port, fn, str(tmp_path), *args), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + LIMIT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"2-process run did not finish in {LIMIT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert "traceback" not in res, f"rank {r}:\n{res['traceback']}"
    return results


def _rank_main(rank: int, port: int, fn, out_dir: str, *args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPPDET_PROGRESS="0")
    out = Path(out_dir) / f"rank{rank}.json"
    try:
        assert dist.init(None, timeout_s=60)
        try:
            result = fn(rank, Path(out_dir), *args)
        finally:
            dist.shutdown()
    except BaseException:  # reported to the parent through the file
        result = {"traceback": traceback.format_exc()}
    out.write_text(json.dumps(result))
    # the result is on disk: leave without torch's C++ teardown, which now and then aborts a
    # finished process ("terminate called without an active exception", SIGABRT) -- the same
    # mitigation as ``python -m sppdet`` under torchrun (sppdet/__main__.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _collectives(rank: int, out_dir: Path) -> dict:
    world = dist.get_world_size()
    mine = dist.shard(list(range(7)))
    gathered = dist.gather_object({"rank": rank, "items": mine})
    everyone = dist.all_gather_object(rank * 10)
    t = torch.arange(3 + rank, dtype=torch.float32).reshape(-1, 1) + 100 * rank  # 3 rows, then 4
    tensors = dist.gather_tensors(t)
    told = dist.broadcast_object({"from": rank})
    try:
        dist.raise_if_any(ValueError("disk full on rank 1") if rank == 1 else None)
        failure = None
    except dist.DistributedError as e:
        failure = ("DistributedError", str(e))
    except ValueError as e:
        failure = ("ValueError", str(e))
    dist.barrier()
    return {"world": world, "main": dist.is_main(), "mine": mine, "gathered": gathered,
            "everyone": everyone, "tensors": None if tensors is None else [x.tolist() for x in tensors],
            "told": told, "failure": failure}


def test_collectives_on_two_gloo_processes(tmp_path):
    r0, r1 = _run_two(_collectives, tmp_path)
    assert r0["world"] == r1["world"] == 2 and r0["main"] and not r1["main"]
    assert r0["mine"] == [0, 2, 4, 6] and r1["mine"] == [1, 3, 5]
    assert r0["gathered"] == [{"rank": 0, "items": [0, 2, 4, 6]}, {"rank": 1, "items": [1, 3, 5]}]
    assert r1["gathered"] is None
    assert r0["everyone"] == r1["everyone"] == [0, 10]
    assert r0["tensors"] == [[[0.0], [1.0], [2.0]], [[100.0], [101.0], [102.0], [103.0]]]
    assert r1["tensors"] is None
    assert r0["told"] == r1["told"] == {"from": 0}
    # the failing rank re-raises its own error; the other one learns which rank failed and why
    assert r1["failure"] == ["ValueError", "disk full on rank 1"]
    assert r0["failure"] == ["DistributedError", "rank 1 of 2 failed: disk full on rank 1"]


def _proposals_on_rank(rank: int, out_dir: Path, voc: str) -> dict:
    ds = load_dataset(voc, "train")
    store = compute_proposals(ds, PRESET, 50, workers=1, out=out_dir / "two.npz", progress=False)
    return {"ids": store.ids, "boxes": {i: store[i].tolist() for i in store.ids},
            "path": str(store.path)}


def test_compute_proposals_in_a_process_group_gives_every_rank_the_one_process_store(tmp_path):
    """The library path `sppdet train` takes: compute_proposals sees the group and shards."""
    voc = write_voc(tmp_path / "voc", n=5)
    ds = load_dataset(voc, "train")
    one = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "one.npz", progress=False)
    r0, r1 = _run_two(_proposals_on_rank, tmp_path, str(voc))
    for r in (r0, r1):
        assert r["ids"] == one.ids and r["path"] == str(tmp_path / "two.npz")
        for i in one.ids:
            assert np.array_equal(np.asarray(r["boxes"][i], np.float32).reshape(-1, 4), one[i])
    assert_same_store(one, ProposalStore.load(tmp_path / "two.npz"))


# ---------------------------------------------------------------------------
# torchrun -m sppdet


def test_torchrun_proposals_equal_one_process(tmp_path):
    voc = write_voc(tmp_path / "voc", n=5)
    ds = load_dataset(voc, "train")
    one = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "one.npz", progress=False)
    # an interrupted earlier run left one finished image in the sidecar: it must be reused, not redone
    out = tmp_path / "two.npz"
    sentinel = np.array([[1, 2, 30, 40], [0, 0, 9, 9]], np.float32)
    PartsDir(out, make_settings(PRESET, 50, ds)).open().save(image_key(ds[3]), sentinel)

    res = torchrun("proposals", "--data", str(voc), "--split", "train", "--out", str(out), *PRESET_ARGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(str(out)) == 1  # rank 1 prints nothing: one summary line, as one process
    assert "[rank 1/2] INFO" not in res.stderr and "[rank 0/2] INFO" in res.stderr
    two = ProposalStore.load(out)
    assert two.ids == one.ids and two.settings == dict(one.settings)
    np.testing.assert_array_equal(two[ds[3].image_id], sentinel)
    assert not find_shards(out) and not out.with_name(out.name + ".parts").exists()

    # the same command again, without the sentinel: now bit-identical to one process
    out.unlink()
    res = torchrun("proposals", "--data", str(voc), "--split", "train", "--out", str(out), *PRESET_ARGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_store(one, ProposalStore.load(out))


def test_torchrun_error_on_one_rank_stops_both_without_losing_work(tmp_path):
    voc = write_voc(tmp_path / "voc", n=5)
    bad = voc / "JPEGImages" / "img001.jpg"  # position 1: rank 1's shard (positions 1, 3)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    out = tmp_path / "p.npz"
    res = torchrun("proposals", "--data", str(voc), "--split", "train", "--out", str(out), *PRESET_ARGS)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("sppdet: error:")]
    # both ranks report (rank 0 naming the rank that failed), unless torchrun stopped one of them
    # first: its agent terminates the other workers as soon as one exits with an error
    assert 1 <= len(errors) <= 2 and all("img001.jpg" in line for line in errors)
    assert len(errors) == 1 or any("rank 1 of 2 failed" in line for line in errors)
    assert "/sppdet/" not in res.stderr  # no traceback through sppdet (torchrun adds its own summary)
    assert not out.exists()
    # rank 0's shard (positions 0, 2, 4) is saved: shard file written before the error check
    ds = load_dataset(voc, "train")
    shard1 = ProposalStore.load(find_shards(out)[2][1])
    assert shard1.ids == [ds[0].image_id, ds[2].image_id, ds[4].image_id]
    # --skip-bad-images: the same command completes, reusing that work
    res = torchrun("proposals", "--data", str(voc), "--split", "train", "--out", str(out), "--skip-bad-images",
                   *PRESET_ARGS)
    assert res.returncode == 0, res.stderr[-3000:]
    store = ProposalStore.load(out)
    assert store.ids == [r.image_id for r in ds.records if r.image_id != "img001"]
    assert store.skipped == ["img001"]


def test_torchrun_command_that_is_not_distributed_runs_once(tmp_path):
    voc = write_voc(tmp_path / "voc", n=3)
    ds = load_dataset(voc, "train")
    store = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "p.npz", progress=False)
    res = torchrun("recall", "--data", str(voc), "--split", "train", "--proposals", str(store.path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.strip().startswith("{")]
    assert len(lines) == 1, res.stdout  # rank 0 alone ran it
    assert "does not use several processes yet" in res.stderr
