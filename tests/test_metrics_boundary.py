"""Boundary IoU: hand-computed bands, and the authors' definition (pad + 3x3 erosion d times) as oracle."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from segexp.metrics.boundary import (
    BoundaryIoU,
    boundary_iou,
    dilation_pixels,
    label_boundaries,
    mask_to_boundary,
)


def reference_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The paper's definition, spelled out: 1-pixel zero pad, 3x3 erosion repeated d times."""
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1]
    return (mask.astype(np.uint8) - eroded) > 0


def test_band_width():
    assert dilation_pixels(10, 10) == 1  # 0.28 -> at least 1
    assert dilation_pixels(200, 300) == 7  # 0.02 * 360.6 = 7.2
    assert dilation_pixels(3, 4, dilation_ratio=0.5) == 2  # 2.5 rounds half to even


def test_hand_computed_squares():
    gt = np.zeros((10, 10), bool)
    gt[2:8, 2:8] = True  # 6x6, d = 1: ring of 36 - 16 = 20 pixels
    assert mask_to_boundary(gt).sum() == 20
    pred = np.zeros((10, 10), bool)
    pred[2:8, 3:9] = True  # shifted one column: rings share 5 + 5 pixels on the top and bottom rows
    assert boundary_iou(gt, pred) == pytest.approx(10 / 30)
    full = np.ones((10, 10), bool)  # the image border is a boundary: ring of 100 - 64
    assert mask_to_boundary(full).sum() == 36
    assert boundary_iou(np.zeros((5, 5)), np.zeros((5, 5))) == 1.0


@pytest.mark.parametrize("shape", [(50, 70), (120, 90), (33, 200)])
def test_matches_reference_definition(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        small = rng.random((shape[0] // 8 + 1, shape[1] // 8 + 1)) < 0.5
        mask = cv2.resize(small.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
        assert np.array_equal(mask_to_boundary(mask), reference_boundary(mask))
        other = np.roll(mask, 3, axis=1)
        gb, pb = reference_boundary(mask), reference_boundary(other)
        want = (gb & pb).sum() / (gb | pb).sum()
        assert boundary_iou(mask, other) == pytest.approx(want)


def test_label_boundaries_equal_per_segment_boundaries():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 6, (7, 9)).astype(np.uint8)
    labels = cv2.resize(small, (90, 70), interpolation=cv2.INTER_NEAREST)
    labels = labels.astype(np.int64) * 1000  # non-contiguous, non-uint8 ids
    d = dilation_pixels(*labels.shape)
    got = label_boundaries(labels, d)
    want = np.zeros_like(got)
    for v in np.unique(labels):
        want |= reference_boundary(labels == v)
    assert np.array_equal(got, want)


def test_metric_mean_over_images():
    gt = np.zeros((2, 10, 10), bool)
    gt[:, 2:8, 2:8] = True
    pred = gt.copy()
    pred[1] = np.roll(pred[1], 1, axis=1)
    m = BoundaryIoU()
    m.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert float(m.compute()) == pytest.approx((1 + 1 / 3) / 2)
    assert math.isfinite(float(m.compute()))
