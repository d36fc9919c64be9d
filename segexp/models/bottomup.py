"""Feature generator of the bottom-up entity segmentation: encoder + RefineNet-style decoder.

The paper (Sec. 3.6) uses the encoder-decoder of Xian et al. with a ConvNeXt-B encoder, four
chained RefineNet fusion blocks as the decoder (as in MiDaS, Ranftl et al.) and three conv layers
up to the input resolution, ending in ``tanh``: a D = 128 map per pixel. With 256 decoder
channels and ``convnext_base`` this has ~102M parameters, the paper's ~101M.

* ``ResidualConvUnit``: x + conv(relu(conv(relu(x)))) (3x3 convs, RefineNet's RCU).
* ``FusionBlock``: the deeper path (upsampled to the skip's size, so dilated backbones work too)
  plus ``RCU(skip)``, then another RCU and a 1x1 projection.
* inputs are padded to a multiple of the encoder stride and the output cropped back.
* head: 3x3 conv to C/2, bilinear upsampling to the input size, 3x3 conv to 32 + ReLU, 1x1 conv
  to D, ``tanh``. The output is *raw* (the unit-length regulariser acts on it); normalise it to
  get the projective features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segexp.models.backbone import Backbone

__all__ = ["BottomUpNet", "FusionBlock", "ResidualConvUnit", "RefineDecoder"]


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return (
        x
        if x.shape[-2:] == tuple(size)
        else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels)
        self.out_unit = ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, skip: torch.Tensor, deeper: torch.Tensor | None = None) -> torch.Tensor:
        x = self.skip_unit(skip)
        if deeper is not None:
            x = x + _up(deeper, skip.shape[-2:])
        return self.project(self.out_unit(x))


class RefineDecoder(nn.Module):
    """Four chained fusion blocks over the four deepest backbone levels (deepest first)."""

    def __init__(self, in_channels: list[int], channels: int = 256):
        super().__init__()
        if len(in_channels) < 4:
            raise ValueError(
                f"the RefineNet decoder needs 4 feature levels, the backbone gives {len(in_channels)}; "
                "set backbone.out_indices"
            )
        self.in_channels = list(in_channels[-4:])
        self.adapt = nn.ModuleList(nn.Conv2d(c, channels, 3, padding=1, bias=False) for c in self.in_channels)
        self.fuse = nn.ModuleList(FusionBlock(channels) for _ in self.in_channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = [adapt(f) for adapt, f in zip(self.adapt, features[-4:])]
        x = None
        for level, fuse in zip(reversed(levels), reversed(self.fuse)):
            x = fuse(level, x)
        return x


class BottomUpNet(nn.Module):
    """Image (B,3,H,W) -> raw features (B,D,H,W) in (-1, 1) (``tanh``), not yet unit length."""

    def __init__(
        self, backbone: Backbone, embed_dim: int = 128, decoder_channels: int = 256, head_channels: int = 32
    ):
        super().__init__()
        self.backbone = backbone
        self.decoder = RefineDecoder(list(backbone.out_channels), decoder_channels)
        self.head_in = nn.Conv2d(decoder_channels, decoder_channels // 2, 3, padding=1)
        self.head_mid = nn.Conv2d(decoder_channels // 2, head_channels, 3, padding=1)
        self.head_out = nn.Conv2d(head_channels, embed_dim, 1)
        self.embed_dim = embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # pad (bottom/right, replicated) to a multiple of the encoder's stride: any input size
        # works, small multi-resolution levels included; the output is cropped back
        h, w = images.shape[-2:]
        div = max(self.backbone.reductions)
        padded = (
            F.pad(images, (0, -w % div, 0, -h % div), mode="replicate") if (h % div or w % div) else images
        )
        x = self.decoder(self.backbone(padded))
        x = _up(self.head_in(x), padded.shape[-2:])
        x = self.head_out(F.relu(self.head_mid(x)))
        return torch.tanh(x[..., :h, :w])
