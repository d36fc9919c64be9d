"""ConfusionMatrix / mIoU: hand-computed cases, ignore pixels, VOC exclusion rule (DDP: test_metrics_ddp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segexp.metrics.semantic import (
    ConfusionMatrix,
    confusion_matrix,
    foreground_scores,
    iou_from_confusion,
    per_class_table,
)

# GT / prediction pairs (t, p): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) and one ignored pixel.
TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
PRED = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
CM = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_confusion_matrix_hand_computed():
    assert torch.equal(confusion_matrix(PRED, TARGET, 3, 255), CM)
    # IoU_0 = 1/(2+2-1), IoU_1 = 2/(2+3-2), IoU_2 = 1/(2+1-1)
    assert torch.allclose(iou_from_confusion(CM), torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))


def test_metric_scores_hand_computed():
    m = ConfusionMatrix(3)
    m.update(PRED, TARGET)
    r = m.compute()
    assert r["mIoU"] == pytest.approx(0.5)
    assert r["pixel_acc"] == pytest.approx(4 / 6)
    assert r["mean_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # object = classes 1 and 2: 3 of the 4 object-predicted pixels are object, 3 of the 4 object pixels found
    assert (r["fg_precision"], r["fg_recall"]) == (pytest.approx(3 / 4), pytest.approx(3 / 4))
    assert r["fg_class_acc"] == 1.0  # no object pixel took another object's class
    assert m.confmat.dtype == torch.int64


def test_foreground_scores_are_class_agnostic():
    """Object predicted as another object class is still object; missed object lowers recall only."""
    cm = torch.tensor([[5, 0, 0], [1, 3, 2], [0, 0, 4]])
    assert foreground_scores(cm) == {"fg_precision": 1.0, "fg_recall": 0.9, "fg_class_acc": 7 / 9}
    over = torch.tensor([[3, 2, 0], [0, 6, 0], [0, 0, 4]])  # background predicted as object
    assert foreground_scores(over) == {"fg_precision": 10 / 12, "fg_recall": 1.0, "fg_class_acc": 1.0}
    assert math.isnan(foreground_scores(torch.tensor([[4, 0], [0, 0]]))["fg_recall"])


def test_ignore_pixels_do_not_count():
    target = TARGET.clone()
    pred = PRED.clone()
    pred[0, 1, 2:] = 1  # changing predictions on ignored pixels changes nothing
    assert torch.equal(confusion_matrix(pred, target, 3), CM)
    assert confusion_matrix(pred, target, 3).sum() == 6


def test_absent_classes_excluded_but_false_positive_classes_count():
    m = ConfusionMatrix(5)
    m.update(PRED, TARGET)
    r = m.compute()
    assert math.isnan(r["iou"][3]) and math.isnan(r["iou"][4])
    assert r["mIoU"] == pytest.approx(0.5)  # classes 3, 4: no GT, no prediction -> excluded
    pred = PRED.clone()
    pred[0, 0, 0] = 4  # class 4 predicted but absent from GT: IoU 0, and it enters the mean
    m2 = ConfusionMatrix(5)
    m2.update(pred, TARGET)
    r2 = m2.compute()
    assert r2["iou"][4] == 0
    assert r2["mIoU"] == pytest.approx((0 + 2 / 3 + 1 / 2 + 0) / 4)
    assert math.isnan(r2["iou"][3])


def test_logits_and_labels_identical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 9, 7, generator=g)
    target = torch.randint(0, 4, (3, 9, 7), generator=g)
    target[:, 0] = 255
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.confmat, b.confmat)
    assert a.compute()["mIoU"] == b.compute()["mIoU"]


def test_matches_numpy_bincount_oracle_over_batches():
    rng = np.random.default_rng(1)
    m = ConfusionMatrix(6)
    ref = np.zeros((6, 6), dtype=np.int64)
    for _ in range(4):
        t = rng.integers(0, 6, (2, 11, 13))
        t[rng.random(t.shape) < 0.1] = 255
        p = rng.integers(0, 6, (2, 11, 13))
        m.update(torch.from_numpy(p), torch.from_numpy(t))
        v = t != 255
        ref += np.bincount(t[v] * 6 + p[v], minlength=36).reshape(6, 6)
    assert np.array_equal(m.confmat.numpy(), ref)


def test_per_class_table():
    m = ConfusionMatrix(4)
    m.update(PRED, TARGET)
    table = per_class_table(m.compute(), ["bg", "cat", "dog", "cow"])
    assert "| cat | 66.67 |" in table
    assert "| cow | - |" in table
    assert "**50.00**" in table


def test_out_of_range_prediction_raises():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 3)
