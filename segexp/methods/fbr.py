"""FBR (``method=fbr``): fine-grained background representation on a SEAM base (Yin et al., TCSVT 2024).

Base. FBR is a plug-in; the released code plugs it into PPC (EPS + PCM + prototype contrast, image
labels + saliency, ResNet-38) and into AMN (image labels). Here it is plugged into our
:class:`~segexp.methods.seam.SEAM` (image labels only: CAM + PCM + ER + ECR/OHEM + adaptive
min-pooling), whose network and losses the PPC model inherits; the PPC-only parts (EPS saliency
loss, thresholded average pooling, PPC's cross/intra-view prototype contrast) and the AMN base are
not implemented. The FBR head and loss settings are those of the released PPC variant (bank 50,000,
weights 0.1 / 0.01, rate 0.6, entropy quantile 0.1, top-k hw/16); AMN's values are listed in
``conf/method/fbr.yaml``.

One step, per view v of SEAM's two views (crop and its 0.3x rescale), on a ``contrast_size`` grid
(released 16 x 16): pseudo labels from the PCM output ``cam_rv`` (background score 0.10), uncertain
pixels, class prototypes from the view's own FG features; NROIs = k-means (k 8) of each image's
background pixels in the pre-BN ``proj_bg`` space pushed into that view's FIFO bank (one bank per
view, as released), then

    L = L_SEAM + 0.1 L_sim + 0.1 L_seg + 0.01 L_pcl^bg + 0.1 L_pcl^fg   (FBR terms: mean over views)

(``module/train.py`` line 427 of the released file minus the EPS/PPC terms).

Paper-faithful (default) vs ``official_quirks: true``. Reading the released code
(``XuYin94/FBR@fd1aeb85``, see ``/shared/methods/fbr.md`` section 5) shows three behaviours that
differ from the paper's description:

1. the pixel-to-NROI loss gets its anchors from ``f_proj.detach()`` built under ``no_grad`` - it
   produces no gradient at all, so the published "NROI" gain cannot come from that term's gradient;
2. its similarity is ``cosine_similarity(anchor[:, None], keys, dim=1)``: the cosine runs over the
   257 keys for each of the 128 channels, and the cross-entropy is over 128 channel "classes";
3. the PPC model puts the background in the last channel, but the inherited ``max_onehot`` of ECR
   keeps channel 0 - the first foreground class is never zeroed and the real background competes
   in the foreground argmax of the ECR targets.

Faithful mode computes the NROI contrast on non-detached L2-normalised ``proj_fg`` features of the
uncertain pixels with the cosine over the feature dimension of each key, and ECR as SEAM's. Quirks
mode reproduces 1-3 (the FG active-sampling contrast has gradients in the released PPC variant and
is the same in both modes; in the released AMN variant it is detached too - not reproduced).

Choices where the release is ambiguous or undesirable (all documented in the code):

* the released ``get_reliable_pseudo_label`` zeroes class scores outside each class's region *in
  place*, which changes the scores used afterwards for the prototypes; here the prototypes use the
  un-zeroed normalised scores (the background prototype - a top-k over a constant - is never used);
* NROI k-means: batched torch k-means++ (one restart, up to 300 Lloyd iterations, seeded by the
  global step) instead of sklearn ``KMeans(8)`` per image (non-deterministic, CPU);
* the bank is pushed before sampling (an empty bank gives 0 instead of the released NameError);
* ``L_seg`` uses the view's CAM resized back to the head's grid (SEAM's views keep CAMs at input size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segexp.losses.fbr import (
    background_seg_loss,
    class_prototypes,
    contrast_pseudo_labels,
    decorrelation_loss,
    ecr_loss_bg_last_slip,
    fg_active_contrast_loss,
    nroi_centroids,
    nroi_contrast_loss,
    uncertain_mask,
)
from segexp.methods.seam import SEAM
from segexp.models.fbr import NROIBank

__all__ = ["FBR"]

SEAM_TERMS = ("cls", "er", "ecr", "amp")
FBR_TERMS = ("sim", "bg_seg", "nroi", "fg")
DEFAULT_WEIGHTS = {"sim": 0.1, "bg_seg": 0.1, "nroi": 0.01, "fg": 0.1}


class FBR(SEAM):
    def __init__(
        self,
        *args: Any,
        official_quirks: bool = False,
        contrast_size: int = 16,
        bg_score: float = 0.10,
        sure_rate: float = 0.6,
        min_score: float = 0.05,
        entropy_rate: float = 0.1,
        top_fraction: float = 1 / 16,
        tau: float = 0.5,
        num_negatives: int = 256,
        bank_size: int = 50_000,
        kmeans: dict[str, Any] | None = None,
        bg_target_threshold: float = 0.05,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "fbr")
        weights = dict(DEFAULT_WEIGHTS)
        weights.update(kwargs.pop("weights", None) or {})
        unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS) - set(SEAM_TERMS))
        if unknown:
            raise ValueError(f"method.weights: unknown term(s) {unknown}; known: {[*SEAM_TERMS, *FBR_TERMS]}")
        super().__init__(*args, weights=weights, **kwargs)
        heads = getattr(self.model, "fbr_heads", None)
        if heads is None:
            raise ValueError("FBR needs a model with fbr_heads (segexp.models.fbr.FBRNet)")
        self.official_quirks = bool(official_quirks)
        self.contrast_size = int(contrast_size)
        self.bg_score = float(bg_score)
        self.sure_rate = float(sure_rate)
        self.min_score = float(min_score)
        self.entropy_rate = float(entropy_rate)
        self.top_fraction = float(top_fraction)
        self.tau = float(tau)
        self.num_negatives = int(num_negatives)
        self.kmeans = {"k": 8, "n_init": 1, "max_iter": 300, **dict(kmeans or {})}
        self.bg_target_threshold = float(bg_target_threshold)
        dim = heads.proj_bg.out_channels
        self.banks = torch.nn.ModuleList(NROIBank(bank_size, dim) for _ in range(2))  # one per view

    # -- SEAM hooks -----------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        views = self._views(batch["image"])
        losses = self.view_losses(*views, labels)
        per_view = [self._fbr_terms(out, labels, bank) for out, bank in zip(views, self.banks)]
        for name in FBR_TERMS:
            if self.weights[name] > 0:
                losses[name] = self.weights[name] * 0.5 * (per_view[0][name] + per_view[1][name])
        return losses

    def ecr(
        self, y_o: torch.Tensor, y_t: torch.Tensor, rv_o: torch.Tensor, rv_t: torch.Tensor
    ) -> torch.Tensor:
        """SEAM's ECR, or with ``official_quirks`` the released background-last ``max_onehot`` slip."""
        if self.official_quirks:
            return ecr_loss_bg_last_slip(y_o, y_t, rv_o, rv_t, self.ohem_ratio)
        return super().ecr(y_o, y_t, rv_o, rv_t)

    # -- FBR on one view ------------------------------------------------------------------------
    def _fbr_terms(
        self, out: dict[str, torch.Tensor], labels: torch.Tensor, bank: NROIBank
    ) -> dict[str, torch.Tensor]:
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

        size = (self.contrast_size, self.contrast_size)

        def grid(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size, mode="bilinear", align_corners=True)

        f_proj, b_proj = grid(out["f_proj"]), grid(out["b_proj"])
        scores, probs, pseudo = contrast_pseudo_labels(grid(out["cam_rv"]), labels, self.bg_score)
        uncertain = uncertain_mask(pseudo, scores, probs, self.sure_rate, self.min_score, self.entropy_rate)
        prototypes = class_prototypes(f_proj, scores, self.top_fraction)
        feats = F.normalize(f_proj.permute(0, 2, 3, 1).reshape(-1, f_proj.shape[1]), dim=-1)
        flat_pseudo, flat_uncertain = pseudo.reshape(-1), uncertain.reshape(-1)
        if w["nroi"] > 0:
            km = self.kmeans
            bank.push(
                nroi_centroids(
                    b_proj, pseudo == 0, km["k"], km["n_init"], km["max_iter"], seed=int(self.global_step)
                )
            )
            terms["nroi"] = nroi_contrast_loss(
                feats,
                flat_pseudo,
                flat_uncertain,
                prototypes,
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
