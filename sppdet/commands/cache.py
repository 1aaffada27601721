"""``sppdet cache list|prune``: what the cache folder holds, and deleting parts of it."""

from __future__ import annotations

import json
import time


def register(sub) -> None:
    p = sub.add_parser(
        "cache", help="list and prune the cache (proposal stores, conv5 maps)",
        description="The cache folder (--cache, else $SPPDET_CACHE, else ~/.cache/sppdet) holds proposal "
                    "stores (one per dataset, split, preset and box cap), conv5 maps (one folder per backbone "
                    "and weights; files keyed by image content, scale, max side, flip) and R-CNN mode window "
                    "features. `list` shows each entry with its size on disk, images and last use; `prune` "
                    "deletes entries, only ever files whose names and places are sppdet's, never through a "
                    "symlink, and never an entry a running job is using (docs/DISTRIBUTED.md, Resources).")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    csub.required = True

    ls = csub.add_parser("list", help="the entries of the cache, their size on disk and last use",
                         description="List the cache's entries: kind, key (what `prune --key` takes), size on "
                                     "disk (allocated blocks, like du), images, size per image, last use and "
                                     "what produced it (dataset/split, backbone, scales, preset).")
    _cache_option(ls)
    ls.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ls.set_defaults(func=run_list)

    pr = csub.add_parser("prune", help="delete cache entries by age, recency, key, or all",
                         description="Delete cache entries (exactly one criterion). Entries in use by a running "
                                     "job are skipped and reported.")
    _cache_option(pr)
    which = pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                       help="entries last used more than DAYS days ago")
    which.add_argument("--keep-last", type=int, default=None, metavar="N",
                       help="keep the N most recently used entries of each kind, delete the others")
    which.add_argument("--key", action="append", default=None, metavar="K",
                       help="the entry with this key, as `sppdet cache list` shows it (repeatable)")
    which.add_argument("--all", action="store_true", help="every entry")
    pr.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    pr.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pr.set_defaults(func=run_prune)


def _cache_option(p) -> None:
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="the cache folder (default: $SPPDET_CACHE, else ~/.cache/sppdet)")


def _when(t: float | None) -> str:
    if not t:
        return "unknown"
    days = (time.time() - t) / 86400
    ago = f"{days:.0f} d ago" if days >= 1 else f"{days * 24:.0f} h ago" if days * 24 >= 1 else "< 1 h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) + f" ({ago})"


def run_list(args) -> int:
    from ..build import cache_dir
    from ..features.cache_admin import human_bytes, list_cache

    listing = list_cache(cache_dir(args.cache))
    if args.json:
        print(json.dumps(listing.to_json()))
        return 0
    if not listing.entries:
        what = "does not exist yet" if not listing.root.exists() else "holds no sppdet cache entries"
        print(f"{listing.root}: {what}")
    else:
        print(f"{listing.root}: {len(listing.entries)} entries, {human_bytes(listing.total_bytes)} on disk")
        print(f"{'KIND':<13}{'SIZE':>11}{'IMAGES':>8}{'PER IMAGE':>11}  {'LAST USE':<30}KEY")
        for e in sorted(listing.entries, key=lambda e: (e.kind, e.key)):
            per = human_bytes(e.bytes_per_image) if e.bytes_per_image is not None else "-"
            print(f"{e.kind:<13}{human_bytes(e.bytes):>11}{e.images if e.images is not None else '-':>8}"
                  f"{per:>11}  {_when(e.last_use):<30}{e.key}")
            print(f"{'':13}{e.description}")
    if listing.unrecognised:
        print(f"not sppdet's (never touched by prune): {len(listing.unrecognised)} item(s), e.g. "
              + ", ".join(listing.unrecognised[:3]))
    return 0


def run_prune(args) -> int:
    from ..build import cache_dir
    from ..features.cache_admin import human_bytes, prune_cache

    res = prune_cache(cache_dir(args.cache), older_than_days=args.older_than, keep_last=args.keep_last,
                      keys=args.key, everything=args.all, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(res.to_json()))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for e, freed in res.deleted:
        print(f"{verb} {e.key} ({human_bytes(freed)})")
    for e, why in res.skipped:
        print(f"skipped {e.key}: {why}")
    if res.left:
        print(f"left {len(res.left)} file(s) that are not sppdet's or still being written, e.g. {res.left[0]}")
    print(f"{res.root}: {verb} {len(res.deleted)} entr{'y' if len(res.deleted) == 1 else 'ies'}, "
          f"{human_bytes(res.freed_bytes)}; kept {len(res.kept)}, skipped {len(res.skipped)}")
    return 0
