"""Semantic-segmentation metrics from one accumulated confusion matrix.

Why a confusion matrix: it is a sufficient statistic for mIoU, pixel accuracy and mean class
accuracy, it is an integer count (so summing it across DDP ranks is exact), and it is what the
PASCAL VOC devkit accumulates. Reference definitions (VOC devkit ``VOCevalseg``):

* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``;
* ``mIoU`` is the mean over the classes that occur in the ground truth *or* the prediction of
  the evaluated set (a class with no GT pixel and no predicted pixel has ``0/0`` and is excluded);
* ``pixel_acc = sum_c TP_c / #valid pixels``; ``mean_acc`` averages ``TP_c / #GT_c`` over the
  classes present in the ground truth.

Rows of the matrix are ground truth, columns prediction; pixels whose target equals
``ignore_index`` are dropped, as are targets outside ``[0, num_classes)``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["ConfusionMatrix", "confusion_matrix", "iou_from_confusion", "scores_from_confusion",
           "foreground_scores", "per_class_table"]


def _as_labels(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Labels (B,H,W) from either labels or logits/scores (B,C,H,W), by argmax over C."""
    if preds.dim() == target.dim() + 1:
        return preds.argmax(dim=1)
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} do not match")
    return preds


_CPU_CHUNK = 1 << 15  # CPU step: temporaries stay in cache and under ATen's parallel grain (no OpenMP sync)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 255) -> torch.Tensor:
    """int64 ``num_classes x num_classes`` counts (row = GT, column = prediction).

    ``pred`` is labels of the same shape as ``target`` or scores with one more (class) dimension
    at position 1. One ``torch.bincount`` of ``target * C + pred``; pixels that are ignored or
    out of range go to an extra bin that is dropped (no boolean gathering).
    """
    c = int(num_classes)
    pred = _as_labels(pred, target).reshape(-1)
    target = target.reshape(-1)
    if pred.numel():
        lo, hi = torch.aminmax(pred)
        if lo < 0 or hi >= c:  # only predictions on valid pixels must be in range
            valid = (target >= 0) & (target < c)
            if ignore_index is not None:
                valid &= target != ignore_index
            bad = valid & ((pred < 0) | (pred >= c))
            if bool(bad.any()):
                raise ValueError(f"predicted labels must lie in [0, {c}); got {pred[bad][:5].tolist()}")
            pred = torch.where(valid, pred, 0)
    dump = c * c
    counts = torch.zeros(dump + 1, dtype=torch.long, device=target.device)
    step = _CPU_CHUNK if target.device.type == "cpu" else max(1, target.numel())
    for s in range(0, target.numel(), step):
        idx = target[s:s + step].to(torch.int64, copy=True)
        invalid = (idx < 0) | (idx >= c)
        if ignore_index is not None:
            invalid |= idx == ignore_index
        idx.mul_(c).add_(pred[s:s + step])
        idx.masked_fill_(invalid, dump)
        counts += torch.bincount(idx, minlength=dump + 1)
    return counts[:dump].reshape(c, c)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (float64); NaN for classes with neither GT nor predicted pixels."""
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def scores_from_confusion(cm: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """``mIoU``, ``pixel_acc``, ``mean_acc`` (Python floats) and ``iou`` (per-class tensor)."""
    cmd = cm.double()
    iou = iou_from_confusion(cm)
    tp, gt = cmd.diagonal(), cmd.sum(1)
    total = cmd.sum()
    present = gt > 0
    return {
        "mIoU": float(iou.nanmean()) if (~iou.isnan()).any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_acc": float((tp[present] / gt[present]).mean()) if present.any() else float("nan"),
        "iou": iou,
    }


def foreground_scores(cm: torch.Tensor) -> dict[str, float]:
    """Where a model's errors lie, which mIoU alone does not say (class 0 = background, every other
    class = object): ``fg_precision`` / ``fg_recall`` are class-agnostic (over- or under-segmentation;
    an object pixel given another object class counts as object on both sides), ``fg_class_acc`` is
    the share of the object pixels found as object that get their own class (confusion between
    object classes)."""
    cmd = cm.double()
    hit, predicted, actual = cmd[1:, 1:].sum(), cmd[:, 1:].sum(), cmd[1:, :].sum()
    return {
        "fg_precision": float(hit / predicted) if predicted > 0 else float("nan"),
        "fg_recall": float(hit / actual) if actual > 0 else float("nan"),
        "fg_class_acc": float(cmd[1:, 1:].diagonal().sum() / hit) if hit > 0 else float("nan"),
    }


class ConfusionMatrix(Metric):
    """Accumulated confusion matrix; ``compute()`` returns :func:`scores_from_confusion`.

    The state is an int64 matrix reduced with ``sum`` so the DDP-synced result equals the
    single-process one exactly.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += confusion_matrix(preds.detach(), target, self.num_classes,
                                         self.ignore_index).to(self.confmat.device)

    def compute(self) -> dict[str, torch.Tensor | float]:
        """:func:`scores_from_confusion` and :func:`foreground_scores` of the (rank-summed) matrix."""
        return {**scores_from_confusion(self.confmat), **foreground_scores(self.confmat)}


def per_class_table(result: dict, class_names: list[str] | None = None, digits: int = 2) -> str:
    """Markdown table of per-class IoU (in %) with a final mIoU row; excluded classes show ``-``."""
    iou = result["iou"]
    names = class_names if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for {len(iou)} classes")
    lines = ["| class | IoU (%) |", "|---|---:|"]
    for name, v in zip(names, iou.tolist()):
        lines.append(f"| {name} | {'-' if v != v else f'{100 * v:.{digits}f}'} |")
    lines.append(f"| **mIoU** | **{100 * result['mIoU']:.{digits}f}** |")
    return "\n".join(lines)
