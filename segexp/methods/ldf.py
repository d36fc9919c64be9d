"""LDF: label decoupling framework for salient object detection (Wei et al., CVPR 2020).

Training targets come from the ``LDFLabels`` train wrapper (``segexp.data.decouple``): body and
detail maps of each training mask (released decoupling, ``decouple: paper`` for the paper's, or a
coarse model's predictions in the fine stage; ``soft_masks: raw`` decouples grey masks as the
release does instead of cutting them at 0.5 first), cached per image. The feature interaction network
(``segexp.models.ldf.LDFNet``) gives six outputs; the loss is ``segexp.losses.ldf.LDFLoss``.

* ``supervision`` = (branch 1 target, branch 2 target), the paper's Table 5 ablation:
  ``[body, detail]`` (default, LDF), ``[body, edge]``, ``[sal, detail]``, ``[sal, edge]``. The edge
  map is the one-pixel band on each side of the mask boundary (dilation - erosion, 3x3), computed
  on the augmented mask (not given in the sources; our choice).
* ``multiscale_sizes``: the released loader resizes each *batch* to a random square size from
  {224, 256, 288, 320, 352} (bilinear for the image and every label map); ``null`` trains at the
  size the data pipeline gives.
* ``test_size``: inference resizes the image to this square size (released test: 352), runs the
  network, upsamples the logits of ``s2`` (the second iteration's saliency) back and applies the
  sigmoid; ``null`` runs at the input size.
* Schedule (``conf/schedule/ldf_sgd.yaml``): SGD nesterov, momentum 0.9, weight decay 5e-4 on
  *every* parameter as the released code does (``weight_decay_on_all``), backbone lr 0.1x, and the
  triangular per-epoch lr ``(1 - |2 (e + 1) / (E + 1) - 1|) * lr_max`` (scheduler ``triangular``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from segexp.data.decouple import MAP_KEYS
from segexp.methods.optim import build_optimizer
from segexp.methods.sod_base import SODMethod
from segexp.models.param_groups import GROUP_NAMES

SUPERVISION = {("body", "detail"), ("body", "edge"), ("sal", "detail"), ("sal", "edge")}


def triangular_factor(epoch: int, epochs: int) -> float:
    """Released LDF schedule: lr multiplier at (0-based) ``epoch`` of ``epochs``."""
    return 1.0 - abs(2.0 * (epoch + 1) / (epochs + 1) - 1.0)


def edge_band(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(B, 1, H, W) binary float -> boundary band (dilation - erosion with a (2w+1)^2 square)."""
    k = 2 * width + 1
    dil = F.max_pool2d(mask, k, stride=1, padding=width)
    ero = -F.max_pool2d(-mask, k, stride=1, padding=width)
    return dil - ero


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x


class LDF(SODMethod):
    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        supervision: Sequence[str] = ("body", "detail"),
        multiscale_sizes: Sequence[int] | None = None,
        test_size: int | None = 352,
        edge_width: int = 1,
        weight_decay_on_all: bool = True,
        decouple: str = "code",
        soft_masks: str = "threshold",
        name: str = "ldf",
        **base: Any,
    ):
        base.setdefault("train_keys", ("image", "saliency", *MAP_KEYS))
        super().__init__(**base)
        sup = tuple(supervision)
        if sup not in SUPERVISION:
            raise ValueError(f"supervision {list(sup)} not one of {sorted(map(list, SUPERVISION))}")
        self.model = model
        self.loss = loss
        self.supervision = sup
        self.multiscale_sizes = list(multiscale_sizes) if multiscale_sizes else None
        self.test_size = test_size
        self.edge_width = edge_width
        self.weight_decay_on_all = weight_decay_on_all
        self.decouple = decouple  # read by the LDFLabels wrapper (data.train_wrappers), kept for the record
        self.soft_masks = soft_masks  # likewise (segexp.data.decouple: threshold | raw)
        self._rng = random.Random(0)

    def forward(self, images: torch.Tensor, shape=None) -> tuple[torch.Tensor, ...]:
        return self.model(images, shape)

    def on_train_start(self) -> None:
        self._rng.seed(int(torch.initial_seed()) + self.global_rank)

    def targets(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        image = batch["image"]
        sal = (batch["saliency"] > 0.5).float()[:, None]
        if all(key in batch for key in MAP_KEYS):
            body, detail = (batch[key].float()[:, None] for key in MAP_KEYS)
        elif self.supervision == ("sal", "edge"):
            body = detail = sal
        else:
            raise KeyError(f"LDF needs the {MAP_KEYS} maps: add the LDFLabels train wrapper")
        valid = batch["valid"].float()[:, None] if "valid" in batch else torch.ones_like(sal)
        maps = torch.cat([sal, body, detail, valid], 1)
        if self.multiscale_sizes:
            size = self._rng.choice(self.multiscale_sizes)
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
            maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        sal, body, detail, valid = maps.split(1, dim=1)
        valid = (valid > 0.5).float()
        branch1 = body if self.supervision[0] == "body" else sal
        if self.supervision[1] == "detail":
            branch2 = detail
        else:
            branch2 = edge_band((sal > 0.5).float(), self.edge_width)
        return image, {"branch1": branch1, "branch2": branch2, "saliency": sal}, valid

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, targets, valid = self.targets(batch)
        outputs = self(image)
        return self.loss(outputs, targets, None if bool(valid.all()) else valid)

    def saliency(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        x = images
        if self.test_size:
            size = (self.test_size, self.test_size)
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        logits = self(x, shape=(h, w))[-1]
        return torch.sigmoid(logits.float())

    # -- optimisation --------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().parameter_groups()
        if not self.weight_decay_on_all:
            return groups
        return {"backbone": groups["backbone"] + groups["backbone_no_decay"],
                "new": groups["new"] + groups["new_no_decay"],
                **{k: [] for k in GROUP_NAMES if k.endswith("_no_decay")}}

    def configure_optimizers(self):
        sched = self.schedule
        kwargs = dict(_plain(sched["scheduler"]))
        if kwargs.get("name") != "triangular":
            return super().configure_optimizers()
        optimizer = build_optimizer(sched["optimizer"], self.parameter_groups(), _plain(sched["lr_mult"]))
        epochs = int(self.trainer.max_epochs)
        scheduler = LambdaLR(optimizer, lambda e: triangular_factor(e, epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


LDFSaliency = LDF  # the name before 2026-12-02, which older checkpoints record
