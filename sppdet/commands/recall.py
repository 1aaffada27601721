"""``sppdet recall``: proposal recall figures (and plots) on a split."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import SppdetError
from .proposals import ProposalSettings, add_proposal_options

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "recall", help="proposal recall at IoU 0.5 / 0.7, average recall, plots",
        description="Recall of selective-search proposals against the ground truth (difficult objects "
                    "excluded): recall at IoU 0.5 and 0.7, average recall over IoU 0.5:0.95, mean boxes "
                    "per image, recall vs IoU and vs number of boxes.  Without --proposals the proposals "
                    "are computed (or taken from the cache) with --mode / --max-boxes.")
    p.add_argument("--data", metavar="ROOT", help="VOC-format dataset root (default: the config's data.root)")
    p.add_argument("--split", metavar="S",
                   help="split name (several: trainval,test; default with --config: its data.train_split)")
    p.add_argument("--proposals", default=None, metavar="FILE", help="a proposal store (.npz) to score")
    add_proposal_options(p)
    p.add_argument("--include-difficult", action="store_true", help="also count objects marked difficult")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write recall_vs_iou.png and recall_vs_boxes.png to DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..proposals import ProposalStore, compute_proposals
    from ..proposals.recall import compute_recall, format_result, plot_recall, to_json
    from ..proposals.runner import load_splits

    s = ProposalSettings(args)
    if not s.data or not s.split:
        raise SppdetError("recall: --data ROOT and --split S are required (or --config C naming them)")
    dataset = load_splits(s.data, s.split, skip_bad_images=s.skip_bad_images)
    if args.proposals:
        store = ProposalStore.load(args.proposals)
        name = Path(args.proposals).name
        unknown = sum(1 for r in dataset.records if r.image_id not in store)
        if unknown == len(dataset):
            raise SppdetError(f"--proposals {args.proposals}: holds none of the {len(dataset)} images of "
                              f"split {s.split!r} (wrong dataset or split?)")
    else:
        store = compute_proposals(dataset, s.preset, s.max_boxes, workers=s.workers,
                                  cache_dir=s.cache, skip_bad_images=s.skip_bad_images)
        name = s.preset.name
    res = compute_recall(dataset, store, include_difficult=args.include_difficult)
    plots = [str(p) for p in plot_recall({name: res}, args.plots)] if args.plots else []
    if args.json:
        print(to_json(res, proposals=str(store.path) if store.path else None,
                      preset=store.settings.get("preset_name"), split=dataset.split, plots=plots))
    else:
        print(f"proposals: {store.path}")
        print(format_result(res))
        for p in plots:
            print(f"plot: {p}")
    return 0
