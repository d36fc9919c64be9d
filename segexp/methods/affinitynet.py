"""AffinityNet (``method=affinitynet``): learns pixel affinities from CAM-derived affinity labels
(Ahn & Kwak, CVPR 2018; the random-walk stage of psa and SEAM, ``train_aff.py``).

A training sample carries ``pseudo``: the affinity-label map of
:class:`segexp.stages.affinity_labels.AffinityLabelStage` (class id where the low-alpha CRF is
confident foreground, 0 where the high-alpha CRF says background, 255 = uncertain). One step:

* embedding on the stride-8 grid (:class:`~segexp.models.affinitynet.AffinityNet`);
* labels brought to that grid by nearest sampling at the cell centres (``nearest-exact``). psa
  average-pools the stacked la/ha CRF *score* maps by 8 and takes the argmax; the label stage here
  caches label maps, so the cell-centre label stands in for it (choice; identical on cells inside
  one region, it differs only on cells cut by a boundary);
* pairs within ``radius`` (5): bg+ (both 0), fg+ (same class != 0), neg (different classes), none of
  them 255 (:func:`segexp.losses.affinity.pair_masks`);
* loss = ``w_bg * L_bg+ + w_fg * L_fg+ + w_neg * L_neg`` with ``L_+ = mean -log(a + eps)``,
  ``L_neg = mean -log(1 + eps - a)``, each averaged over the batch's pairs of its kind (psa sums over
  the batch and divides by the count), weights 1/4, 1/4, 1/2.

Validation/test score the affinities against pairs built the same way from the GT masks:
per-kind pair accuracy (affinity > 0.5 means "same") and their mean, ``val/aff_balanced_acc``
(the checkpoint metric the pipeline uses). There is no per-pixel class prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from segexp.losses.affinity import PAIR_KINDS, affinity_terms, pair_masks
from segexp.losses.weights import term_weights
from segexp.methods.base import SegMethod
from segexp.models.affinitynet import effective_radius, grid_pair_affinity, pair_indices

__all__ = ["AffinityNetMethod", "labels_on_grid", "PairAccuracy"]

def labels_on_grid(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) label maps -> (N, h, w): the label at each cell centre (``nearest-exact``)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


class PairAccuracy(Metric):
    """Per-kind accuracy of affinities on labelled pairs (affinity > 0.5 = same region); summed
    counts, so exact under DDP."""

    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros(len(PAIR_KINDS)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(PAIR_KINDS)), dist_reduce_fx="sum")

    def update(self, aff: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> None:
        same = aff > 0.5
        for k, kind in enumerate(PAIR_KINDS):
            m = masks[kind]
            hit = same[m] if kind != "neg" else ~same[m]
            self.correct[k] += hit.sum()
            self.total[k] += m.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        acc = self.correct / self.total.clamp(min=1)
        present = self.total > 0
        out = {f"acc_{kind}": acc[k] for k, kind in enumerate(PAIR_KINDS) if present[k]}
        out["balanced_acc"] = acc[present].mean() if present.any() else torch.tensor(float("nan"))
        return out


class AffinityNetMethod(SegMethod):
    """Trains :class:`~segexp.models.affinitynet.AffinityNet` on affinity labels (module docstring).

    Args:
        model: the AffinityNet.
        radius: pair radius on the feature grid (psa/SEAM: 5).
        weights: loss weight of each pair kind (``bg_pos``, ``fg_pos``, ``neg``: 1/4, 1/4, 1/2).
        eps: inside the logarithms (1e-5).
        label_key: the batch key holding affinity labels (``pseudo``).
    """

    predicts_classes = False  # pair affinities; labels come from the rw stage

    def __init__(
        self,
        model: nn.Module,
        name: str = "affinitynet",
        radius: int = 5,
        weights: Mapping[str, float] | None = None,
        eps: float = 1e-5,
        label_key: str = "pseudo",
        **base: Any,
    ):
        super().__init__(**base)
        w = term_weights(weights, PAIR_KINDS)  # conf/method/affinitynet.yaml (psa train_aff.py)
        self.model = model
        self.name = name
        self.radius = int(radius)
        self.weights = w
        self.eps = float(eps)
        self.label_key = label_key
        self.val_pairs = PairAccuracy()
        self.test_pairs = PairAccuracy()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def pairs(self, size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = size
        return pair_indices(h, w, effective_radius(h, w, self.radius), device)

    def affinities(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Pair affinities (N, P) of ``images`` with their (from, to) indices and the grid size."""
        emb = self(images)
        size = tuple(emb.shape[-2:])
        src, dst = self.pairs(size, emb.device)
        return grid_pair_affinity(emb.float(), effective_radius(*size, self.radius)), src, dst, size

    def labelled_pairs(self, images: torch.Tensor, labels: torch.Tensor):
        aff, src, dst, size = self.affinities(images)
        masks = pair_masks(labels_on_grid(labels, size), src, dst, self.ignore_index)
        return aff, masks

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.label_key not in batch:
            raise KeyError(
                f"affinitynet: the batch has no {self.label_key!r} (affinity labels); train it through the "
                "rw stage (pipeline.refine=[..., rw]) or add a PseudoLabels wrapper of "
                "conf/stage/aff_labels.yaml"
            )
        aff, masks = self.labelled_pairs(batch["image"], batch[self.label_key])
        terms = affinity_terms(aff, masks, self.eps)
        return {k: self.weights[k] * v for k, v in terms.items()}

    # -- evaluation: pair accuracy against GT-derived pairs -------------------------------------
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "affinitynet predicts pair affinities, not classes: use it through the rw stage "
            "(conf/stage/rw.yaml)"
        )

    def _pair_step(self, batch: dict[str, Any], metric: PairAccuracy) -> None:
        if "mask" in batch:
            aff, masks = self.labelled_pairs(batch["image"], batch["mask"])
            metric.update(aff, masks)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._pair_step(batch, self.val_pairs)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._pair_step(batch, self.test_pairs)

    def _log_pairs(self, metric: PairAccuracy, prefix: str) -> None:
        if int(metric.total.sum()) > 0:
            for name, value in metric.compute().items():
                self.log(f"{prefix}/aff_{name}", value, sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_pairs(self.val_pairs, "val")

    def on_test_epoch_end(self) -> None:
        self._log_pairs(self.test_pairs, "test")
