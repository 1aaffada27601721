"""``sppdet proposals``: selective search for a split, cached, parallel, resumable, shardable."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import SppdetError

logger = logging.getLogger(__name__)


def add_proposal_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``proposals`` and ``recall`` (preset, cap, workers, cache)."""
    from ..proposals.presets import PRESETS

    p.add_argument("--mode", default="fast", metavar="PRESET",
                   help=f"selective-search preset: {', '.join(PRESETS)} (default: fast)")
    p.add_argument("--max-boxes", type=int, default=2000, metavar="N",
                   help="keep at most N boxes per image, best first (default: 2000; 0: no cap)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset setting, e.g. --set ks=50,100 --set max_sides=300 (repeatable)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes (default 0: all cores)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $SPPDET_CACHE or ~/.cache/sppdet)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip images that cannot be decoded (with a warning) instead of failing")


def preset_from_args(args: argparse.Namespace):
    """The Preset that --mode and --set describe."""
    from ..proposals.presets import get_preset, parse_override

    overrides = dict(parse_override(t) for t in (args.overrides or []))
    return get_preset(args.mode, **overrides)


def register(sub) -> None:
    p = sub.add_parser(
        "proposals", help="selective-search proposals for a split (cached, parallel)",
        description="Run selective search on every image of a split and store the boxes "
                    "(float32 x1,y1,x2,y2, original pixels, best first) in one .npz file. "
                    "Finished images are kept when interrupted: rerun the same command to resume. "
                    "Several splits can be joined with commas (--split trainval,test).")
    p.add_argument("--data", metavar="ROOT", help="VOC-format dataset root")
    p.add_argument("--split", metavar="S", help="split name (ImageSets/Main/S.txt)")
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
    from ..utils.io import default_cache_dir

    if args.max_boxes < 0:
        raise SppdetError(f"--max-boxes {args.max_boxes}: must be >= 0 (0: no cap)")
    if args.workers < 0:
        raise SppdetError(f"--workers {args.workers}: must be >= 0 (0: all cores)")
    preset = preset_from_args(args)
    parse_shard(args.shard)  # fail on a bad --shard before reading the dataset
    cache = Path(args.cache) if args.cache else default_cache_dir()

    if args.merge and args.out and not args.data:
        store = merge_shards(args.out)
        print(f"{store.path}: {len(store)} images, {store.mean_boxes:.1f} boxes/img (merged)")
        return 0
    if not args.data or not args.split:
        raise SppdetError("proposals: --data ROOT and --split S are required "
                          "(only --merge --out FILE works without them)")
    dataset = load_splits(args.data, args.split, skip_bad_images=args.skip_bad_images)
    if args.merge:
        path = Path(args.out) if args.out else default_store_path(cache, dataset, preset.key(), args.max_boxes)
        from ..proposals.store import make_settings

        store = merge_shards(path, make_settings(preset, args.max_boxes, dataset))
        print(f"{store.path}: {len(store)} images, {store.mean_boxes:.1f} boxes/img (merged)")
        return 0

    store = compute_proposals(dataset, preset, args.max_boxes, workers=args.workers, out=args.out,
                              cache_dir=cache, shard=args.shard, skip_bad_images=args.skip_bad_images)
    shard = store.settings.get("shard")
    what = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    skipped = f", {len(store.skipped)} skipped" if store.skipped else ""
    print(f"{store.path}: {len(store)} images{what}, {store.mean_boxes:.1f} boxes/img{skipped}, "
          f"preset {preset.name} ({preset.key()})")
    return 0
