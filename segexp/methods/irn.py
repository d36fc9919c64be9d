"""IRN (``method=irn``): IRNet learns class boundaries and displacements from inter-pixel relation labels
(Ahn, Cho & Kwak, CVPR 2019; ``jiwoon-ahn/irn : step/train_irn.py``; the same file in ``gaviotas/AMN``).

A training sample carries ``pseudo``: the IR labels of :class:`segexp.stages.ir_labels.IRLabelStage`
(class id = confident foreground, 0 = confident background, 255 = uncertain). One step:

* boundary logits and displacements on the stride-4 grid (:class:`~segexp.models.irn.IRNet`);
* labels brought to that grid at the cell centres (``nearest-exact``; the release's PIL nearest
  0.25 rescale of the crop samples the same pixels, ``4 i + 2``);
* pairs of the :class:`~segexp.losses.irn.PathIndex` with radius 10 (``train_irn.py``); a grid too small
  for it uses ``(min side - 1) // 2`` (psa's rule; the release only sees 128 x 128 grids);
* loss = weighted :func:`~segexp.losses.irn.irn_terms` (``bg_pos``, ``fg_pos``, ``neg``, ``dp_fg``, ``dp_bg``;
  weights in ``conf/method/irn.yaml``): L = L_B + L_D^fg + L_D^bg (L_B's two positive sets weighted 1/2
  each) by default, the paper's total as recorded here but not checked against its text (see
  :mod:`segexp.losses.irn`); the release halves every term (``official_quirks``, the same as half the
  learning rate but for weight decay).

Optimisation as released: the backbone is frozen, the boundary branch trains at the base lr and the
displacement branch at 10x (parameter groups ``edge`` and ``displacement``, weight decay on every
parameter incl. biases and GroupNorm); ``conf/pipeline/irn/default.yaml`` sets the schedule.

Validation/test: pair accuracy of the boundary affinities against pairs built from the GT masks
(``val/aff_balanced_acc``, as AffinityNet).

Against the release (``jiwoon-ahn/irn@a2ece00``; numbers in ``tests/test_irn.py``):

* matched to float rounding: path index, pair labels, every loss term and its gradients, the heads of
  IRNet (values, gradients), the boundary map, the walk and its labels, the IR labels;
* SGD with momentum 1e-4 (PolyOptimizer's positional slip) and poly 0.9: reproduced in
  ``conf/pipeline/irn/default.yaml``;
* intentionally different: ResNet-50's layer4 is dilated here (timm, see :mod:`segexp.models.irn`);
  grids smaller than ``2 r + 1`` shrink the radius (the release's crops give 128 x 128 grids only);
* not done: the release's pass over the inference list after training that stores the mean
  displacement in the mean shift (only its instance segmentation reads the displacement field).

Release differences (data pipeline / inference), ``voc12/dataloader.py``, ``misc/imutils.py``,
``run_sample.py``, ``step/{make_cam,cam_to_ir_label,train_irn,make_sem_seg_labels}.py`` against
``conf/pipeline/irn/default.yaml``, ``conf/stage/{ir_labels,irn}.yaml``:

* random scale U(0.5, 1.5), PIL bicubic image / nearest labels, flip 0.5, no colour jitter, ImageNet
  mean / std: matched (albumentations, cv2 kernels);
* crop 512: the release pads the normalised image with 0 (the mean colour) and the labels with 255 at a
  random offset: matched (``fill: [124, 116, 104]``, the rounded mean before normalisation, ``position:
  random``), labels -> ignore: matched;
* labels to the stride-4 grid (PIL nearest, 0.25): matched; batch 32 (drop_last), 3 epochs, lr 0.1 / 1.0
  (edge / displacement), wd 1e-4 on every parameter, momentum 1e-4, poly 0.9: matched;
* IR labels: background 0.30 / 0.05, CRF of each argmax (``gt_prob`` 0.7, 3 / 3, 50 / 5 / 10, 10 iterations):
  matched; their CAMs (``high_res``): each pass resized to the size rounded up to a multiple of 16, then
  cropped - differs: the CAM export resizes to the image size (a sub-pixel shift), not changed;
* the walk's CAMs: the stride-4 maps of ``make_cam.py`` (passes summed at ``ceil(H / 4)``, ``/ max``);
  intentionally different: the full-size export resized to that grid and max-normalised again (the cache
  keeps full-size maps, :mod:`segexp.stages.irn_labels`);
* boundary map: image + flip, zero-padded to 512 after normalisation, ``sigmoid`` of the mean logit; walk
  beta 10, ``exp_times`` 8, radius 5, ``x (1 - edge)``, x4 bilinear, ``/ max``, ``sem_seg_bg_thres`` 0.25:
  matched;
* IRN's own CAM network (``resnet50_cam``: resize-long 320-640, crop 512, batch 16, lr 0.1, wd 1e-4,
  5 epochs; scales 1.0 / 0.5 / 1.5 / 2.0 x flip; ``cam_eval_thres`` 0.15): not reproduced by an
  experiment - the irn stage walks the pipeline's CAMs; image labels (``cls_labels.npy``, from the XML
  annotations): matched (``voc_aug``'s ``labels_from: xml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segexp.losses.affinity import PAIR_KINDS
from segexp.losses.irn import IRN_TERMS, PathIndex, boundary_affinity, irn_terms, path_index
from segexp.losses.weights import term_weights
from segexp.methods.affinitynet import AffinityNetMethod, labels_on_grid
from segexp.models.affinitynet import effective_radius
from segexp.models.param_groups import GROUP_NAMES

__all__ = ["IRN"]


RELEASE_SCALE = 0.5  # the release's total is half the paper's (train_irn.py)

class IRN(AffinityNetMethod):
    """Trains :class:`~segexp.models.irn.IRNet` on IR labels (module docstring). The validation pair
    accuracy is AffinityNet's, on the boundary affinities.

    Args:
        model: the IRNet.
        radius: pair radius on the stride-4 grid (release: 10).
        weights: loss weight of each of :data:`~segexp.losses.irn.IRN_TERMS`.
        eps: inside the logarithms (1e-5).
        label_key: the batch key holding IR labels (``pseudo``).
        official_quirks: the release's halved loss (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        name: str = "irn",
        radius: int = 10,
        weights: Mapping[str, float] | None = None,
        eps: float = 1e-5,
        label_key: str = "pseudo",
        official_quirks: bool = False,
        **base: Any,
    ):
        w = term_weights(weights, IRN_TERMS)  # conf/method/irn.yaml (paper Sec. 3.3)
        if official_quirks:  # train_irn.py: (pos + neg) / 2 + (dp_fg + dp_bg) / 2
            w = {k: RELEASE_SCALE * v for k, v in w.items()}
        pair_weights = {k: w[k] for k in PAIR_KINDS}
        super().__init__(
            model, name=name, radius=radius, weights=pair_weights, eps=eps, label_key=label_key, **base
        )
        self.weights = w

    def path_index(self, size: tuple[int, int]) -> PathIndex:
        h, w = size
        return path_index(effective_radius(h, w, self.radius), h, w)

    def affinities(self, images: torch.Tensor):
        """Boundary affinities (N, P) of ``images`` with their (from, to) indices and the grid size."""
        boundary, _ = self(images)
        size = tuple(boundary.shape[-2:])
        index = self.path_index(size)
        src, dst = index.pairs(boundary.device)
        return boundary_affinity(torch.sigmoid(boundary.float()), index).flatten(1), src, dst, size

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.label_key not in batch:
            raise KeyError(
                f"irn: the batch has no {self.label_key!r} (IR labels); train it through the irn pipeline "
                "step (segexp.pipeline.irn) or add a PseudoLabels wrapper of conf/stage/ir_labels.yaml"
            )
        boundary, disp = self(batch["image"])
        size = tuple(boundary.shape[-2:])
        labels = labels_on_grid(batch[self.label_key], size)
        terms = irn_terms(
            boundary.float(), disp.float(), labels, self.path_index(size), self.ignore_index, self.eps
        )
        return {k: self.weights[k] * v for k, v in terms.items()}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "irn predicts boundaries and displacements, not classes: use it through the irn stage "
            "(conf/stage/irn.yaml)"
        )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``edge`` and ``displacement`` (release: lr x1 and x10, both decayed), a trainable backbone
        under ``backbone``; the other standard groups empty so any schedule's ``lr_mult`` applies."""
        groups: dict[str, list[nn.Parameter]] = {k: [] for k in GROUP_NAMES}
        groups["backbone"] = [p for p in self.model.backbone.parameters() if p.requires_grad]
        groups["edge"] = list(self.model.edge_layers.parameters())
        groups["displacement"] = list(self.model.dp_layers.parameters())
        return groups
