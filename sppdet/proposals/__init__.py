"""Selective-search proposals: the algorithm, presets, the proposal store, recall.

Public API::

    selective_search(image, preset="fast", max_boxes=2000) -> ndarray[N, 4] float32
    get_preset(name, **overrides) -> Preset;  PRESETS (names)
    compute_proposals(dataset, preset="fast", max_boxes=2000, *, workers=0, out=None,
                      cache_dir=None, shard=None, skip_bad_images=False, progress=True) -> ProposalStore
    ProposalStore.load(path); store[image_id]; image_id in store; len(store); store.settings; store.path
    default_store_path(cache_dir, dataset, preset_key, max_boxes) -> Path
    merge_shards(store_path) -> ProposalStore
    compute_recall(dataset, store, iou_thresholds=..., max_boxes_list=...) -> RecallResult

Boxes are float32 ``(x1, y1, x2, y2)``, 0-based continuous pixels of the
original image, best first (see :mod:`sppdet.proposals.selective_search` for
the order).
"""

from .presets import PRESETS, Preset, get_preset, parse_override
from .recall import RecallResult, compute_recall, plot_recall
from .runner import compute_proposals, load_splits
from .selective_search import fallback_windows, opencv_selective_search, selective_search
from .store import ProposalStore, ProposalStoreError, default_store_path, merge_shards

__all__ = [
    "PRESETS", "Preset", "get_preset", "parse_override",
    "selective_search", "opencv_selective_search", "fallback_windows",
    "compute_proposals", "load_splits",
    "ProposalStore", "ProposalStoreError", "default_store_path", "merge_shards",
    "RecallResult", "compute_recall", "plot_recall",
]
