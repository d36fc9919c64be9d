"""IRNet (Ahn, Cho & Kwak, CVPR 2019): a class-boundary branch and a displacement-field branch on the
multi-level features of a frozen backbone, both at the stride of the backbone's level 1 (4 on ResNet).

As released (``jiwoon-ahn/irn : net/resnet50_irn.py``, ``Net``), on ResNet-50 with strides (2, 2, 2, 1):

* the backbone is not trained: its features are detached and it stays in eval mode
  (``freeze_backbone``; here its parameters are frozen and its features computed without gradient);
* boundary: per level ``1x1 conv (no bias) -> GroupNorm(4, 32) -> bilinear upsampling to the stride of
  level 1 -> ReLU`` (32 channels each), concatenated, ``1x1 conv -> 1`` with bias (logits);
* displacement: ``1x1 conv -> GN -> ReLU`` on level 0 (64 ch, GN 8) and level 1 (128, GN 16); 256 channels
  (GN 16) on every deeper level, upsampled to the stride of level 2 and concatenated, ``1x1 -> 256, GN,
  upsampling to level 1's stride, ReLU``; with levels 0 and 1: ``1x1 -> 256, GN, ReLU, 1x1 -> 2`` (no bias),
  then the mean shift (a buffer subtracted in eval mode, filled after training by the release);
* level 0 is the stem *after* ResNet's max pool (the release's ``stage1``); a backbone whose level 0
  has half the stride of level 1 (timm's ResNet ``act1``, small_cnn's stem) gets that max pool
  (3x3, stride 2, padding 1) here, which on ResNet is exactly the release's feature;
* all new layers keep PyTorch's default initialisation (the release sets none).

Differences: the release's ResNet-50 runs layer4 at stride 1 *without* dilation; a segexp ResNet-50
at ``output_stride: 16`` dilates it (timm's rule). Any number of levels >= 3 works (the release has 5;
the boundary head then has ``32 x levels`` inputs and the deep displacement head ``256 x (levels - 2)``),
so a 4-level small_cnn (``cam_shapes``) runs too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IRNet", "MeanShift"]

EDGE_DIM, EDGE_GROUPS = 32, 4  # fc_edge1..5
DP_DIMS = ((64, 8), (128, 16))  # fc_dp1 (level 0), fc_dp2 (level 1): (channels, GroupNorm groups)
DP_DEEP, DP_GROUPS = 256, 16  # fc_dp3..7


class Branch(nn.Sequential):
    """``1x1 conv (no bias) -> GroupNorm -> [bilinear x factor] -> ReLU`` (the release's fc_edge / fc_dp)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, factor: int = 1):
        layers = [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.GroupNorm(groups, out_ch)]
        if factor > 1:
            layers.append(nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False))
        super().__init__(*layers, nn.ReLU(inplace=True))


class MeanShift(nn.Module):
    """Subtracts ``running_mean`` (the mean displacement, release ``Net.MeanShift``) in eval mode only."""

    def __init__(self, num_features: int = 2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else x - self.running_mean.view(1, -1, 1, 1)


def _crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x[..., : like.shape[-2], : like.shape[-1]]


class IRNet(nn.Module):
    """``forward(x) -> (boundary logits (N, 1, h, w), displacement (N, 2, h, w))`` at stride ``self.stride``.

    Args:
        backbone: a :class:`~segexp.models.backbone.Backbone` with at least 3 feature levels.
        freeze_backbone: the release's frozen, eval-mode backbone (true); false trains it too.
    """

    def __init__(self, backbone: nn.Module, freeze_backbone: bool = True):
        super().__init__()
        ch, red = list(backbone.out_channels), list(backbone.reductions)
        if len(ch) < 3:
            raise ValueError(
                f"IRNet needs >= 3 backbone feature levels, got {len(ch)} (backbone.out_indices)"
            )
        if red[0] not in (red[1], red[1] // 2):
            raise ValueError(f"IRNet: level 0 stride {red[0]} is neither level 1's ({red[1]}) nor half of it")
        self.backbone = backbone
        self.freeze_backbone = bool(freeze_backbone)
        self.pool_stem = red[0] < red[1]
        self.stride = red[1]
        if self.freeze_backbone:
            backbone.requires_grad_(False)
        self.edge_layers = nn.ModuleList(
            [Branch(c, EDGE_DIM, EDGE_GROUPS, r // red[1]) for c, r in zip(ch, red)]
            + [nn.Conv2d(EDGE_DIM * len(ch), 1, 1, bias=True)]
        )
        deep = [Branch(ch[2], DP_DEEP, DP_GROUPS)]
        deep += [Branch(c, DP_DEEP, DP_GROUPS, r // red[2]) for c, r in zip(ch[3:], red[3:])]
        self.mean_shift = MeanShift(2)
        self.dp_layers = nn.ModuleList(
            [Branch(ch[k], d, g) for k, (d, g) in enumerate(DP_DIMS)]
            + deep
            + [
                Branch(DP_DEEP * len(deep), DP_DEEP, DP_GROUPS, red[2] // red[1]),
                nn.Sequential(
                    nn.Conv2d(sum(d for d, _ in DP_DIMS) + DP_DEEP, DP_DEEP, 1, bias=False),
                    nn.GroupNorm(DP_GROUPS, DP_DEEP),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(DP_DEEP, 2, 1, bias=False),
                    self.mean_shift,
                ),
            ]
        )

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feats = list(self.backbone(x))
        if self.pool_stem:
            feats[0] = F.max_pool2d(feats[0], 3, 2, 1)
        return feats

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        *edge_branches, edge_head = self.edge_layers
        edges = [branch(f) for branch, f in zip(edge_branches, feats)]
        edges = [edges[0]] + [_crop(e, edges[1]) for e in edges[1:]]
        boundary = edge_head(torch.cat(edges, 1))

        dp1, dp2, *deep_branches, dp_up, dp_head = self.dp_layers
        deep = [branch(f) for branch, f in zip(deep_branches, feats[2:])]
        deep = [_crop(d, deep[0]) for d in deep]
        up = _crop(dp_up(torch.cat(deep, 1)), feats[1])
        disp = dp_head(torch.cat([dp1(feats[0]), dp2(feats[1]), up], 1))
        return boundary, disp

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # the release's Net.train: BatchNorm statistics stay fixed
        return self
