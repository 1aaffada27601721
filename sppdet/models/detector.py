"""The trained detector as one object: what training produces and a checkpoint holds.

:class:`SPPDetector` bundles the backbone, the feature settings the SVMs and
regressors were trained on (scales, pyramid, mode, ...: they decide how the
extractor must pool), the fc head, the per-class linear SVMs, the box
regressors and the post-processing settings (NMS, top-k, flip, box voting).

It scores pooled window features; it does not extract them (the extractor, with
its caches, is :class:`sppdet.features.FeatureExtractor`) and it does not run
NMS (:func:`sppdet.detect.postprocess`): losses, solvers, regressor fitting and
NMS live outside the model layer (DESIGN §4).  :mod:`sppdet.checkpoint` writes
and reads it; :mod:`sppdet.train` builds it; :mod:`sppdet.detect` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import FeatureConfig, TestConfig
from ..errors import CheckpointError
from ..utils.device import resolve_device
from .backbones import Backbone
from .bbox_reg import BBoxRegressors
from .heads import FCHead, fc7_features
from .svm import LinearSVMs


@dataclass
class SPPDetector:
    """A trained SPPnet detector's parts.

    Attributes:
        classes: class names (label ``k`` is ``classes[k]``).
        backbone: the conv layers (their ``weights_id`` keys the conv5 caches).
        features: the feature settings the heads were trained on (scales, pyramid, mode, ...).
        head: fc6/fc7/classifier, or ``None`` without fine-tuning.
        svms: per-class linear SVMs.
        bbox_reg: per-class box regressors, or ``None`` when disabled.
        svm_features: ``"fc7"`` (SVMs score the head's fc7 output) or ``"spp"`` (the pooled feature).
        test: post-processing settings (NMS IoU, detections per image, flip, box voting, ...).
        feature_dim: length of the pooled window feature.
        backbone_weights: the weights reference the backbone was built from (``None``: its
            default, ``"random"``, or a path).
        backbone_trained: the conv layers were changed by training (end-to-end fine-tuning).
        stats: training statistics (timings, counts).
    """

    classes: list[str]
    backbone: Backbone
    features: FeatureConfig
    svms: LinearSVMs
    head: FCHead | None = None
    bbox_reg: BBoxRegressors | None = None
    svm_features: str = "fc7"
    test: TestConfig = field(default_factory=TestConfig)
    feature_dim: int = 0
    backbone_weights: str | None = None
    backbone_trained: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: str | torch.device) -> "SPPDetector":
        """Move the networks to ``device`` (``auto`` allowed) and switch them to eval mode."""
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.backbone.to(self.device)
        if self.head is not None:
            self.head.to(self.device).eval()
        return self

    @torch.no_grad()
    def score(self, pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """SVM scores (ndarray[N, K]) of pooled window features (Tensor[N, D]), and those
        features as float32 numpy (the box regressors' input)."""
        pooled = pooled.float()
        x = pooled
        if self.svm_features == "fc7":
            if self.head is None:
                raise CheckpointError("this checkpoint scores fc7 features but holds no fc layers")
            x = fc7_features(self.head, pooled, self.device)
        # the SVMs score where fc7 is (on a GPU: only the [N, K] scores cross to the host)
        scores = self.svms.decision_function(x).cpu()
        scores = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        return scores, pooled.cpu().numpy()

    @torch.no_grad()
    def score_tensor(self, pooled: torch.Tensor) -> torch.Tensor:
        """SVM scores (Tensor[N, K] float32) of pooled window features (Tensor[N, D]), computed
        on the model's device and left there (fc7 in chunks, then one matmul for all classes)."""
        pooled = pooled.float()
        x = pooled
        if self.svm_features == "fc7":
            if self.head is None:
                raise CheckpointError("this checkpoint scores fc7 features but holds no fc layers")
            x = fc7_features(self.head, pooled, self.device)
        return self.svms.decision_function(x)

    def regress_tensor(self, pooled: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """:meth:`regress` on the features' device: Tensor[N, K, 4] float32, or the windows
        (Tensor[N, 4] float32) without regressors."""
        if self.bbox_reg is None:
            return windows.to(device=pooled.device, dtype=torch.float32)
        return self.bbox_reg.predict_all_tensor(pooled, windows)

    def regress(self, pooled: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """Per-class refined boxes (ndarray[N, K, 4]) of ``windows`` (ndarray[N, 4]) from their
        pooled features; the windows themselves (float32 [N, 4]) without regressors."""
        if self.bbox_reg is None:
            return np.asarray(windows, dtype=np.float32)
        return self.bbox_reg.predict_all(pooled, windows)
