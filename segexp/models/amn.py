"""AMN network (Lee et al., CVPR 2022, "Threshold Matters in WSSS"; ``gaviotas/AMN@75c1999c``,
``net/resnet50_amn.py``): backbone features conditioned on the image label, then a DeepLab-v2
classifier to background + classes.

* label conditioning: ``Linear(K -> C_feat)`` of the multi-hot image label (default init), multiplied
  channel-wise into the deepest backbone map - the network can only score classes the label allows;
* classifier: ``Dropout(0.1)`` then the *sum* of four 3x3 convs dilated 6, 12, 18, 24 (bias, weights
  N(0, 0.01), bias 0) to ``num_classes`` channels, background = channel 0 (as released);
* FBR's AMN variant (``XuYin94/FBR@fd1aeb85``, ``AMN/net/resnet50_amn.py``) adds ``proj_fg`` and
  ``proj_bg``: bias-free Xavier-uniform 1x1 convs to 128 on the conditioned map, each followed by a
  ReLU (no BN, no background classifier - those are commented out there).

``dropout_in_eval`` keeps the classifier dropout active in eval mode: the release overrides
``Net.train()`` without calling ``super().train()``, so the model never leaves training mode
(``model.eval()`` in ``make_amn_cam.py`` changes nothing) - its BatchNorms are ``FixedBatchNorm``
(running statistics always), so the dropout is the one thing that differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DilatedSumClassifier", "AMNNet"]


class DilatedSumClassifier(nn.Module):
    """DeepLab-v2 classifier: the sum of one dilated 3x3 conv per rate (padding = rate, bias)."""

    def __init__(self, in_channels: int, num_outputs: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_outputs, 3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.convs:  # as released: N(0, 0.01) weights, zero bias
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


class AMNNet(nn.Module):
    """``backbone`` (a :class:`~segexp.models.backbone.Backbone`) + label conditioning + classifier.

    Args:
        backbone: its deepest map is used (released: ResNet-50 layer4 at stride 16).
        num_classes: classes including the background (channel 0); the label has ``num_classes - 1``.
        rates: dilation rates of the classifier (released 6, 12, 18, 24 on a stride-16 grid).
        dropout: element-wise dropout before the classifier (released 0.1).
        fbr_dim: FBR's AMN variant: output channels of ``proj_fg`` / ``proj_bg`` (released 128);
            ``None`` = plain AMN (no projections).
        dropout_in_eval: the release's never-eval mode (see the module docstring).

    ``forward(x, labels)`` returns ``{"logits": (N, num_classes, h, w), "features": the conditioned
    map}`` on the backbone grid, plus ``f_proj`` / ``b_proj`` (ReLU'd projections) with ``fbr_dim``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18, 24),
        dropout: float = 0.1,
        fbr_dim: int | None = None,
        dropout_in_eval: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        channels = backbone.out_channels[-1]
        self.label_enc = nn.Linear(self.num_classes - 1, channels)
        self.dropout = float(dropout)
        self.dropout_in_eval = bool(dropout_in_eval)
        self.classifier = DilatedSumClassifier(channels, self.num_classes, rates)
        self.fbr_dim = None if fbr_dim is None else int(fbr_dim)
        if self.fbr_dim is not None:
            self.proj_fg = nn.Conv2d(channels, self.fbr_dim, 1, bias=False)
            self.proj_bg = nn.Conv2d(channels, self.fbr_dim, 1, bias=False)
            nn.init.xavier_uniform_(self.proj_fg.weight)
            nn.init.xavier_uniform_(self.proj_bg.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)[-1]
        cond = feats * self.label_enc(labels.to(feats.dtype))[..., None, None]
        drop = F.dropout(cond, self.dropout, training=self.training or self.dropout_in_eval)
        out = {"logits": self.classifier(drop), "features": cond}
        if self.fbr_dim is not None:
            out["f_proj"] = torch.relu(self.proj_fg(cond))
            out["b_proj"] = torch.relu(self.proj_bg(cond))
        return out
