"""`sppdet bench scale`: subsets, fits, the projection and the JSON (on a tiny synthetic set)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from sppdet.bench import scale
from sppdet.cli import main
from sppdet.errors import SppdetError

from conftest import TINY_TRAIN

TINY = [*TINY_TRAIN, "--set", "test.flip=false", "--set", "bbox_reg.enabled=false"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def test_sizes_are_checked():
    assert scale.parse_sizes("50, 25,100,25") == [25, 50, 100]
    for bad in ("25", "0,5", "a,b", ""):
        with pytest.raises(SppdetError, match="--images"):
            scale.parse_sizes(bad)


def test_line_fit_against_the_normal_equations():
    n = [25, 50, 100, 200]
    y = [31.0, 52.5, 98.0, 205.0]
    f = scale.fit_line(n, y)
    # slow reference: the 2x2 normal equations and R^2 = 1 - SS_res / SS_tot, by hand
    k, sx, sy = len(n), sum(n), sum(y)
    sxx, sxy = sum(v * v for v in n), sum(a * b for a, b in zip(n, y))
    b = (k * sxy - sx * sy) / (k * sxx - sx * sx)
    a = (sy - b * sx) / k
    mean = sy / k
    r2 = 1 - sum((yi - a - b * ni) ** 2 for ni, yi in zip(n, y)) / sum((yi - mean) ** 2 for yi in y)
    assert f["slope"] == pytest.approx(b) and f["intercept"] == pytest.approx(a) and f["r2"] == pytest.approx(r2)
    assert scale.fit_line([1, 2], [3.0, 3.0]) == {"intercept": pytest.approx(3.0), "slope": pytest.approx(0.0),
                                                   "r2": 1.0}


def _run(n: int, a: float, b: float) -> dict:
    s = {"proposals": 0.5 * n, "features": 0.25 * n, "train_total": a + b * n, "test_features": 0.1 * n,
         "eval_total": 2.0 + 0.2 * n}
    s["total"] = s["train_total"] + s["eval_total"]
    return {"images": n, "seconds": s, "peak_rss_mb": 1000.0 + n, "cache_mb": 0.5 + 2 * n * 0.01}


def test_projection_of_exactly_linear_runs():
    runs = [_run(n, 10.0, 3.0) for n in (25, 50, 100)]
    out = scale.summarise(runs, project_images=9963, train_fraction=5011 / 9963)
    p = out["projection"]
    assert (p["images"], p["train_images"], p["test_images"]) == (9963, 5011, 4952)
    assert p["seconds"]["train_total"] == pytest.approx(10.0 + 3.0 * 5011, abs=0.1)
    assert p["seconds"]["eval_total"] == pytest.approx(2.0 + 0.2 * 4952, abs=0.1)
    assert p["seconds"]["test_features"] == pytest.approx(0.1 * 4952, abs=0.1)
    assert p["hours"] == pytest.approx((10.0 + 3.0 * 5011 + 2.0 + 0.2 * 4952) / 3600, abs=1e-3)
    assert p["cache_gb"] == pytest.approx((0.5 + 0.01 * 9963) / 1024, abs=1e-3)   # MiB per image held -> GiB
    lin = out["linearity"]
    assert lin["proposals"]["spread"] == 0 and lin["proposals"]["r2"] == pytest.approx(1.0)
    assert lin["proposals"]["per_image_seconds"] == [0.5, 0.5, 0.5]
    per = [(10 + 3 * n) / n for n in (25, 50, 100)]
    assert lin["train_total"]["spread"] == pytest.approx((max(per) - min(per)) / (sum(per) / 3), abs=1e-4)
    assert out["memory"]["ratio_last_to_first"] == pytest.approx(1100 / 1025, abs=1e-4)
    assert p["peak_rss_mb_measured_max"] == 1100.0                       # the largest run's, as measured
    assert p["peak_rss_mb_linear"] == pytest.approx(1000.0 + 5011, abs=0.1)   # the line, at the larger share
    assert "peak_rss_mb" not in p and "upper bound" in p["method"]


def test_subset_lists_the_first_images_and_writes_nothing_into_the_dataset(tmp_path):
    from sppdet.data import load_dataset
    from sppdet.data.synthetic import make_synthetic
    from sppdet.data.voc import read_split

    root = make_synthetic(tmp_path / "data", num_images=6, seed=2)
    before = _snapshot(root)
    ids = read_split(root / "ImageSets" / "Main" / "trainval.txt")
    sub = scale.make_subset(root, tmp_path / "out" / "n2" / "data", {"trainval": ids[:2], "test": ["000002"]})
    assert read_split(sub / "ImageSets" / "Main" / "trainval.txt") == ids[:2]
    ds = load_dataset(sub, "trainval")
    assert [r.image_id for r in ds] == ids[:2]
    assert all(Path(r.path).resolve().is_relative_to(root.resolve()) for r in ds)
    assert (sub / "JPEGImages").is_symlink() and _snapshot(root) == before


def test_run_command_reports_the_exit_status_and_the_peak_rss_of_that_process(tmp_path):
    code = "import sys; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('hi'); sys.exit(3)"
    r = scale.run_command([sys.executable, "-c", code], stdout=tmp_path / "o", stderr=tmp_path / "e",
                          env=dict(os.environ))
    assert r["rc"] == 3 and (tmp_path / "o").read_text() == "hi\n"
    assert 300 <= r["peak_rss_mb"] < 600
    small = scale.run_command([sys.executable, "-c", "pass"], stdout=tmp_path / "o", stderr=tmp_path / "e",
                              env=dict(os.environ))
    assert small["rc"] == 0 and small["peak_rss_mb"] < 200        # per process, not the earlier one's


def _in_process(argv, *, stdout: Path, stderr: Path, env):
    """scale.run_command without the fresh process (fast): ``python -m sppdet ARGS`` -> main(ARGS)."""
    assert argv[1:3] == ["-m", "sppdet"]
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(["-q", *argv[3:]])
    stdout.write_text(buf.getvalue())
    stderr.write_text("")
    return {"rc": rc, "seconds": time.perf_counter() - t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def test_bench_scale_json_subsets_and_separate_caches(tmp_path, monkeypatch, capsys):
    from sppdet.data.synthetic import make_synthetic
    from sppdet.data.voc import read_split

    root = make_synthetic(tmp_path / "data", num_images=8, seed=5)
    before = _snapshot(root)
    monkeypatch.setattr(scale, "run_command", _in_process)
    out = tmp_path / "bench"
    capsys.readouterr()
    assert main(["-q", "bench", "scale", "--config", "demo_lite0", "--data", str(root), "--images", "2,1",
                 "--out", str(out), "--device", "cpu", *TINY]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res)[:4] == ["config", "device", "runs", "projection"]
    assert res["config"] == "demo_lite0" and res["device"] == "cpu"
    assert [r["images"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert {"images", "seconds", "peak_rss_mb", "cache_mb"} <= set(r)
        assert {"proposals", "features", "finetune", "svm", "train_total", "test_features", "eval_total",
                "total"} <= set(r["seconds"])
        assert all(isinstance(v, float) and v >= 0 for v in r["seconds"].values())
        assert r["peak_rss_mb"] > 0 and r["cache_mb"] > 0 and r["test_images"] == r["images"]
    p = res["projection"]
    assert p["images"] == 9963 and p["hours"] >= 0 and p["cache_gb"] >= 0
    assert set(res["linearity"]) >= {"train_total", "eval_total", "total"}
    assert {"per_image_seconds", "spread", "r2"} <= set(res["linearity"]["total"])
    assert json.loads((out / "scale.json").read_text()) == res
    # the subsets: the first N ids of each list, written under --out; one cache per N
    ids = {s: read_split(root / "ImageSets" / "Main" / f"{s}.txt") for s in ("trainval", "test")}
    for n in (1, 2):
        main_dir = out / f"n{n}" / "data" / "ImageSets" / "Main"
        assert {s: read_split(main_dir / f"{s}.txt") for s in ids} == {s: v[:n] for s, v in ids.items()}
        assert list((out / f"n{n}" / "cache" / "features").rglob("*.npz"))
        assert (out / f"n{n}" / "run" / "model.pt").is_file()
    assert _snapshot(root) == before
    # a rerun into the same --out refuses (it would reuse the caches)
    assert main(["-q", "bench", "scale", "--config", "demo_lite0", "--data", str(root), "--images", "1,2",
                 "--out", str(out), *TINY]) == 2
    assert "exists from an earlier bench run" in capsys.readouterr().err


def test_bench_scale_refuses_an_out_folder_inside_the_dataset(tmp_path, capsys):
    from sppdet.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "data", num_images=4, seed=5)
    before = _snapshot(root)
    assert main(["-q", "bench", "scale", "--config", "demo_lite0", "--data", str(root), "--images", "1,2",
                 "--out", str(root / "bench")]) == 2
    assert "never writes into the dataset" in capsys.readouterr().err
    assert main(["-q", "bench", "scale", "--config", "demo_lite0", "--data", str(root), "--images", "1,9",
                 "--out", str(tmp_path / "b")]) == 2
    assert "fewer than --images 9" in capsys.readouterr().err
    assert _snapshot(root) == before


@pytest.mark.slow
def test_bench_scale_in_fresh_processes(tmp_path, capsys):
    """The real thing: every N's train and eval in their own processes (about a minute here)."""
    from sppdet.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "data", num_images=8, seed=5)
    assert main(["-q", "bench", "scale", "--config", "demo_lite0", "--data", str(root), "--images", "1,2",
                 "--out", str(tmp_path / "bench"), "--device", "cpu", *TINY]) == 0
    res = json.loads(capsys.readouterr().out)
    for r in res["runs"]:
        assert 100 < r["peak_rss_mb_train"] < 8000 and 100 < r["peak_rss_mb_eval"] < 8000
        assert r["seconds"]["train_total"] > r["seconds"]["finetune"]
        assert (tmp_path / "bench" / f"n{r['images']}" / "train.log.txt").is_file()
