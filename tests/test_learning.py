"""The testbed's recipes learn: a bounded run in the default suite, the full recipes (slow) against
the targets of experiments/testbed (supervised val mIoU >= 0.85; CAM F1 >= 0.9 and CAM mIoU >= 0.35)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from segexp.metrics.semantic import ConfusionMatrix
from tests.conftest import REPO, compose, run_cli

# The supervised recipe as configured, on 600 images (360 train), 13 epochs = 299 steps of 16,
# validated once, at the end (every epoch: 22 % more time for the same assertion).
SHORT = [
    "+experiment=supervised_shapes",
    "data.prepare.num_images=600",
    "data.num_workers=0",
    "schedule.epochs=13",
    "trainer.check_val_every_n_epoch=13",
    "test=false",
]


def _all_background_miou(datamodule) -> float:
    """mIoU of predicting background everywhere on the validation split (the trivial baseline)."""
    cm = ConfusionMatrix(num_classes=datamodule.num_classes)
    for batch in datamodule.val_dataloader():
        cm.update(torch.zeros_like(batch["mask"]), batch["mask"])
    return cm.compute()["mIoU"]


def test_supervised_recipe_clears_all_background_by_a_wide_margin(data_dir, tmp_path):
    from segexp.runner import build_datamodule, train

    cfg = compose([*SHORT, f"paths.data_dir={data_dir}"], out_dir=tmp_path)
    metrics = train(cfg)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    baseline = _all_background_miou(dm)
    print(f"val mIoU {metrics['val/mIoU_best']:.3f} vs all-background {baseline:.3f}")
    # measured: 0.45-0.55 after 300 steps (2026-12-03: 0.526; the full recipe, 1,125 steps: 0.92);
    # all-background ~0.15
    assert metrics["val/mIoU_best"] > baseline + 0.2


def _train(experiment: str, data_dir, run_dir, *extra: str) -> dict:
    args = [f"+experiment={experiment}", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *extra]
    proc = run_cli("segexp.train", args, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_supervised_recipe_reaches_its_target(data_dir, tmp_path):
    """supervised_shapes as configured (~3 min on 2 idle cores)."""
    metrics = _train("supervised_shapes", data_dir, tmp_path / "sup", "test=false")
    assert metrics["val/mIoU"] >= 0.85


@pytest.mark.slow
def test_cam_recipe_reaches_its_targets_and_leaves_room_below_supervised(data_dir, tmp_path):
    """cam_shapes as configured (~3 min): the classifier recognises the shapes (F1 >= 0.9), its CAMs
    localise them (CAM mIoU >= 0.35 at the best threshold) and stay >= 0.15 below full supervision."""
    run_dir = tmp_path / "cam"
    _train("cam_shapes", data_dir, run_dir, "test=false")
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        last = [row for row in csv.DictReader(handle) if row.get("val/cls_F1")][-1]  # the final epoch
    assert float(last["val/cls_F1"]) >= 0.9
    assert 0.35 <= float(last["val/cam_best_mIoU"]) <= 0.85 - 0.15
