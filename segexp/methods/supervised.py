"""Fully-supervised semantic segmentation: the reference every weakly-supervised paper compares
with, and the stage-2 retraining of image-level pipelines (``target_key: pseudo``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segexp.methods.base import SegMethod, upsample_like


class Supervised(SegMethod):
    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        target_key: str = "mask",
        name: str = "supervised",
        **base: Any,
    ):
        super().__init__(**base)
        self.model = model
        self.loss = loss
        self.target_key = target_key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        target = batch[self.target_key]
        logits = upsample_like(self(batch["image"]), target.shape[-2:])
        return {"ce": self.loss(logits, target)}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return upsample_like(self(images), images.shape[-2:])


SupervisedSegmentation = Supervised  # the name before 2026-12-02, which older checkpoints record
