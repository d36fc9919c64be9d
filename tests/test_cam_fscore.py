"""F-score of CAM labels (SC-CAM Table 2): hand-computed confusion matrix, the curve, the CAM stage report."""

from __future__ import annotations

import math

import pytest
import torch

from segexp.metrics.cam import CAMThresholdCurve
from segexp.metrics.fscore import f1_from_confusion, mean_f1
from segexp.metrics.semantic import iou_from_confusion


def test_f1_on_a_hand_computed_confusion_matrix():
    # rows = GT, columns = prediction; class 3 has neither GT nor prediction (left out of the mean)
    cm = torch.tensor([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    f1 = f1_from_confusion(cm)
    # class 0: TP 5, FP 2, FN 1 -> 10/13; class 1: TP 3, FP 1, FN 3 -> 6/10; class 2: TP 0, FP 1 -> 0
    assert f1[:3].tolist() == pytest.approx([10 / 13, 6 / 10, 0.0])
    assert math.isnan(f1[3])
    assert mean_f1(cm) == pytest.approx((10 / 13 + 0.6 + 0.0) / 3)


def test_f1_is_two_iou_over_one_plus_iou_per_class_and_bounded_by_the_miou():
    g = torch.Generator().manual_seed(0)
    cm = torch.randint(0, 50, (5, 5), generator=g)
    iou = iou_from_confusion(cm)
    assert torch.allclose(f1_from_confusion(cm), 2 * iou / (1 + iou))
    miou = float(iou.mean())
    assert mean_f1(cm) <= 2 * miou / (1 + miou) + 1e-12  # concavity: why the paper's F is not this mean


def test_f1_rejects_a_non_square_matrix_and_is_nan_when_empty():
    with pytest.raises(ValueError, match="square"):
        f1_from_confusion(torch.zeros(2, 3))
    assert math.isnan(mean_f1(torch.zeros(3, 3, dtype=torch.long)))


def test_curve_reports_the_fscore_at_the_best_miou_threshold_not_the_best_fscore():
    # one foreground class; GT 1,1,1,0,0
    cams = torch.tensor([0.5, 0.7, 0.5, 0.4, 0.7]).view(1, 1, 1, 5)
    target = torch.tensor([1, 1, 1, 0, 0]).view(1, 1, 5)
    m = CAMThresholdCurve(2, thresholds=(0.3, 0.6))
    m.update(cams, target)
    r = m.compute()
    # t=0.3: all foreground -> IoU (0, 3/5), F (0, 6/8)
    # t=0.6: preds 0,1,0,0,1 -> IoU (1/4, 1/4), F (2/5, 2/5)
    assert r["miou"].tolist() == pytest.approx([3 / 10, 1 / 4])
    assert r["fscore"].tolist() == pytest.approx([3 / 8, 2 / 5])
    assert r["best_threshold"] == 0.3 and r["best_fscore"] == pytest.approx(3 / 8)  # not the max F (2/5)
    assert m.at(0.6)["fscore"] == pytest.approx(2 / 5) and m.at(0.6)["mIoU"] == pytest.approx(1 / 4)
