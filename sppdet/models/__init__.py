"""Networks: backbones (conv5-style maps), spatial pyramid pooling, fc heads."""

from .backbones import Backbone, backbone_names, build_backbone
from .spp import (DEFAULT_LEVELS, PAPER_DETECTION_LEVELS, SpatialPyramidPooling, choose_scales, feature_dim,
                  num_bins, project_windows, spp_pool)

__all__ = [
    "Backbone", "build_backbone", "backbone_names", "SpatialPyramidPooling", "spp_pool", "project_windows",
    "choose_scales", "feature_dim", "num_bins", "DEFAULT_LEVELS", "PAPER_DETECTION_LEVELS",
]
