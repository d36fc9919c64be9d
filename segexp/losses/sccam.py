"""SC-CAM objective (Chang et al., CVPR 2020, Eq. 3; released ``train_cls.py:264-267``).

``L = MLSM(H_p(f), Y_p) + lambda * MLSM(H_s(f), Y_s)``: multilabel soft-margin (mean over classes
of BCE-with-logits) on the parent logits against the image labels, plus ``lambda`` (5) times the
same loss on the C x K sub-category logits against the multi-hot sub-category pseudo labels.
"""

from __future__ import annotations

import torch

from segexp.losses.cam import multilabel_soft_margin

__all__ = ["sccam_losses"]


def sccam_losses(
    parent_logits: torch.Tensor,
    parent_labels: torch.Tensor,
    sub_logits: torch.Tensor,
    sub_labels: torch.Tensor,
    sub_weight: float = 5.0,
    parent_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Weighted terms ``{"cls": parent_weight * L_p, "sub": sub_weight * L_s}`` (sum = Eq. 3)."""
    if sub_logits.shape != sub_labels.shape:
        raise ValueError(
            f"sub-category logits {tuple(sub_logits.shape)} and labels {tuple(sub_labels.shape)} differ: "
            "the clustering's K must equal the network's num_subcategories"
        )
    return {
        "cls": parent_weight * multilabel_soft_margin(parent_logits, parent_labels),
        "sub": sub_weight * multilabel_soft_margin(sub_logits, sub_labels),
    }
