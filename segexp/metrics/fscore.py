"""F-score of a label map from the same confusion matrix as mIoU (SC-CAM's Table 2 "F-Score").

SC-CAM (Chang et al., CVPR 2020, Table 2) reports "mIoU and F-Score of the initial response" per
round, and neither the paper text we have nor the released code defines the F-score. Choice:
per-class F1 (the Dice score) ``F_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, averaged over the classes
the mIoU next to it averages (VOC rule of :mod:`segexp.metrics.semantic`: every class with a GT or
a predicted pixel, background included). Why: it needs nothing but the confusion matrix the CAM
evaluation already accumulates (exact under DDP), and with the same classes the two columns differ
only in the per-class measure (``F_c = 2 IoU_c / (1 + IoU_c)``).

Caveat for comparisons with the paper: ``2x / (1 + x)`` is concave, so this mean F is at most
``2 mIoU / (1 + mIoU)``; the paper's pairs (e.g. mIoU 46.8 with F 65.1, bound 63.8) exceed that
bound, so the authors averaged differently (per image, or precision and recall before the harmonic
mean, or foreground only). Compare our F-scores across rounds, not with the paper's absolute values.
"""

from __future__ import annotations

import torch

__all__ = ["f1_from_confusion", "mean_f1"]


def f1_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class F1 (float64) of a confusion matrix (row = GT, column = prediction); NaN for classes
    with neither GT nor predicted pixels."""
    cm = torch.as_tensor(cm).double()
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {tuple(cm.shape)}")
    tp = cm.diagonal()
    denom = cm.sum(0) + cm.sum(1)  # = 2 TP + FP + FN
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_f1(cm: torch.Tensor) -> float:
    """Mean per-class F1 over the classes with a GT or a predicted pixel (NaN if there is none)."""
    f1 = f1_from_confusion(cm)
    return float(f1.nanmean()) if (~f1.isnan()).any() else float("nan")
