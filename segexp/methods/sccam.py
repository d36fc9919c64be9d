"""SC-CAM (``method=sccam``): a CAM classifier trained jointly on parent classes and sub-categories.

Chang et al., "Weakly-Supervised Semantic Segmentation via Sub-category Exploration", CVPR 2020;
released code ``Juliachang/SC-CAM@191ec486``. The network is :class:`~segexp.models.sccam_head.
SubCategoryCAMNet` (parent CAM head + bias-free ``C x K`` sub-category head on the pooled feature);
the loss is Eq. 3 (:func:`~segexp.losses.sccam.sccam_losses`, lambda = ``sub_weight`` = 5). The
sub-category labels come from the clustering stage (:mod:`segexp.stages.subcategory`) through
the ``SubCategoryLabels`` train wrapper; the rounds (features of round r-1 -> clustering -> a fresh
network) are :mod:`segexp.pipeline.sccam`.

CAMs (``cam_source``):

* ``parent`` (released default, ``infer_cls.py``): the parent classifier's CAM, ReLU per pass,
  summed over scales x flip, divided by its max (``cam_norm: max``), background score 0.15.
* ``merged`` (released ``cls200`` option, ``infer_utils.cls200_cam_norm`` + ``merge_200_cam_dict``):
  the K sub-category CAMs of a parent, summed over the passes, normalised jointly by their common
  max, merged by the per-pixel max. With max normalisation this equals the per-pixel max over K
  normalised by its own max, which is what is computed. Choice: ReLU per pass on the sub-CAMs as on
  the parent CAMs (``forward_two_cam`` applies it to both).

Choices where the sources leave room: the released classifier is trained with the same
4-group SGD as psa/SEAM (``conf/schedule/seam_poly.yaml``, momentum 5e-4 as run); validation reads
the parent CAM mIoU of the configured ``cam_source``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segexp.losses.sccam import sccam_losses
from segexp.methods.cam import CAM, normalise_cams, sum_over_passes

__all__ = ["SCCAM", "CAM_SOURCES", "batch_sub_labels"]

CAM_SOURCES = ("parent", "merged")


def batch_sub_labels(batch: dict[str, Any], key: str = "sub_labels") -> torch.Tensor:
    """The (N, C * K) sub-category labels of a batch, with a pointer to what adds them."""
    if key in batch:
        return batch[key]
    raise KeyError(
        f"the batch has no {key!r}: train SC-CAM with the SubCategoryLabels train wrapper "
        "(data.train_wrappers, see conf/experiment/sccam_shapes.yaml) or through its rounds "
        "(python -m segexp.pipeline +experiment=sccam_shapes)"
    )


class SCCAM(CAM):
    """SC-CAM classifier; ``model`` is a :class:`~segexp.models.sccam_head.SubCategoryCAMNet`.

    Args:
        num_subcategories: K, clusters per parent class (paper: 10); must match the model's.
        sub_weight: lambda of Eq. 3 (paper: 5).
        cam_source: ``parent`` or ``merged`` sub-category CAMs (see the module docstring).
        sub_labels_key: the batch key of the sub-category labels.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str = "sccam",
        num_subcategories: int = 10,
        sub_weight: float = 5.0,
        cam_source: str = "parent",
        sub_labels_key: str = "sub_labels",
        **cam: Any,
    ):
        super().__init__(model, name=name, **cam)
        if cam_source not in CAM_SOURCES:
            raise ValueError(f"cam_source must be one of {CAM_SOURCES}, got {cam_source!r}")
        model_k = getattr(model, "num_subcategories", None)
        if model_k != num_subcategories:
            raise ValueError(
                f"method.num_subcategories={num_subcategories} but the model has {model_k} sub-categories "
                "per class (method.model.num_subcategories)"
            )
        self.num_subcategories = int(num_subcategories)
        self.sub_weight = float(sub_weight)
        self.cam_source = cam_source
        self.sub_labels_key = sub_labels_key

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self(batch["image"])
        return sccam_losses(
            self.fg_logits(out["cam"]),
            batch["labels"],
            out["sub_logits"],
            batch_sub_labels(batch, self.sub_labels_key),
            sub_weight=self.sub_weight,
            parent_weight=self.cls_weight,
        )

    @torch.no_grad()
    def multiscale_cams(
        self,
        image: torch.Tensor,
        labels: torch.Tensor | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
    ) -> torch.Tensor:
        if self.cam_source == "parent":
            return super().multiscale_cams(image, labels, scales, flip)
        total = sum_over_passes(
            lambda v: F.relu(self.model.sub_cam(v)),
            image,
            self.scales if scales is None else tuple(scales),
            self.flip if flip is None else flip,
            self.resize_mode,
        )
        n, _, h, w = total.shape
        merged = total.view(n, -1, self.num_subcategories, h, w).amax(2)
        if labels is not None:
            merged = merged * labels.to(merged.dtype)[..., None, None]
        return normalise_cams(merged, self.cam_norm)


SCCAMMethod = SCCAM  # the name before 2026-12-02, which older checkpoints record
