"""The fully connected layers trained on SPP features (fc6, fc7, classifier).

The network module holds only layers; the loss, the SVMs, the regressors and
NMS live elsewhere (DESIGN §4).
"""

from __future__ import annotations

import torch
from torch import nn


class FCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> cls_score.

    Args:
        in_dim: length of the pooled feature (bins x channels).
        fc_dims: widths of the hidden layers (the paper: [4096, 4096]).
        num_classes: K object classes; the classifier has K + 1 outputs
            (index 0 is background).
        dropout: dropout probability after each hidden layer (0.5 in the paper).
    """

    def __init__(self, in_dim: int, fc_dims: list[int] | tuple[int, ...], num_classes: int,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.fc_dims = [int(d) for d in fc_dims]
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = []
        prev = self.in_dim
        for d in self.fc_dims:
            layers += [nn.Linear(prev, d), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            prev = d
        self.hidden = nn.Sequential(*layers)
        self.cls_score = nn.Linear(prev, self.num_classes + 1)
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        """Length of the fc7 (last hidden layer) feature."""
        return self.fc_dims[-1] if self.fc_dims else self.in_dim

    def reset_parameters(self) -> None:
        # He init suits the ReLUs when fc6/fc7 are trained from scratch; the paper starts
        # them from ImageNet-trained layers instead (load_imagenet_fc, finetune.init).
        for m in self.hidden:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)

    def load_imagenet_fc(self, fc: dict[str, torch.Tensor]) -> None:
        """Start fc6/fc7 from ImageNet-trained layers (``fc6.weight``, ``fc6.bias``, ``fc7.weight``,
        ``fc7.bias``, torch ``Linear`` layout), as the paper does; ``cls_score`` keeps its init.

        Raises:
            ValueError: the head has not exactly two hidden layers of those shapes.
        """
        linears = [m for m in self.hidden if isinstance(m, nn.Linear)]
        if len(linears) != 2:
            raise ValueError(f"load_imagenet_fc: the head has {len(linears)} hidden layers, fc6/fc7 need 2")
        with torch.no_grad():
            for name, m in zip(("fc6", "fc7"), linears):
                w, b = fc[f"{name}.weight"], fc[f"{name}.bias"]
                if tuple(w.shape) != tuple(m.weight.shape) or tuple(b.shape) != tuple(m.bias.shape):
                    raise ValueError(f"load_imagenet_fc: {name} is {tuple(w.shape)}, the head's layer is "
                                     f"{tuple(m.weight.shape)}")
                m.weight.copy_(w)
                m.bias.copy_(b)

    def fc7(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden features (Tensor[N, out_dim]) of pooled features x (Tensor[N, in_dim])."""
        return self.hidden(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (Tensor[N, K + 1]) of pooled features x (Tensor[N, in_dim])."""
        return self.cls_score(self.hidden(x))


@torch.no_grad()
def fc7_features(head: FCHead, pooled: torch.Tensor, device: torch.device | str = "cpu",
                 chunk: int = 4096) -> torch.Tensor:
    """fc7 features (Tensor[N, head.out_dim]) of pooled features (Tensor[N, D]), in chunks, no grad."""
    if len(pooled) == 0:
        return pooled.new_zeros((0, head.out_dim))
    return torch.cat([head.fc7(pooled[j:j + chunk].to(device)) for j in range(0, len(pooled), chunk)])
