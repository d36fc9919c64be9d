"""PPC (``method=ppc``): EPS + PCM + pixel-to-prototype contrast, image labels + saliency maps.

The I+S base of FBR (Du et al., CVPR 2022 "Weakly supervised semantic segmentation by pixel-to-
prototype contrast", on EPS, Lee et al., CVPR 2021) as the FBR release runs it (``XuYin94/FBR``:
``network/resnet38_contrast.py``, ``module/train.py``, ``eps.py``; ``/shared/methods/fbr.md`` s.2).
Built on :class:`~segexp.methods.seam.SEAM` (PCM, ER, ECR/OHEM, adaptive min-pooling are SEAM's
code); one step:

* views: the crop and the whole crop resized to ``view_size`` x ``view_size`` (released 128 for a
  448 crop); CAMs and PCM outputs stay on the feature grid (SEAM upsamples them to the view);
* ``cls``: MLSM on Thresholded-Average-Pooled logits (``tap_threshold`` 0.10; null = GAP) of both
  views (mean), + SEAM's adaptive min-pooling ``amp`` on the PCM output;
* ``sal``: EPS on the CAM and on the PCM output of both views:
  ``mean(eps(cam1), eps(cam2)) + mean(eps(rv1), eps(rv2))`` (tau 0.4 from the release script,
  alpha 0.5); view 2's saliency is the map bilinearly resized with the view;
* ``er``, ``ecr``: SEAM's (``official_quirks``: the released background-last ECR slip, below);
* ``ppc_cross``, ``ppc_intra``: the prototype contrast on the ``contrast_size`` grid (16), weights
  0.1 each, temperature 0.1 (:func:`~segexp.losses.ppc.ppc_contrast_losses`).

Total: ``cls + amp + sal + er + ecr + 0.1 ppc_cross + 0.1 ppc_intra`` (release line 427 minus FBR).

Background channel. The released network puts the background in the *last* fc8 channel (20);
segexp keeps it first (channel 0) everywhere - CAMNet's ``background_first``, the PCM input, the
ECR targets, the pseudo labels - so a released channel ``c < 20`` is our ``c + 1`` and 20 is our
0. Nothing changes numerically except the one place where the release itself mixes the two
conventions: its ``max_onehot`` (inherited from SEAM) keeps channel 0, i.e. *aeroplane*, and lets
the real background join the foreground argmax of the ECR targets. ``official_quirks: true``
reproduces that slip (:class:`ReleasedECRSlip`, used by FBR too); the default is SEAM's ECR.

Choices where the release is silent or differs from SEAM's base:

* no Dropout before the classifier (the released ``fc8`` is applied to conv6 directly):
  ``model.dropout: 0``;
* the prototypes use the un-zeroed normalised scores (see :mod:`segexp.methods.fbr`); the absent
  classes' and the background's prototypes stay in the softmax as released;
* inference (``contrast_infer.py``): softmax over all 1+K channels of the plain CAM per pass,
  foreground probabilities x label, summed over scales x flips, max-normalised
  (``cam_norm: max``), background threshold 0.22 (release script).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segexp.losses.fbr import ecr_loss_bg_last_slip
from segexp.losses.ppc import ContrastGrid, contrast_grid, eps_saliency_loss, ppc_contrast_losses, tap_logits
from segexp.methods.seam import SEAM

__all__ = ["PPC", "ReleasedECRSlip", "ContrastGrids", "check_weights", "SEAM_TERMS", "PPC_TERMS"]

SEAM_TERMS = ("cls", "er", "ecr", "amp")
PPC_TERMS = ("sal", "ppc_cross", "ppc_intra")
PPC_WEIGHTS = {"sal": 1.0, "ppc_cross": 0.1, "ppc_intra": 0.1}


def check_weights(weights: dict[str, float], known: tuple[str, ...]) -> None:
    """``method.weights`` may name only terms this method computes (a typo would silently do nothing)."""
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"method.weights: unknown term(s) {unknown}; known: {list(known)}")


class ReleasedECRSlip:
    """Mixin for a SEAM-based method: ``official_quirks: true`` swaps SEAM's ECR for the released
    PPC/FBR one, whose ``max_onehot`` assumes the background first on a background-last map."""

    def __init__(self, *args: Any, official_quirks: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.official_quirks = bool(official_quirks)

    def ecr(
        self, y_o: torch.Tensor, y_t: torch.Tensor, rv_o: torch.Tensor, rv_t: torch.Tensor
    ) -> torch.Tensor:
        if self.official_quirks:
            return ecr_loss_bg_last_slip(y_o, y_t, rv_o, rv_t, self.ohem_ratio)
        return super().ecr(y_o, y_t, rv_o, rv_t)


class ContrastGrids:
    """Mixin: both views on the contrast grid (features, pseudo labels, prototypes), the input
    shared by PPC's prototype contrast and FBR's terms."""

    def __init__(
        self,
        *args: Any,
        contrast_size: int = 16,
        bg_score: float = 0.10,
        top_fraction: float = 1 / 16,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.contrast_size = int(contrast_size)
        self.bg_score = float(bg_score)
        self.top_fraction = float(top_fraction)

    def contrast_grids(
        self, views: tuple[dict[str, torch.Tensor], ...], labels: torch.Tensor
    ) -> list[ContrastGrid]:
        return [
            contrast_grid(out, labels, self.contrast_size, self.bg_score, self.top_fraction) for out in views
        ]


class PPC(ContrastGrids, ReleasedECRSlip, SEAM):
    TERMS = SEAM_TERMS + PPC_TERMS

    def __init__(
        self,
        *args: Any,
        view_size: int = 128,
        tap_threshold: float | None = 0.10,
        saliency: dict[str, float] | None = None,
        temperature: float = 0.1,
        inference_softmax: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "ppc")
        kwargs.setdefault("cam_norm", "max")
        kwargs.setdefault("inference_map", "cam")
        weights = {**PPC_WEIGHTS, **dict(kwargs.pop("weights", None) or {})}
        check_weights(weights, type(self).TERMS)
        kwargs.setdefault("train_keys", ("image", "labels", "saliency"))
        if weights["sal"] > 0 and "saliency" not in kwargs["train_keys"]:
            raise ValueError(
                "method.train_keys must include 'saliency' while method.weights.sal > 0 (EPS loss)"
            )
        super().__init__(*args, weights=weights, **kwargs)
        if getattr(self.model, "fbr_heads", None) is None:
            raise ValueError("PPC needs a model with a projection head (segexp.models.fbr.FBRNet)")
        self.view_size = int(view_size)
        self.tap_threshold = None if tap_threshold is None else float(tap_threshold)
        sal = {"tau": 0.4, "alpha": 0.5, **dict(saliency or {})}
        self.sal_tau, self.sal_alpha = float(sal["tau"]), float(sal["alpha"])
        self.temperature = float(temperature)
        self.inference_softmax = bool(inference_softmax)

    # -- views and losses -----------------------------------------------------------------------
    def _views(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The crop and the crop resized to ``view_size``; maps stay on the feature grid."""
        size = (self.view_size, self.view_size)
        return self(images), self(F.interpolate(images, size, mode="bilinear", align_corners=True))

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        views = self._views(batch["image"])
        return self.base_losses(views, batch, self.contrast_grids(views, batch["labels"]))

    def cls_logits(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Foreground logits by Thresholded Average Pooling (released); GAP if ``tap_threshold`` is null."""
        if self.tap_threshold is None:
            return super().cls_logits(out)
        weight = self.model.head.classifier.weight
        return tap_logits(out["features"], weight, self.tap_threshold)[:, 1:]

    def base_losses(
        self, views: tuple[dict[str, torch.Tensor], ...], batch: dict[str, Any], grids: list[ContrastGrid]
    ) -> dict[str, torch.Tensor]:
        out1, out2 = views
        labels = batch["labels"]
        losses = self.view_losses(out1, out2, labels)
        w = self.weights
        if w["sal"] > 0:
            sal1 = batch["saliency"].to(out1["cam"].dtype)[:, None]
            sal2 = F.interpolate(sal1, (self.view_size,) * 2, mode="bilinear", align_corners=True)

            def eps(cam: torch.Tensor, sal: torch.Tensor) -> torch.Tensor:
                return eps_saliency_loss(cam, sal, labels, self.sal_tau, self.sal_alpha)

            losses["sal"] = w["sal"] * (
                0.5 * (eps(out1["cam"], sal1) + eps(out2["cam"], sal2))
                + 0.5 * (eps(out1["cam_rv"], sal1) + eps(out2["cam_rv"], sal2))
            )
        if w["ppc_cross"] > 0 or w["ppc_intra"] > 0:
            cross, intra = ppc_contrast_losses(grids[0], grids[1], self.temperature)
            losses["ppc_cross"] = w["ppc_cross"] * cross
            losses["ppc_intra"] = w["ppc_intra"] * intra
        return losses

    # -- inference ------------------------------------------------------------------------------
    def fg_cams(self, images: torch.Tensor) -> torch.Tensor:
        """Released inference: softmax over all channels of the plain CAM, foreground part."""
        if not self.inference_softmax:
            return super().fg_cams(images)
        return F.softmax(self(images)[self.inference_map], 1)[:, 1:]
