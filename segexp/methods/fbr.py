"""FBR: fine-grained background representation (Yin et al., TCSVT 2024) as a plug-in on two bases.

Bases. FBR is a plug-in; the released code plugs it into PPC (EPS + PCM + prototype contrast, image
labels + saliency, ResNet-38) and into AMN (image labels). Here the FBR terms live once, in
:class:`FBRTerms`, and are plugged into

* ``method=fbr_ppc`` - :class:`FBRPPC` on :class:`~segexp.methods.ppc.PPCasFBR` (the PPC base as
  FBR's release runs it: TAP, background-masked cross-view terms, no PPC intra-view term), the
  paper's headline I+S setting (image labels + saliency maps; ``fbr_voc`` / ``fbr_coco``): the total is the
  release's line 427, ``L_PPC + 0.1 L_sim + 0.1 L_seg + 0.01 L_pcl^bg + 0.1 L_pcl^fg``; the
  contrast grid, pseudo labels and prototypes are computed once per view and shared by PPC's
  prototype contrast and the FBR terms, as in the release's ``get_contrast_loss``;
* ``method=fbr`` - :class:`FBR` on our :class:`~segexp.methods.seam.SEAM` (image labels only: CAM +
  PCM + ER + ECR/OHEM + adaptive min-pooling; SEAM's 0.3x second view), an image-only variant that
  is not a released setting (``fbr_seam_voc``): ``L_SEAM`` + the same FBR terms.

The FBR head and loss settings here are those of the released PPC variant (bank 50,000, weights
0.1 / 0.01, rate 0.6, entropy quantile 0.1, top-k hw/16). FBR on the AMN base (image labels only, the
paper's I setting) is :class:`segexp.methods.amn.FBRAMN` (``method=fbr_amn``), with AMN's values.

One step, per view v of the base's two views, on a ``contrast_size`` grid (released 16 x 16):
pseudo labels from the PCM output ``cam_rv`` (background score 0.10), uncertain pixels, class
prototypes from the view's own FG features; NROIs = k-means (k 8) of each image's background
pixels in the pre-BN ``proj_bg`` space pushed into that view's FIFO bank (one bank per view, as
released); the FBR terms are averaged over the two views.

Paper-faithful (default) vs ``official_quirks: true``. Reading the released code
(``XuYin94/FBR@fd1aeb85``, see ``/shared/methods/fbr.md`` section 5) shows six behaviours that
differ from the paper's description:

1. the pixel-to-NROI loss gets its anchors from ``f_proj.detach()`` built under ``no_grad`` - it
   produces no gradient at all, so the published "NROI" gain cannot come from that term's gradient;
2. its similarity is ``cosine_similarity(anchor[:, None], keys, dim=1)``: the cosine runs over the
   257 keys for each of the 128 channels, and the cross-entropy is over 128 channel "classes";
3. the PPC model puts the background in the last channel, but the inherited ``max_onehot`` of ECR
   keeps channel 0 - the first foreground class is never zeroed and the real background competes
   in the foreground argmax of the ECR targets (a property of the released PPC base itself:
   :class:`~segexp.methods.ppc.ReleasedECRSlip`, shared by both bases);
4. the NROI positive key is the *raw* prototype (``tmp_prototypes``), not the L2-normalised one,
   beside raw NROI centroids; with the cosine of 2. the keys' scales matter, so this changes the
   (gradient-free, hence logged-only) NROI value;
5. the contrast-grid min-max leaves pixels at a channel's minimum at ``-(min + 1e-5) / (max - min
   + 1e-5)`` instead of 0 (:func:`~segexp.losses.seam.released_min_max`; same pseudo labels);
6. ``get_reliable_pseudo_label`` zeroes each class's scores outside its pseudo-label region *in
   place*, so the prototypes computed afterwards read those zeroed scores
   (:func:`~segexp.losses.fbr.region_masked_scores`; ``ContrastGrids.QUIRK_REGION_MASKED_PROTOTYPES``,
   also on ``method=ppc_fbr``). On ``tests/test_ppc_release.py``'s seeded input it moves view 1's
   prototypes by up to 0.014 and the cross-view terms by 1.4e-4 relative.

Faithful mode computes the NROI contrast on non-detached L2-normalised ``proj_fg`` features of the
uncertain pixels with the cosine over the feature dimension of each key against the L2-normalised
prototype, ECR as SEAM's and prototypes from the unmasked scores. Quirks mode reproduces 1-6 (the FG
active-sampling contrast has gradients in the released PPC variant and is the same in both modes - its
cosine over D does not see the prototype's scale; in the released AMN variant it is detached too:
``FBRAMN``'s quirks mode reproduces that).

Choices where the release is ambiguous or undesirable (all documented in the code):

* the background prototype - a top-k over a constant - is never a positive; on the PPC base it
  stays one of the negatives of PPC's softmax, as released;
* NROI k-means: batched torch k-means++ (one restart, up to 300 Lloyd iterations, seeded by the
  global step) instead of sklearn ``KMeans(8)`` per image (non-deterministic, CPU);
* the bank is pushed before sampling (an empty bank gives 0 instead of the released NameError);
* ``L_seg`` uses the view's CAM resized back to the head's grid (SEAM's views keep CAMs at input size;
  PPC's stay on the grid).

Release differences (data pipeline / inference), ``XuYin94/FBR@fd1aeb85`` (``data/dataset.py``,
``util/imutils.py``, ``module/optimizer.py``, ``contrast_train.py``, ``contrast_infer.py``,
``script/script_contrast.sh``) against ``conf/experiment/fbr_voc.yaml``:

* crop, scale, flip, jitter, saliency, normalisation, batch, lr / groups / momentum slip, step count,
  image labels, CAM inference (softmax, 4 scales x flip, background 0.22): the PPC release's, file for
  file - the differences listed in :mod:`segexp.methods.ppc` hold here unchanged;
* runs as released: yes (its ``get_dataloader`` / ``get_model`` / ``contrast_infer.py`` fix PPC's);
* scored output: ``crf_png/crf_5_8`` - dense CRF, background ``(1 - max)^8``, 5 iterations, kernels 3 / 3
  and 80 / 13 / 10, on VOC train; matched: ``fbr_voc`` sets ``pipeline.stages.crf`` alpha 8, 5 iterations
  (the stage defaults, alpha 4 and 10 iterations, are psa's);
* weights exported: the final ones (``checkpoint_contrast1.pth``); differs: the pipeline's best
  ``val/cam_best_mIoU`` checkpoint - reported;
* FBR on SEAM (``method=fbr``) has no release; FBR's ``AMN/`` folder: :mod:`segexp.methods.amn`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segexp.losses.fbr import (
    background_seg_loss,
    decorrelation_loss,
    fg_active_contrast_loss,
    nroi_centroids,
    nroi_contrast_loss,
    uncertain_mask,
)
from segexp.losses.ppc import ContrastGrid, flat_features
from segexp.losses.weights import term_weights
from segexp.methods.ppc import PPC, SEAM_TERMS, ContrastGrids, PPCasFBR, ReleasedECRSlip
from segexp.methods.seam import SEAM
from segexp.models.fbr import NROIBank

__all__ = ["FBRTerms", "FBR", "FBRPPC"]

FBR_TERMS = ("sim", "bg_seg", "nroi", "fg")


class FBRTerms:
    """Mixin putting FBR's four terms on a base method that provides ``_views(images)``,
    ``contrast_grids(views, labels)`` and ``base_losses(views, batch, grids)``."""

    TERMS: tuple[str, ...] = FBR_TERMS
    QUIRK_REGION_MASKED_PROTOTYPES = True  # quirk 6 (module docstring)

    def __init__(
        self,
        *args: Any,
        sure_rate: float = 0.6,
        min_score: float = 0.05,
        entropy_rate: float = 0.1,
        tau: float = 0.5,
        num_negatives: int = 256,
        bank_size: int = 50_000,
        kmeans: dict[str, Any] | None = None,
        bg_target_threshold: float = 0.05,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "fbr")
        weights = term_weights(kwargs.pop("weights", None), type(self).TERMS)  # conf/method/fbr*.yaml
        super().__init__(*args, weights=weights, **kwargs)
        heads = getattr(self.model, "fbr_heads", None)
        if heads is None or not getattr(heads, "background", False):
            raise ValueError(
                "FBR needs a model with fbr_heads and their background branch (segexp.models.fbr.FBRNet)"
            )
        self.sure_rate = float(sure_rate)
        self.min_score = float(min_score)
        self.entropy_rate = float(entropy_rate)
        self.tau = float(tau)
        self.num_negatives = int(num_negatives)
        self.kmeans = {"k": 8, "n_init": 1, "max_iter": 300, **dict(kmeans or {})}
        self.bg_target_threshold = float(bg_target_threshold)
        dim = heads.proj_bg.out_channels
        self.banks = torch.nn.ModuleList(NROIBank(bank_size, dim) for _ in range(2))  # one per view

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        views = self._views(batch["image"])
        grids = self.contrast_grids(views, labels)
        losses = self.base_losses(views, batch, grids)
        per_view = [
            self._fbr_terms(out, grid, labels, bank) for out, grid, bank in zip(views, grids, self.banks)
        ]
        for name in FBR_TERMS:
            if self.weights[name] > 0:
                losses[name] = self.weights[name] * 0.5 * (per_view[0][name] + per_view[1][name])
        return losses

    def _fbr_terms(
        self, out: dict[str, torch.Tensor], grid: ContrastGrid, labels: torch.Tensor, bank: NROIBank
    ) -> dict[str, torch.Tensor]:
        """The FBR terms of one view (its outputs and its contrast grid)."""
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if w["sim"] > 0:
            terms["sim"] = decorrelation_loss(out["f_proj"], out["b_feat"])
        if w["bg_seg"] > 0:
            cam_fg = F.interpolate(
                out["cam"][:, 1:], out["bg_logit"].shape[-2:], mode="bilinear", align_corners=True
            )
            terms["bg_seg"] = background_seg_loss(out["bg_logit"], cam_fg, labels, self.bg_target_threshold)
        if w["nroi"] <= 0 and w["fg"] <= 0:
            return terms

        pseudo, prototypes = grid.pseudo, grid.prototypes
        uncertain = uncertain_mask(
            pseudo, grid.scores, grid.probs, self.sure_rate, self.min_score, self.entropy_rate
        )
        feats = flat_features(grid.f_proj)
        flat_pseudo, flat_uncertain = pseudo.reshape(-1), uncertain.reshape(-1)
        if w["nroi"] > 0:
            km = self.kmeans
            bank.push(
                nroi_centroids(
                    grid.b_proj,
                    pseudo == 0,
                    km["k"],
                    km["n_init"],
                    km["max_iter"],
                    seed=int(self.global_step),
                )
            )
            terms["nroi"] = nroi_contrast_loss(
                feats,
                flat_pseudo,
                flat_uncertain,
                grid.raw_prototypes if self.official_quirks else prototypes,  # released: tmp_prototypes
                bank,
                self.num_negatives,
                self.tau,
                self.official_quirks,
            )
        if w["fg"] > 0:
            terms["fg"] = fg_active_contrast_loss(
                feats, flat_pseudo, flat_uncertain, prototypes, self.num_negatives, self.tau
            )
        return terms


class FBR(FBRTerms, ContrastGrids, ReleasedECRSlip, SEAM):
    """FBR on the SEAM base (image labels only; ``method=fbr``)."""

    TERMS = SEAM_TERMS + FBR_TERMS

    def base_losses(
        self, views: tuple[dict[str, torch.Tensor], ...], batch: dict[str, Any], grids: list[ContrastGrid]
    ) -> dict[str, torch.Tensor]:
        return self.view_losses(*views, batch["labels"])


class FBRPPC(FBRTerms, PPCasFBR):
    """FBR on the PPC base as FBR's release runs it (image labels + saliency; ``method=fbr_ppc``)."""

    TERMS = PPC.TERMS + FBR_TERMS
