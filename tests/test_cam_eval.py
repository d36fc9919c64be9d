"""A CAM network scores a split the same way in the test loop (``segexp.eval``) as in validation."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tests.conftest import config_inference


def _batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    mask = torch.zeros(32, 32, dtype=torch.long)
    cls = 1 + i % 2
    mask[8:24, 8:24] = cls
    labels = torch.zeros(2)
    labels[cls - 1] = 1
    return {"image": torch.randn(3, 32, 32, generator=g), "mask": mask, "labels": labels}


def test_test_loop_logs_the_threshold_curve_and_classifier_f1_as_validation_does():
    from segexp.methods.cam import CAM
    from segexp.models.backbone import Backbone
    from segexp.models.cam_head import CAMNet

    torch.manual_seed(0)
    model = CAMNet(Backbone("resnet18", pretrained=False, output_stride=8), num_classes=3)
    sched = {"optimizer": None, "lr_mult": {}, "scheduler": {}}
    method = CAM(model=model, num_classes=3, class_names=["bg", "a", "b"], schedule=sched,
                 eval_keys=("image", "mask", "labels"), inference=config_inference("method=cam"),
                 panels={"max_images": 0, "every_n_epochs": 0})
    loader = DataLoader([_batch(i) for i in range(6)], batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    val = trainer.validate(method, dataloaders=loader, verbose=False)[0]
    test = trainer.test(method, dataloaders=loader, verbose=False)[0]
    for name in ("cam_best_mIoU", "cam_best_threshold", "cls_F1"):
        assert test[f"test/{name}"] == val[f"val/{name}"], name
    # the curve is reset between runs: a second validation gives the same, not an accumulation
    assert trainer.validate(method, dataloaders=loader, verbose=False)[0] == val
