"""Shared base of the salient-object-detection methods (CAS, LDF): SOD metrics instead of mIoU.

A SOD method implements ``compute_losses`` and ``saliency(images) -> (B, 1, H, W)`` in [0, 1];
``predict`` (two-class scores for the generic tooling) is derived from it. Validation and test
accumulate :class:`segexp.metrics.sod.SODMetrics` against the ``saliency`` GT (binarised at 0.5)
at the evaluated resolution and log ``<split>/MAE, S, maxF, meanF, adpF, maxE, meanE, adpE, wF``.
The confusion-matrix ``mIoU`` of the map thresholded at 0.5 is logged as well, so that the generic
tooling (sweeps, the experiment smoke tests) sees the usual key.

Several test dataloaders (one per benchmark set) are supported: metrics are then logged as
``test/<set>/<metric>`` (names from the datamodule's ``test_set_names`` if it has them) and the
first set also as ``test/<metric>``.

Evaluation batches may be padded (bottom/right, ``valid`` map): each image is then cropped to its
valid area before it is scored.
"""

from __future__ import annotations

from typing import Any

import torch

from segexp.data.collate import unpadded_sizes
from segexp.methods.base import SegMethod
from segexp.metrics.sod import SODMetrics

__all__ = ["SODMethod", "LOGGED"]

LOGGED = ("MAE", "S", "maxF", "meanF", "adpF", "maxE", "meanE", "adpE", "wF")


class SODMethod(SegMethod):
    def __init__(self, **base: Any):
        base.setdefault("train_keys", ("image", "saliency"))
        base.setdefault("eval_keys", ("image", "saliency"))
        super().__init__(**base)
        self.val_sod = SODMetrics()
        self.test_sod = torch.nn.ModuleList([SODMetrics()])

    # -- to implement --------------------------------------------------------------------------
    def saliency(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Saliency maps (B, 1, H, W) in [0, 1] at the input resolution."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        s = self.saliency(images).clamp(0, 1)
        return torch.cat([1 - s, s], dim=1)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def gt_mask(batch: dict[str, Any], ignore_index: int = 255) -> torch.Tensor:
        """Binary GT (B, H, W) long with ``ignore_index`` outside the valid area."""
        gt = (batch["saliency"] > 0.5).long()
        if "valid" in batch:
            gt = torch.where(batch["valid"].bool(), gt, torch.full_like(gt, ignore_index))
        return gt

    def _update_sod(self, metric: SODMetrics, pred: torch.Tensor, batch: dict[str, Any]) -> None:
        """``pred`` (B, H, W) in [0, 1]."""
        pred = pred.detach().float().clamp(0, 1)
        gt = batch["saliency"] > 0.5
        valid = batch.get("valid")
        if valid is None or bool(valid.all()):
            metric.update(pred, gt)
            return
        for i, (h, w) in enumerate(unpadded_sizes(batch)):  # padded batch: each image on its own area
            metric.update(pred[i : i + 1, :h, :w], gt[i : i + 1, :h, :w])

    def _log_sod(self, metric: SODMetrics, prefix: str) -> None:
        if int(metric.count) == 0:
            metric.reset()
            return
        result = metric.compute()
        for key in LOGGED:
            self.log(f"{prefix}/{key}", float(result[key]), sync_dist=False)
        metric.reset()

    # -- evaluation ----------------------------------------------------------------------------
    def _eval(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.saliency(batch["image"])[:, 0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        sal = self._eval(batch)
        self._update_sod(self.val_sod, sal, batch)
        self.val_cm.update(torch.stack([1 - sal, sal], 1), self.gt_mask(batch, self.ignore_index))
        if batch_idx == 0:
            self._panel_batch = {
                "batch": {**batch, "mask": self.gt_mask(batch, self.ignore_index)},
                "pred": (sal > 0.5).long(),
                "columns": {"saliency": sal.detach().clamp(0, 1)},
            }

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        while len(self.test_sod) <= dataloader_idx:
            self.test_sod.append(SODMetrics().to(self.device))
        sal = self._eval(batch)
        self._update_sod(self.test_sod[dataloader_idx], sal, batch)
        if self.dump is not None:  # a SaliencyDump (segexp.runner.evaluate, dump.predictions=true)
            self.dump.add(batch, sal, dataloader_idx)
        if dataloader_idx == 0:
            self.test_cm.update(torch.stack([1 - sal, sal], 1), self.gt_mask(batch, self.ignore_index))

    def on_validation_epoch_end(self) -> None:
        self._log_sod(self.val_sod, "val")
        self._log_confusion(self.val_cm, "val")
        self._send_panels()

    def on_test_epoch_end(self) -> None:
        names = list(getattr(self.trainer.datamodule, "test_set_names", None) or []) if self._trainer else []
        if len(self.test_sod) == 1:
            self._log_sod(self.test_sod[0], "test")
        else:
            first = self.test_sod[0].compute() if int(self.test_sod[0].count) else None
            for i, metric in enumerate(self.test_sod):
                self._log_sod(metric, f"test/{names[i] if i < len(names) else i}")
            if first is not None:
                for key in LOGGED:
                    self.log(f"test/{key}", float(first[key]), sync_dist=False)
        self._log_confusion(self.test_cm, "test")
