"""Fine-tuning of the fc layers on SPP features (the paper's §4 fine-tuning).

The convolutional layers are frozen (their conv5 maps are cached, so an epoch
never recomputes a convolution); only fc6, fc7 and a new (K+1)-way classifier
are trained, on mini-batches of windows sampled from a few images: 25% of the
windows are foreground (IoU >= 0.5 with a ground-truth box, labelled with its
class), the rest background (IoU in [0.1, 0.5), label 0).  Horizontal flips
are used when the caller provides mirrored features.

With ``end_to_end`` the caller's feature function returns features that carry
gradients back into the convolutional layers (what Fast R-CNN later did); the
loop is the same.

Several processes (a ``torch.distributed`` group, e.g. ``torchrun -m sppdet train``):
the head is wrapped in ``DistributedDataParallel`` and every rank computes its share of
each global mini-batch (:func:`draw_batch`: image ``i`` belongs to rank ``i mod W``), so
W ranks train with the one-process batch (``images_per_batch`` images, ``batch_size``
windows) and the gradients DDP averages are those of that whole batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import FinetuneConfig
from ..errors import SppdetError
from ..utils import dist
from ..utils.io import atomic_torch_save
from ..utils.progress import progress
from .windows import ImageWindows

log = logging.getLogger(__name__)

#: ``feature_fn(image_index, window_indices, flip) -> Tensor[len(window_indices), D]``
FeatureFn = Callable[[int, np.ndarray, bool], torch.Tensor]

#: One image's part of a mini-batch: ``(image_index, window_indices ndarray[M] int64,
#: labels ndarray[M] int64 (0: background, k + 1: class k), flip)``.
BatchEntry = tuple[int, np.ndarray, np.ndarray, bool]

#: ``batches(iteration, rng) -> [BatchEntry, ...]``: the global mini-batch of an iteration
#: (0-based), drawn from the generator the fine-tuning snapshot saves.
BatchPlan = Callable[[int, np.random.Generator], list]


class TrainingError(SppdetError):
    """Training cannot go on (e.g. the loss became NaN/inf)."""


@dataclass
class FinetuneParams(FinetuneConfig):
    """Fine-tuning settings: the config's ``finetune`` section (:class:`~sppdet.config.FinetuneConfig`,
    inherited, so each default is written once) with ``iterations`` resolved (>= 1; see
    ``sppdet.train.pipeline.finetune_iterations``), plus ``flip`` (mirror half of the
    mini-batch images), ``seed`` and ``snapshot_seconds`` (how often a resumable snapshot is saved)."""

    flip: bool = True
    seed: int = 0
    snapshot_seconds: float = 60.0

    def __post_init__(self) -> None:
        base = getattr(super(), "__post_init__", None)
        if base is not None:
            base()
        if self.iterations < 1:
            raise ValueError(f"FinetuneParams.iterations: expected >= 1, got {self.iterations}")


#: ``finetune.init`` values.
FC_INITS = ("auto", "imagenet", "he")


def resolve_fc_init(mode: str, backbone, feature_dim: int, pyramid, context: float,
                    fc_dims) -> str:
    """How fc6/fc7 start: ``"imagenet"`` (the backbone's ImageNet fc layers) or ``"he"``.

    ImageNet fc6 (ZFNet's, 9216 inputs) reads pool5, a 6 x 6 max pooling of the whole
    conv5 map flattened as ``(C, 6, 6)``: exactly sppdet's one-level ``{6}`` pyramid
    feature (channel-major, then bin row, then bin column).  So ``imagenet`` needs a
    backbone with ImageNet fc layers (``zf5`` with ``features.weights: imagenet``),
    ``features.pyramid: [6]``, no context feature, and ``fc_dims: [4096, 4096]``.
    ``auto`` takes ``imagenet`` where all of that holds, else ``he``.

    Raises:
        ConfigError: ``imagenet`` asked for where it cannot apply (one line, saying why).
    """
    from ..errors import ConfigError

    if mode not in FC_INITS:
        raise ConfigError(f"finetune.init: must be one of {', '.join(FC_INITS)}, got {mode!r}")
    if mode == "he":
        return "he"
    fc_file = getattr(backbone, "imagenet_fc_file", None)
    why = []
    if fc_file is None:
        why.append(f"backbone {backbone.name} ({backbone.weights_source} weights) has no ImageNet fc layers "
                   "(zf5 with features.weights: imagenet has)")
    if [int(n) for n in pyramid] != [6] or context:
        why.append(f"the pyramid must be [6] without context (got {list(pyramid)}"
                   f"{', context ' + str(context) if context else ''})")
    if int(feature_dim) != 9216:
        why.append(f"the pooled feature has {feature_dim} values, fc6 takes 9216")
    if [int(d) for d in fc_dims] != [4096, 4096]:
        why.append(f"finetune.fc_dims must be [4096, 4096] (got {list(fc_dims)})")
    if not why:
        from ..models.weights import zf5_fc_file

        if not zf5_fc_file(fc_file).is_file():
            why.append(f"{zf5_fc_file(fc_file)} is missing (rerun 'sppdet weights fetch zf5')")
    if why:
        if mode == "imagenet":
            raise ConfigError(f"finetune.init: imagenet cannot apply: {'; '.join(why)}")
        (log.info if fc_file is not None else log.debug)("fine-tuning: fc6/fc7 start from He init (%s)",
                                                         "; ".join(why))
        return "he"
    return "imagenet"


#: The classifier init of :meth:`FCHead.reset_parameters` (normal, this standard deviation).
HEAD_FC8_STD = 0.01


def init_fc_head(head: nn.Module, used: str, backbone, fc8_init_std: float = HEAD_FC8_STD) -> None:
    """Initialise ``head`` as :func:`resolve_fc_init` decided (He: its own reset); the new
    classifier (fc8, ``cls_score``) starts from ``N(0, fc8_init_std^2)``, bias 0 (the paper:
    0.01, which is also the head's own init, so that value draws nothing more)."""
    head.reset_parameters()
    if float(fc8_init_std) != HEAD_FC8_STD:
        nn.init.normal_(head.cls_score.weight, std=float(fc8_init_std))
        nn.init.zeros_(head.cls_score.bias)
    if used == "imagenet":
        from ..models.weights import load_zf5_fc, zf5_fc_file

        head.load_imagenet_fc(load_zf5_fc(backbone.imagenet_fc_file))
        log.info("fine-tuning: fc6/fc7 start from ImageNet (%s)", zf5_fc_file(backbone.imagenet_fc_file))


#: The loss/accuracy curve keeps about this many points (each the mean over its iterations).
CURVE_POINTS = 200


class _Curve:
    """Fine-tuning loss and batch accuracy, averaged over blocks of ``every`` iterations."""

    def __init__(self, iterations: int) -> None:
        self.every = max(1, -(-iterations // CURVE_POINTS))
        self.points: dict[str, list[float]] = {"iteration": [], "loss": [], "accuracy": [], "lr": []}
        self._loss: list[float] = []
        self._acc: list[float] = []

    def add(self, it: int, loss: float, acc: float, lr: float, last: bool) -> None:
        """Record iteration ``it`` (1-based); closes a point every ``every`` iterations and at the end."""
        self._loss.append(loss)
        self._acc.append(acc)
        if it % self.every == 0 or last:
            self.points["iteration"].append(int(it))
            self.points["loss"].append(float(np.mean(self._loss)))
            self.points["accuracy"].append(float(np.mean(self._acc)))
            self.points["lr"].append(float(lr))
            self._loss, self._acc = [], []

    def state(self) -> dict:
        return {"every": self.every, "points": {k: list(v) for k, v in self.points.items()},
                "open": [list(self._loss), list(self._acc)]}

    def load(self, state: dict) -> None:
        if int(state.get("every", 0)) != self.every:
            return
        self.points = {k: [float(x) for x in v] for k, v in state["points"].items()}
        self.points["iteration"] = [int(x) for x in self.points["iteration"]]
        self._loss, self._acc = [float(x) for x in state["open"][0]], [float(x) for x in state["open"][1]]

    def to_dict(self) -> dict:
        return {"every": self.every, **{k: list(v) for k, v in self.points.items()}}


def sample_windows(windows: ImageWindows, num: int, fg_fraction: float, fg_iou: float,
                   bg_low: float, bg_high: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num`` windows of one image for a fine-tuning mini-batch.

    Foreground: ``max_iou >= fg_iou`` (label = class + 1), at most
    ``round(fg_fraction * num)`` of them, without replacement.  Background:
    ``bg_low <= max_iou < bg_high`` (label 0) fill the rest, without
    replacement when there are enough, else with replacement; if an image has
    no window in the background range, windows with ``max_iou < bg_high`` are
    used instead.

    Returns:
        (indices ndarray[M] int64, labels ndarray[M] int64) with M <= num
        (M < num only when the image has too few windows of both kinds).
    """
    fg = np.flatnonzero(windows.max_iou >= fg_iou)
    bg = np.flatnonzero((windows.max_iou >= bg_low) & (windows.max_iou < bg_high))
    if len(bg) == 0:
        bg = np.flatnonzero(windows.max_iou < bg_high)
    n_fg = min(len(fg), int(round(fg_fraction * num)))
    fg_sel = rng.choice(fg, n_fg, replace=False) if n_fg else np.zeros(0, np.int64)
    n_bg = num - n_fg
    if len(bg) == 0:
        bg_sel = np.zeros(0, np.int64)
    else:
        bg_sel = rng.choice(bg, n_bg, replace=len(bg) < n_bg)
    idx = np.concatenate([fg_sel, bg_sel]).astype(np.int64)
    labels = np.concatenate([windows.best_label[fg_sel] + 1, np.zeros(len(bg_sel), np.int64)])
    return idx, labels.astype(np.int64)


def draw_batch(shares: Sequence[Sequence[ImageWindows]], it: int, params: FinetuneParams,
               rng: np.random.Generator) -> list[BatchEntry]:
    """The global mini-batch of iteration ``it`` (0-based): ``images_per_batch`` images x
    ``batch_size // images_per_batch`` windows (:func:`sample_windows`).

    Args:
        shares: the usable training images of each rank, ``shares[r]`` those of rank ``r``
            (one process: ``[all of them]``).
        it: the iteration.
        params: ``images_per_batch``, ``batch_size``, the sampling settings and ``flip``.
        rng: the generator; every rank runs the same one, so every rank knows the batch.

    Image slots: slot ``j`` of iteration ``it`` belongs to rank ``E[(it * ipb + j) mod |E|]``
    (``E``: the ranks with at least one usable image, in order); each rank's images are drawn
    uniformly without replacement from its own share, ranks in order.  With one share this
    is exactly the one-process draw (``ipb`` images out of all); with W ranks and W dividing
    ``images_per_batch`` every rank takes ``ipb / W`` images every iteration; otherwise the
    extra slots rotate over the ranks (so over W iterations each rank fills ``ipb`` slots, and
    with ``ipb < W`` some ranks have no image in an iteration).  Then, image by image: its
    windows (:func:`sample_windows`) and, when ``params.flip``, a fair coin for mirroring.
    An image per slot, so the global batch is the one-process batch in size and kind; the
    draw is stratified by rank, so it is a different random batch than one process draws.

    Returns:
        ``[(image_index, window_indices, labels, flip), ...]`` in rank order (images whose
        sample came out empty are left out).
    """
    ipb = int(params.images_per_batch)
    per_image = max(1, params.batch_size // ipb)
    eligible = [r for r, sh in enumerate(shares) if len(sh)]
    slots = [0] * len(shares)
    for j in range(ipb):
        slots[eligible[(it * ipb + j) % len(eligible)]] += 1
    picks: list[ImageWindows] = []
    for r in eligible:
        if slots[r]:
            sh = shares[r]
            picks += [sh[j] for j in rng.choice(len(sh), min(slots[r], len(sh)), replace=False)]
    out: list[BatchEntry] = []
    for w in picks:
        idx, lab = sample_windows(w, per_image, params.fg_fraction, params.fg_iou,
                                  params.bg_iou_low, params.bg_iou_high, rng)
        if len(idx) == 0:
            continue
        flip = bool(params.flip and rng.random() < 0.5)
        out.append((int(w.index), idx, lab, flip))
    return out


def _rank_seed(seed: int, rank: int, start: int = 0) -> int:
    """The torch seed (dropout masks) of rank ``rank > 0``: derived from the run's seed."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(start)]).generate_state(1)[0])


def _snapshot_state(head: nn.Module, opt: torch.optim.Optimizer, it: int, rng_states: tuple,
                    key: str, extra: dict | None, curve: dict | None = None,
                    rank_rngs: list | None = None) -> dict:
    state = {"key": key, "iteration": it, "head": head.state_dict(), "optimizer": opt.state_dict(),
             "numpy_rng": rng_states[0], "torch_rng": rng_states[1]}
    if rank_rngs is not None:   # several ranks: each one's torch generator (dropout masks)
        state["torch_rng_ranks"] = list(rank_rngs)
    if curve is not None:
        state["curve"] = curve
    if extra:
        state["extra"] = {k: v.state_dict() for k, v in extra.items()}
    return state


def finetune(head: nn.Module, feature_fn: FeatureFn, windows: Sequence[ImageWindows],
             params: FinetuneParams, *, device: torch.device | str = "cpu",
             snapshot: str | Path | None = None, key: str = "",
             extra_modules: dict[str, nn.Module] | None = None,
             extra_param_groups: list[dict] | None = None,
             show_progress: bool = True, batches: BatchPlan | None = None,
             prefetch: bool | None = None) -> dict:
    """Train ``head`` (an :class:`~sppdet.models.heads.FCHead`) with SGD.

    Args:
        head: the fc layers; trained in place.
        feature_fn: pooled features of the given windows of an image (flipped or not).
        windows: the training images' windows (images without any foreground or
            background window are skipped).
        params: schedule and sampling settings.
        device: where the head runs.
        snapshot: a file to save progress to (periodically and on Ctrl-C), and
            to resume from when its ``key`` matches.
        key: identifies the training run (config + data); a snapshot with
            another key is ignored.
        extra_modules / extra_param_groups: more modules saved in the snapshot
            and optimised (end-to-end fine-tuning of the conv layers; one process only).
        batches: the mini-batch of each iteration; default :func:`draw_batch` (what
            training uses; another plan is for tests and experiments).
        prefetch: draw the next iteration's batch and compute its features (``feature_fn``:
            conv5 maps from the cache, pooling) in a background thread while the current one
            trains, into pinned memory on a GPU, copied to it with ``non_blocking``.  Default
            (None): on when the head trains on CUDA without ``extra_modules`` (end-to-end
            features depend on the weights being trained, so they cannot be computed ahead);
            off on the CPU, where the loop is as it always was.  The batches, features and
            weights are the same either way, and so is the snapshot (each iteration's generator
            state is taken before its batch is drawn).

    Several processes (a ``torch.distributed`` group): every rank calls this with the same
    arguments.  The head runs under ``DistributedDataParallel``; every rank draws the same
    global batch (same generator, same seed) and computes the features, loss and gradients
    of the entries whose image it owns (``image_index mod W == rank``), so ``feature_fn`` is
    only ever asked for the rank's own images.  Each rank's loss is its windows' summed
    cross-entropy times ``W / (windows in the global batch)``, so DDP's gradient average is
    the gradient of the whole batch's mean loss, as in one process.  The loss and accuracy
    logged and returned are the whole batch's.  Rank 0 alone writes the snapshot (with every
    rank's torch generator); a resumed run may use another number of ranks (the generator
    of the batches is shared; a rank without its saved generator re-seeds its dropout).
    Dropout masks are drawn on each rank from its own torch seed (rank 0: ``params.seed``).

    Returns:
        stats: iterations, final loss (running mean), accuracy, seconds, ``ranks`` and ``curve``:
        ``{"every", "iteration", "loss", "accuracy", "lr"}``, the loss and batch accuracy
        averaged over each block of ``every`` iterations (about :data:`CURVE_POINTS` points;
        kept across a resume from the snapshot).

    Raises:
        TrainingError: when the loss becomes NaN or infinite (with the last values); on
            several ranks, with ``extra_modules`` (end-to-end fine-tuning).
    """
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1 and (extra_modules or extra_param_groups):
        raise TrainingError("finetune.end_to_end: not available on several processes yet (run it as one process)")
    usable = [w for w in windows if len(w) and (w.max_iou < params.bg_iou_high).any()]
    if not usable:
        raise TrainingError("fine-tuning: no training image has background windows (check the proposals)")
    head.to(device).train()
    groups = [{"params": [p for p in head.parameters() if p.requires_grad]}] + list(extra_param_groups or [])
    opt = torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    base_lrs = [g.get("lr", params.lr) for g in opt.param_groups]
    step_at = int(params.lr_step_fraction * params.iterations)
    rng = np.random.default_rng(params.seed)
    torch.manual_seed(params.seed if rank == 0 else _rank_seed(params.seed, rank))
    start = 0
    curve = _Curve(params.iterations)
    snapshot = Path(snapshot) if snapshot else None
    if snapshot is not None and snapshot.is_file():
        try:
            state = torch.load(snapshot, map_location=device, weights_only=True)
            if state.get("key") == key:
                head.load_state_dict(state["head"])
                opt.load_state_dict(state["optimizer"])
                rng.bit_generator.state = state["numpy_rng"]
                rank_rngs = state.get("torch_rng_ranks")
                # (generator states are CPU byte tensors; map_location may have moved them)
                if world > 1 and rank_rngs is not None and len(rank_rngs) == world:
                    torch.set_rng_state(rank_rngs[rank].cpu())
                elif rank == 0:
                    torch.set_rng_state(state["torch_rng"].cpu())
                else:
                    torch.manual_seed(_rank_seed(params.seed, rank, int(state["iteration"])))
                for name, mod in (extra_modules or {}).items():
                    mod.load_state_dict(state["extra"][name])
                start = int(state["iteration"])
                if "curve" in state:
                    curve.load(state["curve"])
                log.info("fine-tuning: resuming from %s at iteration %d/%d", snapshot, start, params.iterations)
            else:
                log.info("fine-tuning: ignoring snapshot %s made with other settings", snapshot)
        except Exception as e:  # a corrupt snapshot is rebuilt, never trusted
            log.warning("fine-tuning: ignoring unreadable snapshot %s (%s)", snapshot, e)
    if world > 1:
        starts = dist.all_gather_object(start)
        if len(set(starts)) > 1:
            raise dist.DistributedError(
                f"{snapshot}: the ranks found different fine-tuning snapshots (iterations {starts}); the run "
                "folder must be on a filesystem shared by every node")

    ahead = (device.type == "cuda" and not extra_modules and not extra_param_groups) if prefetch is None \
        else bool(prefetch)
    # with ``ahead``: the batch of the iteration not started yet, drawn already, and the numpy
    # generator's state from before it was drawn (what a snapshot of that iteration must hold)
    pending: list = []

    def rng_states() -> tuple:
        np_state = pending[0][0] if pending else rng.bit_generator.state
        return np_state, torch.get_rng_state()

    def save(it: int, states: tuple, rank_rngs: list | None = None) -> None:
        """Save the state at the START of iteration ``it`` (RNGs as they were then), so a
        resumed run repeats exactly what an uninterrupted run would have done (rank 0 writes)."""
        if snapshot is None or rank != 0:
            return
        atomic_torch_save(snapshot, _snapshot_state(head, opt, it, states, key, extra_modules, curve.state(),
                                                    rank_rngs))

    gathered: dict[int, list] = {}   # iteration -> every rank's torch generator then (the latest only)

    def save_all(it: int) -> None:
        """:func:`save` with every rank's torch generator (a collective: every rank calls it)."""
        if world == 1:
            save(it, rng_states())
        else:
            gathered.clear()
            gathered[it] = dist.all_gather_object(torch.get_rng_state())
            save(it, rng_states(), gathered[it])

    shares = [[w for w in usable if w.index % world == r] for r in range(world)]
    plan = batches if batches is not None else (lambda i, g: draw_batch(shares, i, params, g))
    model: nn.Module = head
    reduce_device = torch.device("cpu")
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(head, device_ids=[device] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
        if torch.distributed.get_backend() == "nccl":
            reduce_device = device
    in_dim = int(getattr(head, "in_dim", 0))
    loss_fn = nn.CrossEntropyLoss()
    recent: list[float] = []
    acc_hist: list[float] = []
    t0 = time.perf_counter()
    last_save = time.monotonic()
    it = start
    bar = progress(total=params.iterations, initial=start, desc="fine-tune", unit="it",
                   disable=None if show_progress else True)
    pin = device.type == "cuda"
    pool = None
    if ahead:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sppdet-finetune-prefetch")

    def own_entries(entries: list) -> list:
        return entries if world == 1 else [e for e in entries if e[0] % world == rank]

    def load(own: list) -> tuple[list, list]:
        """Features (CPU ones pinned on a GPU run) and labels of this rank's entries (worker thread)."""
        feats, labels = [], []
        for i, idx, lab, flip in own:
            t = feature_fn(i, idx, flip)
            if pin and t.device.type == "cpu":
                t = t.to(torch.float32).pin_memory()
            feats.append(t)
            lab_t = torch.from_numpy(np.asarray(lab, dtype=np.int64))
            labels.append(lab_t.pin_memory() if pin else lab_t)
        return feats, labels

    def draw_ahead(i: int) -> None:
        """Draw iteration ``i``'s batch now and start loading it (when ``i`` is to be run)."""
        if i < params.iterations:
            st = rng.bit_generator.state
            entries = plan(i, rng)
            pending.append((st, entries, pool.submit(load, own_entries(entries))))

    states = rng_states()
    try:
        while it < params.iterations:
            states = rng_states()
            scale = 0.1 if it >= step_at else 1.0
            for g, lr0 in zip(opt.param_groups, base_lrs):
                g["lr"] = lr0 * scale
            err: BaseException | None = None
            if ahead:
                if not pending:
                    draw_ahead(it)
                _, entries, fut = pending.pop(0)
                draw_ahead(it + 1)                 # loads while this iteration trains
                try:
                    feats, labels = fut.result()
                    feats = [t.to(device, torch.float32, non_blocking=True) for t in feats]
                    labels = [t.to(device, non_blocking=True) for t in labels]
                except Exception as e:  # noqa: BLE001 - several ranks: reported to all, then raised
                    if world == 1:
                        raise
                    err, feats, labels = e, [], []
            else:
                entries = plan(it, rng)
                own = own_entries(entries)
                feats, labels = [], []
                try:
                    for i, idx, lab, flip in own:
                        feats.append(feature_fn(i, idx, flip).to(device, torch.float32))
                        labels.append(torch.from_numpy(np.asarray(lab, dtype=np.int64)))
                except Exception as e:  # noqa: BLE001 - several ranks: reported to all, then raised
                    if world == 1:
                        raise
                    err, feats, labels = e, [], []
            x = torch.cat(feats) if feats else torch.zeros((0, in_dim), device=device)
            y = torch.cat(labels).to(device) if labels else torch.zeros(0, dtype=torch.int64, device=device)
            logits = model(x)
            want_save = False
            if world == 1:
                loss = loss_fn(logits, y)
                lv = float(loss.detach())
                acc = float((logits.detach().argmax(1) == y).float().mean())
            else:
                n_total = max(1, sum(len(e[1]) for e in entries))
                ce = nn.functional.cross_entropy(logits, y, reduction="sum")
                due = rank == 0 and snapshot is not None and time.monotonic() - last_save > params.snapshot_seconds
                red = torch.tensor([float(ce.detach()), float((logits.detach().argmax(1) == y).sum()),
                                    float(due), float(err is not None)], dtype=torch.float64, device=reduce_device)
                torch.distributed.all_reduce(red)
                if red[3] > 0:
                    dist.raise_if_any(err)
                lv, acc, want_save = float(red[0]) / n_total, float(red[1]) / n_total, bool(red[2] > 0)
                loss = ce * (world / n_total)
            recent.append(lv)
            if not math.isfinite(lv):
                raise TrainingError(
                    f"fine-tuning diverged at iteration {it + 1}: loss values "
                    f"{', '.join(f'{v:.4g}' for v in recent[-5:])}; lower finetune.lr (now {params.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc_hist.append(acc)
            it += 1
            curve.add(it, lv, acc_hist[-1], params.lr * scale, it == params.iterations)
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(recent[-100:]):.3f}", acc=f"{np.mean(acc_hist[-100:]):.3f}")
            if it % 500 == 0:
                log.info("fine-tune it %d/%d loss %.4f acc %.3f lr %.2g", it, params.iterations,
                         np.mean(recent[-500:]), np.mean(acc_hist[-500:]), params.lr * scale)
            if world == 1:
                if snapshot is not None and time.monotonic() - last_save > params.snapshot_seconds:
                    save(it, rng_states())
                    last_save = time.monotonic()
            elif want_save:
                save_all(it)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        # several ranks: no collective now; the other ranks' generators are kept when the last
        # periodic snapshot was of this iteration, else they re-seed their dropout on resume
        save(it, states, gathered.get(it))
        log.warning("fine-tuning interrupted at iteration %d; progress saved to %s", it, snapshot)
        raise
    finally:
        bar.close()
        if pool is not None:
            for _, _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
            pending.clear()
    if snapshot is not None:
        save_all(it)
    head.eval()
    return {
        "iterations": params.iterations,
        "resumed_from": start,
        "loss": float(np.mean(recent[-100:])) if recent else float("nan"),
        "accuracy": float(np.mean(acc_hist[-100:])) if acc_hist else float("nan"),
        "seconds": time.perf_counter() - t0,
        "ranks": world,
        "curve": curve.to_dict(),
    }
