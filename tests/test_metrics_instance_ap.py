"""COCO segm AP through pycocotools: perfect predictions (ids from 0), hand-computed AP values."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segexp.metrics.instance_ap import InstanceAP, masks_from_instance_map


def _instance_map():
    m = np.full((20, 30), 255, np.int64)
    m[2:8, 3:10] = 0  # an instance whose id is 0
    m[10:18, 5:25] = 1
    m[1:5, 20:28] = 7
    return m


def test_perfect_prediction_with_id_zero_is_one():
    gt = _instance_map()
    m = InstanceAP(background=255)
    m.update(torch.from_numpy(gt), [0.9, 0.8, 0.7], torch.from_numpy(gt))
    assert m.compute() == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}


def test_naive_annotation_id_zero_breaks_pycocotools():
    """Why we renumber: a GT annotation with id 0 makes its true positive count as a false positive."""
    masks, _ = masks_from_instance_map(_instance_map(), background=255)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    anns = [{"id": i, "image_id": 1, "category_id": 1, "segmentation": r, "area": float(mask_utils.area(r)),
             "bbox": mask_utils.toBbox(r).tolist(), "iscrowd": 0} for i, r in enumerate(rles)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": 1, "height": 20, "width": 30}], "annotations": anns,
                      "categories": [{"id": 1}]}
        gt.createIndex()
        dt = gt.loadRes([{"image_id": 1, "category_id": 1, "segmentation": r, "score": 0.9} for r in rles])
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] < 1.0


def test_hand_computed_recall_half():
    gt = _instance_map()
    m = InstanceAP(background=255)
    m.update(torch.from_numpy(gt), [0.9, 0.8, 0.7], torch.from_numpy(gt))
    m.update(np.zeros((0, 20, 30), bool), [], torch.from_numpy(gt))  # second image: nothing found
    # precision 1 up to recall 1/2, then nothing: 101-point AP = 51/101 at every IoU threshold
    assert m.compute()["AP50"] == pytest.approx(51 / 101)


def test_false_positive_ranked_first_and_loose_mask():
    gt = np.zeros((20, 20), np.int64)
    gt[5:15, 5:15] = 1
    fp = np.zeros((20, 20), bool)
    fp[0:3, 0:3] = True
    loose = np.zeros((20, 20), bool)
    loose[5:15, 5:13] = True  # IoU 0.8 with the GT
    m = InstanceAP()
    m.update(np.stack([fp, loose]), [0.9, 0.8], torch.from_numpy(gt))
    r = m.compute()
    # precision 1/2 at recall 1 (interpolated: 1/2 everywhere) for IoU thresholds .50-.80, missed above
    assert r["AP50"] == pytest.approx(0.5) and r["AP75"] == pytest.approx(0.5)
    assert r["AP"] == pytest.approx(0.5 * 7 / 10)


def test_no_gt_gives_nan_and_score_count_checked():
    m = InstanceAP()
    m.update(np.zeros((0, 4, 4), bool), [], np.zeros((4, 4), np.int64))
    assert np.isnan(m.compute()["AP"])
    with pytest.raises(ValueError):
        m.update(np.ones((1, 4, 4), bool), [0.5, 0.4], np.zeros((4, 4), np.int64))
