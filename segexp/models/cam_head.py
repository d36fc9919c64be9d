"""CAM network: a backbone, Dropout2d + a 1x1 classifier (no bias) on its deepest map, optionally SEAM's PCM.

The classifier output *is* the class activation map (GAP of it gives the image logits), as in
psa's ``resnet38_cls`` (20 foreground channels) and SEAM's ``fc8`` (21 channels, background first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import segexp.models.resnet38d  # noqa: F401  (registers timm "resnet38d")
from segexp.models.pcm import PCM, pcm_input

__all__ = ["CAMHead", "CAMNet"]


class CAMHead(nn.Module):
    """Dropout2d then 1x1 conv ``in_channels -> num_outputs`` (no bias, Xavier-uniform: psa/SEAM ``fc8``)."""

    def __init__(self, in_channels: int, num_outputs: int, dropout: float = 0.5, bias: bool = False):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_channels, num_outputs, 1, bias=bias)
        nn.init.xavier_uniform_(self.classifier.weight)
        if bias:
            nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))


class CAMNet(nn.Module):
    """``backbone`` + :class:`CAMHead` (+ :class:`~segexp.models.pcm.PCM`).

    Args:
        backbone: a :class:`~segexp.models.backbone.Backbone` (returns a list of feature maps).
        num_classes: classes including the background; the CAM has ``num_classes - 1`` channels
            (foreground only, plain CAM) or ``num_classes`` with ``background_first`` (SEAM).
        dropout: Dropout2d before the classifier (released: 0.5).
        pcm: keyword arguments of :class:`~segexp.models.pcm.PCM` (SEAM; ``tap_channels`` come from
            the backbone) or None. ``pcm_taps`` index the backbone feature list for its two taps
            (ResNet-38: 2 = conv4, 3 = conv5).
        background_first: channel 0 of the CAM is the background (SEAM); needed by the PCM input.

    ``forward(x)`` returns ``{"cam": (N, channels, h, w), "cam_rv": PCM output or absent,
    "features": the deepest backbone map}`` on the feature grid (stride = backbone output stride);
    ``features`` is what plug-in heads (FBR's projections) read.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        dropout: float = 0.5,
        pcm: Mapping[str, Any] | None = None,
        pcm_taps: Sequence[int] = (2, 3),
        background_first: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        num_outputs = num_classes if background_first else num_classes - 1
        self.head = CAMHead(backbone.out_channels[-1], num_outputs, dropout)
        self.pcm_taps = tuple(pcm_taps)
        self.pcm = None
        if pcm is not None:
            tap_channels = [backbone.out_channels[i] for i in self.pcm_taps]
            self.pcm = PCM(tap_channels=tap_channels, **dict(pcm))
        self.background_first = background_first
        if pcm is not None and not background_first:
            raise ValueError("the PCM needs a background channel first in the CAM (background_first=true)")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        cam = self.head(feats[-1])
        out = {"cam": cam, "features": feats[-1]}
        if self.pcm is not None:
            cam_hat = pcm_input(cam)  # no_grad, from cam.detach()
            out["cam_rv"] = self.pcm(cam_hat, x, [feats[i] for i in self.pcm_taps])
        return out
