"""DDP on CPU: 2 gloo processes, uneven split of the samples; synced results == single process."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segexp.metrics.cam import CAMThresholdCurve
from segexp.metrics.entity import EntityMetrics
from segexp.metrics.instance_ap import InstanceAP
from segexp.metrics.semantic import ConfusionMatrix
from segexp.metrics.sod import SODMetrics

SPLIT = ([0, 1, 2, 3, 4], [5, 6])  # uneven: 5 samples on rank 0, 2 on rank 1


def _samples():
    g = torch.Generator().manual_seed(7)
    preds = torch.randint(0, 5, (7, 16, 20), generator=g)
    target = torch.randint(0, 5, (7, 16, 20), generator=g)
    target[target == 4] = 255  # class 4 never in GT
    cams = torch.rand(7, 4, 16, 20, generator=g)
    sal = (torch.rand(7, 16, 20, generator=g) * 255).to(torch.uint8)
    sal_gt = ((target % 2) * 255).to(torch.uint8)
    return preds, target, cams, sal, sal_gt


def _metrics():
    return {"cm": ConfusionMatrix(5), "cam": CAMThresholdCurve(5, thresholds=(0.1, 0.3, 0.5)),
            "sod": SODMetrics(), "ent": EntityMetrics(), "ap": InstanceAP(background=None)}


def _feed(metrics, idx):
    preds, target, cams, sal, sal_gt = _samples()
    for i in idx:
        metrics["cm"].update(preds[i:i + 1], target[i:i + 1])
        metrics["cam"].update(cams[i:i + 1], target[i:i + 1])
        metrics["sod"].update(sal[i:i + 1], sal_gt[i:i + 1])
        metrics["ent"].update(preds[i:i + 1], target[i:i + 1])
        # instances: the GT classes as instances (id 0 included), predictions with made-up scores
        scores = torch.linspace(0.9, 0.5, int(preds[i].max()) + 1)[torch.unique(preds[i])]
        metrics["ap"].update(preds[i], scores, target[i].masked_fill(target[i] == 255, -1).clamp(min=0))
    return {k: m.compute() for k, m in metrics.items()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = _metrics()
        res = _feed(metrics, SPLIT[rank])
        with metrics["cm"].sync_context():
            res["cm_state"] = metrics["cm"].confmat.clone()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b):
    if isinstance(a, dict):
        return all(_close(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.allclose(a.double(), b.double(), atol=1e-12, equal_nan=True)
    if isinstance(a, float):
        return (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-12)
    return a == b


def test_ddp_sync_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single_metrics = _metrics()
    single = _feed(single_metrics, SPLIT[0] + SPLIT[1])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(got["cm_state"], single_metrics["cm"].confmat)  # exact integer counts
        assert got["cm"]["mIoU"] == single["cm"]["mIoU"]
        assert torch.equal(got["cam"]["miou"], single["cam"]["miou"])
        for k in ("sod", "ent", "ap"):
            assert _close(got[k], single[k]), k
    # the synced value really differs from what rank 1 alone would report
    alone = _feed(_metrics(), SPLIT[1])
    assert alone["cm"]["mIoU"] != single["cm"]["mIoU"]
