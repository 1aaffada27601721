"""Proposal store, resumable/parallel/sharded runner and the ``sppdet proposals`` command."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import sppdet.proposals.runner as runner
from sppdet.cli import main
from sppdet.data import load_dataset
from sppdet.errors import ImageDecodeError
from sppdet.proposals import (ProposalStore, ProposalStoreError, compute_proposals, default_store_path,
                              get_preset, merge_shards, selective_search)
from sppdet.proposals.store import PartsDir, make_settings, parse_shard, shard_path

#: Cheap settings for the runner tests (images are ~100 px).
PRESET = get_preset("fast", ks=(100.0,), colour_spaces=("hsv",), strategies=("cfst",), max_sides=(64,),
                    extra_runs=(), min_box_size=2.0)
SIZES = [(72, 96), (90, 64), (64, 80), (80, 100), (70, 70)]


def write_voc(root: Path, n: int = 4, split: str = "train") -> Path:
    """A tiny VOC-format folder: n JPEGs with coloured rectangles and their XML."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        rng = np.random.default_rng(i)
        img = (rng.integers(0, 40, size=(h, w, 3)) + 100).astype(np.uint8)
        objs = []
        for j, color in enumerate([(230, 30, 30), (30, 40, 220)]):
            x1, y1 = 5 + 30 * j + i, 6 + 20 * j
            x2, y2 = min(x1 + 30, w - 1), min(y1 + 28, h - 1)
            img[y1:y2, x1:x2] = color
            objs.append(("dog" if j == 0 else "cat", x1, y1, x2, y2, int(j == 1 and i == 0)))
        image_id = f"img{i:03d}"
        ids.append(image_id)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), img[:, :, ::-1])
        xml = [f"<annotation><filename>{image_id}.jpg</filename>",
               f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
        for name, x1, y1, x2, y2, diff in objs:
            # VOC: 1-based inclusive pixel indices of the covered columns/rows x1..x2-1
            xml.append(f"<object><name>{name}</name><difficult>{diff}</difficult><bndbox>"
                       f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                       f"</bndbox></object>")
        xml.append("</annotation>")
        (root / "Annotations" / f"{image_id}.xml").write_text("".join(xml))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path / "voc")


@pytest.fixture
def calls(monkeypatch):
    """Count (and optionally interrupt) the selective-search calls the runner makes in-process."""
    state = {"n": 0, "fail_at": None}
    real = runner.selective_search

    def counting(image, preset, max_boxes):
        state["n"] += 1
        if state["fail_at"] is not None and state["n"] == state["fail_at"]:
            raise KeyboardInterrupt
        return real(image, preset, max_boxes)

    monkeypatch.setattr(runner, "selective_search", counting)
    return state


def assert_same_store(a: ProposalStore, b: ProposalStore) -> None:
    assert a.ids == b.ids
    for i in a.ids:
        np.testing.assert_array_equal(a[i], b[i])


# ---------------------------------------------------------------------------
# The file


def test_store_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    boxes = [rng.uniform(0, 50, (n, 4)).astype(np.float32) for n in (3, 0, 7)]
    settings = {"format": "sppdet-proposals/1", "preset": {"ks": [1.0]}, "max_boxes": 5}
    store = ProposalStore(["a", "b b", "ü/c"], boxes, settings, image_keys=["k1", "k2", "k3"], skipped=["z"])
    path = store.save(tmp_path / "p.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert z["boxes"].dtype == np.float32 and z["boxes"].shape == (10, 4)
    back = ProposalStore.load(path)
    assert back.ids == ["a", "b b", "ü/c"] and len(back) == 3 and "b b" in back and "x" not in back
    for i, b in zip(back.ids, boxes):
        assert back[i].dtype == np.float32 and back[i].shape == b.shape
        np.testing.assert_array_equal(back[i], b)
    assert back.settings == settings and back.skipped == ["z"] and back.key_of("ü/c") == "k3"
    assert back.path == path and back.num_boxes().tolist() == [3, 0, 7]


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "p.npz"
    settings = {"format": "sppdet-proposals/1"}
    ProposalStore(["a"], [np.ones((2, 4), np.float32)], settings).save(path)

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        ProposalStore(["b"], [np.zeros((1, 4), np.float32)], settings).save(path)
    monkeypatch.undo()
    assert ProposalStore.load(path).ids == ["a"]  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz"]  # no temporary left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_format", "bad_offsets"])
