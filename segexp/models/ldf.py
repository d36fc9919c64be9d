"""LDF feature interaction network (Wei et al., CVPR 2020; ``weijun88/LDF : train-*/net.py : LDF``).

Layout (``shared/methods/ldf.md`` section 3):

* encoder: the backbone's four stages at strides 4/8/16/32 (ResNet-50 layer1..layer4);
* per branch (body ``b``, detail ``d``) and stage: 1x1 conv -> C, 3x3 conv C, BN, ReLU;
* one decoder per branch, shared by both iterations: top-down from stride 32,
  ``o0 = CBR(x5 + g5)``, upsample, ``o1 = CBR(x4 + g4 + o0)``, ..., ``o3 = CBR(x2 + g2 + o2)``
  (stride 4; ``g`` = feedback of the interaction encoder, 0 in iteration 1);
* interaction encoder: concat(o3_b, o3_d) -> CBR C at stride 4, max-pool x3 with a CBR each to
  strides 8/16/32, then one CBR per scale and branch -> feedback (g_b, g_d);
* heads: body/detail 3x3 C -> 1, saliency 3x3 2C -> C, BN, ReLU, 3x3 C -> 1 on concat(body, detail);
* six logit maps (b1, d1, s1, b2, d2, s2), bilinearly upsampled to the input (or ``shape``).

Kaiming-normal (fan_in, ReLU) init of the new convs, BN weight 1 / bias 0. ``frozen_stem``
excludes the stem conv/BN weights from training as the released code does (it leaves
``bkbone.conv1``/``bkbone.bn1`` out of the optimiser; the BN stays in train mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.models.backbone import Backbone

__all__ = ["LDFNet"]


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _Decoder(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.convs = nn.ModuleList([_cbr(c, c) for _ in range(4)])

    def forward(self, feats: Sequence[torch.Tensor], feedback: Sequence[torch.Tensor] | None = None):
        """``feats``/``feedback`` ordered deepest first (stride 32, 16, 8, 4)."""
        out = None
        for i, (conv, x) in enumerate(zip(self.convs, feats)):
            if feedback is not None:  # sizes differ only for inputs not divisible by 32
                g = feedback[i]
                x = x + (g if g.shape[-2:] == x.shape[-2:] else _up(g, x.shape[-2:]))
            if out is not None:
                x = x + _up(out, x.shape[-2:])
            out = conv(x)
        return out


class _InteractionEncoder(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.down = nn.ModuleList([_cbr(2 * c, c)] + [_cbr(c, c) for _ in range(3)])
        self.to_body = nn.ModuleList([_cbr(c, c) for _ in range(4)])
        self.to_detail = nn.ModuleList([_cbr(c, c) for _ in range(4)])

    def forward(self, x: torch.Tensor):
        scales = []
        for i, conv in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = conv(x)
            scales.append(x)  # strides 4, 8, 16, 32
        body = [m(s) for m, s in zip(self.to_body, scales)][::-1]
        detail = [m(s) for m, s in zip(self.to_detail, scales)][::-1]
        return body, detail


class LDFNet(nn.Module):
    def __init__(self, backbone: Backbone, channels: int = 64, iterations: int = 2, frozen_stem: bool = True):
        super().__init__()
        if len(backbone.out_channels) < 4:
            raise ValueError("LDF needs four backbone stages (out_indices [1, 2, 3, 4] for a ResNet)")
        if iterations < 1:
            raise ValueError("iterations must be >= 1")
        self.backbone = backbone
        self.iterations = iterations
        c = channels
        in_chs = backbone.out_channels[-4:]  # strides 4, 8, 16, 32

        def lateral(cin: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, c, 1), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c),
                                 nn.ReLU(inplace=True))

        self.lateral_b = nn.ModuleList([lateral(ch) for ch in in_chs])
        self.lateral_d = nn.ModuleList([lateral(ch) for ch in in_chs])
        self.decoder_b = _Decoder(c)
        self.decoder_d = _Decoder(c)
        self.encoder = _InteractionEncoder(c)
        self.head_b = nn.Conv2d(c, 1, 3, padding=1)
        self.head_d = nn.Conv2d(c, 1, 3, padding=1)
        self.head_s = nn.Sequential(
            nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, 1, 3, padding=1),
        )
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if frozen_stem:
            body = backbone.body
            for attr in ("conv1", "bn1"):
                if hasattr(body, attr):
                    for p in getattr(body, attr).parameters():
                        p.requires_grad_(False)

    def forward(self, x: torch.Tensor, shape=None) -> tuple[torch.Tensor, ...]:
        feats = self.backbone(x)[-4:]
        fb = [m(f) for m, f in zip(self.lateral_b, feats)][::-1]  # deepest first
        fd = [m(f) for m, f in zip(self.lateral_d, feats)][::-1]
        shape = x.shape[-2:] if shape is None else shape
        outputs: list[torch.Tensor] = []
        gb = gd = None
        for k in range(self.iterations):
            ob = self.decoder_b(fb, gb)
            od = self.decoder_d(fd, gd)
            cat = torch.cat([ob, od], dim=1)
            outputs += [_up(self.head_b(ob), shape), _up(self.head_d(od), shape)]
            outputs.append(_up(self.head_s(cat), shape))
            if k + 1 < self.iterations:
                gb, gd = self.encoder(cat)
        return tuple(outputs)
