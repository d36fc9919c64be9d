"""CAM / pseudo-label quality: mIoU of CAMs against a constant background score.

Protocol (SEAM, Wang et al. CVPR 2020; FBR and most WSSS papers follow it): the foreground
CAMs of an image (``K`` classes, each scaled to [0, 1], zero for classes absent from the image
label) are stacked under a constant background score ``t``; the label is
``argmax([t, cam_1, ..., cam_K])`` (ties go to the background, as ``np.argmax`` over the padded
array does), and mIoU is computed from the confusion matrix with the VOC rules of
:mod:`segexp.metrics.semantic`. The background-threshold curve evaluates many ``t`` at once.

**Caveat to report:** ``best_threshold`` is chosen on the very split that is evaluated, as SEAM's
``eval.py`` and FBR do; the resulting "best mIoU" is therefore optimistic. Report it as such, or
fix ``t`` on a held-out split and read the curve at that ``t``.

Next to mIoU the curve gives the mean per-class F-score (:mod:`segexp.metrics.fscore`, same classes)
at every threshold; ``best_fscore`` is the F-score at the best-mIoU threshold, not the curve's
maximum F, so the two numbers describe one labelling (SC-CAM's Table 2 pairs them that way).

Single pass: a pixel with max CAM ``m`` and arg-max class ``k`` predicts ``k + 1`` for every
``t < m`` and background otherwise, so one ``bincount`` over (number of thresholds below ``m``,
GT, ``k + 1``) plus cumulative sums gives the exact confusion matrix at every threshold.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from segexp.metrics.fscore import mean_f1
from segexp.metrics.semantic import scores_from_confusion

__all__ = ["CAMThresholdCurve", "cam_confusion_curve", "curve_scores", "max_normalise", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(61))  # 0.00, 0.01, ..., 0.60


def max_normalise(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU then divide each (image, class) map by its maximum -- the usual CAM scaling."""
    cams = cams.clamp(min=0)
    return cams / (cams.flatten(2).amax(-1)[..., None, None] + eps)


def cam_confusion_curve(cams: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor,
                        ignore_index: int | None = 255) -> torch.Tensor:
    """Confusion matrices (T, K+1, K+1), one per background threshold, for CAMs (B,K,H,W).

    Class 0 is background; CAM channel ``k`` is class ``k + 1``. ``thresholds`` must be sorted.
    """
    if cams.dim() != 4 or cams.shape[0] != target.shape[0] or cams.shape[2:] != target.shape[1:]:
        raise ValueError(f"cams {tuple(cams.shape)} must be (B,K,H,W) matching target {tuple(target.shape)}")
    k = cams.shape[1]
    c = k + 1
    n_thr = thresholds.numel()
    top, arg = cams.max(dim=1)
    target = target.long()
    valid = (target >= 0) & (target < c)
    if ignore_index is not None:
        valid &= target != ignore_index
    top, arg, target = top[valid], arg[valid] + 1, target[valid]
    # number of thresholds strictly below the top score: the pixel is foreground for those
    below = torch.searchsorted(thresholds.to(top.dtype).contiguous(), top.contiguous(), right=False)
    idx = (below * c + target) * c + arg
    hist = torch.bincount(idx, minlength=(n_thr + 1) * c * c).view(n_thr + 1, c, c)
    # foreground part at threshold j: pixels with below > j
    fg = hist.flip(0).cumsum(0).flip(0)[1:]
    # background part at threshold j: pixels with below <= j, all predicted 0
    bg = hist.sum(2).cumsum(0)[:n_thr]
    fg[:, :, 0] += bg
    return fg


def curve_scores(confmats: torch.Tensor, thresholds: torch.Tensor) -> dict:
    """Scores of a background-threshold curve from its confusion matrices (T, K+1, K+1): what
    :meth:`CAMThresholdCurve.compute` returns (the CAM export stage sums per-image curves itself)."""
    confmats = torch.as_tensor(confmats)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    results = [scores_from_confusion(cm) for cm in confmats]
    miou = torch.tensor([r["mIoU"] for r in results], dtype=torch.float64)
    fscore = torch.tensor([mean_f1(cm) for cm in confmats], dtype=torch.float64)
    best = int(torch.nan_to_num(miou, nan=-1.0).argmax())
    return {
        "thresholds": thresholds.clone(),
        "miou": miou,
        "fscore": fscore,
        "best_threshold": float(thresholds[best]),
        "best_mIoU": float(miou[best]),
        "best_fscore": float(fscore[best]),
        "best": results[best],
    }


class CAMThresholdCurve(Metric):
    """mIoU of CAMs versus the background threshold, accumulated in one pass.

    ``update(cams, target)``: CAMs (B,K,H,W) in [0,1] (see :func:`max_normalise`), target
    (B,H,W) with classes 0..K (0 = background). ``compute()`` returns ``thresholds``, ``miou``
    (per threshold), ``fscore`` (mean per-class F1 per threshold), ``best_threshold``, ``best_mIoU``,
    ``best_fscore`` (F at that threshold) and the full scores at the best threshold (``best`` -- see
    :func:`segexp.metrics.semantic.scores_from_confusion`). The best threshold is picked on the
    evaluated data itself (see the module docstring).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, thresholds=DEFAULT_THRESHOLDS, ignore_index: int | None = 255,
                 **kwargs):
        super().__init__(**kwargs)
        thr = torch.as_tensor(thresholds, dtype=torch.float64)
        if thr.dim() != 1 or not bool((thr[1:] > thr[:-1]).all()):
            raise ValueError("thresholds must be a strictly increasing 1-D sequence")
        self.num_classes = int(num_classes)  # including background
        self.ignore_index = ignore_index
        self.register_buffer("thresholds", thr, persistent=False)
        self.add_state("confmats", default=torch.zeros(len(thr), num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, cams: torch.Tensor, target: torch.Tensor) -> None:
        if cams.shape[1] != self.num_classes - 1:
            raise ValueError(f"expected {self.num_classes - 1} foreground CAM channels, got {cams.shape[1]}")
        self.confmats += cam_confusion_curve(cams.detach(), target, self.thresholds, self.ignore_index)

    def compute(self) -> dict:
        return curve_scores(self.confmats, self.thresholds)

    def at(self, threshold: float) -> dict:
        """Scores (and ``fscore``) at one of the configured thresholds (e.g. one fixed on a held-out
        split)."""
        hit = (self.thresholds - threshold).abs() < 1e-9
        if not bool(hit.any()):
            raise KeyError(f"threshold {threshold} is not on the curve")
        cm = self.confmats[int(hit.nonzero()[0])]
        return {**scores_from_confusion(cm), "fscore": mean_f1(cm)}