def test_corrupt_file_is_reported_by_name(tmp_path, damage):
    path = tmp_path / "p.npz"
    settings = {"format": "sppdet-proposals/1"}
    ProposalStore(["a", "b"], [np.ones((30, 4), np.float32)] * 2, settings).save(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "garbage":
        path.write_bytes(b"not a zip at all")
    elif damage == "wrong_format":
        ProposalStore(["a"], [np.ones((1, 4), np.float32)], {"format": "other/9"}).save(path)
    else:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["offsets"] = np.array([0, 40, 50])  # does not end at len(boxes)
        np.savez(path, **arrays)
    with pytest.raises(ProposalStoreError) as e:
        ProposalStore.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4) and parse_shard((1, 1)) == (1, 1) and parse_shard(None) is None
    for bad in ("0/4", "5/4", "1/0", "x", "1-4"):
        with pytest.raises(ProposalStoreError, match="--shard"):
            parse_shard(bad)
    assert shard_path(Path("/c/ss-k-max9.npz"), 2, 3) == Path("/c/ss-k-max9.shard-2-of-3.npz")


# ---------------------------------------------------------------------------
# The runner


def test_compute_matches_selective_search_and_is_cached(voc, tmp_path, calls):
    ds = load_dataset(voc, "train")
    store = compute_proposals(ds, PRESET, 50, workers=1, cache_dir=tmp_path / "c", progress=False)
    assert store.path == default_store_path(tmp_path / "c", ds, PRESET.key(), 50)
    assert store.ids == [r.image_id for r in ds] and calls["n"] == len(ds)
    from sppdet.data import load_image

    for r in ds:
        np.testing.assert_array_equal(store[r.image_id], selective_search(load_image(r.path), PRESET, 50))
        assert store[r.image_id].dtype == np.float32 and 1 <= len(store[r.image_id]) <= 50
    assert not PartsDir(store.path, store.settings).dir.exists()  # sidecar merged and removed
    again = compute_proposals(ds, PRESET, 50, workers=1, cache_dir=tmp_path / "c", progress=False)
    assert calls["n"] == len(ds)  # nothing recomputed
    assert_same_store(store, again)


def test_changed_image_recomputes_only_that_image(voc, tmp_path, calls):
    ds = load_dataset(voc, "train")
    out = tmp_path / "p.npz"
    compute_proposals(ds, PRESET, 50, workers=1, out=out, progress=False)
    n0 = calls["n"]
    img = cv2.imread(str(ds[2].path))
    cv2.imwrite(str(ds[2].path), np.ascontiguousarray(img[::-1]), [cv2.IMWRITE_JPEG_QUALITY, 60])
    ds = load_dataset(voc, "train")
    compute_proposals(ds, PRESET, 50, workers=1, out=out, progress=False)
    assert calls["n"] - n0 == 1


def test_resume_after_interruption(voc, tmp_path, calls):
    ds = load_dataset(voc, "train")
    out = tmp_path / "p.npz"
    calls["fail_at"] = 3  # Ctrl-C while the third image is being computed
    with pytest.raises(KeyboardInterrupt):
        compute_proposals(ds, PRESET, 50, workers=1, out=out, progress=False)
    assert not out.exists()
    parts = PartsDir(out, make_settings(PRESET, 50, ds))
    assert parts.count() == 2  # the two finished images are saved
    calls["fail_at"], calls["n"] = None, 0
    store = compute_proposals(ds, PRESET, 50, workers=1, out=out, progress=False)
    assert calls["n"] == len(ds) - 2  # only the rest is computed
    fresh = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "fresh.npz", progress=False)
    assert_same_store(store, fresh)


