"""CAS: a 2-channel FCN / DeepLab-v3 trained with the class-agnostic segmentation loss (or CE).

``loss`` decides the training signal: a :class:`segexp.losses.cas.CASLoss` (``region_based``) gets
the softmax descriptors and the FG/BG partition of the (possibly corrupted) saliency GT; any other
loss (``loss=ce_sod``, the paper's cross-entropy baseline) gets the binary class target with
``ignore_index`` outside the valid (unpadded) area.

Which output channel is "salient" (stated protocol, ``salient_channel: auto``): the CAS loss does
not fix it, so at every validation epoch each channel's softmax map is scored; the channel whose
mean probability is higher on GT-foreground than on GT-background pixels (summed over the
*validation* images: contrast = mean over images of mean_fg(p_c) - mean_bg(p_c)) is the salient
one. Its metrics are logged as ``val/*`` and it is stored in the model (buffer
``salient_channel``, saved in the checkpoint), so testing uses the channel picked on validation
data, never on the test set. The CE baseline uses the same protocol, so both are evaluated alike
(``salient_channel: 1`` fixes the channel instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segexp.methods.base import upsample_like
from segexp.methods.sod_base import SODMethod
from segexp.metrics.semantic import ConfusionMatrix
from segexp.metrics.sod import SODMetrics


class CASSaliency(SODMethod):
    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        salient_channel: str | int = "auto",
        num_outputs: int = 2,
        name: str = "cas",
        **base: Any,
    ):
        super().__init__(**base)
        self.model = model
        self.loss = loss
        if salient_channel != "auto" and not 0 <= int(salient_channel) < num_outputs:
            raise ValueError(f"salient_channel must be 'auto' or in 0..{num_outputs - 1}")
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

    def saliency(self, images: torch.Tensor) -> torch.Tensor:
        c = int(self.salient_channel)
        return self.probabilities(images)[:, c : c + 1]

    # -- validation: score every channel, keep the salient one ---------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.auto_channel:
            return super().validation_step(batch, batch_idx)
        probs = self.probabilities(batch["image"])
        gt = self.gt_mask(batch, self.ignore_index)
        for c in range(self.num_outputs):
            p = probs[:, c]
            self._update_sod(self.val_sod_ch[c], p, batch)
            self.val_cm_ch[c].update(torch.stack([1 - p, p], 1), gt)
            fg, bg = (gt == 1).float(), (gt == 0).float()
            mean_fg = (p * fg).sum((1, 2)) / fg.sum((1, 2)).clamp(min=1)
            mean_bg = (p * bg).sum((1, 2)) / bg.sum((1, 2)).clamp(min=1)
            self._contrast[c] += float((mean_fg - mean_bg).sum())
        if batch_idx == 0:
            self._panel_batch = {"batch": {**batch, "mask": gt}, "probs": probs.detach()}

    def on_validation_epoch_end(self) -> None:
        if not self.auto_channel:
            return super().on_validation_epoch_end()
        c = int(torch.argmax(self._contrast))
        self.salient_channel.fill_(c)
        self.log("val/salient_channel", float(c), sync_dist=False)
        self.log("val/channel_contrast", float(self._contrast[c]), sync_dist=False)
        self._contrast.zero_()
        self._log_sod(self.val_sod_ch[c], "val")
        self._log_confusion(self.val_cm_ch[c], "val")
        for i in range(self.num_outputs):
            self.val_sod_ch[i].reset()
            self.val_cm_ch[i].reset()
        if self._panel_batch is not None:
            self._panel_batch = {"batch": self._panel_batch["batch"],
                                 "pred": (self._panel_batch["probs"][:, c] > 0.5).long()}
        self._send_panels()
