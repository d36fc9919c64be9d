"""Box2Seg (Kulharia et al., ECCV 2020): box-supervised segmentation with an attention-weighted loss.

Training batch: ``image``, the GrabCut pseudo mask (``pseudo``, from the stage cache through
:class:`segexp.data.pseudo_labels.PseudoLabels`; or the GT ``mask`` in the fully-supervised
setting, ``target_key: mask``) and the boxes (``boxes``, ``box_labels``, ``box_difficult``) after
augmentation, rasterised here into B(i, c) (:func:`segexp.losses.box2seg.box_masks`).
The Box2Seg experiments set
``data.min_box_visibility: 0``: a box the crop leaves less than 10% visible would otherwise be
dropped by the transform and its visible pixels would count as certain background (B(i, 0), L_bg)
while the GrabCut mask calls them object.

Phases (one run): the first ``pretrain_epochs`` epochs train the embeddings only (their
affinities agree with GrabCut same-label pairs: loss term ``pretrain``); then every main-phase
term of :class:`~segexp.losses.box2seg.Box2SegLoss` with its weight. Evaluation runs the
segmentation branch only.

All three heads are computed in every training step, and heads that no active term uses enter
the loss with weight 0, so every parameter takes part in every step (DDP without
``find_unused_parameters``, ablations with a head switched off included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segexp.losses.box2seg import Box2SegLoss, box_masks
from segexp.methods.base import SegMethod


class Box2Seg(SegMethod):
    def __init__(
        self,
        model: nn.Module,
        loss: Box2SegLoss,
        target_key: str = "pseudo",
        pretrain_epochs: int = 1,
        use_difficult: bool = True,
        name: str = "box2seg",
        **base: Any,
    ):
        super().__init__(**base)
        self.model = model
        self.loss = loss
        self.target_key = target_key
        self.pretrain_epochs = int(pretrain_epochs)
        self.use_difficult = use_difficult

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.segment(images)

    def in_pretraining(self) -> bool:
        """The first ``pretrain_epochs`` epochs, unless the pretraining term is switched off."""
        return self.current_epoch < self.pretrain_epochs and self.loss.active("pretrain")

    def box_masks(self, batch: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
        boxes, labels = batch["boxes"], batch["box_labels"]
        if not self.use_difficult and "box_difficult" in batch:
            keep = [~d.bool() for d in batch["box_difficult"]]
            boxes = [b[k] for b, k in zip(boxes, keep)]
            labels = [lb[k] for lb, k in zip(labels, keep)]
        device = batch["image"].device
        return box_masks(boxes, labels, self.num_classes, size, batch.get("valid"), device=device)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        target = batch[self.target_key]
        out = self.model(images)
        # 0-weighted sum of every output: parameters of unused heads still get (zero) gradients
        keepalive = sum(v.sum() for v in out.values()) * 0.0
        if self.in_pretraining():
            losses = self.loss.pretrain(out["emb"], target, self.num_classes)
        else:
            boxes = self.box_masks(batch, tuple(target.shape[-2:]))
            alpha = torch.sigmoid(out["att"])
            losses = self.loss(out["seg"], alpha, out["emb"], target, boxes, batch.get("valid"))
        if not losses:
            return {"zero": keepalive}
        first = next(iter(losses))
        losses[first] = losses[first] + keepalive
        return losses

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.segment(images)
