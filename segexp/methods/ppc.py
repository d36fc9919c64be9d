"""PPC (``method=ppc``): EPS + PCM + pixel-to-prototype contrast, image labels + saliency maps.

Du et al., CVPR 2022 ("Weakly supervised semantic segmentation by pixel-to-prototype contrast") on
the EPS base (Lee et al., CVPR 2021), as its authors released it: ``usr922/wseg@c62f0d2c``, branch
``esp`` (``module/train.py``, ``eps.py``, ``network/resnet38_contrast.py``, ``contrast_infer.py``,
``script/script_contrast.sh``). Built on :class:`~segexp.methods.seam.SEAM` (PCM, ER, ECR/OHEM,
adaptive min-pooling are SEAM's code). One step:

* views: the crop and the whole crop resized to ``view_size`` x ``view_size`` (128 for a 448 crop);
  CAMs and PCM outputs stay on the feature grid (SEAM upsamples them to the view);
* ``cls``: MLSM on the GAP of the CAM of both views (mean) + SEAM's adaptive min-pooling ``amp``;
* ``sal``: EPS on the CAM and on the PCM output of both views, ``mean(eps(cam1), eps(cam2)) +
  mean(eps(rv1), eps(rv2))`` (tau 0.4 from the script, alpha 0.5); view 2's saliency is the map
  resized with the view;
* ``er``, ``ecr``: SEAM's (``official_quirks``: the released background-last ECR slip, below);
* on the ``contrast_size`` grid (16), per view: pseudo labels (min-max normalised PCM output, the
  background a constant 0.10, argmax of ``softmax(scores * [1, labels])``) and prototypes (score-
  weighted mean feature of each class's top hw/16 scores over the batch), then three terms with
  temperature 0.1, weight 0.1 each (:mod:`segexp.losses.ppc`):
  ``ppc_cross`` (pixels vs the other view's prototypes), ``ppc_cross_cam`` (own prototypes, the
  other view's pseudo labels), ``ppc_intra`` (own prototypes and labels, semi-hard prototype
  mining + hard pixel sampling). All pixels count, the background too.

Total: ``cls + amp + sal + er + ecr + 0.1 (ppc_cross + ppc_cross_cam + ppc_intra)`` (``train_contrast``).

FBR's variant (:class:`PPCasFBR`, ``method=ppc_fbr``, the base of ``method=fbr_ppc``;
``XuYin94/FBR@fd1aeb85``) changes three things: Thresholded Average Pooling (0.10) for ``cls``,
background pixels masked out of both cross-view terms, and no ``ppc_intra`` (FBR's ``fg`` term takes
its place). Background score 0.10 and top-k hw/16 are the same in both releases; the SEAM-base PPC
(``usr922/wseg`` master @e96b9610, ``contrast_train.py``: image labels only) uses 0.20 and hw/8 - not
this method.

Background channel. The released network puts the background in the *last* fc8 channel (20);
segexp keeps it first (channel 0) everywhere, so a released channel ``c < 20`` is our ``c + 1``.
Nothing changes numerically except where the release itself mixes the conventions (below).

Paper and release. The paper's text was not at hand here (only its abstract, which names both
mining strategies), so every default is the release's value; where the release's code contradicts
its own evident intent, segexp follows the intent and ``official_quirks: true`` reproduces the code:

1. ECR: the inherited ``max_onehot`` keeps channel 0 - on a background-last map that is *aeroplane* -
   and lets the background join the foreground argmax of the ECR targets (:class:`ReleasedECRSlip`);
2. ``ppc_intra``: the semi-hard window (``topk(neg_scores, 13)[:, 3:]``) ranks the pixel's own
   prototype among its "negatives" (it is prepended as the positive as well, so it can sit in the
   denominator twice, or push the window one rank down); here the negatives are the other classes'
   prototypes (:func:`~segexp.losses.ppc.semi_hard_negatives`);
3. ``ppc_intra``: classes with a single pixel add nothing but count in the mean over classes; here
   the mean runs over the classes that contribute;
4. the contrast-grid min-max sets pixels below ``min + 1e-5`` to 0 before subtracting the minimum,
   so they end at ``-(min + 1e-5) / (max - min + 1e-5)``; here (SEAM's ``max_norm``, a min-max by
   definition) they get 0 (:func:`~segexp.losses.seam.released_min_max`).

Compared with the release (``tests/test_ppc_release.py``: its code run on seeded inputs, values and
gradients stored as constants):

* matched to float precision (equal values, prototypes within 6e-8, gradients within 5e-10):
  ``cls + amp``, ``sal``, ``er``,
  ``ecr`` (quirks), pseudo labels, prototypes, ``ppc_cross``, ``ppc_cross_cam``, ``ppc_intra``
  (quirks; the hard-pixel draws made equal by seeding both sides);
* matched by reading: the views and saliency resizing, the network (fc8 on conv6 without dropout,
  1x1 ReLU projection to 128, the PCM), weights, temperature, inference (softmax over all channels
  of the plain CAM per pass, foreground x label, 4 scales x flip summed, ``/ (max + 1e-5)``,
  background 0.22 from the script, ``cam_norm: max``);
* intentionally different: items 1-4 above (differences on the test inputs: ``ecr`` 0.029,
  ``ppc_intra`` 0.030, mostly item 3; item 4 gives the same pseudo labels - the background's 0.10
  wins either way - and the same prototypes unless a class has fewer than k positive scores in the
  batch, then a zero prototype instead of the mean of k tied pixels); the
  release's per-pixel random negatives (``random.sample(range(21), 10)``) are computed but never
  used - not reproduced; pixels are drawn with torch's RNG instead of Python's ``random``; the
  release hard-codes 21 classes (``topk(.., 13)``), here the window shrinks to the prototypes there
  are; both views are resized to ``contrast_size`` (the release resizes view 1 only, view 2 being
  16 x 16 already); the released ``contrast_infer.py`` of this branch cannot run the contrast network
  (no ``contrast`` network type in ``parse_args``/``infer_cam_mp``, no ``forward_cam``): segexp runs
  its ``eps`` path, as FBR's fixed copy does.

Release differences (data pipeline / inference), read from ``contrast_train.py``, ``data/dataset.py``,
``util/imutils.py``, ``module/optimizer.py``, ``contrast_infer.py``, ``script_contrast.sh`` against
``conf/experiment/seam_voc.yaml`` / ``fbr_voc.yaml`` (FBR's copy has the same pipeline):

* runs as released: no - ``get_dataloader`` has no ``contrast`` branch (raises) and ``get_model`` asserts
  the network name for ``.params`` weights; intentionally different: segexp runs the saliency dataset,
  as FBR's copy does;
* random scale: ``RandomResizeLong(448, 768)`` any integer, PIL bicubic; intentionally different: long side
  448..768 in steps of 64, cv2 bicubic (albumentations' ``LongestMaxSize`` takes a list);
* flip 0.5, ColorJitter(0.3, 0.3, 0.3, 0.1) on the image only, ImageNet mean / std: matched
  (albumentations' jitter, torchvision's in the release);
* crop 448: release pads the *normalised* image with 0 (the mean colour) at a random offset;
  matched (``seam_voc``: ``fill: [124, 116, 104]``, the rounded mean before normalisation,
  ``position: random``);
* saliency: RGB PNG averaged / 255, resized *bicubic* with the image, padded 0; intentionally different:
  a grey map carried as a mask (nearest); view 2's map bilinear to 128 (align_corners): matched;
* batch 8 (drop_last), lr 0.01, groups 1x / 2x / 10x / 20x, wd 5e-4 (0 on biases), momentum 5e-4
  (``PolyOptimizer``'s positional slip), poly 0.9 per step: matched (``seam_poly``);
* length: 10,000 x ``iter_size`` 2 = 20,000 optimizer steps (a step per batch, no accumulation), poly
  horizon 10582 // 8 x 15 = 19,830; intentionally different: 15 epochs = 19,830 steps (the last 170
  released steps run at 1.4e-4 x the initial lr);
* image labels: ``cls_labels.npy`` (psa's, from the XML annotations): matched (``voc_aug``'s
  ``labels_from: xml``);
* CAM inference: scales 0.5 / 1 / 1.5 / 2 x flip, softmax over 21 channels per pass, bilinear to the
  image, foreground x label, summed, ``/ (max + 1e-5)``, background 0.22, scored on VOC train without
  CRF: matched; the rescale is PIL bicubic (antialiased at 0.5), here torch bicubic - intentionally
  different (on the device);
* weights exported: the final ones; differs: the pipeline exports the checkpoint of the best
  ``val/cam_best_mIoU`` (VOC train GT) - reported, not changed.

Other choices: the absent classes' and the background's prototypes stay in the softmax of the cross-
view terms, as released.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segexp.losses.fbr import ecr_loss_bg_last_slip
from segexp.losses.ppc import (
    ContrastGrid,
    contrast_grid,
    eps_saliency_loss,
    flat_features,
    ppc_contrast_losses,
    ppc_intra_view_loss,
    tap_logits,
)
from segexp.losses.weights import term_weights
from segexp.methods.seam import SEAM

__all__ = ["PPC", "PPCasFBR", "ReleasedECRSlip", "ContrastGrids", "SEAM_TERMS", "PPC_TERMS"]

SEAM_TERMS = SEAM.TERMS
PPC_TERMS = ("sal", "ppc_cross", "ppc_cross_cam", "ppc_intra")
INTRA_DEFAULTS = {"skip": 3, "negatives": 10, "pixel_fraction": 0.5, "pixel_pool": 0.6}


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
    shared by PPC's prototype contrast and FBR's terms.

    ``QUIRK_REGION_MASKED_PROTOTYPES``: under ``official_quirks`` the prototypes read the scores with
    each class zeroed outside its pseudo-label region - the in-place side effect of FBR's
    ``get_reliable_pseudo_label`` (``XuYin94/FBR@fd1aeb85``, ``module/train.py``), absent from PPC's
    release (``usr922/wseg``), so False here and True on FBR's methods."""

    QUIRK_REGION_MASKED_PROTOTYPES: bool = False

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
        quirks = bool(getattr(self, "official_quirks", False))  # ReleasedECRSlip's flag
        masked = quirks and self.QUIRK_REGION_MASKED_PROTOTYPES
        return [
            contrast_grid(out, labels, self.contrast_size, self.bg_score, self.top_fraction, quirks, masked)
            for out in views
        ]


