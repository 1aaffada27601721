"""Window features: the extractor (SPP / R-CNN mode), its conv5 caches, the training-window
feature cache and the memory budget that bounds it.

Public API::

    FeatureExtractor(backbone, scales=..., pyramid=..., cache_dir=..., mode="spp"|"rcnn", ...)
    Conv5Cache(folder, backbone, ...)                               (the conv5 maps, disk + RAM)
    WindowFeatures(extractor, dataset, windows, cache_dir, ...)     (training windows, cached)
    available_memory() -> bytes | None
"""

from .conv5_cache import CACHE_FORMAT, Conv5Cache
from .extractor import FeatureExtractor, context_boxes, enlarge_boxes, resize_image
from .memory import available_memory
from .window_cache import WindowFeatures

__all__ = ["FeatureExtractor", "resize_image", "context_boxes", "enlarge_boxes", "CACHE_FORMAT",
           "WindowFeatures", "available_memory", "Conv5Cache"]
