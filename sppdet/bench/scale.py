"""``sppdet bench scale``: the training and test stages on the first N images, for several N.

For each N of ``--images`` (e.g. 25, 50, 100):

1. a subset root ``OUT/n<N>/data``: ``ImageSets/Main/<split>.txt`` and ``<test split>.txt``
   hold the first N ids of the dataset's lists, ``Annotations`` and ``JPEGImages`` are symlinks
   to the dataset's (nothing is written into the dataset);
2. ``sppdet train`` (config, ``--set``s) into ``OUT/n<N>/run`` and ``sppdet eval --json`` of its
   checkpoint on the test subset, each in a fresh process, both with the cache ``OUT/n<N>/cache``
   (so no N reuses another's proposals or conv5 maps);
3. the seconds of every stage (``RUN/timings.json``; eval's per-image seconds times its images;
   each command's wall time), the peak RSS of each command (``wait4``: the largest of the
   command's process and its reaped workers) and the cache's size on disk.

Then a least-squares line ``seconds = a + b N`` per stage, extrapolated to a VOC-sized run
(``--project-images``, default 9963 = VOC 2007 trainval 5011 + test 4952: training stages at the
training share, test stages at the test share), and how linear the time is: seconds per image
for each N, their spread ``(max - min) / mean`` and the fit's R^2.  One JSON object on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.voc import discover_classes, parse_voc_xml, read_split, split_file
from ..errors import SppdetError

log = logging.getLogger(__name__)

#: VOC 2007: trainval and test images (the default projection: the paper's whole data set).
VOC07_TRAINVAL, VOC07_TEST = 5011, 4952
MiB, GiB = 2 ** 20, 2 ** 30

#: Training stages in ``timings.json`` order (others found there are kept too).
TRAIN_STAGES = ("proposals", "features", "features_e2e", "finetune", "svm", "bbox_reg")


def parse_sizes(text: str) -> list[int]:
    """``"25,50,100"`` -> ``[25, 50, 100]`` (sorted, distinct, each >= 1, at least two)."""
    try:
        sizes = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        sizes = []
    if len(sizes) < 2 or sizes[0] < 1:
        raise SppdetError(f"--images {text!r}: expected at least two image counts >= 1, e.g. --images 25,50,100")
    return sizes


def make_subset(root: Path, out: Path, splits: dict[str, list[str]]) -> Path:
    """A VOC root at ``out`` whose split files list ``splits[name]`` and whose ``Annotations``
    and ``JPEGImages`` are symlinks to ``root``'s (nothing is written under ``root``)."""
    main = out / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        (main / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    for sub in ("Annotations", "JPEGImages"):
        link = out / sub
        target = (root / sub).resolve()
        if not target.is_dir():
            raise SppdetError(f"{root / sub}: not found (bench scale takes a VOC-format root)")
        try:
            link.symlink_to(target, target_is_directory=True)
        except OSError as e:
            raise SppdetError(f"{link}: cannot make a symlink to {target} ({e.strerror})") from None
    return out


def fit_line(n: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least squares ``y = a + b n``: ``{"intercept": a, "slope": b, "r2": R^2}`` (R^2 = 1 when
    ``y`` is constant and fitted exactly; with two points the line is exact, R^2 = 1)."""
    x = np.asarray(n, dtype=np.float64)
    v = np.asarray(y, dtype=np.float64)
    A = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, v, rcond=None)
    resid = v - (a + b * x)
    ss_tot = float(((v - v.mean()) ** 2).sum())
    ss_res = float((resid ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-18 else 0.0)
    return {"intercept": float(a), "slope": float(b), "r2": float(r2)}


def linearity(sizes: Sequence[int], seconds: Sequence[float]) -> dict[str, Any]:
    """How linear ``seconds(N)`` is: seconds per image for each N, their spread, the line."""
    per = [s / n for s, n in zip(seconds, sizes)]
    mean = float(np.mean(per)) if per else float("nan")
    fit = fit_line(sizes, seconds)
    return {"per_image_seconds": [round(p, 6) for p in per],
            "spread": round((max(per) - min(per)) / mean, 4) if mean > 0 else None,
            "slope_seconds_per_image": round(fit["slope"], 6), "intercept_seconds": round(fit["intercept"], 3),
            "r2": round(fit["r2"], 6)}


def dataset_classes(root: Path, ids: Sequence[str]) -> list[str]:
    """The class list of the whole dataset's lists (every N trains the same K classes, and the
    test subset never holds a class the training subset lacks): :func:`discover_classes` of the
    object names in the annotations of ``ids``."""
    names: set[str] = set()
    for i in dict.fromkeys(ids):
        names.update(o.name for o in parse_voc_xml(root / "Annotations" / f"{i}.xml", i).objects)
    if not names:
        raise SppdetError(f"{root}: the splits' annotations name no objects")
    return discover_classes(names)


def _du(path: Path) -> int:
    """Bytes on disk (allocated blocks) of the files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


#: Runs a command and writes its ``wait4`` resource usage to a file.  A process's peak RSS
#: (``ru_maxrss``) starts, at ``exec``, from the peak of the memory image it replaces -- for a
#: child of this (large) process, this process's own peak -- so the command is started from this
#: small launcher (``python -I -S``, a few MiB) and the figure is the command's own.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"status": status, "maxrss": ru.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_command(argv: list[str], *, stdout: Path, stderr: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv`` in a fresh process; returns ``{"rc", "seconds", "peak_rss_mb"}``.

    Peak RSS is ``wait4``'s ``ru_maxrss`` of that process, taken by a small launcher (see
    :data:`_LAUNCHER`): the largest resident set of the command and of the worker processes it
    reaped (the largest single one, not their sum)."""
    usage = Path(str(stdout) + ".rusage.json")
    t0 = time.perf_counter()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage), *argv], stdout=out,
                             stderr=err, env=env)
        try:
            rc = p.wait()
        except BaseException:
            p.kill()
            p.wait()
            raise
    secs = time.perf_counter() - t0
    try:
        maxrss = json.loads(usage.read_text())["maxrss"]
    except (OSError, ValueError, KeyError):
        maxrss = float("nan")
    # ru_maxrss: KiB on Linux, bytes on macOS
    rss = maxrss / (MiB if sys.platform == "darwin" else 1024)
    return {"rc": rc, "seconds": secs, "peak_rss_mb": rss}


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    err = [ln for ln in lines if "error" in ln.lower()]
    return (err or lines or [""])[-1][:300]


def _sppdet(*args: str) -> list[str]:
    return [sys.executable, "-m", "sppdet", *args]


def one_run(n: int, *, root: Path, out: Path, config: str, sets: Sequence[str], train_split: str,
            test_split: str, train_ids: list[str], test_ids: list[str], device: str | None,
            env: dict[str, str], classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and evaluate on the first ``n`` images; the run's row of the JSON."""
    base = out / f"n{n}"
    if base.exists():
        raise SppdetError(f"{base}: exists from an earlier bench run; remove it or pass another --out "
                          "(runs must not reuse each other's caches)")
    base.mkdir(parents=True)
    splits = {train_split: train_ids[:n]}
    splits[test_split] = test_ids[:n]
    data = make_subset(root, base / "data", splits)
    cache, run_dir = base / "cache", base / "run"
    dev = ["--device", device] if device else []
    fixed = ["--set", f"data.train_split={train_split}"]
    if classes is not None:
        fixed += ["--set", f"data.classes={json.dumps(list(classes))}"]
    train = _sppdet("train", "--config", config, "--data", str(data), "--out", str(run_dir), "--cache", str(cache),
                    *[a for s in sets for a in ("--set", s)], *fixed, *dev)
    log.info("bench scale: N=%d: training (%s)", n, base / "train.log.txt")
    tr = run_command(train, stdout=base / "train.out.txt", stderr=base / "train.log.txt", env=env)
    if tr["rc"] != 0:
        raise SppdetError(f"bench scale: sppdet train on {n} images failed (exit {tr['rc']}): "
                          f"{_last_line(base / 'train.log.txt')} (log: {base / 'train.log.txt'})")
    ev_cmd = _sppdet("eval", "--checkpoint", str(run_dir / "model.pt"), "--data", str(data), "--split", test_split,
                     "--cache", str(cache), "--json", *dev)
    log.info("bench scale: N=%d: evaluating (%s)", n, base / "eval.log.txt")
    ev = run_command(ev_cmd, stdout=base / "eval.json", stderr=base / "eval.log.txt", env=env)
    if ev["rc"] != 0:
        raise SppdetError(f"bench scale: sppdet eval on {n} images failed (exit {ev['rc']}): "
                          f"{_last_line(base / 'eval.log.txt')} (log: {base / 'eval.log.txt'})")
    timings = json.loads((run_dir / "timings.json").read_text())
    evj = json.loads((base / "eval.json").read_text().strip().splitlines()[-1])
    seconds: dict[str, float] = {}
    for k, v in timings.items():
        if isinstance(v, dict) and "seconds" in v:
            seconds[k] = round(float(v["seconds"]), 3)
    seconds["train_total"] = round(tr["seconds"], 3)
    images = int(evj.get("images", n))
    for k, v in (evj.get("seconds_per_image") or {}).items():
        seconds[f"test_{k}"] = round(float(v) * images, 3)
    seconds["eval_total"] = round(ev["seconds"], 3)
    seconds["total"] = round(tr["seconds"] + ev["seconds"], 3)
    cache_bytes = _du(cache)
    conv5 = _du(cache / "features") if (cache / "features").is_dir() else 0
    row = {"images": n, "seconds": seconds, "peak_rss_mb": round(max(tr["peak_rss_mb"], ev["peak_rss_mb"]), 1),
           "cache_mb": round(cache_bytes / MiB, 2),
           "peak_rss_mb_train": round(tr["peak_rss_mb"], 1), "peak_rss_mb_eval": round(ev["peak_rss_mb"], 1),
           "conv5_cache_mb": round(conv5 / MiB, 2), "test_images": images, "mAP": evj.get("mAP"),
           "folder": str(base)}
    log.info("bench scale: N=%d: train %.1f s, eval %.1f s, peak RSS %.0f MiB, cache %.1f MiB", n, tr["seconds"],
             ev["seconds"], row["peak_rss_mb"], row["cache_mb"])
    return row


