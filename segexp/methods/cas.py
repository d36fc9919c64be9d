"""CAS: a 2-channel FCN / DeepLab-v3 trained with the class-agnostic segmentation loss (or CE).

``loss`` decides the training signal: a :class:`segexp.losses.cas.CASLoss` (``region_based``) gets
the softmax descriptors and the FG/BG partition of the (possibly corrupted) saliency GT; any other
loss (``loss=ce_sod``, the paper's cross-entropy baseline) gets the binary class target with
``ignore_index`` outside the valid (unpadded) area.

Which output channel is "salient" (stated protocol, ``salient_channel: auto``): the CAS loss does
not fix it, so at every validation epoch each channel's map is scored; the channel whose mean
probability is higher on GT-foreground than on GT-background pixels (contrast = sum over the
*validation* images of mean_fg(p_c) - mean_bg(p_c)) is the salient one. Under DDP the per-rank
contrasts are summed over ranks (``all_reduce``) before the choice, so every rank keeps the same
channel, the one the whole validation set gives. Its metrics are logged as ``val/*`` and it is
stored in the model (buffer ``salient_channel``, saved in the checkpoint), so testing uses the
channel picked on validation data, never on the test set. The CE baseline uses the same protocol,
so both are evaluated alike (``salient_channel: 1`` fixes the channel instead).

The evaluated map (``saliency_map``):

* ``softmax`` (default): the salient channel's softmax probability, a continuous map as the SOD
  metrics (max/mean F, E curves, S) expect;
* ``adaptive``: the released ``test.py`` protocol (``shared/methods/cas.md`` s.6): each channel's
  softmax is binarised at twice its per-image mean (capped at 1, as the adaptive F-measure does;
  the code's comparison is not given) and the binary map is what the metrics see (max/mean F then
  equal the adaptive F).

Measured on the shapes runs (``experiments/cas_lfd_shapes/results.md``): the choice of map moves
MAE by 0.01-0.04; what kept MAE above a constant map was the network (under-trained, and at 64 px
its stride-16 or even stride-8 logits blur a background halo around the small objects).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segexp.methods.base import upsample_like
from segexp.methods.sod_base import SODMethod
from segexp.metrics.semantic import ConfusionMatrix
from segexp.metrics.sod import SODMetrics

SALIENCY_MAPS = ("softmax", "adaptive")


def channel_contrast(probs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(C,) float64: sum over the images of mean_fg(p_c) - mean_bg(p_c). ``probs`` (B, C, H, W),
    ``gt`` (B, H, W) with 1 = foreground, 0 = background, anything else ignored."""
    fg, bg = (gt == 1).to(probs.dtype)[:, None], (gt == 0).to(probs.dtype)[:, None]
    mean_fg = (probs * fg).sum((2, 3)) / fg.sum((2, 3)).clamp(min=1)
    mean_bg = (probs * bg).sum((2, 3)) / bg.sum((2, 3)).clamp(min=1)
    return (mean_fg - mean_bg).sum(0).double()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the DDP ranks, as a new tensor (a copy of ``t`` when torch.distributed
    is not initialised)."""
    t = t.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def adaptive_binary(p: torch.Tensor) -> torch.Tensor:
    """(B, ..., H, W) -> binary float map ``p >= min(2 mean(p), 1)`` per image and channel."""
    t = (2 * p.mean((-2, -1), keepdim=True)).clamp(max=1)
    return (p >= t).to(p.dtype)


class CAS(SODMethod):
    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        salient_channel: str | int = "auto",
        num_outputs: int = 2,
        saliency_map: str = "softmax",
        name: str = "cas",
        **base: Any,
    ):
        super().__init__(**base)
        self.model = model
        self.loss = loss
        if salient_channel != "auto" and not 0 <= int(salient_channel) < num_outputs:
            raise ValueError(f"salient_channel must be 'auto' or in 0..{num_outputs - 1}")
        if saliency_map not in SALIENCY_MAPS:
            raise ValueError(f"saliency_map={saliency_map!r}: choose one of {SALIENCY_MAPS}")
        self.saliency_map = saliency_map
        self.auto_channel = salient_channel == "auto"
        self.num_outputs = num_outputs
        first = 1 if self.auto_channel else int(salient_channel)
        self.register_buffer("salient_channel", torch.tensor(first))
        self.val_sod_ch = nn.ModuleList([SODMetrics() for _ in range(num_outputs)])
        self.val_cm_ch = nn.ModuleList([ConfusionMatrix(2, self.ignore_index) for _ in range(num_outputs)])
        self._contrast = torch.zeros(num_outputs, dtype=torch.float64)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        saliency = batch["saliency"]
        logits = upsample_like(self(batch["image"]), saliency.shape[-2:])
        valid = batch.get("valid")
        if getattr(self.loss, "region_based", False):
            return {"cas": self.loss(logits, saliency, valid)}
        return {"ce": self.loss(logits, self.gt_mask(batch, self.ignore_index))}

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return upsample_like(self(images), images.shape[-2:]).float().softmax(1)

    def maps_from(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) per-channel saliency maps as evaluated (``saliency_map``)."""
        return adaptive_binary(probs) if self.saliency_map == "adaptive" else probs

    def saliency(self, images: torch.Tensor) -> torch.Tensor:
        c = int(self.salient_channel)
        return self.maps_from(self.probabilities(images))[:, c : c + 1]

    # -- validation: score every channel, keep the salient one ---------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.auto_channel:
            return super().validation_step(batch, batch_idx)
        probs = self.probabilities(batch["image"])
        maps = self.maps_from(probs)
        gt = self.gt_mask(batch, self.ignore_index)
        for c in range(self.num_outputs):
            p = maps[:, c]
            self._update_sod(self.val_sod_ch[c], p, batch)
            self.val_cm_ch[c].update(torch.stack([1 - p, p], 1), gt)
        self._contrast += channel_contrast(probs.detach(), gt).cpu()
        if batch_idx == 0:
            self._panel_batch = {"batch": {**batch, "mask": gt}, "maps": maps.detach()}

    def choose_salient_channel(self) -> tuple[int, float]:
        """Store the channel of highest validation contrast summed over all ranks (so every rank
        keeps the same one), reset the accumulator; returns (channel, its contrast)."""
        total = sum_over_ranks(self._contrast.to(self.device))
        c = int(torch.argmax(total))
        self.salient_channel.fill_(c)
        self._contrast.zero_()
        return c, float(total[c])

    def on_validation_epoch_end(self) -> None:
        if not self.auto_channel:
            return super().on_validation_epoch_end()
        c, contrast = self.choose_salient_channel()
        self.log("val/salient_channel", float(c), sync_dist=False)
        self.log("val/channel_contrast", contrast, sync_dist=False)
        self._log_sod(self.val_sod_ch[c], "val")
        self._log_confusion(self.val_cm_ch[c], "val")
        for i in range(self.num_outputs):
            self.val_sod_ch[i].reset()
            self.val_cm_ch[i].reset()
        if self._panel_batch is not None:
            self._panel_batch = {"batch": self._panel_batch["batch"],
                                 "pred": (self._panel_batch["maps"][:, c] > 0.5).long()}
        self._send_panels()


CASSaliency = CAS  # the name before 2026-12-02, which older checkpoints record
