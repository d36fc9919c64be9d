"""FCN and DeepLab-v3 heads on the deepest backbone features (torchvision's segmentation models).

The CAS paper trains ``torchvision.models.segmentation.fcn_resnet101(num_classes=2)`` and tests
``deeplabv3_resnet101`` (``shared/methods/cas.md`` section 3). Both are a head on the stride-8
(dilated) last ResNet stage, no auxiliary head, logits upsampled bilinearly to the input:

* FCN head: 3x3 conv (in -> in/4), BN, ReLU, dropout 0.1, 1x1 conv;
* DeepLab-v3 head: ASPP (rates 12/24/36 at stride 8, 256 ch, pooling branch, dropout 0.5 in
  torchvision), 3x3 conv 256, BN, ReLU, 1x1 conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from segexp.models.backbone import Backbone
from segexp.models.deeplab import ASPP, default_aspp_rates

__all__ = ["FCNHead", "DeepLabV3Head", "SegNet", "HEADS"]

HEADS = ("fcn", "deeplabv3")


class FCNHead(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1):
        inter = in_channels // 4
        super().__init__(
            ConvNormAct(in_channels, inter, 3),
            nn.Dropout(dropout),
            nn.Conv2d(inter, num_classes, 1),
        )


class DeepLabV3Head(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (12, 24, 36),
                 channels: int = 256, dropout: float = 0.5):
        super().__init__(
            ASPP(in_channels, channels, rates, dropout),
            ConvNormAct(channels, channels, 3),
            nn.Conv2d(channels, num_classes, 1),
        )


class SegNet(nn.Module):
    """``Backbone`` + FCN or DeepLab-v3 head on its last feature map, logits at the input size."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 2,
        head: str = "fcn",
        dropout: float | None = None,
        aspp_rates: Sequence[int] | None = None,
        aspp_channels: int = 256,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
        self.backbone = backbone
        in_ch = backbone.out_channels[-1]
        if head == "fcn":
            self.head: nn.Module = FCNHead(in_ch, num_classes, 0.1 if dropout is None else dropout)
        else:
            rates = default_aspp_rates(backbone.reductions[-1]) if aspp_rates is None else tuple(aspp_rates)
            drop = 0.5 if dropout is None else dropout
            self.head = DeepLabV3Head(in_ch, num_classes, rates, aspp_channels, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x)[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
