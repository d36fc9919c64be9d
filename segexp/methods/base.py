"""The small LightningModule every method stands on.

A method only says how a batch becomes named loss terms (``compute_losses``) and how an image
becomes class scores (``predict``). This base does the rest once: optimizer + per-step lr schedule
from ``conf/schedule``, logging of every loss term, the confusion-matrix mIoU on val/test (exact
under DDP: the matrix is summed across ranks), and image panels for the active loggers.
Nothing here branches on device, precision or strategy — those are Trainer settings.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import LambdaLR

from segexp.data.transforms import denormalize
from segexp.inference.tta import predict_tta
from segexp.methods.optim import build_optimizer, lr_factor
from segexp.metrics.semantic import ConfusionMatrix
from segexp.models.param_groups import param_groups
from segexp.reporting.dump import PredictionDump
from segexp.reporting.panels import log_panels

# Epoch metrics here are reduced across ranks before they are logged (confusion matrices and SOD
# sums are all-reduced in compute()), so Lightning's advice to log them with sync_dist=True would
# average identical values; its warning (one per metric name under DDP) only misleads.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*", category=UserWarning)
# Lightning 2.6 calling a torch API that torch 2.14 deprecated: nothing a user can act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class SegMethod(pl.LightningModule):
    """Base of all methods. Subclasses set ``train_keys``/``eval_keys`` via config and implement
    ``compute_losses(batch) -> dict[name, scalar]`` (already weighted) and ``predict(images)``."""

    #: ``predict`` gives class scores (AffinityNet's gives none: no training panel for it)
    predicts_classes: bool = True

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        schedule: Mapping[str, Any],
        ignore_index: int = 255,
        train_keys: Sequence[str] = ("image", "mask"),
        eval_keys: Sequence[str] = ("image", "mask"),
        panels: Mapping[str, Any] | None = None,
        tta: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.train_keys = tuple(train_keys)
        self.eval_keys = tuple(eval_keys)
        self.schedule = schedule
        self.panels = dict(_plain(panels) or {"max_images": 4, "every_n_epochs": 1})
        self.val_cm = ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
        self.test_cm = ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
        self._panel_batch: dict[str, Any] | None = None
        self._train_panel_batch: dict[str, Any] | None = None  # first batch with pseudo labels of an epoch
        # Evaluation-time augmentation (segexp.inference.tta): scales, flip, window, stride.
        self.tta = dict(_plain(tta) or {})
        # Set by segexp.runner.evaluate: write test predictions / per-image scores there.
        self.dump: PredictionDump | None = None

    def record_provenance(self, record: Mapping[str, Any]) -> None:
        """Which method and experiment made the weights, with the resolved method config: saved as
        the module's hyperparameters (checkpoint key ``hyper_parameters``), from which
        ``segexp.utils.checkpoints.load_method(ckpt)`` rebuilds the method and ``runner`` refuses
        another method's checkpoint in one line. Not the init arguments: those hold built modules
        (network, loss) that only the config can rebuild."""
        self.save_hyperparameters(dict(record), logger=False)

    # -- to implement --------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Class scores (B, C, H, W) at the input resolution."""
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        total = torch.stack(list(losses.values())).sum()
        bs = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        if batch_idx == 0 and "pseudo" in batch and self.predicts_classes:  # image | pseudo | prediction
            self._train_panel_batch = batch
        return total

    def on_train_epoch_end(self) -> None:
        batch, self._train_panel_batch = self._train_panel_batch, None
        if batch is None or not self._panels_due():
            return
        was_training = self.training
        self.eval()  # no BatchNorm statistics or dropout from a drawing pass
        with torch.no_grad():
            pred = self.infer(batch["image"]).argmax(1)
        self.train(was_training)
        self._draw_panels("train/panels", batch, pred, batch["pseudo"], {}, target_title="pseudo label")

    # -- evaluation ----------------------------------------------------------------------------
    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """Scores used for evaluation: ``predict`` itself, or its test-time-augmented average."""
        scales = tuple(self.tta.get("scales", (1.0,)))
        if scales == (1.0,) and not self.tta.get("flip") and not self.tta.get("window"):
            return self.predict(images)
        return predict_tta(self.predict, images, scales=scales, flip=bool(self.tta.get("flip")),
                           window=self.tta.get("window"), stride=self.tta.get("stride"))

    def _eval_step(self, batch: dict[str, Any], cm: ConfusionMatrix) -> torch.Tensor:
        scores = self.infer(batch["image"])
        if "mask" in batch:
            cm.update(scores, batch["mask"])
        return scores

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self._eval_step(batch, self.val_cm)
        if batch_idx == 0:
            columns = self.panel_columns(scores)
            self._panel_batch = {"batch": batch, "pred": scores.argmax(1), "columns": columns}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self._eval_step(batch, self.test_cm)
        if self.dump is not None:
            self.dump.add(batch, scores.argmax(1))

    def _log_confusion(self, cm: ConfusionMatrix, prefix: str) -> None:
        result = cm.compute()
        self.log(f"{prefix}/mIoU", result["mIoU"], sync_dist=False)
        self.log(f"{prefix}/pixel_acc", result["pixel_acc"], sync_dist=False)
        if self.class_names and self.class_names[0] == "background":  # class-agnostic over/under-segmentation
            for key in ("fg_precision", "fg_recall", "fg_class_acc"):
                if result[key] == result[key]:  # not NaN
                    self.log(f"{prefix}/{key}", result[key], sync_dist=False)
        for name, iou in zip(self.class_names, result["iou"].tolist()):
            if iou == iou:  # not NaN: the class was present
                self.log(f"{prefix}/IoU_{name}", iou, sync_dist=False)
        cm.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_confusion(self.val_cm, "val")
        self._send_panels()

    def on_test_epoch_end(self) -> None:
        self._log_confusion(self.test_cm, "test")
        if self.dump is not None:
            self.dump.finish(self.global_rank)

    def panel_columns(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra panel columns (title -> (B, H, W) map; floats in [0, 1] are drawn as heat maps)."""
        return {}

    def _panels_due(self) -> bool:
        every = int(self.panels.get("every_n_epochs", 1))
        if every <= 0 or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return False
        return self.current_epoch % every == 0

    def _send_panels(self) -> None:
        if self._panel_batch is None or not self._panels_due():
            return
        batch, pred = self._panel_batch["batch"], self._panel_batch["pred"]
        columns = self._panel_batch.get("columns") or {}
        self._draw_panels("val/panels", batch, pred, batch.get("mask"), columns)
        self._panel_batch = None

    def _draw_panels(self, tag, batch, pred, target, columns, target_title: str = "GT") -> None:
        n = min(int(self.panels.get("max_images", 4)), batch["image"].shape[0])
        images = [denormalize(batch["image"][i]) for i in range(n)]
        targets = [target[i].cpu().numpy() if target is not None else None for i in range(n)]
        preds = [pred[i].cpu().numpy() for i in range(n)]
        extras = {title: [m[i].float().cpu().numpy() if m.is_floating_point() else m[i].cpu().numpy()
                          for i in range(n)] for title, m in columns.items()}
        log_panels(self.loggers, tag, images, targets, preds, self.global_step, self.class_names,
                   extras=extras, target_title=target_title)

    # -- optimisation --------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Named parameter groups for lr multipliers; methods with extra modules may override."""
        return param_groups(self.model)

    def configure_optimizers(self):
        sched = self.schedule
        optimizer = build_optimizer(sched["optimizer"], self.parameter_groups(), _plain(sched["lr_mult"]))
        total = int(self.trainer.estimated_stepping_batches)
        kwargs = dict(_plain(sched["scheduler"]))
        interval = kwargs.pop("interval", "step")
        if interval == "epoch":
            total = int(self.trainer.max_epochs)
        scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, total, **kwargs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def upsample_like(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
