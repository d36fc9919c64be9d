"""Wide ResNet-38 ("resnet38d") of AffinityNet / SEAM / SC-CAM as a timm model.

Architecture and parameter names follow ``jiwoon-ahn/psa : network/resnet38d.py`` (identical in
``YudeWang/SEAM``), so the converted MXNet ImageNet weights that users of those repositories have
(the ``state_dict`` produced by their ``convert_mxnet_to_torch`` from
``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``, keys ``conv1a.weight``, ``b2.bn_branch2a.running_mean``,
``b7.conv_branch2b2.weight``, ``bn7.weight``, ...) load with ``backbone.pretrained=/path/file.pth``
through :func:`segexp.models.backbone.load_backbone_weights`. Keys of the original classifier that the
features model lacks are reported as unexpected and ignored.

Output stride is fixed at 8 (b5 dilation 2, b6/b7 dilation 4); requesting 16/32 raises. Feature
levels (``features_only=True``), as in the released ``forward_as_dict``:

=====  ==================================  ========  ======  ===============================
level  tensor                              channels  stride  ``feature_info`` module
=====  ==================================  ========  ======  ===============================
0      output of b2_2                      128       2       ``b2_2``
1      output of b3_2                      256       4       ``b3_2``
2      ``conv4`` = ReLU(b5.bn_branch2a(.))  512       8       ``b4_5`` (BN sits in b5)
3      ``conv5`` = ReLU(b6.bn_branch2a(.))  1024      8       ``b5_2`` (BN sits in b6)
4      ``conv6`` = ReLU(bn7(b7 output))    4096      8       ``bn7``
=====  ==================================  ========  ======  ===============================

``frozen_stages=1`` of :class:`~segexp.models.backbone.Backbone` therefore freezes ``conv1a, b2, b2_1,
b2_2`` exactly as SEAM does (``resnet38_SEAM.py:27``); ``freeze_bn=true`` gives the frozen BN of the
released code. Input: ImageNet mean/std normalisation (as everywhere in segexp).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models import FeatureInfo, register_model
from torch import nn

__all__ = ["ResNet38d", "resnet38d"]

_FEATURES = (
    dict(num_chs=128, reduction=2, module="b2_2"),
    dict(num_chs=256, reduction=4, module="b3_2"),
    dict(num_chs=512, reduction=8, module="b4_5"),
    dict(num_chs=1024, reduction=8, module="b5_2"),
    dict(num_chs=4096, reduction=8, module="bn7"),
)


class ResBlock(nn.Module):
    """Pre-activation basic block (psa ``ResBlock``)."""

    def __init__(
        self,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        stride: int = 1,
        first_dilation: int | None = None,
        dilation: int = 1,
    ):
        super().__init__()
        self.same_shape = in_ch == out_ch and stride == 1
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(
            in_ch, mid_ch, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, BN-ReLU of the block input) -- the second is psa's ``x_bn_relu`` tap."""
        pre = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(pre)
        b = self.conv_branch2a(pre)
        b = self.conv_branch2b1(F.relu(self.bn_branch2b1(b)))
        return branch1 + b, pre


class ResBlockBot(nn.Module):
    """Pre-activation bottleneck block with dropout (psa ``ResBlock_bot``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(
            out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(pre)
        b = self.conv_branch2a(pre)
        b = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(b))))
        b = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(b))))
        return branch1 + b, pre


class ResNet38d(nn.Module):
    """ResNet-38 (Wu, Shen, van den Hengel), output stride 8.

    ``features_only``: ``forward`` returns the feature levels ``out_indices`` (table in the module
    docstring); otherwise it returns ``num_classes`` logits (GAP + linear ``fc``; there are no hub
    weights for this head). ``feature_info`` follows timm's ``FeatureInfo``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    ):
        super().__init__()
        self.conv1a = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)
        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)
        self.b4 = ResBlock(256, 512, 512, stride=2)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", ResBlock(512, 512, 512))
        self.b5 = ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = ResBlockBot(1024, 2048, stride=1, dilation=4, dropout=0.3)
        self.b7 = ResBlockBot(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        if any(not 0 <= i < len(_FEATURES) for i in self.out_indices):
            raise ValueError(f"out_indices must be in 0..{len(_FEATURES) - 1}, got {self.out_indices}")
        self.feature_info = FeatureInfo([dict(f) for f in _FEATURES], self.out_indices)
        self.num_classes = num_classes
        if not features_only:
            self.fc = nn.Linear(4096, num_classes)

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2"):
            x, _ = getattr(self, name)(x)
        f0 = x
        for name in ("b3", "b3_1", "b3_2"):
            x, _ = getattr(self, name)(x)
        f1 = x
        for name in ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x, _ = getattr(self, name)(x)
        x, conv4 = self.b5(x)
        x, _ = self.b5_1(x)
        x, _ = self.b5_2(x)
        x, conv5 = self.b6(x)
        x, _ = self.b7(x)
        conv6 = F.relu(self.bn7(x))
        return [f0, f1, conv4, conv5, conv6]

    def forward(self, x: torch.Tensor):
        levels = self.forward_levels(x)
        if self.features_only:
            return [levels[i] for i in self.out_indices]
        return self.fc(levels[-1].mean((2, 3)))


@register_model
def resnet38d(pretrained: bool = False, **kwargs) -> ResNet38d:
    """timm entry point: ``timm.create_model("resnet38d", features_only=True, output_stride=8)``.

    There are no hub weights: pass a local converted weights file through ``Backbone(pretrained=PATH)``.
    """
    if pretrained:
        raise ValueError(
            "resnet38d has no hub weights; give the converted MXNet weights file as "
            "backbone.pretrained=/path/to/resnet38d.pth"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_path_rate"):
        kwargs.pop(key, None)
    output_stride = kwargs.pop("output_stride", None)
    if output_stride not in (None, 8):
        raise TypeError(
            f"resnet38d has a fixed output_stride of 8 (dilated b5-b7); got output_stride={output_stride}"
        )
    kwargs.pop("feature_cfg", None)
    return ResNet38d(**kwargs)


def build_backbone(**kwargs):
    """:class:`~segexp.models.backbone.Backbone` over ``resnet38d`` (importing this module registers the
    timm entry point, so ``conf/backbone/resnet38d.yaml`` targets this function)."""
    from segexp.models.backbone import Backbone

    kwargs.setdefault("name", "resnet38d")
    return Backbone(**kwargs)
