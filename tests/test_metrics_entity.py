"""Entity matching (recall, mIoU, mBIoU) and the feature diagnostics: hand cases and loop oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segexp.metrics.boundary import boundary_iou
from segexp.metrics.entity import (
    EntityMetrics,
    EntitySimilarity,
    boundary_iou_matrix,
    entity_similarity,
    iou_matrix,
)

GT = torch.tensor([[1, 1, 2, 2]] * 4)  # left half id 1, right half id 2


def test_hand_computed_matching():
    m = EntityMetrics(iou_thresholds=(0.5, 0.6), boundary=False)
    m.update(torch.full((4, 4), 5), GT)  # one segment covering both: IoU 8/16 with each
    pred = torch.tensor([[7, 7, 7, 8]] * 4)  # IoU(1,7) = 8/12, IoU(2,7) = 4/16, IoU(2,8) = 4/8
    m2 = EntityMetrics(iou_thresholds=(0.5, 0.6), boundary=False)
    m2.update(pred, GT)
    r, r2 = m.compute(), m2.compute()
    assert r["recall@0.5"] == 1.0 and r["recall@0.6"] == 0.0 and r["mIoU"] == pytest.approx(0.5)
    assert r2["recall@0.5"] == 1.0 and r2["recall@0.6"] == 0.5
    assert r2["mIoU"] == pytest.approx((8 / 12 + 0.5) / 2)
    mat = iou_matrix(GT, pred)
    assert mat["iou"].flatten().tolist() == pytest.approx([8 / 12, 0.0, 4 / 16, 0.5])


def test_ignore_and_background():
    gt = torch.tensor([[0, 0, 3, 3], [0, 0, 3, 3], [255, 255, 3, 3]])
    pred = torch.tensor([[9, 9, 9, 4], [9, 9, 9, 4], [4, 4, 4, 4]])
    m = iou_matrix(gt, pred, ignore_index=255, gt_background=0)
    assert m["gt_ids"].tolist() == [3]  # 0 is background, 255 ignored
    # segment 3 (6 px) vs pred 4 (valid pixels: 2 + 2 = 4, 4 of them in 3) and pred 9 (6 px, 2 in 3)
    assert m["iou"].flatten().tolist() == pytest.approx([4 / 6, 2 / 10])
    m = iou_matrix(gt, pred, ignore_index=255, gt_background=0, pred_background=9)
    assert m["pred_ids"].tolist() == [4]


def test_background_zero_is_not_a_segment_by_default():
    """Bottom-up protocol (shared/methods/bottomup.md s.2, s.7): the unlabeled id 0 is not an
    entity - recall and mIoU run over the labeled GT segments only."""
    gt = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 2, 2]])
    pred = torch.tensor([[5, 5, 5, 5], [5, 6, 6, 5], [5, 6, 6, 5], [5, 5, 5, 5]])
    # GT 1 = pred 6 exactly; GT 2 (2 px) lies inside pred 5 (12 px): IoU 2/12
    r = EntityMetrics(boundary=False)
    r.update(pred, gt)
    out = r.compute()
    assert out["num_gt_segments"] == 2
    assert out["recall@0.5"] == 0.5 and out["mIoU"] == pytest.approx((1 + 2 / 12) / 2)
    # told otherwise, the 10-pixel background is a third GT segment (best match pred 5: IoU 10/12)
    r0 = EntityMetrics(boundary=False, gt_background=None, pred_background=None)
    r0.update(pred, gt)
    out0 = r0.compute()
    assert out0["num_gt_segments"] == 3
    assert out0["recall@0.5"] == pytest.approx(2 / 3)
    assert out0["mIoU"] == pytest.approx((10 / 12 + 1 + 2 / 12) / 3)
    # a predicted 0 is "no segment": a GT entity covered only by 0s is missed
    r1 = EntityMetrics(boundary=False)
    r1.update(torch.where(pred == 6, 0, pred), gt)
    assert r1.compute()["mIoU"] == pytest.approx((0 + 2 / 12) / 2)


def test_iou_matrix_loop_oracle():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (12, 15)) * 10
    pred = rng.integers(0, 4, (12, 15)) + 100
    gt[0] = 255
    m = iou_matrix(torch.from_numpy(gt), torch.from_numpy(pred), ignore_index=255)
    valid = gt != 255
    for i, a in enumerate(m["gt_ids"].tolist()):
        for j, b in enumerate(m["pred_ids"].tolist()):
            ga, pb = (gt == a) & valid, (pred == b) & valid
            assert m["iou"][i, j].item() == pytest.approx((ga & pb).sum() / (ga | pb).sum())


def test_boundary_iou_matrix_equals_pairwise_masks():
    rng = np.random.default_rng(1)
    import cv2

    gt = cv2.resize(rng.integers(0, 4, (4, 5)).astype(np.uint8), (60, 48), interpolation=cv2.INTER_NEAREST)
    pred = np.roll(gt, 2, axis=1) + 10
    pred[:, :5] = 50
    gt_t, pred_t = torch.from_numpy(gt.astype(np.int64)), torch.from_numpy(pred.astype(np.int64))
    m = iou_matrix(gt_t, pred_t)
    b = boundary_iou_matrix(gt_t, pred_t, m)
    for i, a in enumerate(m["gt_ids"].tolist()):
        for j, c in enumerate(m["pred_ids"].tolist()):
            assert b[i, j].item() == pytest.approx(boundary_iou(gt == a, pred == c)), (a, c)
    em = EntityMetrics(gt_background=None, pred_background=None)  # id 0 is a GT segment here
    em.update(pred_t, gt_t)
    best = m["iou"].argmax(1)
    want = np.mean([boundary_iou(gt == a, pred == m["pred_ids"][best[i]].item())
                    for i, a in enumerate(m["gt_ids"].tolist())])
    assert em.compute()["mBIoU"] == pytest.approx(want)


def test_similarity_hand_computed():
    # entity 0: (1,0) and (0,1) -> mean direction (1,1)/sqrt2; entity 1: (1,0) twice
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 2, 2)
    ent = torch.tensor([[[0, 0], [1, 1]]])
    r = entity_similarity(f, ent)
    s = 1 / math.sqrt(2)
    assert r["intra_sim"] == pytest.approx((2 * s + 2) / 4)
    assert r["inter_sim"] == pytest.approx(s) and r["inter_deg"] == pytest.approx(45.0)
    orth = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, -1.0]]).T.reshape(1, 2, 2, 2)
    r = entity_similarity(orth, ent)
    assert r["inter_deg"] == pytest.approx(90.0) and r["intra_deg"] == pytest.approx(0.0, abs=1e-5)
    m = EntitySimilarity()
    m.update(f, ent)
    m.update(orth, ent)
    assert m.compute()["inter_sim"] == pytest.approx(s / 2)