def test_stale_settings_are_rebuilt(voc, tmp_path, calls):
    ds = load_dataset(voc, "train")
    out = tmp_path / "p.npz"
    compute_proposals(ds, PRESET, 50, workers=1, out=out, progress=False)
    other = get_preset(PRESET, ks=(300.0,))
    calls["n"] = 0
    store = compute_proposals(ds, other, 50, workers=1, out=out, progress=False)
    assert calls["n"] == len(ds)
    assert store.settings["preset_key"] == other.key()
    calls["n"] = 0
    store = compute_proposals(ds, other, 10, workers=1, out=out, progress=False)  # max_boxes is a setting too
    assert calls["n"] == len(ds) and max(store.num_boxes()) <= 10
    # stale partial results of an interrupted run with other settings are not used either
    calls["fail_at"], calls["n"] = 3, 0
    with pytest.raises(KeyboardInterrupt):
        compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "q.npz", progress=False)
    calls["fail_at"], calls["n"] = None, 0
    compute_proposals(ds, other, 50, workers=1, out=tmp_path / "q.npz", progress=False)
    assert calls["n"] == len(ds)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_store_is_rebuilt(voc, tmp_path, calls, damage, caplog):
    ds = load_dataset(voc, "train")
    out = tmp_path / "p.npz"
    good = compute_proposals(ds, PRESET, 50, workers=1, out=out, progress=False)
    out.write_bytes(out.read_bytes()[:200] if damage == "truncate" else b"\x00" * 64)
    calls["n"] = 0
    with caplog.at_level("WARNING"):
        store = compute_proposals(ds, PRESET, 50, workers=1, out=out, progress=False)
    assert calls["n"] == len(ds) and "rebuilding" in caplog.text
    assert_same_store(good, store)
    assert_same_store(good, ProposalStore.load(out))


def test_shards_merge_into_the_same_store_as_one_run(voc, tmp_path):
    ds = load_dataset(voc, "train")
    one = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "one.npz", progress=False)
    out = tmp_path / "sharded.npz"
    s1 = compute_proposals(ds, PRESET, 50, workers=1, out=out, shard="1/3", progress=False)
    assert s1.ids == [ds[0].image_id, ds[3].image_id] and not out.exists()
    with pytest.raises(ProposalStoreError, match="missing"):
        merge_shards(out)
    compute_proposals(ds, PRESET, 50, workers=1, out=out, shard=(3, 3), progress=False)
    merged = compute_proposals(ds, PRESET, 50, workers=1, out=out, shard="2/3", progress=False)
    assert merged.path == out and out.exists()
    assert_same_store(one, merged)
    assert_same_store(one, ProposalStore.load(out))
    assert not list(tmp_path.glob("sharded.shard-*"))  # shard files removed after the merge


def test_parallel_pool_gives_the_same_store(voc, tmp_path):
    ds = load_dataset(voc, "train")
    a = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "a.npz", progress=False)
    b = compute_proposals(ds, PRESET, 50, workers=2, out=tmp_path / "b.npz", progress=False)
    assert_same_store(a, b)


def break_image(voc: Path, image_id: str = "img001") -> Path:
    p = voc / "JPEGImages" / f"{image_id}.jpg"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])  # header intact (the dataset loads), pixel data truncated
    return p


def test_bad_image_named_or_skipped(voc, tmp_path):
    bad = break_image(voc)
    ds = load_dataset(voc, "train")
    with pytest.raises(ImageDecodeError) as e:
        compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "p.npz", progress=False)
    assert bad.name in str(e.value)
    store = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "p.npz", progress=False,
                              skip_bad_images=True)
    assert store.skipped == ["img001"] and "img001" not in store and len(store) == len(ds) - 1


# ---------------------------------------------------------------------------
# The command


