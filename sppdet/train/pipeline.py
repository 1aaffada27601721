"""``sppdet train``: proposals -> conv5 features -> fine-tuning -> SVMs -> box regression -> checkpoint.

Every stage is keyed by what produced it (config values, data, upstream
stages) and its output is written atomically into ``RUN/stages/``; a stage
whose output exists with the same key is skipped, so a killed run resumes.
Inside a stage, proposals and conv5 maps are cached per image, and
fine-tuning saves a snapshot periodically and on Ctrl-C.

Under torchrun (a process group) every rank runs the pipeline; the learned stages split their
work over the ranks (docs/DISTRIBUTED.md) and end with the same result on every rank, and rank 0
alone writes the run folder.

Files in RUN: ``config.yaml`` (the resolved config of ``model.pt``, written with it), ``train.log``,
``timings.json`` (seconds per stage), ``finetune_log.json`` (the fine-tuning
loss/accuracy curve), ``stages/*.pt`` and ``model.pt`` (the checkpoint, DESIGN §3).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import build
from ..checkpoint import save_detector
from ..config import Config
from ..data.records import Dataset
from ..errors import SppdetError
from ..features import WindowFeatures
from ..features.cache_admin import check_conv5_space
from ..models.detector import SPPDetector
from ..models.heads import FCHead, fc7_features
from ..utils import dist, memory
from ..utils.device import resolve_device
from ..utils.io import atomic_torch_save, atomic_write_json, atomic_write_text, stable_hash
from ..utils.log import add_log_file
from ..utils.progress import progress
from ..models.bbox_reg import BBoxRegressors
from ..models.svm import LinearSVMs
from .bbox_reg import train_bbox_regressors_on_windows
from .finetune import FinetuneParams, finetune, init_fc_head, resolve_fc_init
from .svm import SVMParams, WindowSet, feature_scale, train_svms
from .windows import ImageWindows, build_windows

log = logging.getLogger(__name__)

STAGES = ("proposals", "features", "finetune", "svm", "bbox_reg")

#: Settings added after runs were made, left out of the stage keys while they have the value
#: that trains as before (so that those runs' stages stay valid).
_KEY_NEUTRAL = {"fc8_init_std": (0.01,), "neg_overlap_dedupe": (None, 0.0)}


def section_key(section) -> dict:
    """A config section as it enters a stage key (:data:`_KEY_NEUTRAL` settings at their old
    behaviour left out)."""
    d = dataclasses.asdict(section)
    return {k: v for k, v in d.items() if not (k in _KEY_NEUTRAL and v in _KEY_NEUTRAL[k])}


def features_key(cfg: Config, backbone) -> str:
    """Identifies the features a config and backbone weights produce (for stage keys)."""
    f = cfg.features
    parts = [backbone.name, backbone.weights_id, f.mode, f.scales, f.max_side, f.pyramid, f.rcnn_size, f.rcnn_context]
    if f.context:       # appended only when on, so runs made before the option keep their keys
        parts += ["context", f.context, f.context_pyramid]
    return stable_hash(parts)


def training_data_key(train_set: Dataset, image_key: Callable[[Path], str]) -> str:
    """Identifies the training data for the stage keys: each image's id, content hash
    (``image_key``) and ground truth.  Where the data lies, and how its path was spelled, is not
    part of it: a data folder moved or copied, or given as a relative path, reuses the stages;
    an image replaced or a box edited (even with the object count unchanged) redoes them."""
    return stable_hash([[r.image_id, image_key(r.path), r.boxes.round(3).tolist(), r.labels.tolist(),
                         r.difficult.tolist()] for r in train_set.records])


def finetune_iterations(cfg: Config, num_images: int) -> int:
    """Fine-tuning iterations: the config's, or scaled to the dataset size.

    The paper fine-tunes for 250k mini-batches on VOC 2007 trainval (5011
    images, ~50 per image); ``iterations_per_image`` scales that to smaller
    sets, clamped to [min_iterations, max_iterations].
    """
    ft = cfg.finetune
    if ft.iterations > 0:
        return ft.iterations
    n = int(round(ft.iterations_per_image * num_images))
    return int(min(max(n, ft.min_iterations), ft.max_iterations))


class Pipeline:
    """Trains a detector from a config into a run folder (see module docstring)."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, data_root: str | None = None,
                 show_progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / "stages"
        self.data_root = data_root
        self.show_progress = show_progress
        self.device = resolve_device(cfg.device)
        self.cache_dir = build.training_cache_dir(cfg)
        self.timings: dict[str, Any] = {}
        self.finetune_stats: dict[str, Any] | None = None

    # ---------------------------------------------------------------- helpers
    def _timed(self, name: str, fn: Callable[[], Any], reused: bool = False) -> Any:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        # "seconds": this run; "total_seconds": every run of this stage so far (interrupted ones
        # included), which is what the stage cost when its caches were reused in later runs
        prev = self.timings.get(name, {})
        self.timings[name] = {"seconds": round(dt, 3), "reused": reused,
                              "total_seconds": round(prev.get("total_seconds", 0.0) + dt, 3)}
        peak = memory.peak_rss_mb()
        if peak is not None:
            # this process's peak resident size so far: the first stage that reaches the run's
            # peak is the one that set it
            self.timings[name]["peak_rss_mb_after"] = round(peak, 1)
        log.info("stage %-9s %s in %.1f s", name, "reused" if reused else "done", dt)
        if dist.is_main():
            atomic_write_json(self.run_dir / "timings.json", self.timings)
        return out

    def _window_features(self, extractor, train_set: Dataset, windows: list[ImageWindows]) -> WindowFeatures:
        # several ranks on a node share its features.pooled_memory_gb; each keeps its own images only
        return WindowFeatures(extractor, train_set, windows, self.cache_dir,
                              features_key=features_key(self.cfg, extractor.backbone),
                              pooled_memory_gb=self.cfg.features.pooled_memory_gb / dist.get_local_world_size(),
                              show_progress=self.show_progress)

    def _warm(self, feats: WindowFeatures, flips: tuple[bool, ...]) -> None:
        """Pool the training windows into RAM (within the budget) before fine-tuning; with
        several ranks, only this rank's images (the ones its stages ask for)."""
        if dist.get_world_size() == 1:
            feats.warm(flips)
            return
        if feats.pooled_budget <= 0:
            return
        t0 = time.perf_counter()
        items = [(i, f) for f in flips for i in dist.shard(range(len(feats.windows))) if len(feats.windows[i])]
        kept = 0
        for i, f in progress(items, desc="pooling windows", unit="img", disable=None if self.show_progress else True):
            before = feats.pooled_bytes
            feats(i, np.zeros(1, np.int64), f)   # pools all of image i's windows when they fit
            if feats.pooled_bytes == before:     # over the budget: the rest are pooled per batch
                break
            kept += 1
        log.info("SPP features of %d of this rank's %d image views pooled into RAM: %.2f GiB (budget %.2f GiB), "
                 "%.1f s", kept, len(items), feats.pooled_bytes / 2 ** 30, feats.pooled_budget / 2 ** 30,
                 time.perf_counter() - t0)

    def _stage_file(self, name: str) -> Path:
        return self.stage_dir / f"{name}.pt"

    def _load_stage(self, name: str, key: str) -> dict | None:
        f = self._stage_file(name)
        if not f.is_file():
            return None
        try:
            data = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            log.warning("%s: unreadable stage output (%s); redoing the stage", f, e)
            return None
        if data.get("key") != key:
            log.info("stage %s: settings or inputs changed; redoing it", name)
            return None
        return data

    def _save_stage(self, name: str, key: str, payload: dict) -> None:
        if dist.is_main():   # several ranks hold the same result: rank 0 writes it
            atomic_torch_save(self._stage_file(name), {"key": key, **payload})

    def _load_stage_all(self, name: str, key: str) -> dict | None:
        """:meth:`_load_stage` on every rank, which must agree on whether the stage is done."""
        data = self._load_stage(name, key)
        if dist.get_world_size() > 1:
            found = dist.all_gather_object(data is not None)
            if len(set(found)) > 1:
                raise dist.DistributedError(
                    f"{self._stage_file(name)}: only ranks {[r for r, f in enumerate(found) if f]} of "
                    f"{len(found)} find this stage's output; the run folder (--out) must be on a "
                    "filesystem shared by every node")
        return data

    # ------------------------------------------------------------------- run
    def run(self) -> Path:
        """Run (or resume) every stage; returns the checkpoint path ``RUN/model.pt``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = add_log_file(self.run_dir / "train.log")
        try:
            return self._run()
        finally:
            logging.getLogger("sppdet").removeHandler(handler)
            handler.close()

    def _run(self) -> Path:
        cfg = self.cfg
        tf = self.run_dir / "timings.json"
        if tf.is_file():
            try:
                self.timings = json.loads(tf.read_text())
            except ValueError:
                self.timings = {}
        # RUN/config.yaml is written with model.pt (below), never before: a run that fails
        # must leave the pair that belongs together (train.log has this run's settings)
        log.debug("resolved config:\n%s", cfg.to_yaml())
        t_all = time.perf_counter()
        log.info("training %s into %s (device %s, cache %s)", cfg.name, self.run_dir, self.device, self.cache_dir)

        dataset = build.dataset_from_config(cfg.data, cfg.data.train_split, self.data_root)
        classes = list(cfg.data.classes or dataset.classes)
        K = len(classes)
        if K == 0:
            raise SppdetError(f"{dataset.root}: split {cfg.data.train_split!r} has no annotated objects to train on")
        log.info("data: %s/%s, %d images, %d classes", dataset.root, dataset.split, len(dataset), K)

        # the conv5 cache this run needs must fit on its disk: refused before any stage runs
        backbone = build.backbone(cfg)
        extractor = build.extractor(cfg.features, backbone, self.device, self.cache_dir)
        flips = (False, True) if cfg.features.flip else (False,)
        need_flips = flips if cfg.finetune.enabled and not cfg.finetune.end_to_end else (False,)
        check_conv5_space(extractor, dataset, need_flips)

        # ---- proposals
        from ..proposals import compute_proposals

        preset = build.preset(cfg)
        store = self._timed("proposals", lambda: compute_proposals(
            dataset, preset, cfg.proposals.max_boxes, workers=cfg.proposals.workers,
            cache_dir=self.cache_dir, skip_bad_images=cfg.data.skip_bad_images,
            progress=self.show_progress))
        keep = [r for r in dataset.records if r.image_id in store]
        if len(keep) < len(dataset.records):
            log.warning("%d images without proposals (undecodable) are left out of training",
                        len(dataset.records) - len(keep))
        train_recs = [r if cfg.data.use_difficult else r.without_difficult() for r in keep]
        train_set = Dataset(dataset.name, dataset.split, classes, train_recs, dataset.root)
        windows = [build_windows(i, r, store[r.image_id], K) for i, r in enumerate(train_recs)]
        n_obj = sum(w.num_gt for w in windows)
        if n_obj == 0:
            raise SppdetError(f"{dataset.root}: no (non-difficult) objects in split {dataset.split!r} to train on")
        data_key = stable_hash([training_data_key(train_set, extractor.cache.image_key), classes,
                                cfg.data.use_difficult, preset.key(), cfg.proposals.max_boxes])

        # ---- features
        feats = self._window_features(extractor, train_set, windows)
        self._timed("features", lambda: feats.prepare(need_flips))
        feat_key = stable_hash([features_key(cfg, backbone), data_key])

        # ---- fine-tuning
        head = None
        ft_key = ""
        if cfg.finetune.enabled:
            head, ft_key = self._finetune(cfg, extractor, backbone, feats, windows, K, feat_key)
            if cfg.finetune.end_to_end:
                # the conv layers changed: cached maps of the old weights no longer apply
                extractor = build.extractor(cfg.features, backbone, self.device, self.cache_dir)
                feats = self._window_features(extractor, train_set, windows)
                self._timed("features_e2e", lambda: feats.prepare((False,)))
                feat_key = stable_hash([features_key(cfg, backbone), data_key])

        # ---- SVMs
        svm_key = stable_hash([feat_key, ft_key, section_key(cfg.svm), cfg.seed])
        svm_state = self._load_stage_all("svm", svm_key)
        if svm_state is None:
            svms, svm_stats = self._timed("svm", lambda: self._train_svms(cfg, feats, windows, head, K, classes))
            self._save_stage("svm", svm_key, {"svm": svms.state_dict(), "stats": svm_stats})
            svm_state = {"svm": svms.state_dict(), "stats": svm_stats}
        else:
            self._timed("svm", lambda: None, reused=True)

        # ---- box regression
        reg_state = None
        if cfg.bbox_reg.enabled:
            reg_key = stable_hash([feat_key, dataclasses.asdict(cfg.bbox_reg), cfg.seed])
            reg_state = self._load_stage_all("bbox_reg", reg_key)
            if reg_state is None:
                reg = self._timed("bbox_reg", lambda: self._train_bbox_reg(cfg, feats, windows, K, classes))
                reg_state = {"bbox_reg": reg.state_dict()}
                self._save_stage("bbox_reg", reg_key, reg_state)
            else:
                self._timed("bbox_reg", lambda: None, reused=True)

        # ---- checkpoint
        model = SPPDetector(
            classes=classes, backbone=backbone, features=cfg.features,
            svms=LinearSVMs.from_state_dict(svm_state["svm"]), head=head,
            bbox_reg=BBoxRegressors.from_state_dict(reg_state["bbox_reg"]) if reg_state is not None else None,
            svm_features=cfg.svm.features, test=cfg.test, feature_dim=extractor.feature_dim,
            backbone_weights=cfg.features.weights, backbone_trained=cfg.finetune.end_to_end,
            stats={"timings": self.timings, "train_images": len(train_recs), "train_objects": n_obj})
        if self.finetune_stats is not None:
            model.stats["finetune"] = self.finetune_stats
        ckpt = self.run_dir / "model.pt"
        err: BaseException | None = None
        if dist.is_main():   # every rank holds the same detector; rank 0 writes it
            try:
                ckpt = save_detector(ckpt, model, cfg)
                atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
                err = e
        self.timings["total_seconds_this_run"] = round(time.perf_counter() - t_all, 3)
        if dist.is_main() and err is None:
            atomic_write_json(self.run_dir / "timings.json", self.timings)
            log.info("checkpoint written to %s", ckpt)
        dist.raise_if_any(err)   # also the point after which the checkpoint exists for every rank
        return ckpt

    # ---------------------------------------------------------------- stages
    def _finetune(self, cfg, extractor, backbone, feats, windows, K, feat_key):
        ft = cfg.finetune
        iters = finetune_iterations(cfg, len(windows))
        head = FCHead(extractor.feature_dim, ft.fc_dims, K, ft.dropout)
        fc_init = resolve_fc_init(ft.init, backbone, extractor.feature_dim, cfg.features.pyramid,
                                  cfg.features.context, ft.fc_dims)
        key = stable_hash([feat_key, section_key(ft), iters, cfg.features.flip, cfg.seed, fc_init])
        state = self._load_stage_all("finetune", key)
        if state is not None:
            head.load_state_dict(state["head"])
            if ft.end_to_end:
                backbone.load_state_dict(state["backbone"])
                backbone.weights_id = state["backbone_weights_id"]
            self._timed("finetune", lambda: None, reused=True)
            self._record_finetune(state.get("stats"))
            return head.to(self.device).eval(), key
        params = build.params(FinetuneParams, ft, iterations=iters, flip=cfg.features.flip, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        init_fc_head(head, fc_init, backbone, ft.fc8_init_std)
        extra_modules, extra_groups = None, None
        feature_fn = feats
        if ft.end_to_end:
            feature_fn = self._live_feature_fn(extractor, windows)
            backbone.train()
            for m in backbone.modules():  # frozen BatchNorm statistics, as usual for detection
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            extra_modules = {"backbone": backbone}
            extra_groups = [{"params": [p for p in backbone.parameters() if p.requires_grad],
                             "lr": ft.lr * ft.conv_lr_mult}]
        log.info("fine-tuning %s on %d images: %d iterations of %d windows%s", "conv+fc" if ft.end_to_end else "fc",
                 len(windows), iters, ft.batch_size,
                 f" (each of {dist.get_world_size()} ranks computes its images' share)"
                 if dist.get_world_size() > 1 else "")

        def run() -> dict:
            if not ft.end_to_end:
                self._warm(feats, (False, True) if cfg.features.flip else (False,))
            return finetune(head, feature_fn, windows, params, device=self.device,
                            snapshot=self.stage_dir / "finetune.snapshot.pt", key=key,
                            extra_modules=extra_modules, extra_param_groups=extra_groups,
                            show_progress=self.show_progress)

        stats = self._timed("finetune", run)
        payload = {"head": head.state_dict(), "stats": stats}
        if ft.end_to_end:
            backbone.eval()
            backbone.weights_id = "e2e-" + stable_hash([key, stats["loss"]])
            payload["backbone"] = backbone.state_dict()
            payload["backbone_weights_id"] = backbone.weights_id
        self._save_stage("finetune", key, payload)
        if dist.is_main():
            (self.stage_dir / "finetune.snapshot.pt").unlink(missing_ok=True)
        log.info("fine-tuning: loss %.4f, batch accuracy %.3f, %.1f s", stats["loss"], stats["accuracy"],
                 stats["seconds"])
        self._record_finetune(stats)
        return head.eval(), key

    def _record_finetune(self, stats: dict | None) -> None:
        """Keep the fine-tuning statistics (and curve) for the checkpoint and ``RUN/finetune_log.json``."""
        if not stats:
            return
        self.finetune_stats = {k: stats[k] for k in ("iterations", "loss", "accuracy", "seconds", "ranks", "curve")
                               if k in stats}
        if dist.is_main():
            atomic_write_json(self.run_dir / "finetune_log.json", self.finetune_stats)

    def _live_feature_fn(self, extractor, windows):
        from ..data.images import load_image

        def fn(i: int, idx: np.ndarray, flip: bool) -> torch.Tensor:
            rec = windows[i].record
            maps = extractor.conv_maps_live(load_image(rec.path), flip=flip)
            return extractor.pooled(maps, windows[i].boxes[idx], rec.width, flip=flip)

        return fn

    @torch.no_grad()
    def _train_svms(self, cfg, feats, windows, head, K, classes):
        use_fc7 = cfg.svm.features == "fc7"
        if use_fc7:
            head = head.to(self.device).eval()

        def features(i: int, idx: np.ndarray) -> np.ndarray:
            x = feats(i, idx, False)
            if use_fc7:
                x = fc7_features(head, x, self.device)
            return x.cpu().numpy().astype(np.float32)

        def get_windows(i: int) -> WindowSet:
            w = windows[i]
            return WindowSet(features=features(i, np.arange(len(w))), gt_labels=w.gt_labels, max_iou=w.iou,
                             boxes=w.boxes)

        def get_positives(i: int) -> WindowSet:
            w = windows[i]
            gt = np.flatnonzero(w.gt_labels >= 0)
            return WindowSet(features=features(i, gt), gt_labels=w.gt_labels[gt], max_iou=w.iou[gt])

        # the feature-norm statistic over all kinds of windows, from a seeded sample of images
        # (several ranks: the same draws; each computes its images' rows, rank 0 the statistic)
        rng = np.random.default_rng(cfg.seed)
        plan = []
        for i in rng.choice(len(windows), min(len(windows), 32), replace=False):
            n = len(windows[i])
            plan.append((int(i), np.sort(rng.choice(n, min(n, 64), replace=False))))
        world, rank = dist.get_world_size(), dist.get_rank()
        err = None
        mine = []
        try:
            mine = [(j, features(i, idx)) for j, (i, idx) in enumerate(plan) if i % world == rank]
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
            err = e
        dist.raise_if_any(err)
        parts = dist.gather_object(mine)
        scale = None
        if dist.is_main():
            rows = [x for _, x in sorted((p for part in parts for p in part), key=lambda t: t[0])]
            scale = feature_scale(np.concatenate(rows), cfg.svm.feature_norm)
        del parts, mine
        scale = dist.broadcast_object(scale)

        params = build.params(SVMParams, cfg.svm, device=cfg.device, seed=cfg.seed)
        return train_svms(get_windows, len(windows), K, params, class_names=classes,
                          progress=self.show_progress, get_positives=get_positives, scale=scale)

    @torch.no_grad()
    def _train_bbox_reg(self, cfg, feats, windows, K, classes):
        return train_bbox_regressors_on_windows(feats, windows, K, min_iou=cfg.bbox_reg.min_iou, lam=cfg.bbox_reg.lam,
                                                max_pairs_per_class=cfg.bbox_reg.max_pairs_per_class,
                                                seed=cfg.seed, class_names=classes, progress=self.show_progress)


def train(cfg: Config, run_dir: str | Path, *, data_root: str | None = None, show_progress: bool = True) -> Path:
    """Train (or resume training) a detector; returns the checkpoint path."""
    return Pipeline(cfg, run_dir, data_root=data_root, show_progress=show_progress).run()
