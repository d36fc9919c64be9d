"""Plain CAM baseline (``method=cam``): backbone + 1x1 classifier, GAP, multilabel soft-margin loss.

Also the base of every image-level CAM method (SEAM, SC-CAM, ...): it owns

* ``fg_cams(images)``: raw foreground CAMs on the feature grid (what inference aggregates);
* ``multiscale_cams(image, labels)``: the multi-scale x flip CAM of one image at its own size,
  label-masked and normalised as the method specifies (CAM export, stage 2 of the pipeline);
* validation/test: ``predict`` gives ``[bg = bg_threshold, normalised CAMs]`` class scores, masked by
  the image labels when the batch has them (``eval_keys`` include ``labels``), so ``val/mIoU`` is the
  single-scale CAM mIoU at ``bg_threshold``; ``val/cam_best_mIoU`` / ``val/cam_best_threshold`` read
  the background-threshold curve (:class:`~segexp.metrics.cam.CAMThresholdCurve`; best threshold
  chosen on the evaluated split itself - optimistic, as in SEAM's ``--curve``); ``val/cls_F1`` is the
  classifier's micro-averaged multi-label F1 (logit > 0), so a CAM score can be read against how well
  the network recognises the classes at all. The test loop logs the same as ``test/*``, so
  ``segexp.eval split=val`` scores a checkpoint exactly as validation did.

Normalisations (``cam_norm``): ``max`` = psa/AffinityNet ``infer_cls.py`` (ReLU per pass, sum,
divide by max + 1e-5); ``minmax`` (SEAM's default) = a min-max normalisation as defined - the
minimum maps to 0, the maximum to ~1 - with SEAM's epsilon and the arithmetic of its training
``max_norm`` (sum, ReLU, ``max(s - min - 1e-5, 0) / (max - min + 1e-5)``); ``minmax_release`` = the
arithmetic of SEAM's ``infer_SEAM.py:72-77`` (YudeWang/SEAM@3212261b) for release parity: values
below min + 1e-5 are set to 0 *before* subtracting the minimum, so those pixels end at
``-(min + 1e-5) / (max - min + 1e-5)`` instead of 0 - about ``-1e-5 / max`` where the minimum is
0, well below 0 where every value is positive, -1 on every pixel of a label-masked (absent)
class; all other pixels are equal (:func:`~segexp.losses.seam.released_min_max`;
``tests/test_seam.py`` holds the release's numbers). Hard labels at a positive background score
are the same under both; soft scores (CRF, random walk) see the negative values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MultilabelF1Score

from segexp.losses.cam import gap_logits, multilabel_soft_margin
from segexp.losses.seam import released_min_max
from segexp.methods.base import SegMethod
from segexp.metrics.cam import CAMThresholdCurve
from segexp.utils.errors import UserError

__all__ = ["CAM", "normalise_cams", "sum_over_passes", "CAM_NORMS"]

CAM_NORMS = ("max", "minmax", "minmax_release")


def normalise_cams(summed: torch.Tensor, mode: str = "max", eps: float = 1e-5) -> torch.Tensor:
    """Per (image, class) normalisation of aggregated CAMs (N, K, H, W) (see the module docstring)."""
    if mode == "max":
        s = summed.clamp(min=0)
        return s / (s.flatten(2).amax(-1)[..., None, None] + eps)
    if mode == "minmax":
        s = summed.clamp(min=0)
        smin = s.flatten(2).amin(-1)[..., None, None]
        smax = s.flatten(2).amax(-1)[..., None, None]
        return ((s - smin - eps) / (smax - smin + eps)).clamp(min=0)
    if mode == "minmax_release":
        return released_min_max(summed, eps)
    raise ValueError(f"cam_norm must be one of {CAM_NORMS}, got {mode!r}")


def sum_over_passes(
    cams_of: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    resize_mode: str,
) -> torch.Tensor:
    """Sum of ``cams_of(view)`` over scales x (flip), each upsampled to the image (bilinear) and unflipped."""
    h, w = image.shape[-2:]
    total = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = image if size == (h, w) else F.interpolate(image, size, mode=resize_mode, align_corners=False)
        for flipped in (False, True) if flip else (False,):
            cam = F.interpolate(
                cams_of(x.flip(-1) if flipped else x), (h, w), mode="bilinear", align_corners=False
            )
            cam = cam.flip(-1) if flipped else cam
            total = cam if total is None else total + cam
    return total


INFERENCE_KEYS = ("scales", "flip", "resize_mode")  # CAM export passes (infer_*.py)

class CAM(SegMethod):
    """CAM classifier. ``model`` is a :class:`~segexp.models.cam_head.CAMNet` with ``num_classes - 1``
    outputs (foreground only) or ``num_classes`` with ``background_first`` (SEAM)."""

    has_classifier = True  # validation reports the multi-label classifier's F1 (``val/cls_F1``)

    def __init__(
        self,
        model: nn.Module,
        name: str = "cam",
        cam_norm: str = "max",
        bg_threshold: float = 0.2,
        cls_weight: float = 1.0,
        inference: dict[str, Any] | None = None,
        **base: Any,
    ):
        super().__init__(**base)
        if cam_norm not in CAM_NORMS:
            raise ValueError(f"cam_norm must be one of {CAM_NORMS}, got {cam_norm!r}")
        self.model = model
        self.name = name
        self.cam_norm = cam_norm
        self.bg_threshold = float(bg_threshold)
        self.cls_weight = float(cls_weight)
        inference = dict(inference or {})
        missing = [key for key in INFERENCE_KEYS if inference.get(key) is None]
        if missing:  # their one home is the method's YAML (conf/method/cam.yaml); no fallback here
            raise UserError(
                f"method.inference.{missing[0]} is not set: CAM methods read scales, flip and resize_mode "
                "from conf/method/<name>.yaml (cam.yaml for the CAM family)"
            )
        self.scales: tuple[float, ...] = tuple(float(s) for s in inference["scales"])
        self.flip: bool = bool(inference["flip"])
        self.resize_mode: str = str(inference["resize_mode"])
        # per evaluated split ("val", "test"): the background-threshold curve and the classifier's F1
        self.curves = nn.ModuleDict({
            split: CAMThresholdCurve(num_classes=self.num_classes, ignore_index=self.ignore_index)
            for split in ("val", "test")
        })
        self.cls_f1 = nn.ModuleDict({
            split: MultilabelF1Score(num_labels=self.num_classes - 1, average="micro", threshold=0.5)
            for split in ("val", "test")
        })

    # -- the network ----------------------------------------------------------------------------
    @property
    def background_first(self) -> bool:
        return bool(getattr(self.model, "background_first", False))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images)

    def fg_logits(self, cam: torch.Tensor) -> torch.Tensor:
        logits = gap_logits(cam)
        return logits[:, 1:] if self.background_first else logits

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self(batch["image"])
        return {"cls": self.cls_weight * multilabel_soft_margin(self.fg_logits(out["cam"]), batch["labels"])}

    def fg_cams(self, images: torch.Tensor) -> torch.Tensor:
        """Raw foreground CAMs (N, K, h, w) that inference aggregates (psa ``forward_cam``:
        ReLU of the CAM)."""
        cam = self(images)["cam"]
        cam = cam[:, 1:] if self.background_first else cam
        return F.relu(cam) if self.cam_norm == "max" else cam

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def multiscale_cams(
        self,
        image: torch.Tensor,
        labels: torch.Tensor | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
    ) -> torch.Tensor:
        """Normalised foreground CAMs (N, K, H, W) of ``image`` (N, 3, H, W): every scale x (flip),
        upsampled to H x W (bilinear, align_corners=False), unflipped, label-masked, summed, normalised."""
        scales = self.scales if scales is None else tuple(scales)
        flip = self.flip if flip is None else flip
        total = sum_over_passes(self.fg_cams, image, scales, flip, self.resize_mode)
        if labels is not None:
            total = total * labels.to(total.dtype)[..., None, None]
        return normalise_cams(total, self.cam_norm)

    def single_scale_cams(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.multiscale_cams(images, labels, scales=(1.0,), flip=False)

    def scores_from_cams(self, cams: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        t = self.bg_threshold if threshold is None else threshold
        bg = torch.full_like(cams[:, :1], t)
        return torch.cat([bg, cams], 1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``[bg_threshold, normalised single-scale CAMs]`` without image labels (all classes allowed)."""
        return self.scores_from_cams(self.single_scale_cams(images))

    def panel_columns(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """The strongest normalised CAM at each pixel, as a heat map beside the prediction."""
        return {"CAM": scores[:, 1:].amax(1).detach().clamp(0, 1)}

    # -- evaluation: CAM mIoU (labels from the batch when present) + threshold curve ---------------
    def _eval_step(self, batch: dict[str, Any], cm) -> torch.Tensor:
        split = "val" if cm is self.val_cm else "test"
        cams = self.single_scale_cams(batch["image"], batch.get("labels"))
        scores = self.scores_from_cams(cams)
        if "mask" in batch:
            cm.update(scores, batch["mask"])
            self.curves[split].update(cams.float(), batch["mask"])
        if "labels" in batch and self.has_classifier:  # fg_cams may not be the raw CAM
            logits = self.fg_logits(self(batch["image"])["cam"])
            self.cls_f1[split].update(torch.sigmoid(logits.float()), batch["labels"].long())
        return scores

    def _log_curve_and_f1(self, split: str) -> None:
        curve, f1 = self.curves[split], self.cls_f1[split]
        if curve.update_called:
            result = curve.compute()
            self.log(f"{split}/cam_best_mIoU", result["best_mIoU"], sync_dist=False)
            self.log(f"{split}/cam_best_threshold", result["best_threshold"], sync_dist=False)
        curve.reset()
        if f1.update_called:
            self.log(f"{split}/cls_F1", f1.compute(), sync_dist=False)  # torchmetrics syncs ranks
        f1.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_curve_and_f1("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._log_curve_and_f1("test")
        super().on_test_epoch_end()


CAMMethod = CAM  # the name before 2026-12-02, which older checkpoints record