class PPC(ContrastGrids, ReleasedECRSlip, SEAM):
    """PPC as its authors released it (``usr922/wseg``, branch ``esp``); see the module docstring."""

    TERMS = SEAM_TERMS + PPC_TERMS

    def __init__(
        self,
        *args: Any,
        view_size: int = 128,
        tap_threshold: float | None = None,
        saliency: dict[str, float] | None = None,
        temperature: float = 0.1,
        mask_background: bool = False,
        intra: dict[str, float] | None = None,
        inference_softmax: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "ppc")
        kwargs.setdefault("cam_norm", "max")
        kwargs.setdefault("inference_map", "cam")
        weights = term_weights(kwargs.pop("weights", None), type(self).TERMS)  # conf/method/ppc*.yaml
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
        self.mask_background = bool(mask_background)
        intra = {**INTRA_DEFAULTS, **dict(intra or {})}
        unknown = sorted(set(intra) - set(INTRA_DEFAULTS))
        if unknown:
            raise ValueError(f"method.intra: unknown key(s) {unknown}; known: {list(INTRA_DEFAULTS)}")
        self.intra = intra
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
        """Foreground logits by GAP (PPC's release); Thresholded Average Pooling when
        ``tap_threshold`` is set (FBR's network)."""
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
        if w["ppc_cross"] > 0 or w["ppc_cross_cam"] > 0:
            cross, cross_cam = ppc_contrast_losses(grids[0], grids[1], self.temperature, self.mask_background)
            losses["ppc_cross"] = w["ppc_cross"] * cross
            losses["ppc_cross_cam"] = w["ppc_cross_cam"] * cross_cam
        if w["ppc_intra"] > 0:
            losses["ppc_intra"] = w["ppc_intra"] * 0.5 * sum(self.intra_view(g) for g in grids)
        return losses

    def intra_view(self, grid: ContrastGrid) -> torch.Tensor:
        """The intra-view term of one view (its pixels, prototypes and pseudo labels)."""
        c = self.intra
        return ppc_intra_view_loss(
            flat_features(grid.f_proj),
            grid.prototypes,
            grid.pseudo.reshape(-1),
            self.temperature,
            int(c["skip"]),
            int(c["negatives"]),
            float(c["pixel_fraction"]),
            float(c["pixel_pool"]),
            self.official_quirks,
        )

    # -- inference ------------------------------------------------------------------------------
    def fg_cams(self, images: torch.Tensor) -> torch.Tensor:
        """Released inference: softmax over all channels of the plain CAM, foreground part."""
        if not self.inference_softmax:
            return super().fg_cams(images)
        return F.softmax(self(images)[self.inference_map], 1)[:, 1:]


class PPCasFBR(PPC):
    """The PPC base as FBR's release runs it (``XuYin94/FBR@fd1aeb85``, ``method=ppc_fbr``; under
    ``method=fbr_ppc``): Thresholded Average Pooling (0.10) for ``cls``, background pixels masked
    out of both cross-view terms, and no PPC intra-view term (FBR puts its own ``fg`` term there).
    Everything else - views, EPS, ER/ECR, pseudo labels, prototypes, inference - is PPC's, except
    that ``official_quirks`` also reproduces FBR's region-masked prototypes (:class:`ContrastGrids`)."""

    QUIRK_REGION_MASKED_PROTOTYPES = True

    def __init__(
        self, *args: Any, tap_threshold: float | None = 0.10, mask_background: bool = True, **kwargs: Any
    ):
        kwargs.setdefault("name", "ppc_fbr")
        weights = {"ppc_intra": 0.0, **dict(kwargs.pop("weights", None) or {})}
        super().__init__(
            *args, tap_threshold=tap_threshold, mask_background=mask_background, weights=weights, **kwargs
        )
