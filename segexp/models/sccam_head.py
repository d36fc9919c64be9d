"""SC-CAM network: the CAM network plus a bias-free sub-category classifier on the same pooled feature.

SC-CAM ``network/resnet38_cls.py`` applies one Dropout2d to conv6, global-average-pools it and
feeds the pooled feature ``f`` to two bias-free 1x1 convolutions (Xavier init): ``fc8_20`` (parent
classes, C) and ``fc8_200`` (sub-categories, C x K). The parent classifier is the CAM head of
:class:`~segexp.models.cam_head.CAMNet` (a 1x1 conv commutes with the GAP, so its map is the CAM and
its pooled output the parent logits); the sub-category classifier is applied to the pooled feature
only (no C x K map in training), and :meth:`SubCategoryCAMNet.sub_cam` gives its maps for the merged
sub-category CAM at inference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segexp.models.cam_head import CAMNet

__all__ = ["SubCategoryCAMNet"]


class SubCategoryCAMNet(CAMNet):
    """``CAMNet`` (foreground-only CAM, no PCM) + a ``(num_classes - 1) * num_subcategories`` head.

    Sub-category ``c * K + k`` is cluster ``k`` of foreground class ``c`` (0-based, background
    excluded), the layout of SC-CAM's 200-d labels.

    ``forward(x)`` returns ``{"cam": (N, C, h, w), "sub_logits": (N, C * K)}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_subcategories: int = 10,
        dropout: float = 0.5,
        pcm: Any = None,
        background_first: bool = False,
    ):
        if pcm is not None or background_first:
            raise ValueError(
                "SC-CAM's network has no PCM and no background channel (pcm: null, background_first: false)"
            )
        super().__init__(backbone, num_classes, dropout=dropout)
        if num_subcategories < 1:
            raise ValueError(f"num_subcategories must be >= 1, got {num_subcategories}")
        self.num_subcategories = int(num_subcategories)
        in_channels = backbone.out_channels[-1]
        self.sub_classifier = nn.Conv2d(
            in_channels, (num_classes - 1) * self.num_subcategories, 1, bias=False
        )
        nn.init.xavier_uniform_(self.sub_classifier.weight)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.head.dropout(self.backbone(x)[-1])  # one dropout shared by both classifiers
        pooled = feat.mean((2, 3), keepdim=True)
        return {"cam": self.head.classifier(feat), "sub_logits": self.sub_classifier(pooled).flatten(1)}

    def sub_cam(self, x: torch.Tensor) -> torch.Tensor:
        """Sub-category activation maps (N, C * K, h, w) (dropout is inactive in eval mode)."""
        return self.sub_classifier(self.head.dropout(self.backbone(x)[-1]))
