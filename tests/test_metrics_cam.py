"""CAM background-threshold curve: hand-computed case and a brute-force argmax oracle."""

from __future__ import annotations

import pytest
import torch

from segexp.metrics.cam import CAMThresholdCurve, cam_confusion_curve, max_normalise
from segexp.metrics.semantic import confusion_matrix


def test_hand_computed_curve():
    # 4 pixels, classes 1 and 2; pixel 4 ties (0.5, 0.5) -> class 1, and ties with t = 0.5 -> background
    cams = torch.tensor([[[[0.9, 0.3, 0.1, 0.5]], [[0.2, 0.6, 0.05, 0.5]]]])
    target = torch.tensor([[[1, 2, 0, 2]]])
    m = CAMThresholdCurve(3, thresholds=(0.0, 0.5, 0.7))
    m.update(cams, target)
    r = m.compute()
    # t=0: preds 1,2,1,1 -> IoU 0, 1/3, 1/2; t=0.5: preds 1,2,0,0 -> 1/2, 1, 1/2; t=0.7: 1,0,0,0 -> 1/3, 1, 0
    assert r["miou"].tolist() == pytest.approx([5 / 18, 2 / 3, 4 / 9])
    assert r["best_threshold"] == 0.5 and r["best_mIoU"] == pytest.approx(2 / 3)
    assert m.at(0.7)["mIoU"] == pytest.approx(4 / 9)


def test_matches_padded_argmax_oracle_with_ties_and_ignore():
    g = torch.Generator().manual_seed(0)
    k = 4
    cams = (torch.rand(3, k, 9, 11, generator=g) * 20).round() / 20  # many ties, also with thresholds
    cams[:, 2] = 0  # a class absent everywhere
    target = torch.randint(0, k + 1, (3, 9, 11), generator=g)
    target[:, :2] = 255
    thresholds = torch.tensor([0.0, 0.05, 0.1, 0.25, 0.3, 0.5, 0.6])
    curve = cam_confusion_curve(cams, target, thresholds)
    for j, t in enumerate(thresholds):
        padded = torch.cat([torch.full_like(cams[:, :1], float(t)), cams], 1)
        want = confusion_matrix(padded.argmax(1), target, k + 1)  # first max wins: background on ties
        assert torch.equal(curve[j], want), float(t)


def test_accumulates_over_batches():
    g = torch.Generator().manual_seed(1)
    cams = torch.rand(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 4, (4, 8, 8), generator=g)
    a, b = CAMThresholdCurve(4), CAMThresholdCurve(4)
    a.update(cams, target)
    b.update(cams[:1], target[:1])
    b.update(cams[1:], target[1:])
    assert torch.equal(a.confmats, b.confmats)
    assert len(a.compute()["miou"]) == 61


def test_max_normalise_and_validation():
    cams = torch.tensor([[[[2.0, -1.0]], [[0.0, 0.0]]]])
    n = max_normalise(cams)
    assert n[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-4) and n[0, 0, 0, 1] == 0 and n[0, 1].abs().sum() == 0
    with pytest.raises(ValueError):
        CAMThresholdCurve(3, thresholds=(0.5, 0.1))
    with pytest.raises(ValueError):
        CAMThresholdCurve(3).update(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
