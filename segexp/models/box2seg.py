"""Box2Seg network: one encoder, three heads (segmentation y, attention alpha, embeddings beta).

The paper's decoders are not specified in the available text ([MEM]: UPerNet-style). Here the
encoder is any :class:`~segexp.models.backbone.Backbone` and the segmentation branch is the
DeepLabV3+ head. ``shared_decoder: true`` (default) puts the attention and embedding heads on the
DeepLabV3+ decoder features (one decoder, three light heads: the cheap choice, and what makes the
affinity loss shape the features the classifier reads); ``false`` gives each of them its own
DeepLabV3+ decoder on the shared encoder (three decoders, as the paper describes).

Outputs (``forward(x, heads)``, a dict with the requested heads only):

* ``seg``: logits (N, L+1, H, W) at the input size;
* ``att``: attention logits (N, L, H, W) at the input size; alpha = sigmoid(att);
* ``emb``: L2-normalised embeddings (N, D, H/4, W/4) at the decoder stride.

At test time only ``seg`` is computed (:meth:`Box2SegNet.segment`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from segexp.models.backbone import Backbone
from segexp.models.deeplab import DeepLabV3PlusHead, head_for_backbone, low_level_index

__all__ = ["Box2SegNet"]

HEADS = ("seg", "att", "emb")


class _Projection(nn.Module):
    """3x3 ConvNormAct + 1x1 conv: a light head on decoder features."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.conv = ConvNormAct(in_channels, hidden, 3, norm_layer="batchnorm2d", act_layer="relu")
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x))


class Box2SegNet(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        embed_dim: int = 32,
        head_channels: int = 128,
        shared_decoder: bool = True,
        low_level_reduction: int = 4,
        aspp_rates: Sequence[int] | None = None,
        aspp_channels: int = 256,
        low_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.shared_decoder = shared_decoder
        self.low_index = low_level_index(backbone, low_level_reduction)

        def decoder(n_out: int) -> DeepLabV3PlusHead:
            return head_for_backbone(
                backbone, n_out, low_level_reduction, aspp_rates, aspp_channels=aspp_channels,
                low_channels=low_channels, decoder_channels=decoder_channels, dropout=dropout,
            )

        self.seg_head = decoder(num_classes)
        if shared_decoder:
            self.att_head = _Projection(decoder_channels, head_channels, num_classes - 1)
            self.emb_head = _Projection(decoder_channels, head_channels, embed_dim)
        else:
            self.att_head = decoder(num_classes - 1)
            self.emb_head = decoder(embed_dim)

    def forward(self, x: torch.Tensor, heads: Sequence[str] = HEADS) -> dict[str, torch.Tensor]:
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; heads are {HEADS}")
        feats = self.backbone(x)
        high, low = feats[-1], feats[self.low_index]
        size = x.shape[-2:]
        out: dict[str, torch.Tensor] = {}
        if self.shared_decoder:
            dec = self.seg_head.decode(high, low)
            if "seg" in heads:
                out["seg"] = self.seg_head.classifier(self.seg_head.drop(dec))
            if "att" in heads:
                out["att"] = self.att_head(dec)
            if "emb" in heads:
                out["emb"] = self.emb_head(dec)
        else:
            for name, head in (("seg", self.seg_head), ("att", self.att_head), ("emb", self.emb_head)):
                if name in heads:
                    out[name] = head(high, low)
        for name in ("seg", "att"):
            if name in out:
                out[name] = F.interpolate(out[name], size=size, mode="bilinear", align_corners=False)
        if "emb" in out:
            out["emb"] = F.normalize(out["emb"], dim=1)
        return out

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Test time: only the segmentation branch runs."""
        return self.forward(x, heads=("seg",))["seg"]
