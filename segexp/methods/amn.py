"""AMN (``method=amn``) and FBR on AMN (``method=fbr_amn``): image labels + IR labels.

AMN: Lee, Kim, Shim, "Threshold Matters in WSSS: Manipulating the Activation for the Robust and
Accurate Segmentation Model Against Thresholds", CVPR 2022; release ``gaviotas/AMN@75c1999c``
(``net/resnet50_amn.py``, ``step/train_amn.py``, ``step/make_amn_cam.py``, ``step/eval_amn_cam.py``,
``run_sample.py``, ``scripts/generate_pseudo_mask.sh``). FBR on AMN: Yin et al., TCSVT 2024; release
``XuYin94/FBR@fd1aeb85``, folder ``AMN/`` (the same files plus ``region_utils.py``).

Recipe (IRN-style; the pipeline steps are not this module): CAM network -> IR labels (CAM padded
with a constant background 0.30 / 0.05, dense CRF of each argmax, combined: class where the 0.30 map
says foreground, 0 where both say background, 255 between) -> **AMN** trained on the IR labels ->
AMN CAMs -> IR labels again (0.45 / 0.15) -> IRN -> pseudo masks. This module is the AMN step:

* network (:class:`~segexp.models.amn.AMNNet`): deepest backbone map x ``Linear(K -> C)`` of the image
  label, ``Dropout(0.1)``, DeepLab-v2 classifier (sum of 3x3 convs at rates 6/12/18/24) to 1 + K
  channels, background channel 0;
* training (the batch's ``labels`` condition the network, ``label_key`` holds the IR labels): IR
  labels brought to the logit grid by nearest sampling at cell centres (the release's PIL NEAREST
  resize; ``tests/test_amn.py`` checks the two agree), ``L_pcl`` = label-smoothed (eps 0.4)
  balanced cross-entropy (:func:`~segexp.losses.amn.smoothed_balanced_ce`) - the only term;
* CAMs (:meth:`AMN.multiscale_cams`, what the CAM export caches): the conditioned logits averaged
  over scales x flip at the image size, softmax over all channels, each labelled class min-max
  normalised over the image (:func:`~segexp.losses.amn.amn_cams`); val/test score them against a
  constant background ``bg_threshold`` (0.25, ``eval_amn_cam.py`` with ``run_sample.py``'s
  ``cam_eval_thres``).

FBR on AMN (:class:`FBRAMN`): ``proj_fg`` / ``proj_bg`` (1x1 -> 128 + ReLU) on the conditioned map;
``L = L_pcl + 0.1 L_sim + 0.1 L_fg + 0.05 L_nroi`` (``AMN/step/train_amn.py``, ``get_contrast_loss``)
with ``L_sim`` = mean cos(f_proj, b_proj); on the logit grid: pseudo labels = argmax of the min-max
normalised softmax (background included; no image-label mask, so an absent class, whose
normalised maximum is ~1 as any channel's, takes pixels too - as released), uncertain pixels (sure
rate 0.4 over scores > 0.05, entropy above the per-image 25 % quantile over *all* pixels), raw
prototypes from the top ``hw/32`` scores per channel of the batch; per image k-means (8) NROIs of
the background pixels' ``b_proj`` in one FIFO bank of 100,000; FG active-sampling and pixel-to-NROI
contrasts (tau 0.5, 256 negatives) from :mod:`segexp.losses.fbr`, as in the SEAM/PPC variants
(``segexp/methods/fbr.py``).

Paper and release. The AMN paper's text was not at hand (only the abstract, README), so every AMN
default is the release's value. Where the release's code departs from its evident intent, segexp
follows the intent and ``official_quirks: true`` reproduces the code:

1. AMN (both releases): ``Net.train()`` is overridden without ``super().train()``, so the network
   never leaves training mode - the classifier's ``Dropout(0.1)`` stays on when the CAMs are made
   (``make_amn_cam.py`` calls ``model.eval()``, which does nothing). Quirks: dropout at inference
   (``AMNNet.dropout_in_eval``); the backbone BatchNorms are frozen in both (released
   ``FixedBatchNorm``; here ``backbone.freeze_bn``);
2. FBR-AMN: both contrasts get their anchors from ``f_proj.detach()`` built under ``no_grad``: they
   produce no gradient, only ``L_sim`` and ``L_pcl`` train (``/shared/methods/fbr.md`` section 5.2).
   Default: the anchors keep their gradient;
3. FBR-AMN, pixel-to-NROI: ``cosine_similarity(anchor[:, None], keys, dim=1)`` against the *raw*
   prototype - the cosine across the 257 keys per channel (section 5.1). Default: cosine over the
   feature dimension, L2-normalised prototype (:func:`~segexp.losses.fbr.contrast_logits`);
4. FBR-AMN: the prototypes read the scores after ``get_reliable_pseudo_label`` zeroed each present
   class outside its own region *in place* (:func:`~segexp.losses.fbr.region_masked_scores`).
   Default: the scores as computed (the choice of ``method=fbr``).

Compared with the releases (``tests/test_amn.py``: their functions run on seeded CPU inputs, the
numbers stored as constants): ``L_pcl`` value and gradient, the label resize, the network forward
and gradients of AMN's and FBR's ``Net`` (segexp's weights copied into them; layer4 undilated on
both sides, see below) with ``L_sim``, the CAMs of ``make_amn_cam.py`` (with IR labels; one and two
scales), the FBR-AMN pseudo labels, uncertain pixels and prototypes (quirks), ``Compled_reco``'s FG
term (value and gradient) and NROI term (quirks; the release's random draws replaced by segexp's).
Matched by reading: the schedule (Adam, backbone
5e-6, new layers 1e-4, weight decay 1e-4, constant lr, 5 epochs, batch 16; ``conf/experiment/
amn_voc.yaml``); the data pipeline and inference below.

Intentionally different:

* the release's ResNet-50 at stride 16 is ``strides=(2, 2, 2, 1)`` *without* dilation in layer4;
  segexp's backbone builder (timm ``output_stride=16``) dilates layer4's blocks 2-3 (rate 2) - a
  receptive-field change, not a parameter change (``backbone.py`` has no stride-only option);
* backbone BatchNorm affine parameters are frozen (``freeze_bn``); the release trains them at 5e-6
  (only ``conv1`` / ``bn1`` are frozen there, here ``frozen_stages: 1``); biases and norms get no
  weight decay (segexp's parameter groups; the release decays every tensor);
* ``make_amn_cam.py`` keeps the *raw* probabilities on pixels the first-round IR labels call
  background (it reads the IR labels at inference); the CAM export here has no IR labels, so it
  normalises every pixel - :meth:`AMN.multiscale_cams` takes ``ir_label`` to reproduce it where a
  caller has them;
* a batch without foreground (or background) IR pixels: the release divides by 0 (NaN), here that
  side adds 0; the label resize passes ``(H, W)`` where PIL wants ``(W, H)`` (same on the released
  square crops), here the grid's own size;
* FBR-AMN: a batch with one foreground class crashes ``Compled_reco`` (a Categorical over no
  classes); here ``L_fg`` is 0 and ``L_nroi`` is computed. k-means NROIs: batched torch k-means++
  (seeded by the global step) instead of sklearn per image; the FBR release keeps the checkpoint
  of the best train-set mIoU (AMN's: the last) - segexp's checkpointing is the trainer's.

Release differences (data pipeline / inference), ``voc12/dataloader.py``, ``misc/imutils.py``,
``run_sample.py``, ``step/*.py``, ``scripts/generate_pseudo_mask.sh`` (FBR's ``AMN/`` copies are equal up to
whitespace) against ``conf/experiment/amn_voc.yaml``, ``conf/stage/{ir_labels,irn}.yaml``:

* random scale U(0.5, 1.5), PIL bicubic image / nearest IR labels, flip 0.5, no colour jitter, ImageNet
  mean / std: matched (albumentations ``RandomScale``, cv2 kernels);
* crop 512, image padded with 0 after normalisation (the mean colour), labels with 255, at a random
  offset: matched (``fill: [124, 116, 104]``, the rounded mean, ``position: random``; ``valid`` -> ignore);
* batch 16 (drop_last), 5 epochs, constant lr: matched; image labels from ``cls_labels.npy`` (XML
  annotations): matched (``voc_aug``'s ``labels_from: xml``);
* first-round IR labels 0.30 / 0.05 of the CAM network's ``high_res`` maps: matched (``amn_voc``); that
  network is IRN's ``resnet50_cam`` recipe (resize-long 320-640, crop 512, batch 16, lr 0.1, 5 epochs) -
  here any ``cam_ckpt``, no experiment reproduces the recipe;
* CAMs: scales 1.0 / 0.5 / 1.5 / 2.0 x flip, logits bilinear to the image, averaged, one softmax, each
  class min-max; val/test against a constant 0.25 on VOC train: matched; the rescale is PIL bicubic,
  here torch bicubic (intentionally: on the device); IR-background pixels keep raw probabilities in
  the release (intentionally different, above);
* second round: IR labels 0.45 / 0.15 of the AMN CAMs, then IRN; the walk reads the stride-4 AMN CAM
  (raw probabilities on IR-background pixels) ``** 1.3``, beta 10, ``exp_times`` 8, radius 5, background
  0.25; differs: 0.45 / 0.15 and ``cam_power: 1.3`` are overrides of ``conf/pipeline/irn/default.yaml`` /
  ``conf/stage/irn.yaml`` that no experiment sets, and the walk reads the full-size export resized to
  the grid (:mod:`segexp.stages.irn_labels`); IRN's own settings: :mod:`segexp.methods.irn`;
* per-epoch validation (argmax over the label's classes, no threshold) is only logged by AMN (FBR-AMN
  keeps its best): segexp's ``val/cam_best_mIoU`` is a background-threshold curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segexp.losses.amn import amn_cams, amn_contrast_grid, smoothed_balanced_ce
from segexp.losses.fbr import (
    decorrelation_loss,
    fg_active_contrast_loss,
    nroi_centroids,
    nroi_contrast_loss,
    uncertain_mask,
)
from segexp.losses.ppc import flat_features
from segexp.losses.weights import term_weights
from segexp.methods.affinitynet import labels_on_grid
from segexp.methods.cam import CAM, sum_over_passes
from segexp.models.fbr import NROIBank

__all__ = ["AMN", "FBRAMN"]


class AMN(CAM):
    """AMN on IR labels (``label_key``) and image labels; see the module docstring."""

    TERMS: tuple[str, ...] = ("pcl",)
    has_classifier = False  # AMN's CAMs come from its segmentation head: no cls_F1

    def __init__(
        self,
        model: torch.nn.Module,
        name: str = "amn",
        label_key: str = "pseudo",
        smoothing: float = 0.4,
        official_quirks: bool = False,
        weights: dict[str, float] | None = None,
        **kwargs: Any,
    ):
        self_weights = term_weights(weights, type(self).TERMS)  # conf/method/amn.yaml, fbr_amn.yaml
        kwargs.setdefault("train_keys", ("image", "labels", label_key))
        super().__init__(model=model, name=name, **kwargs)
        self.weights = self_weights
        self.label_key = label_key
        self.smoothing = float(smoothing)
        self.official_quirks = bool(official_quirks)
        self.model.dropout_in_eval = self.official_quirks  # quirk 1: never-eval network

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The network conditioned on ``labels`` (N, K); ``None`` = every class allowed."""
        if labels is None:
            labels = images.new_ones(images.shape[0], self.num_classes - 1)
        return self.model(images, labels)

    def pcl_loss(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        logits = out["logits"]
        target = labels_on_grid(batch[self.label_key], tuple(logits.shape[-2:]))
        return smoothed_balanced_ce(logits, target, self.smoothing, self.ignore_index)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self(batch["image"], batch["labels"])
        return {"pcl": self.weights["pcl"] * self.pcl_loss(out, batch)}

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def multiscale_cams(
        self,
        image: torch.Tensor,
        labels: torch.Tensor | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
        ir_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """AMN's CAMs (N, K, H, W): logits conditioned on ``labels`` averaged over scales x (flip) at
        the image size, then :func:`~segexp.losses.amn.amn_cams` (``ir_label``: the release's raw
        probabilities on IR-background pixels)."""
        scales = self.scales if scales is None else tuple(scales)
        flip = self.flip if flip is None else flip
        cond = labels if labels is not None else image.new_ones(image.shape[0], self.num_classes - 1)
        total = sum_over_passes(lambda x: self(x, cond)["logits"], image, scales, flip, self.resize_mode)
        passes = len(scales) * (2 if flip else 1)
        return amn_cams(total / passes, labels, ir_label)


class FBRAMN(AMN):
    """FBR plugged into AMN (``XuYin94/FBR@fd1aeb85``, ``AMN/``; ``method=fbr_amn``)."""

    TERMS = ("pcl", "sim", "fg", "nroi")

    def __init__(
        self,
        *args: Any,
        sure_rate: float = 0.4,
        min_score: float = 0.05,
        entropy_rate: float = 0.25,
        top_fraction: float = 1 / 32,
        tau: float = 0.5,
        num_negatives: int = 256,
        bank_size: int = 100_000,
        kmeans: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "fbr_amn")
        super().__init__(*args, **kwargs)
        dim = getattr(self.model, "fbr_dim", None)
        if dim is None:
            raise ValueError("method=fbr_amn needs AMNNet's projections: set method.model.fbr_dim (128)")
        self.sure_rate = float(sure_rate)
        self.min_score = float(min_score)
        self.entropy_rate = float(entropy_rate)
        self.top_fraction = float(top_fraction)
        self.tau = float(tau)
        self.num_negatives = int(num_negatives)
        self.kmeans = {"k": 8, "n_init": 1, "max_iter": 300, **dict(kmeans or {})}
        self.bank = NROIBank(bank_size, dim)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self(batch["image"], batch["labels"])
        w = self.weights
        losses = {"pcl": w["pcl"] * self.pcl_loss(out, batch)}
        if w["sim"] > 0:
            losses["sim"] = w["sim"] * decorrelation_loss(out["f_proj"], out["b_proj"])
        if w["fg"] > 0 or w["nroi"] > 0:
            for name, value in self.contrast_terms(out).items():
                losses[name] = w[name] * value
        return losses

    def contrast_terms(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``Compled_reco``'s two terms on the logit grid (see the module docstring)."""
        quirks = self.official_quirks
        grid = amn_contrast_grid(out["logits"], out["f_proj"], out["b_proj"], self.top_fraction, quirks)
        uncertain = uncertain_mask(
            grid.pseudo, grid.scores, grid.probs, self.sure_rate, self.min_score, self.entropy_rate,
            foreground_entropy_only=False,
        )
        feats = flat_features(grid.f_proj)
        if quirks:  # quirk 2: anchors from f_proj.detach()
            feats = feats.detach()
        pseudo, flat_uncertain = grid.pseudo.reshape(-1), uncertain.reshape(-1)
        terms: dict[str, torch.Tensor] = {}
        if self.weights["fg"] > 0:
            terms["fg"] = fg_active_contrast_loss(
                feats, pseudo, flat_uncertain, grid.prototypes, self.num_negatives, self.tau
            )
        if self.weights["nroi"] > 0:
            km = self.kmeans
            self.bank.push(
                nroi_centroids(
                    grid.b_proj, grid.pseudo == 0, km["k"], km["n_init"], km["max_iter"],
                    seed=int(self.global_step),
                )
            )
            terms["nroi"] = nroi_contrast_loss(
                feats,
                pseudo,
                flat_uncertain,
                grid.raw_prototypes if quirks else grid.prototypes,  # quirk 3: raw positive
                self.bank,
                self.num_negatives,
                self.tau,
                quirks,
            )
        return terms
