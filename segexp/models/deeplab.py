"""DeepLabV3+ (Chen et al., 2018): ASPP on the deepest features, a light decoder with a stride-4 skip.

The head only sees feature maps, never the backbone, so any `Backbone` works and other methods
reuse the backbone with their own heads. `DeepLabV3Plus` is the convenience pairing that picks the
two feature levels it needs and upsamples logits to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, create_act_layer
from torch import nn

from segexp.models.backbone import Backbone

__all__ = ["ASPP", "DeepLabV3Plus", "DeepLabV3PlusHead", "default_aspp_rates"]


def default_aspp_rates(output_stride: int, base: Sequence[int] = (6, 12, 18)) -> tuple[int, ...]:
    """ASPP rates quoted at output stride 16, scaled to ``output_stride`` (doubled at 8, halved at 32)
    so each branch keeps the same field of view in image pixels."""
    return tuple(max(1, r * 16 // output_stride) for r in base)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one dilated 3x3 branch per rate and an
    image-pooling branch, concatenated and projected.

    The pooling branch has a biased 1x1 conv and no norm: its input is 1x1 per image, so a
    BatchNorm there cannot train with batch size 1 (and its per-batch statistics are meaningless
    for small batches anyway).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.1,
        norm_layer: str = "batchnorm2d",
        act_layer: str = "relu",
    ):
        super().__init__()
        self.rates = tuple(rates)
        conv = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.convs = nn.ModuleList(
            [ConvNormAct(in_channels, out_channels, 1, **conv)]
            + [ConvNormAct(in_channels, out_channels, 3, dilation=r, **conv) for r in self.rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=True),
            create_act_layer(act_layer, inplace=True),
        )
        self.project = ConvNormAct((len(self.rates) + 2) * out_channels, out_channels, 1, **conv)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [conv(x) for conv in self.convs]
        branches.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.drop(self.project(torch.cat(branches, dim=1)))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on ``high`` + a 1x1-reduced ``low`` skip + two 3x3 convs -> logits at the stride of ``low``.

    ``rates`` are used as given; see :func:`default_aspp_rates` for the stride-dependent default.
    ``dropout`` follows the ASPP projection (the reference implementation); ``classifier_dropout``
    sits before the final 1x1 (mmseg's place for it).
    """

    def __init__(
        self,
        in_channels_high: int,
        in_channels_low: int,
        num_classes: int,
        aspp_channels: int = 256,
        low_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
        rates: Sequence[int] = (6, 12, 18),
        classifier_dropout: float = 0.0,
        norm_layer: str = "batchnorm2d",
        act_layer: str = "relu",
    ):
        super().__init__()
        conv = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.aspp = ASPP(in_channels_high, aspp_channels, rates, dropout, norm_layer, act_layer)
        self.low_proj = ConvNormAct(in_channels_low, low_channels, 1, **conv)
        self.decoder = nn.Sequential(
            ConvNormAct(aspp_channels + low_channels, decoder_channels, 3, **conv),
            ConvNormAct(decoder_channels, decoder_channels, 3, **conv),
        )
        self.drop = nn.Dropout(classifier_dropout)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def decode(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Decoder features before the classifier (for projection / auxiliary heads)."""
        x = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([x, self.low_proj(low)], dim=1))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.decode(high, low)))


def low_level_index(backbone: Backbone, low_level_reduction: int) -> int:
    """Index of the backbone output used as the decoder's skip (first at that stride, not the last)."""
    reductions = list(backbone.reductions)
    if low_level_reduction not in reductions[:-1]:
        raise ValueError(
            f"backbone {backbone.name!r} has no feature at stride {low_level_reduction} before its last "
            f"output (reductions {reductions}); set low_level_reduction or out_indices"
        )
    return reductions.index(low_level_reduction)


def head_for_backbone(
    backbone: Backbone,
    num_classes: int,
    low_level_reduction: int = 4,
    aspp_rates: Sequence[int] | None = None,
    **head_kwargs,
) -> DeepLabV3PlusHead:
    """A DeepLabV3+ head sized for ``backbone``: its channels, its skip stride, ASPP rates scaled to
    its output stride unless given. Methods with several heads on one backbone call this per head."""
    low = low_level_index(backbone, low_level_reduction)
    rates = tuple(aspp_rates) if aspp_rates is not None else default_aspp_rates(backbone.reductions[-1])
    return DeepLabV3PlusHead(
        in_channels_high=backbone.out_channels[-1],
        in_channels_low=backbone.out_channels[low],
        num_classes=num_classes,
        rates=rates,
        **head_kwargs,
    )


class DeepLabV3Plus(nn.Module):
    """`Backbone` + `DeepLabV3PlusHead` + bilinear upsampling of the logits to the input size.

    High-level features are the backbone's last output; the skip is the first output at stride
    ``low_level_reduction``. ``aspp_rates=None`` picks (6, 12, 18) scaled to the stride of the
    high-level features (12, 24, 36 at output stride 8).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        low_level_reduction: int = 4,
        aspp_rates: Sequence[int] | None = None,
        aspp_channels: int = 256,
        low_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
        classifier_dropout: float = 0.0,
        norm_layer: str = "batchnorm2d",
        act_layer: str = "relu",
    ):
        super().__init__()
        self.backbone = backbone
        self.low_index = low_level_index(backbone, low_level_reduction)
        self.head = head_for_backbone(
            backbone,
            num_classes,
            low_level_reduction,
            aspp_rates,
            aspp_channels=aspp_channels,
            low_channels=low_channels,
            decoder_channels=decoder_channels,
            dropout=dropout,
            classifier_dropout=classifier_dropout,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        logits = self.head(features[-1], features[self.low_index])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
