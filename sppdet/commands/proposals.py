"""``sppdet proposals``: selective search for a split, cached, parallel, resumable, shardable."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import merge
from ..errors import SppdetError
from .common import add_config_options, add_runtime_options, config_from_args

logger = logging.getLogger(__name__)


def add_proposal_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``proposals`` and ``recall`` (config, preset, cap, runtime options)."""
    from ..proposals.presets import PRESETS

    add_config_options(p, required=False)
    p.add_argument("--mode", default=None, metavar="PRESET",
                   help=f"selective-search preset: {', '.join(PRESETS)} (default: the config's proposals.mode, fast)")
    p.add_argument("--max-boxes", type=int, default=None, metavar="N",
                   help="keep at most N boxes per image, best first (default: the config's proposals.max_boxes, "
                        "2000; 0: no cap)")
    add_runtime_options(p, device=False)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip images that cannot be decoded (with a warning) instead of failing")


class ProposalSettings:
    """What ``proposals`` / ``recall`` run with: the config (``--config``, ``--set``) and the flags."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .. import build

        if args.max_boxes is not None and args.max_boxes < 0:
            raise SppdetError(f"--max-boxes {args.max_boxes}: must be >= 0 (0: no cap)")
        cfg = config_from_args(args)
        if args.mode is not None:
            cfg = merge(cfg, {"proposals": {"mode": args.mode}}, "--mode")
        self.config = cfg
        self.preset = build.preset(cfg)
        self.max_boxes = cfg.proposals.max_boxes if args.max_boxes is None else args.max_boxes
        self.workers = cfg.proposals.workers
        self.cache = build.training_cache_dir(cfg)
        self.skip_bad_images = bool(args.skip_bad_images or cfg.data.skip_bad_images)
        self.data = args.data if args.data else cfg.data.root
        self.split = args.split if args.split else (cfg.data.train_split if args.config else None)


def register(sub) -> None:
    p = sub.add_parser(
        "proposals", help="selective-search proposals for a split (cached, parallel)",
        description="Run selective search on every image of a split and store the boxes "
                    "(float32 x1,y1,x2,y2, original pixels, best first) in one .npz file. "
                    "Finished images are kept when interrupted: rerun the same command to resume. "
                    "Several splits can be joined with commas (--split trainval,test). With --config C "
                    "the preset, cap, cache folder and data come from the training config (the flags win), so "
                    "the store is the one `sppdet train --config C` reuses.")
    p.add_argument("--data", metavar="ROOT", help="VOC-format dataset root (default: the config's data.root)")
    p.add_argument("--split", metavar="S",
                   help="split name (ImageSets/Main/S.txt; default with --config: its data.train_split)")
    add_proposal_options(p)
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="compute only shard i of N (1-based); the shards merge into one store "
                        "when all are present")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="store file (default: a file under the cache folder, keyed by the settings)")
    p.add_argument("--merge", action="store_true",
                   help="merge the shard files of the store (<stem>.shard-<i>-of-<N>.npz) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..proposals import compute_proposals, default_store_path, merge_shards
    from ..proposals.runner import load_splits
    from ..proposals.store import parse_shard

    s = ProposalSettings(args)
    parse_shard(args.shard)  # fail on a bad --shard before reading the dataset

    if args.merge and args.out and not s.data:
        store = merge_shards(args.out)
        print(f"{store.path}: {len(store)} images, {store.mean_boxes:.1f} boxes/img (merged)")
        return 0
    if not s.data or not s.split:
        raise SppdetError("proposals: --data ROOT and --split S are required "
                          "(only --merge --out FILE works without them)")
    dataset = load_splits(s.data, s.split, skip_bad_images=s.skip_bad_images)
    if args.merge:
        path = Path(args.out) if args.out else default_store_path(s.cache, dataset, s.preset.key(), s.max_boxes)
        from ..proposals.store import make_settings

        store = merge_shards(path, make_settings(s.preset, s.max_boxes, dataset))
        print(f"{store.path}: {len(store)} images, {store.mean_boxes:.1f} boxes/img (merged)")
        return 0

    store = compute_proposals(dataset, s.preset, s.max_boxes, workers=s.workers, out=args.out,
                              cache_dir=s.cache, shard=args.shard, skip_bad_images=s.skip_bad_images)
    shard = store.settings.get("shard")
    what = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    skipped = f", {len(store.skipped)} skipped" if store.skipped else ""
    print(f"{store.path}: {len(store)} images{what}, {store.mean_boxes:.1f} boxes/img{skipped}, "
          f"preset {s.preset.name} ({s.preset.key()})")
    return 0