def summarise(runs: list[dict[str, Any]], *, project_images: int, train_fraction: float) -> dict[str, Any]:
    """Linearity per stage and the projection to ``project_images`` (train stages at the training
    share ``train_fraction`` of them, test stages at the rest)."""
    sizes = [r["images"] for r in runs]
    stages = [k for k in runs[0]["seconds"] if all(k in r["seconds"] for r in runs)]
    p_train = int(round(project_images * train_fraction))
    p_test = project_images - p_train
    lin = {k: linearity(sizes, [r["seconds"][k] for r in runs]) for k in stages}
    proj_seconds = {}
    for k in stages:
        f = fit_line(sizes, [r["seconds"][k] for r in runs])
        at = p_test if (k.startswith("test_") or k == "eval_total") else p_train
        proj_seconds[k] = round(max(0.0, f["intercept"] + f["slope"] * at), 1)
    total = proj_seconds["train_total"] + proj_seconds["eval_total"]
    proj_seconds["total"] = round(total, 1)
    # the cache holds N training + N test images: fit per image held, project to all of them
    cf = fit_line([2 * n for n in sizes], [r["cache_mb"] for r in runs])
    cache_gb = max(0.0, cf["intercept"] + cf["slope"] * project_images) * MiB / GiB
    rss = [r["peak_rss_mb"] for r in runs]
    mf = fit_line(sizes, rss)
    return {
        "projection": {"images": int(project_images), "hours": round(total / 3600.0, 3), "cache_gb": round(cache_gb, 3),
                       "train_images": p_train, "test_images": p_test, "seconds": proj_seconds,
                       "peak_rss_mb_measured_max": round(max(rss), 1),
                       "peak_rss_mb_linear": round(mf["intercept"] + mf["slope"] * max(p_train, p_test), 1),
                       "method": "least squares seconds = a + b N per stage over the runs; training stages "
                                 "at train_images, test stages (test_*, eval_total) at test_images; hours = "
                                 "(train_total + eval_total) / 3600; cache_gb from cache_mb = a + b (2 N) at images; "
                                 "peak_rss_mb_linear: a straight line through the runs' peaks, an upper bound and "
                                 "not a prediction (features.pooled_memory_gb, svm.cache_memory_gb and "
                                 "bbox_reg.max_pairs_per_class cap what the stages hold once N fills them)"},
        "linearity": lin,
        "memory": {"peak_rss_mb": rss, "ratio_last_to_first": round(rss[-1] / rss[0], 4) if rss[0] else None,
                   "slope_mb_per_image": round(mf["slope"], 4), "r2": round(mf["r2"], 6)},
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001 - a name only
            return device
    return platform.processor() or platform.machine()


def run(args, *, config_name: str, device: str, train_split: str, test_split: str,
        classes: Sequence[str] | None = None) -> int:
    """Entry point of ``sppdet bench scale`` (the command resolved the config: ``config_name``,
    ``device``, the default splits, the classes it declares or ``None``: those of the two whole
    splits' annotations, fixed for every N)."""
    sizes = parse_sizes(args.images)
    root = Path(args.data).expanduser()
    if not root.is_dir():
        raise SppdetError(f"{root}: dataset folder not found; pass --data ROOT (a VOC root)")
    split = args.split or train_split
    tsplit = args.test_split or test_split
    train_ids = read_split(split_file(root, split))
    test_ids = read_split(split_file(root, tsplit))
    for name, ids in ((split, train_ids), (tsplit, test_ids)):
        if len(ids) < sizes[-1]:
            raise SppdetError(f"{split_file(root, name)}: lists {len(ids)} images, fewer than --images {sizes[-1]}")
    fixed_classes = list(classes) if classes else None
    if fixed_classes is None:
        fixed_classes = dataset_classes(root, train_ids + test_ids)
    out = Path(args.out).expanduser() if args.out else Path("runs") / f"bench-scale-{config_name}"
    try:
        out.resolve().relative_to(root.resolve())
        raise SppdetError(f"--out {out}: inside the dataset {root}; bench scale never writes into the dataset")
    except ValueError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("SPPDET_PROGRESS", "0")
    load0 = [round(v, 2) for v in os.getloadavg()]
    runs = [one_run(n, root=root, out=out, config=args.config, sets=args.overrides or [], train_split=split,
                    test_split=tsplit, train_ids=train_ids, test_ids=test_ids, device=args.device, env=env,
                    classes=None if classes else fixed_classes)
            for n in sizes]
    frac = args.train_fraction if args.train_fraction is not None else VOC07_TRAINVAL / (VOC07_TRAINVAL + VOC07_TEST)
    result: dict[str, Any] = {"config": args.config, "device": device, "runs": runs}
    result.update(summarise(runs, project_images=args.project_images, train_fraction=frac))
    result.update({
        "config_name": config_name, "device_name": device_name(device), "data": str(root), "split": split,
        "test_split": tsplit, "settings": list(args.overrides or []), "classes": fixed_classes, "out": str(out),
        "machine": {"cpus": os.cpu_count(), "load_average_start": load0,
                    "load_average_end": [round(v, 2) for v in os.getloadavg()]},
        "units": {"seconds": "wall seconds", "peak_rss_mb": "MiB (2^20 bytes), largest single process",
                  "cache_mb": "MiB on disk (allocated blocks)", "cache_gb": "GiB (2^30 bytes)"},
    })
    text = json.dumps(result)
    (out / "scale.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
