"""A short real training on the synthetic shapes set learns beyond the trivial baseline."""

from __future__ import annotations

import torch

from segexp.metrics.semantic import ConfusionMatrix
from tests.conftest import compose

SHORT = [
    "+experiment=supervised_shapes",
    "data.prepare.num_images=160",
    "data.prepare.size=64",
    "data.image_size=64",
    "data.num_workers=0",
    "schedule.epochs=20",
    "test=false",
]


def _all_background_miou(datamodule) -> float:
    """mIoU of predicting background everywhere on the validation split (the trivial baseline)."""
    cm = ConfusionMatrix(num_classes=datamodule.num_classes)
    for batch in datamodule.val_dataloader():
        cm.update(torch.zeros_like(batch["mask"]), batch["mask"])
    return cm.compute()["mIoU"]


def test_supervised_training_beats_all_background(data_dir, tmp_path):
    from segexp.runner import build_datamodule, train

    cfg = compose([*SHORT, f"paths.data_dir={data_dir}"], out_dir=tmp_path)
    metrics = train(cfg)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    baseline = _all_background_miou(dm)
    print(f"val mIoU {metrics['val/mIoU_best']:.3f} vs all-background {baseline:.3f}")
    assert metrics["val/mIoU_best"] > baseline + 0.02
