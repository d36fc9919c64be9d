"""LDF losses (Wei et al., CVPR 2020; released code ``weijun88/LDF``, ``train-*/train.py``).

Per iteration k of the feature-interaction network (``shared/methods/ldf.md`` section 4)::

    l_k = BCE(b_k, B) + BCE(d_k, D) + BCE(s_k, G) + IoU(s_k, G),   L = (l_1 + l_2) / 2

with mean-reduced BCE-with-logits (body/detail targets are soft, in [0, 1]) and the per-image
soft IoU ``1 - (sum sigma(s) G + 1) / (sum sigma(s) + sum G - sum sigma(s) G + 1)`` averaged over
the batch. Only the saliency output gets the IoU term.

The supervision ablation of the paper's Table 5 (Body+Detail, Body+Edge, Sal+Detail, Sal+Edge) only
changes which maps are the targets of the two branches; that choice is made where the targets are
built (the method), the loss just takes two branch targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["iou_loss", "bce_iou_loss", "LDFLoss"]


def iou_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft IoU loss of the released code (``iou_loss``): +1 smoothing, per image, batch mean."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    if valid is not None:
        p, t = p * valid, t * valid
    dims = tuple(range(1, p.dim()))
    inter = (p * t).sum(dims)
    union = (p + t).sum(dims) - inter
    return (1 - (inter + 1) / (union + 1)).mean()


def _bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return (per_pixel * valid).sum() / valid.expand_as(per_pixel).sum().clamp(min=1)


def bce_iou_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE + IoU on one saliency map (the structure loss of the saliency head)."""
    return _bce(logits, target, valid) + iou_loss(logits, target, valid)


class LDFLoss(nn.Module):
    """Loss over the six LDF outputs.

    ``forward(outputs, targets, valid=None)``: ``outputs`` = (b1, d1, s1, b2, d2, s2) logits (B,1,H,W)
    at the target size; ``targets`` = dict with ``branch1`` (body or saliency), ``branch2`` (detail or
    edge) and ``saliency``, each (B,1,H,W) in [0, 1]. Returns the named terms already weighted and
    averaged over the iterations (their sum is L).
    """

    def __init__(
        self,
        body_weight: float = 1.0,  # train.py: loss = bce(outb, body) + bce(outd, detail) + ...  (all 1)
        detail_weight: float = 1.0,
        sal_bce_weight: float = 1.0,
        sal_iou_weight: float = 1.0,  # iou_loss on the saliency output only
        iteration_weights: Sequence[float] = (0.5, 0.5),  # (loss1 + loss2) / 2
    ):
        super().__init__()
        self.weights = {"body": body_weight, "detail": detail_weight, "sal_bce": sal_bce_weight,
                        "sal_iou": sal_iou_weight}
        self.iteration_weights = tuple(iteration_weights)

    def forward(
        self,
        outputs: Sequence[torch.Tensor],
        targets: dict[str, torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        n_iter = len(outputs) // 3
        if n_iter != len(self.iteration_weights):
            raise ValueError(f"{len(outputs)} outputs but {len(self.iteration_weights)} iteration weights")
        terms: dict[str, torch.Tensor] = {}
        for k, w in enumerate(self.iteration_weights):
            b, d, s = outputs[3 * k : 3 * k + 3]
            parts = {
                "body": _bce(b, targets["branch1"], valid),
                "detail": _bce(d, targets["branch2"], valid),
                "sal_bce": _bce(s, targets["saliency"], valid),
                "sal_iou": iou_loss(s, targets["saliency"], valid),
            }
            for name, value in parts.items():
                value = w * self.weights[name] * value
                terms[name] = terms[name] + value if name in terms else value
        return terms
