"""sppdet: SPPnet object detection (He et al., ECCV 2014) on PyTorch."""

__version__ = "0.1.0"
