"""End to end through the CLI on a tiny synthetic set: train -> (resume) -> eval -> evaluate -> detect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sppdet.cli import main

TINY = [
    "--set", "features.scales=[224]", "--set", "features.max_side=320",
    "--set", "proposals.max_boxes=150", "--set", "proposals.workers=1",
    "--set", "finetune.iterations=30", "--set", "finetune.fc_dims=[64, 64]",
    "--set", "finetune.batch_size=32",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from sppdet.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("e2e")
    data = make_synthetic(root / "data", num_images=12, seed=5)
    run = root / "run"
    cache = root / "cache"
    args = ["-q", "train", "--config", "demo_lite0", "--data", str(data), "--out", str(run),
            "--cache", str(cache), *TINY]
    assert main(args) == 0
    return {"data": data, "run": run, "cache": cache, "args": args}


def test_train_writes_run_folder_and_resumes(trained, capsys):
    run = trained["run"]
    for name in ("model.pt", "config.yaml", "train.log", "timings.json", "stages/finetune.pt",
                 "stages/svm.pt", "stages/bbox_reg.pt"):
        assert (run / name).is_file(), name
    timings = json.loads((run / "timings.json").read_text())
    assert {"proposals", "features", "finetune", "svm", "bbox_reg"} <= set(timings)
    peaks = [timings[s]["peak_rss_mb_after"] for s in ("proposals", "features", "finetune", "svm", "bbox_reg")]
    assert peaks == sorted(peaks) and peaks[0] > 50          # a running peak, in MiB
    # a second run reuses every stage
    capsys.readouterr()
    assert main(trained["args"]) == 0
    timings = json.loads((run / "timings.json").read_text())
    assert all(timings[s]["reused"] for s in ("finetune", "svm", "bbox_reg"))
    assert "stage finetune  reused" in (run / "train.log").read_text()
    # a changed setting redoes the stages downstream of it only
    assert main(trained["args"] + ["--set", "svm.C=0.01"]) == 0
    timings = json.loads((run / "timings.json").read_text())
    assert timings["finetune"]["reused"] and not timings["svm"]["reused"] and timings["bbox_reg"]["reused"]
    # restore the original model for the other tests
    assert main(trained["args"]) == 0


def test_moved_data_and_run_folders_reuse_the_stages_and_an_edited_box_does_not(trained, tmp_path, monkeypatch):
    """The stage keys hold the images' content and ground truth, not where they lie: the data
    and run folders copied elsewhere, the data given as a relative path, reuse every stage; one
    box moved (the object count unchanged) redoes fine-tuning and what follows."""
    import shutil

    data = tmp_path / "elsewhere" / "data"
    shutil.copytree(trained["data"], data)
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = ["-q", "train", "--config", "demo_lite0", "--data", "data", "--out", str(run),
            "--cache", str(trained["cache"]), *TINY]
    assert main(args) == 0
    timings = json.loads((run / "timings.json").read_text())
    assert all(timings[s]["reused"] for s in ("finetune", "svm", "bbox_reg"))

    ids = (data / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    xml = data / "Annotations" / f"{ids[0]}.xml"
    text = xml.read_text()
    i = text.index("<xmin>") + len("<xmin>")
    j = text.index("</xmin>", i)
    xml.write_text(text[:i] + str(int(float(text[i:j])) + 3) + text[j:])
    assert main(args) == 0
    timings = json.loads((run / "timings.json").read_text())
    assert not any(timings[s]["reused"] for s in ("finetune", "svm", "bbox_reg"))


@pytest.mark.parametrize("gb", ["0", "0.005"])
def test_pooled_features_in_ram_change_nothing(trained, tmp_path, gb):
    """Fine-tuning, SVMs and box regression give bit-identical results whether the pooled
    features are kept in RAM (the default), partly (a budget of ~2 images), or not at all."""
    import torch

    run = tmp_path / "run"
    args = [a if a != str(trained["run"]) else str(run) for a in trained["args"]]
    assert main(args + ["--set", f"features.pooled_memory_gb={gb}"]) == 0
    log = (run / "train.log").read_text()
    assert ("pooled into RAM" in log) == (gb != "0")
    assert ("over features.pooled_memory_gb" in log) == (gb != "0")
    for stage, field in (("finetune", "head"), ("svm", "svm"), ("bbox_reg", "bbox_reg")):
        mine = torch.load(run / "stages" / f"{stage}.pt", weights_only=True)[field]
        ref = torch.load(trained["run"] / "stages" / f"{stage}.pt", weights_only=True)[field]
        assert mine.keys() == ref.keys()
        for k in ref:
            if isinstance(ref[k], torch.Tensor):
                assert torch.equal(mine[k], ref[k]), (stage, k)
            else:
                assert mine[k] == ref[k], (stage, k)


def test_eval_matches_evaluate_on_its_results(trained, capsys, tmp_path):
    res = tmp_path / "res"
    capsys.readouterr()
    assert main(["-q", "eval", "--checkpoint", str(trained["run"] / "model.pt"), "--data", str(trained["data"]),
                 "--split", "test", "--results", str(res), "--json", "--cache", str(trained["cache"]),
                 "--report", str(tmp_path / "report")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "voc07" and 0.0 <= out["mAP"] <= 1.0
    assert (tmp_path / "report" / "index.html").is_file()
    assert main(["-q", "evaluate", "--data", str(trained["data"]), "--split", "test", "--results", str(res),
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["mAP"] == out["mAP"] and again["ap"] == out["ap"]
    # without box regression: a different detector, still a valid score
    assert main(["-q", "eval", "--checkpoint", str(trained["run"] / "model.pt"), "--data", str(trained["data"]),
                 "--split", "test", "--results", str(tmp_path / "res2"), "--json", "--no-bbox-reg",
                 "--cache", str(trained["cache"])]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["mAP"] <= 1.0


def test_detect_images_folder_and_bad_file(trained, tmp_path, capsys):
    imgs = sorted((trained["data"] / "JPEGImages").glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "det"
    capsys.readouterr()
    rc = main(["-q", "detect", "--checkpoint", str(trained["run"] / "model.pt"), *map(str, imgs), str(bad),
               "--out", str(out), "--threshold", "-10", "--cache", str(trained["cache"])])
    captured = capsys.readouterr()
    assert rc == 2
    assert f"{imgs[0]}:" in captured.out and "broken.jpg" in captured.err
    for p in imgs:
        d = json.loads((out / f"{p.stem}.json").read_text())
        assert d["width"] > 0 and isinstance(d["detections"], list)
        for det in d["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 < x2 <= d["width"] and 0 <= y1 < y2 <= d["height"]
            assert det["class"] in ("checker", "cross", "ring", "star", "triangle")
        assert (out / f"{p.stem}.jpg").is_file()


def test_python_api(trained):
    from sppdet.detect import Detector

    det = Detector.from_checkpoint(trained["run"] / "model.pt", device="cpu", cache_dir=trained["cache"])
    img = sorted((trained["data"] / "JPEGImages").glob("*.jpg"))[0]
    out = det(img)
    assert set(out) == {"boxes", "scores", "labels"}
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) <= 100
    assert len(out["scores"]) == len(out["labels"]) == len(out["boxes"])


def test_context_features_train_and_detect(trained, tmp_path):
    """features.context: the checkpoint's fc6 takes the longer feature, the detector rebuilds the
    same extractor from the checkpoint, and its features are the training ones."""
    import numpy as np
    import torch

    from sppdet.detect import Detector

    run = tmp_path / "run"
    args = [a if a != str(trained["run"]) else str(run) for a in trained["args"]]
    assert main(args + ["--set", "features.context=1.8", "--set", "features.context_pyramid=[2]"]) == 0
    det = Detector.from_checkpoint(run / "model.pt", device="cpu", cache_dir=trained["cache"])
    plain = Detector.from_checkpoint(trained["run"] / "model.pt", device="cpu", cache_dir=trained["cache"])
    assert det.extractor.context == 1.8 and det.extractor.feature_dim == plain.extractor.feature_dim + 320 * 4
    state = torch.load(run / "stages" / "finetune.pt", weights_only=True)["head"]
    assert next(v for k, v in state.items() if k.endswith("weight")).shape[1] == det.extractor.feature_dim
    img = sorted((trained["data"] / "JPEGImages").glob("*.jpg"))[0]
    boxes = np.array([[5, 5, 60, 50], [20, 10, 90, 80]], np.float32)
    f = det.extractor.features(("x", img), boxes)
    assert torch.equal(f[:, :plain.extractor.feature_dim], plain.extractor.features(("x", img), boxes))
    out = det(img)
    assert len(out["boxes"]) == len(out["scores"]) > 0


def test_test_time_flip_averages_the_two_views(trained):
    import numpy as np

    from sppdet.boxes import flip_boxes
    from sppdet.data.images import load_image
    from sppdet.detect import Detector

    ckpt = trained["run"] / "model.pt"
    both = Detector.from_checkpoint(ckpt, device="cpu", test_overrides={"flip": True, "box_voting": 0.5})
    plain = Detector.from_checkpoint(ckpt, device="cpu", test_overrides={"flip": False})
    assert both.model.test.flip and both.model.test.box_voting == 0.5 and not plain.model.test.flip
    img = load_image(sorted((trained["data"] / "JPEGImages").glob("*.jpg"))[0])
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [w - 40, h - 40], (30, 2))
    windows = np.concatenate([xy, xy + rng.uniform(20, 40, (30, 2))], 1)
    s, b = both.window_scores((None, img), windows, w)
    s0, b0 = plain.window_scores((None, img), windows, w)
    # reference: the plain detector on a mirrored copy of the image, its windows and boxes mirrored
    s1, b1 = plain.window_scores((None, np.ascontiguousarray(img[:, ::-1])), flip_boxes(windows, w), w)
    b1 = flip_boxes(b1.reshape(-1, 4), w).reshape(b1.shape)
    np.testing.assert_allclose(s, (s0 + s1) / 2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, (b0 + b1) / 2, rtol=1e-4, atol=1e-3)
    assert not np.allclose(s0, s1)           # the mirrored view really is a second opinion
    out = both(img)
    assert out["boxes"].shape[1] == 4 and len(out["scores"]) == len(out["labels"])


def test_eval_and_detect_accept_test_settings_only(trained, tmp_path, capsys):
    ckpt = str(trained["run"] / "model.pt")
    capsys.readouterr()
    assert main(["-q", "eval", "--checkpoint", ckpt, "--data", str(trained["data"]), "--results",
                 str(tmp_path / "res"), "--json", "--cache", str(trained["cache"]), "--set", "test.flip=true",
                 "--set", "test.box_voting=0.5", "--set", "test.nms=0.25"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["mAP"] <= 1.0
    for bad, msg in ((["--set", "svm.C=1"], "only test.* settings"),
                     (["--set", "test.box_voting=2"], "test.box_voting"),
                     (["--set", "test.nmss=0.2"], "unknown key 'nmss'")):
        r = subprocess.run([sys.executable, "-m", "sppdet", "detect", "--checkpoint", ckpt, "--out",
                            str(tmp_path / "d"), str(trained["data"] / "JPEGImages"), *bad],
                           capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        ["train", "--config", str(tmp_path / "missing.yaml")],
        ["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)],
        ["train", "--config", "demo_lite0", "--set", "svm.C=abc", "--data", str(tmp_path)],
    ]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "sppdet", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("sppdet: error: ") and "Traceback" not in r.stderr, r.stderr


def test_demo_command_runs_every_step_and_reuses_on_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    # TINY's values go through the demo's own --set (workers through --workers)
    sets = [a for flag, value in zip(TINY[::2], TINY[1::2])
            if not value.startswith("proposals.workers") for a in (flag, value)]
    args = ["-q", "demo", "--out", str(out), "--images", "10", "--seed", "3", "--workers", "1", *sets]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "test mAP (VOC07 11-point):" in first
    mAP = float(first.split("test mAP (VOC07 11-point):")[1].split()[0])
    assert 0.0 <= mAP <= 1.0
    for p in ("data/ImageSets/Main/test.txt", "run/model.pt", "report/index.html"):
        assert (out / p).is_file(), p
    assert list((out / "results").glob("comp4_det_test_*.txt"))
    assert list((out / "detections").glob("*.json"))
    timings = json.loads((out / "run" / "timings.json").read_text())

    def cache_files():
        return {str(p): p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()}

    before = cache_files()
    assert main(args) == 0
    second = capsys.readouterr().out
    assert f"test mAP (VOC07 11-point): {mAP:.4f}" in second          # same model, same numbers
    again = json.loads((out / "run" / "timings.json").read_text())
    assert all(again[k]["reused"] for k in ("finetune", "svm", "bbox_reg")), again
    assert cache_files() == before      # no proposal or conv5 map recomputed
    assert timings["finetune"]["reused"] is False


def test_building_the_cli_does_not_import_torch():
    # `sppdet --help` and argument errors must answer at once, not after seconds of `import torch`
    code = ("import sys; from sppdet.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _files(folder):
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def test_eval_and_detect_use_the_callers_cache_not_the_checkpoints(trained, tmp_path, monkeypatch, capsys):
    """A checkpoint records the trainer's cache folder; evaluating or running it elsewhere must use
    --cache / $SPPDET_CACHE and write nothing into the trainer's cache or next to the checkpoint."""
    import shutil

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    ckpt = theirs / "model.pt"
    shutil.copy(trained["run"] / "model.pt", ckpt)
    their_cache = _files(trained["cache"])
    mine = tmp_path / "mine"
    monkeypatch.setenv("SPPDET_CACHE", str(mine))
    assert main(["-q", "eval", "--checkpoint", str(ckpt), "--data", str(trained["data"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"] is None                               # scored, not kept: nowhere asked for
    assert sorted(p.name for p in theirs.iterdir()) == ["model.pt"]
    assert list((mine / "proposals").rglob("*.npz"))             # the caller's cache was used ...
    assert _files(trained["cache"]) == their_cache               # ... and the trainer's left alone
    img = sorted((trained["data"] / "JPEGImages").glob("*.jpg"))[0]
    other = tmp_path / "other"
    assert main(["-q", "detect", "--checkpoint", str(ckpt), str(img), "--out", str(tmp_path / "det"),
                 "--cache", str(other)]) == 0
    assert list((other / "proposals").rglob("*.npz"))          # (conv5 maps of decoded arrays are not cached)
    assert _files(trained["cache"]) == their_cache
    assert sorted(p.name for p in theirs.iterdir()) == ["model.pt"]


def test_eval_results_go_to_the_report_folder_and_tilde_is_expanded(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rc = main(["-q", "eval", "--checkpoint", str(trained["run"] / "model.pt"), "--data", str(trained["data"]),
               "--json", "--report", "~/rep", "--cache", "~/cache"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    home = tmp_path / "home"
    assert out["results"] == str(home / "rep" / "results")
    assert list((home / "rep" / "results").glob("comp4_det_test_*.txt"))
    assert (home / "rep" / "index.html").is_file()
    assert list((home / "cache" / "proposals").rglob("*.npz"))
    assert not (tmp_path / "~").exists() and not list(trained["run"].glob("results"))
