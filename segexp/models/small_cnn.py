"""A small plain CNN ("small_cnn_w16/w32/w64") registered with timm: the from-scratch CPU testbed network.

ImageNet backbones (even ResNet-18) are too slow to train from random init on one CPU thread, yet
synthetic-data runs, smoke tests and method ablations need a network that learns in minutes and
still has the feature pyramid every segexp head expects. This is that network: a stride-2 stem and
four stages of conv3x3-BN-ReLU (the first conv of each stage has stride 2), so its levels have
ResNet's reductions and, at width 64, ResNet-18's channels. There are no hub weights; a local file
(``Backbone(pretrained=PATH)``) or random init only.

Feature levels (``features_only=True``; ``w`` = ``widths[0]``, e.g. 32 for ``small_cnn_w32``):

=====  =======================  ========  ================
level  ``feature_info`` module  channels  native reduction
=====  =======================  ========  ================
0      ``stem``                 w         2
1      ``stages.0``             w         4
2      ``stages.1``             2w        8
3      ``stages.2``             4w        16
4      ``stages.3``             8w        32
=====  =======================  ========  ================

``output_stride`` 2/4/8/16/32 replaces the stride of the later stages by dilation, as timm's
ResNet does, so the parameters (and the receptive field in input pixels) do not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SmallCNN", "OUTPUT_STRIDES"]

OUTPUT_STRIDES = (2, 4, 8, 16, 32)


class ConvBnReLU(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> ReLU; ``padding = dilation`` keeps the size at stride 1."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """Stem (conv3x3 stride 2) + 4 stages of ConvBnReLU blocks + timm ``ClassifierHead``.

    Args:
        widths: output channels of the 4 stages (the stem has ``stem_width``, default ``widths[0]``).
        depths: convs per stage; the first one of each stage carries its stride (or dilation).
        output_stride: 2, 4, 8, 16 or 32 (native); below 32 the later stages are dilated.
        num_classes, global_pool, drop_rate, in_chans: timm classifier conventions.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 2, 2),
        stem_width: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        output_stride: int = 32,
    ):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"SmallCNN output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if len(widths) != 4 or len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"SmallCNN needs 4 widths and 4 depths >= 1, got {widths}, {depths}")
        stem_width = widths[0] if stem_width is None else stem_width
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_stride = output_stride
        self.grad_checkpointing = False

        self.stem = ConvBnReLU(in_chans, stem_width, stride=2)
        net_stride, dilation = 2, 1
        self.feature_info = [dict(num_chs=stem_width, reduction=net_stride, module="stem")]
        stages = []
        in_chs = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            # Past the requested stride a stage keeps the resolution and dilates instead; its first
            # conv still sees the previous dilation (what the strided conv saw in input pixels).
            first_dilation = dilation
            if net_stride >= output_stride:
                stride, dilation = 1, dilation * 2
            else:
                stride, net_stride = 2, net_stride * 2
            blocks = [ConvBnReLU(in_chs, width, stride, first_dilation)]
            blocks += [ConvBnReLU(width, width, 1, dilation) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs = width
            self.feature_info.append(dict(num_chs=width, reduction=net_stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = checkpoint(stage, x, use_reentrant=False)
            return x
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    # No url / hf_hub_id: nothing can download. 64 px is the size the testbed trains at.
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 64, 64),
        pool_size=(2, 2),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stem.conv",
        classifier="head.fc",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {"small_cnn_w16": _cfg(), "small_cnn_w32": _cfg(), "small_cnn_w64": _cfg()}
)


def _create(variant: str, pretrained: bool, **kwargs) -> SmallCNN:
    if pretrained:
        raise ValueError(
            f"{variant} has no hub weights (a from-scratch testbed network); use pretrained=False or "
            "a local weights file through segexp's Backbone(pretrained=PATH)"
        )
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3, 4))
    return build_model_with_cfg(
        SmallCNN,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


@register_model
def small_cnn_w16(pretrained: bool = False, **kwargs) -> SmallCNN:
    """SmallCNN, widths (16, 32, 64, 128), depths (1, 1, 2, 2)."""
    return _create("small_cnn_w16", pretrained, **{"widths": (16, 32, 64, 128), **kwargs})


@register_model
def small_cnn_w32(pretrained: bool = False, **kwargs) -> SmallCNN:
    """SmallCNN, widths (32, 64, 128, 256), depths (1, 1, 2, 2)."""
    return _create("small_cnn_w32", pretrained, **{"widths": (32, 64, 128, 256), **kwargs})


@register_model
def small_cnn_w64(pretrained: bool = False, **kwargs) -> SmallCNN:
    """SmallCNN, widths (64, 128, 256, 512) (ResNet-18's channels), depths (1, 1, 2, 2)."""
    return _create("small_cnn_w64", pretrained, **{"widths": (64, 128, 256, 512), **kwargs})
