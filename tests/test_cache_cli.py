"""The cache's bookkeeping: the conv5 disk estimate and check, the disk-use report, `sppdet cache
list` and `sppdet cache prune` (only sppdet's files, never through a symlink, never under a job)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from sppdet.cli import main
from sppdet.features import FeatureExtractor
from sppdet.features import cache_admin
from sppdet.features.cache_admin import CacheEntry, map_file_bytes, select_entries
from sppdet.features.conv5_cache import LOCK_NAME, hold_entry_lock

from conftest import TINY_TRAIN

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def zf5():
    from sppdet.models.backbones import build_backbone

    return build_backbone("zf5", "random")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from sppdet.data import load_dataset
    from sppdet.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("synth") / "data", num_images=8, seed=3)
    return load_dataset(root, "trainval")


def _extractor(bb, cache: Path, scales=(96, 128)) -> FeatureExtractor:
    return FeatureExtractor(bb, scales=scales, max_side=200, pyramid=(2, 1), cache_dir=cache, memory_cache=0)


def _du(paths) -> int:
    return sum(os.lstat(p).st_blocks * 512 for p in paths)


def _full_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * free + 1, 9 * free + 1, free))


# ---------------------------------------------------------------------------
# the estimate and the check


def test_map_size_estimate_bounds_the_files_written(zf5, synth, tmp_path, single_thread):
    """The estimate of every map is its real file rounded up to whole blocks (ZF-5's map is
    ceil(h/16) x ceil(w/16) cells, computed here by running the network on the resized size)."""
    ex = _extractor(zf5, tmp_path / "c")
    ex.precompute(synth, progress=False)
    files = sorted((tmp_path / "c").rglob("*.npz"))
    assert len(files) == len(synth) * 2
    for rec in synth:
        for s in ex.scales:
            est = map_file_bytes(rec.height, rec.width, s, 200, zf5.out_channels, zf5.stride, 2)
            f = ex.cache.cache_file(ex.cache.map_key(ex.cache.image_key(rec.path), s, False))
            real = f.stat().st_size
            from sppdet.models.spp import resize_factor
            k = resize_factor(rec.height, rec.width, s, 200)
            h, w = zf5.feature_size(int(round(rec.height * k)), int(round(rec.width * k)))
            assert real == pytest.approx(256 * h * w * 2 + 1168, abs=64)      # np.savez's headers
            assert real <= est <= math.ceil((real + 1536) / 4096) * 4096
            assert est >= f.stat().st_blocks * 512 - 4096


def test_check_refuses_a_stage_that_will_not_fit_and_writes_nothing(zf5, synth, tmp_path, monkeypatch):
    ex = _extractor(zf5, tmp_path / "c")
    _full_disk(monkeypatch, 100 * 2 ** 20)          # 100 MiB free < the 256 MiB margin alone
    with pytest.raises(cache_admin.CacheSpaceError) as e:
        cache_admin.check_conv5_space(ex, synth, (False, True))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'c'}: the conv5 cache needs about ")
    assert msg.endswith("GiB, 0.098 GiB free; free space or use --cache DIR")
    assert not (tmp_path / "c").exists()                                  # nothing written
    # the same stage with room: passes, and reports what it will need
    _full_disk(monkeypatch, 50 * 2 ** 30)
    info = cache_admin.check_conv5_space(ex, synth, (False, True))
    assert info["maps"] == len(synth) * 2 * 2 and info["cached_maps"] == 0
    assert info["need_bytes"] == info["estimated_bytes"] == sum(
        map_file_bytes(r.height, r.width, s, 200, 256, 16, 2) for r in synth for s in (96, 128)) * 2


def test_check_counts_what_is_cached_and_a_full_cache_needs_nothing(zf5, synth, tmp_path, monkeypatch):
    ex = _extractor(zf5, tmp_path / "c")
    ex.precompute(list(synth)[:2], progress=False)       # half of the split cached
    _full_disk(monkeypatch, 50 * 2 ** 30)
    info = cache_admin.check_conv5_space(ex, synth)
    assert info["cached_maps"] == 4 and info["maps"] == 8
    assert info["need_bytes"] == sum(map_file_bytes(r.height, r.width, s, 200, 256, 16, 2)
                                     for r in list(synth)[2:] for s in (96, 128))
    ex.precompute(synth, progress=False)
    _full_disk(monkeypatch, 0)                            # no space at all: nothing to write, no refusal
    assert cache_admin.check_conv5_space(ex, synth)["need_bytes"] == 0


def test_disk_check_can_be_turned_into_a_warning(zf5, synth, tmp_path, monkeypatch, caplog):
    ex = _extractor(zf5, tmp_path / "c")
    _full_disk(monkeypatch, 1)
    monkeypatch.setenv("SPPDET_DISK_CHECK", "0")
    with caplog.at_level(logging.WARNING):
        assert cache_admin.check_conv5_space(ex, synth) is not None
    assert "free space or use --cache DIR (going on" in caplog.text


def test_disk_use_is_logged_in_total_and_per_image_at_the_end_of_the_stage(zf5, synth, tmp_path, caplog):
    ex = _extractor(zf5, tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="sppdet"):
        cache_admin.check_conv5_space(ex, synth, (False, True))
        assert "on disk" not in caplog.text                # not before the maps exist
        for flip in (False, True):
            ex.precompute(synth, flip=flip, progress=False)
    files = sorted((tmp_path / "c").rglob("*.npz"))
    total = _du(files)
    lines = [r.getMessage() for r in caplog.records if "on disk" in r.getMessage()]
    assert len(lines) == 1, lines
    want = (f"conv5 cache: {synth.name}/trainval, {len(synth)} images, {len(files)} maps: "
            f"{cache_admin.human_bytes(total)} on disk, {cache_admin.human_bytes(total / len(synth))} per image")
    assert lines[0].startswith(want), (lines[0], want)
    # the use record has the bytes, and a rerun (everything cached) reports at once
    use = json.loads(next((tmp_path / "c").rglob("uses/*.json")).read_text())
    assert use["bytes"] == total and use["images"] == len(synth) and use["flips"] == [False, True]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sppdet"):
        cache_admin.check_conv5_space(_extractor(zf5, tmp_path / "c"), synth, (False, True))
    assert sum("on disk" in r.getMessage() for r in caplog.records) == 1


def test_train_and_eval_refuse_to_start_when_the_conv5_cache_will_not_fit(tiny_run, tmp_path, monkeypatch, capsys):
    """One line, exit 2, before any stage ran: no proposals computed, no conv5 map."""
    _full_disk(monkeypatch, 10 * 2 ** 20)
    cache = tmp_path / "cache"
    rc = main(["-q", "train", "--config", "demo_lite0", "--data", str(tiny_run["data"]), "--out", str(tmp_path / "run"),
               "--cache", str(cache), *TINY_TRAIN])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"sppdet: error: {cache / 'features'}: the conv5 cache needs about ")
    assert err.endswith("GiB free; free space or use --cache DIR") and "\n" not in err
    assert not list(cache.rglob("proposals/**/*.npz")) and not list(cache.rglob("features/**/*.npz"))
    rc = main(["-q", "eval", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
               "--split", "test", "--cache", str(tmp_path / "c2"), "--device", "cpu", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith("GiB free; free space or use --cache DIR"), err
    assert not (tmp_path / "c2").exists()


# ---------------------------------------------------------------------------
# list


@pytest.fixture
def evaluated(tiny_run, tmp_path):
    """A cache filled by `sppdet eval` of the tiny detector: proposals of test, conv5 maps."""
    cache = tmp_path / "cache"
    assert main(["-q", "eval", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
                 "--split", "test", "--cache", str(cache), "--device", "cpu", "--workers", "1"]) == 0
    return cache


def test_list_shows_every_entry_with_its_size_images_and_last_use(evaluated, capsys):
    capsys.readouterr()
    assert main(["cache", "list", "--cache", str(evaluated), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kinds = sorted(e["kind"] for e in out["entries"])
    assert kinds == ["conv5", "proposals"], out
    conv5 = next(e for e in out["entries"] if e["kind"] == "conv5")
    maps = sorted((evaluated / "features").rglob("*.npz"))
    every = [p for p in (evaluated / "features").rglob("*") if p.is_file()]
    assert conv5["details"]["maps"] == len(maps) > 0
    assert conv5["bytes"] == _du(every) and conv5["files"] == len(every)
    assert conv5["images"] == 2 and conv5["key"] == "features/" + maps[0].parent.parent.name
    assert conv5["details"]["uses"][0]["split"] == "test"
    prop = next(e for e in out["entries"] if e["kind"] == "proposals")
    store = next((evaluated / "proposals").rglob("*.npz"))
    assert prop["key"] == str(store.relative_to(evaluated).with_suffix("")) and prop["images"] == 2
    assert prop["bytes"] == _du([store]) and prop["details"]["split"] == "test"
    assert abs(prop["last_use"] - time.time()) < 3600 and abs(conv5["last_use"] - time.time()) < 3600
    assert out["total_bytes"] == conv5["bytes"] + prop["bytes"] and out["unrecognised"] == []
    assert main(["cache", "list", "--cache", str(evaluated)]) == 0
    text = capsys.readouterr().out
    assert conv5["key"] in text and prop["key"] in text and "PER IMAGE" in text


def test_reusing_a_proposal_store_marks_its_last_use(evaluated, tiny_run):
    store = next((evaluated / "proposals").rglob("*.npz"))
    old = time.time() - 30 * 86400
    os.utime(store, (old, old))
    assert main(["-q", "eval", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
                 "--split", "test", "--cache", str(evaluated), "--device", "cpu", "--workers", "1"]) == 0
    st = store.stat()
    assert st.st_mtime == pytest.approx(old, abs=1) and abs(st.st_atime - time.time()) < 600


def test_a_rerun_that_finds_everything_cached_changes_no_file_but_records_the_use(evaluated, tiny_run):
    from sppdet.features.cache_admin import list_cache

    def files():
        return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in evaluated.rglob("*") if p.is_file()}

    old = time.time() - 10 * 86400
    for p in evaluated.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))                          # as if written and last used 10 days ago
    before = files()
    for p in evaluated.rglob("*"):                           # (reading them set their access times)
        if p.is_file():
            os.utime(p, (old, old))
    assert [round(e.last_use) for e in list_cache(evaluated).entries] == [round(old)] * 2
    assert main(["-q", "eval", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
                 "--split", "test", "--cache", str(evaluated), "--device", "cpu", "--workers", "1"]) == 0
    assert files() == before
    assert all(abs(e.last_use - time.time()) < 600 for e in list_cache(evaluated).entries)


def test_a_folder_that_is_not_a_cache_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    for cmd in (["cache", "list"], ["cache", "prune", "--all"]):
        assert main([*cmd, "--cache", str(tmp_path / "photos")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"sppdet: error: {tmp_path / 'photos'}: not an sppdet cache folder (it holds none of "
                       "features/, proposals/, rcnn_windows/); pass --cache with the folder sppdet caches into")
    assert (tmp_path / "photos" / "a.jpg").exists()
    assert main(["cache", "list", "--cache", str(tmp_path / "nothing-yet")]) == 0
    assert "does not exist yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# prune


def _entry(key, kind, last, nbytes=1):
    return CacheEntry(key, kind, Path(key), nbytes, 1, 1, last, "")


def test_selection_by_age_recency_key_and_all():
    now = 1_700_000_000.0
    es = [_entry("features/a-1", "conv5", now - 5 * 86400), _entry("features/b-2", "conv5", now - 1 * 86400),
          _entry("features/c-3", "conv5", now - 3 * 86400), _entry("proposals/x/ss", "proposals", now - 9 * 86400),
          _entry("proposals/y/ss", "proposals", None)]
    keys = lambda sel: sorted(e.key for e in sel)  # noqa: E731
    assert keys(select_entries(es, older_than_days=2, now=now)) == ["features/a-1", "features/c-3",
                                                                      "proposals/x/ss", "proposals/y/ss"]
    assert keys(select_entries(es, older_than_days=30, now=now)) == ["proposals/y/ss"]   # unknown: old
    # per kind: keep the N most recent of each
    assert keys(select_entries(es, keep_last=1, now=now)) == ["features/a-1", "features/c-3", "proposals/y/ss"]
    assert keys(select_entries(es, keep_last=0, now=now)) == keys(es)
    assert keys(select_entries(es, keys=["features/c-3"])) == ["features/c-3"]
    assert keys(select_entries(es, everything=True)) == keys(es)
    with pytest.raises(cache_admin.CacheError, match="--key nope: no such entry"):
        select_entries(es, keys=["nope"])
    with pytest.raises(cache_admin.CacheError, match="exactly one of"):
        select_entries(es, older_than_days=1, everything=True)


def test_prune_deletes_only_sppdet_files_and_never_follows_a_symlink(evaluated, tmp_path, capsys):
    entry = next((evaluated / "features").iterdir())
    outside = tmp_path / "outside"
    outside.mkdir()
    victim_name = "cd" + "0" * 38 + ".npz"                 # a map's name, outside the cache
    (outside / victim_name).write_bytes(b"precious")
    (entry / "ab").mkdir(exist_ok=True)
    link_name = "ab" + "1" * 38 + ".npz"
    (entry / "ab" / link_name).symlink_to(outside / victim_name)      # a map-named symlink in a map folder
    (entry / "cd").symlink_to(outside, target_is_directory=True)      # a map folder that is a symlink
    (entry / "notes.txt").write_text("mine")
    (evaluated / "features" / "zf9-symlinkd").symlink_to(outside, target_is_directory=True)
    (evaluated / "README.txt").write_text("mine")
    maps = sorted(p for p in entry.rglob("[0-9a-f]*.npz") if not p.is_symlink() and p.parent.name != "cd")
    assert maps
    capsys.readouterr()
    assert main(["cache", "prune", "--cache", str(evaluated), "--all"]) == 0
    out = capsys.readouterr().out
    assert f"deleted features/{entry.name}" in out and "deleted proposals/" in out
    assert not any(p.exists() for p in maps) and not list((evaluated / "proposals").rglob("*.npz"))
    assert (outside / victim_name).read_bytes() == b"precious"
    assert (entry / "notes.txt").exists() and (entry / "ab" / link_name).is_symlink()
    assert (entry / "cd").is_symlink() and (evaluated / "README.txt").exists()
    assert (evaluated / "features" / "zf9-symlinkd").is_symlink()
    assert not (entry / "uses").exists()


def test_dry_run_deletes_nothing_and_names_what_prune_would_free(evaluated, capsys):
    before = sorted(p for p in evaluated.rglob("*"))
    capsys.readouterr()
    assert main(["cache", "list", "--cache", str(evaluated), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert main(["cache", "prune", "--cache", str(evaluated), "--keep-last", "0", "--dry-run", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert sorted(p for p in evaluated.rglob("*")) == before
    assert res["dry_run"] and res["freed_bytes"] == listed["total_bytes"]
    assert sorted(d["key"] for d in res["deleted"]) == sorted(e["key"] for e in listed["entries"])


def test_prune_by_key_and_by_age(evaluated, capsys):
    from sppdet.features.cache_admin import list_cache, prune_cache

    keys = [e.key for e in list_cache(evaluated).entries]
    prop = next(k for k in keys if k.startswith("proposals/"))
    assert main(["cache", "prune", "--cache", str(evaluated), "--key", prop]) == 0
    assert [e.key for e in list_cache(evaluated).entries] == [k for k in keys if k != prop]
    assert prune_cache(evaluated, older_than_days=1).deleted == []        # used just now
    res = prune_cache(evaluated, older_than_days=1, now=time.time() + 2 * 86400)
    assert [e.key for e, _ in res.deleted] == [k for k in keys if k != prop]
    assert list_cache(evaluated).entries == []


def test_prune_skips_a_conv5_entry_a_running_process_uses(evaluated, tiny_run, capsys):
    from sppdet.detect import Detector

    det = Detector.from_checkpoint(tiny_run["checkpoint"], device="cpu", cache_dir=evaluated)
    entry = det.extractor.cache.entry_dir()            # this "job" now holds the entry's lock
    n = len(list(entry.rglob("*.npz")))
    capsys.readouterr()
    assert main(["cache", "prune", "--cache", str(evaluated), "--all"]) == 0
    out = capsys.readouterr().out
    assert f"skipped features/{entry.name}: in use by a running sppdet process" in out
    assert len(list(entry.rglob("*.npz"))) == n
    del det
    import gc
    gc.collect()                                       # the job ends: its lock is released
    assert main(["cache", "prune", "--cache", str(evaluated), "--all"]) == 0
    assert not entry.exists()


def test_a_job_starting_during_a_prune_waits_and_locks_the_new_entry(tmp_path):
    import fcntl

    entry = tmp_path / "features" / "zf5-12345678"
    entry.mkdir(parents=True)
    fd = os.open(entry / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)                     # the prune
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("fd", hold_entry_lock(entry)))
    t.start()
    t.join(0.5)
    assert t.is_alive()                                # waiting for the prune
    os.unlink(entry / LOCK_NAME)
    os.rmdir(entry)
    os.close(fd)                                       # prune done
    t.join(10)
    assert not t.is_alive() and got["fd"] is not None
    st = os.fstat(got["fd"])
    assert (st.st_ino, st.st_dev) == (os.stat(entry / LOCK_NAME).st_ino, os.stat(entry / LOCK_NAME).st_dev)
    os.close(got["fd"])


def test_prune_skips_proposals_being_computed(tmp_path, capsys):
    d = tmp_path / "cache" / "proposals" / "voc-trainval"
    parts = d / "ss-0123456789abcdef-max2000.npz.parts"
    parts.mkdir(parents=True)
    (parts / "settings.json").write_text("{}")
    np.save(parts / ("0" * 20 + ".npy"), np.zeros((3, 4), np.float32))
    assert main(["cache", "prune", "--cache", str(tmp_path / "cache"), "--all"]) == 0
    out = capsys.readouterr().out
    assert "skipped proposals/voc-trainval/ss-0123456789abcdef-max2000: being written" in out
    assert (parts / "settings.json").exists()
    old = time.time() - 3600
    for p in parts.iterdir():
        os.utime(p, (old, old))
    assert main(["cache", "prune", "--cache", str(tmp_path / "cache"), "--all"]) == 0
    assert not d.exists()
