"""SEAM (``method=seam``): siamese CAM training with ER, PCM and ECR/OHEM (Wang et al., CVPR 2020).

One training step, as released (``YudeWang/SEAM : train_SEAM.py:104-142``):

* view 1 = the crop ``I``; view 2 = ``A(I)`` = bilinear rescale by ``transform_scale`` (0.3,
  align_corners=True). The network returns ``cam`` (21 ch, background first) and the PCM output
  ``cam_rv`` for each view, both upsampled to the view size (bilinear, align_corners=True).
* ``L_cls`` = mean over the views of MLSM(GAP(cam)[1:], labels); plus, when ``amp.enabled``, the
  adaptive min-pooling term on ``cam_rv * label`` (mean over views), logged as ``amp``.
* ``y_o = A(max_norm(cam_1)) * l``, ``rv_o = A(max_norm(cam_rv_1)) * l``, ``y_t = max_norm(cam_2) * l``,
  ``rv_t = max_norm(cam_rv_2) * l`` (``l`` = label with background 1).
* ``L_ER = mean |y_o[1:] - y_t[1:]|``; ``L_ECR = ohem(|maxonehot(bg(y_t)).detach() - rv_o|) +
  ohem(|maxonehot(bg(y_o)).detach() - rv_t|)`` with the top ``ohem_ratio`` (0.2) of channels x pixels.
* total = w_cls L_cls + w_amp L_amp + w_er L_ER + w_ecr L_ECR, all weights 1.

Gradient routing (replicated exactly; tested in ``tests/test_seam.py``): the PCM input CAM is
normalised under ``no_grad`` from ``cam.detach()``, the PCM's backbone taps are detached and the ECR
targets are detached. Hence

* ``L_cls`` and ``L_ER`` train the backbone and the classifier ``fc8`` (foreground channels only);
* ``L_ECR`` and ``L_amp`` train **only** the PCM projections (theta_3, theta_4, f9) - never the
  backbone or ``fc8``;
* the background channel 0 of ``fc8`` gets no gradient at all (it is used only through the
  detached PCM input / ECR targets).

Inference (``infer_SEAM.py``): multi-scale x flip of the **PCM output** foreground channels, each
pass upsampled twice as released: to the pass's input size with ``align_corners=True`` (inside the
network's forward, ``resnet38_SEAM.py``), then to the original size with ``align_corners=False``
(``infer_SEAM.py``; :func:`~segexp.methods.cam.sum_over_passes`). Upsampling once from the feature
grid moves 5-16 % of the label pixels at background 0.26. Then the foreground channels are
label-masked, summed, min-max normalised (``cam_norm: minmax``), background = constant (0.26).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segexp.losses.cam import multilabel_soft_margin
from segexp.losses.seam import adaptive_min_pooling_loss, ecr_loss, er_loss, max_norm
from segexp.losses.weights import term_weights
from segexp.methods.cam import CAM

__all__ = ["SEAM"]


class SEAM(CAM):
    TERMS: tuple[str, ...] = ("cls", "er", "ecr", "amp")  # the loss terms it weights (method.weights)

    def __init__(
        self,
        *args: Any,
        transform_scale: float = 0.3,
        ohem_ratio: float = 0.2,
        weights: dict[str, float] | None = None,
        amp: dict[str, Any] | None = None,
        inference_map: str = "cam_rv",
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "seam")
        kwargs.setdefault("cam_norm", "minmax")
        super().__init__(*args, **kwargs)
        if not self.background_first or getattr(self.model, "pcm", None) is None:
            raise ValueError("SEAM needs a CAMNet with background_first=true and a pcm")
        if inference_map not in ("cam_rv", "cam"):
            raise ValueError(f"inference_map must be 'cam_rv' or 'cam', got {inference_map!r}")
        self.transform_scale = float(transform_scale)
        self.ohem_ratio = float(ohem_ratio)
        self.weights = term_weights(weights, type(self).TERMS)  # conf/method/<name>.yaml
        amp = dict(amp or {})
        self.amp_enabled = bool(amp.get("enabled", True))
        self.amp_fraction = float(amp.get("fraction", 0.25))
        self.inference_map = inference_map

    def _views(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        img2 = F.interpolate(images, scale_factor=self.transform_scale, mode="bilinear", align_corners=True)
        out1, out2 = self(images), self(img2)
        for out, img in ((out1, images), (out2, img2)):
            for k in ("cam", "cam_rv"):
                out[k] = F.interpolate(out[k], img.shape[-2:], mode="bilinear", align_corners=True)
        return out1, out2

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.view_losses(*self._views(batch["image"]), batch["labels"])

    def view_losses(
        self, out1: dict[str, torch.Tensor], out2: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """SEAM's terms from the outputs of the two views (subclasses add their own on the same views)."""
        lab = torch.cat([torch.ones_like(labels[:, :1]), labels], 1).to(out1["cam"].dtype)[..., None, None]
        small = out2["cam"].shape[-2:]

        losses = {
            "cls": self.weights["cls"]
            * 0.5
            * (
                multilabel_soft_margin(self.cls_logits(out1), labels)
                + multilabel_soft_margin(self.cls_logits(out2), labels)
            ),
        }
        if self.amp_enabled:
            losses["amp"] = (
                self.weights["amp"]
                * 0.5
                * (
                    adaptive_min_pooling_loss((out1["cam_rv"] * lab)[:, 1:], self.amp_fraction)
                    + adaptive_min_pooling_loss((out2["cam_rv"] * lab)[:, 1:], self.amp_fraction)
                )
            )

        def down(x: torch.Tensor) -> torch.Tensor:  # A(.) on maps of view 1
            return F.interpolate(x, small, mode="bilinear", align_corners=True)

        y_o = down(max_norm(out1["cam"])) * lab
        rv_o = down(max_norm(out1["cam_rv"])) * lab
        y_t = max_norm(out2["cam"]) * lab
        rv_t = max_norm(out2["cam_rv"]) * lab
        losses["er"] = self.weights["er"] * er_loss(y_o, y_t)
        losses["ecr"] = self.weights["ecr"] * self.ecr(y_o, y_t, rv_o, rv_t)
        return losses

    def cls_logits(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Foreground image logits of one view for ``cls`` (GAP of the CAM; PPC pools otherwise)."""
        return self.fg_logits(out["cam"])

    def ecr(
        self, y_o: torch.Tensor, y_t: torch.Tensor, rv_o: torch.Tensor, rv_t: torch.Tensor
    ) -> torch.Tensor:
        """ECR with OHEM on the label-masked, max-normalised maps of both views (A(.) applied)."""
        return ecr_loss(y_o, y_t, rv_o, rv_t, self.ohem_ratio)

    def fg_cams(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground channels of the PCM output (``inference_map: cam_rv``, released) or of the CAM,
        at the size of ``images`` (``align_corners=True``, as the released forward returns them)."""
        cams = self(images)[self.inference_map][:, 1:]
        return F.interpolate(cams, images.shape[-2:], mode="bilinear", align_corners=True)
