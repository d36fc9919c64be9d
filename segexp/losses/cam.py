"""Image-level classification loss of CAM networks: GAP over the CAM, multilabel soft-margin.

``F.multilabel_soft_margin_loss`` = mean over classes (and images) of BCE-with-logits, the loss of
psa's ``resnet38_cls`` and of SEAM's ``L_cls``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gap_logits", "multilabel_soft_margin"]


def gap_logits(cam: torch.Tensor) -> torch.Tensor:
    """Image logits (N, C) = global average of the CAM (N, C, h, w)."""
    return cam.mean((2, 3))


def multilabel_soft_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin loss of logits (N, C) against multi-hot labels (N, C)."""
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))
