"""ConfusionMatrix / mIoU: hand-computed cases, ignore pixels, VOC exclusion rule, DDP exactness."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segexp.metrics.semantic import ConfusionMatrix, confusion_matrix, iou_from_confusion, per_class_table

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
    assert m.confmat.dtype == torch.int64


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


# --- DDP: 2 gloo processes on CPU, uneven split, synced result == single-process result ---

def _samples():
    g = torch.Generator().manual_seed(7)
    preds = torch.randint(0, 5, (7, 6, 8), generator=g)
    target = torch.randint(0, 5, (7, 6, 8), generator=g)
    target[target == 4] = 255  # class 4 never in GT
    return preds, target


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        preds, target = _samples()
        idx = [0, 1, 2, 3, 4] if rank == 0 else [5, 6]  # uneven: 5 vs 2 samples
        m = ConfusionMatrix(5)
        for i in idx:
            m.update(preds[i:i + 1], target[i:i + 1])
        r = m.compute()  # syncs, then restores the local state
        with m.sync_context():
            synced = m.confmat.clone()
        torch.save({"confmat": synced, "mIoU": r["mIoU"], "iou": r["iou"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_sync_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    preds, target = _samples()
    single = ConfusionMatrix(5)
    single.update(preds, target)
    ref = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["confmat"], single.confmat)
        assert got["mIoU"] == ref["mIoU"]
        assert torch.equal(got["iou"].isnan(), ref["iou"].isnan())
        assert torch.equal(got["iou"].nan_to_num(), ref["iou"].nan_to_num())
