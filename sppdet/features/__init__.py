"""Window features: the extractor (SPP / R-CNN mode), its conv5 caches, the training-window
feature cache and the memory budget that bounds it.

Public API::

    FeatureExtractor(backbone, scales=..., pyramid=..., cache_dir=..., mode="spp"|"rcnn", ...)
    WindowFeatures(extractor, dataset, windows, cache_dir, ...)     (training windows, cached)
    available_memory() -> bytes | None
"""

from .extractor import CACHE_FORMAT, FeatureExtractor, context_boxes, enlarge_boxes, resize_image
from .memory import available_memory
from .window_cache import WindowFeatures

__all__ = ["FeatureExtractor", "resize_image", "context_boxes", "enlarge_boxes", "CACHE_FORMAT",
           "WindowFeatures", "available_memory"]