def test_cli_proposals_and_shards(voc, tmp_path, capsys):
    out = tmp_path / "p.npz"
    sets = ["--set", "proposals.overrides.ks=[100]", "--set", "proposals.overrides.colour_spaces=[hsv]",
            "--set", "proposals.overrides.strategies=[cfst]", "--set", "proposals.overrides.max_sides=[64]",
            "--set", "proposals.overrides.min_box_size=2", "--set", "proposals.overrides.extra_runs=[]"]
    assert main(["proposals", "--data", str(voc), "--split", "train", "--workers", "1", "--out", str(out),
                 "--max-boxes", "50", *sets]) == 0
    assert str(out) in capsys.readouterr().out
    one = ProposalStore.load(out)
    assert one.settings["preset_key"] == PRESET.key() and len(one) == 4
    sharded = tmp_path / "s.npz"
    for i in (1, 2):
        assert main(["proposals", "--data", str(voc), "--split", "train", "--workers", "1", "--out",
                     str(sharded), "--max-boxes", "50", "--shard", f"{i}/2", *sets]) == 0
    assert_same_store(one, ProposalStore.load(sharded))


def test_cli_merge_command(voc, tmp_path, capsys):
    ds = load_dataset(voc, "train")
    out = tmp_path / "m.npz"
    compute_proposals(ds, PRESET, 50, workers=1, out=out, shard=(1, 2), progress=False)
    other = tmp_path / "elsewhere" / "m.npz"  # shard 2 computed on "another machine"
    compute_proposals(ds, PRESET, 50, workers=1, out=other, shard=(2, 2), progress=False)
    shutil.copy(shard_path(other, 2, 2), shard_path(out, 2, 2))
    assert not out.exists()
    assert main(["proposals", "--merge", "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    merged = ProposalStore.load(out)
    assert merged.ids == [r.image_id for r in ds]
    one = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "one.npz", progress=False)
    assert_same_store(one, merged)


def test_cli_bad_image_exit_2_one_line(voc, tmp_path, capsys):
    bad = break_image(voc)
    rc = main(["proposals", "--data", str(voc), "--split", "train", "--workers", "1",
               "--out", str(tmp_path / "p.npz"), "--set", "proposals.overrides.max_sides=[64]"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("sppdet: error:")]
    assert len(lines) == 1 and bad.name in lines[0] and "Traceback" not in err
    assert main(["proposals", "--data", str(voc), "--split", "train", "--workers", "1", "--skip-bad-images",
                 "--out", str(tmp_path / "p.npz"), "--set", "proposals.overrides.max_sides=[64]"]) == 0
    assert "1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("argv,what", [
    (["--shard", "0/2"], "--shard"),
    (["--mode", "nope"], "--mode"),
    (["--set", "proposals.overrides.ks=[x]"], "ks"),
    (["--set", "ks=100"], "--set: unknown key 'ks'"),    # the one grammar: section.key=value
    (["--set", "proposals.mode=nope"], "nope"),
    (["--max-boxes", "-1"], "--max-boxes"),
])
def test_cli_bad_options(voc, tmp_path, capsys, argv, what):
    rc = main(["proposals", "--data", str(voc), "--split", "train", "--workers", "1",
               "--out", str(tmp_path / "p.npz"), *argv])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("sppdet: error:")]
    assert rc == 2 and len(errors) == 1 and what in errors[0] and "Traceback" not in err


def test_cli_merge_without_shards_is_an_error(tmp_path, capsys):
    rc = main(["proposals", "--merge", "--out", str(tmp_path / "none.npz")])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("sppdet: error:")]
    assert rc == 2 and len(errors) == 1 and "no shard files" in errors[0] and "Traceback" not in err


def test_store_file_is_plain_json_settings(voc, tmp_path):
    ds = load_dataset(voc, "train")
    store = compute_proposals(ds, PRESET, 50, workers=1, out=tmp_path / "p.npz", progress=False)
    with zipfile.ZipFile(store.path) as z:
        names = set(z.namelist())
    assert {"boxes.npy", "offsets.npy", "ids.npy", "settings.npy"} <= names
    with np.load(store.path, allow_pickle=False) as z:
        settings = json.loads(str(z["settings"]))
    assert settings["preset"] == PRESET.settings() and settings["max_boxes"] == 50
