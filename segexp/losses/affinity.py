"""AffinityNet pieces (``jiwoon-ahn/psa``, identical in SEAM): pixel pairs within a radius, affinity
labels from low/high-alpha CRF maps, the affinity of embedded features, the affinity loss.

The network that learns the affinities is ``method=affinitynet`` (:mod:`segexp.methods.affinitynet`),
trained by the pipeline and used by the ``rw`` stage (:mod:`segexp.stages.random_walk`);
:func:`dense_affinity`
turns any embedding (or a hand-built one) into the dense matrix
:func:`segexp.inference.random_walk.random_walk` consumes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "pair_offsets",
    "affinity_labels",
    "dense_affinity",
    "PAIR_KINDS",
    "pair_masks",
    "affinity_terms",
    "AFFINITY_WEIGHTS",
    "affinity_loss",
]


def pair_offsets(radius: int = 5) -> list[tuple[int, int]]:
    """Forward-half neighbourhood of psa ``get_indices_of_pairs``: (0, 1..r-1) and rows 1..r-1 with
    dy^2 + dx^2 < r^2 (dx from -r+1 to r-1)."""
    offs = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dy * dy + dx * dx < radius * radius:
                offs.append((dy, dx))
    return offs


def affinity_labels(label_la: np.ndarray, label_ha: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Per-pixel label for pairs (psa ``voc12/data.py:203-259``): the low-alpha argmax, 255 where the
    low-alpha map says background (uncertain), 0 where the high-alpha map says background."""
    out = label_la.astype(np.int64).copy()
    out[label_la == 0] = ignore
    out[label_ha == 0] = 0
    return out


def dense_affinity(feats: torch.Tensor, radius: int | None = 5) -> torch.Tensor:
    """Dense symmetric affinity (hw, hw) of features (D, h, w): ``exp(-mean_c |f_i - f_j|)`` for pairs
    within ``radius`` (None = all pairs), 0 elsewhere, unit diagonal (psa ``infer_aff.py``)."""
    d, h, w = feats.shape
    f = feats.reshape(d, -1)
    aff = torch.exp(-(f[:, :, None] - f[:, None, :]).abs().mean(0))
    if radius is not None:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).float()
        dist2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
        aff = torch.where(dist2 < radius * radius, aff, torch.zeros_like(aff))
    aff.fill_diagonal_(1.0)
    return aff


PAIR_KINDS = ("bg_pos", "fg_pos", "neg")


def pair_masks(
    labels: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, ignore_index: int = 255
) -> dict[str, torch.Tensor]:
    """Boolean (N, P) masks of the pairs (src, dst) of grid labels (N, h, w): bg+ (both 0), fg+ (same
    class != 0), neg (different classes), pairs touching ``ignore_index`` in none of them."""
    flat = labels.flatten(1)
    a, b = flat[:, src], flat[:, dst]
    valid = (a != ignore_index) & (b != ignore_index)
    return {
        "bg_pos": valid & (a == 0) & (b == 0),
        "fg_pos": valid & (a == b) & (a != 0),
        "neg": valid & (a != b),
    }


def affinity_terms(
    aff: torch.Tensor, masks: Mapping[str, torch.Tensor], eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Unweighted loss of each pair kind: mean ``-log(a + eps)`` (positives) / ``-log(1 + eps - a)``
    (negatives) over the pairs of that kind; 0 (with a gradient path) when there are none."""
    out = {}
    for kind in PAIR_KINDS:
        m = masks[kind]
        values = -torch.log(1.0 + eps - aff[m]) if kind == "neg" else -torch.log(aff[m] + eps)
        out[kind] = values.mean() if values.numel() else aff.sum() * 0.0
    return out


AFFINITY_WEIGHTS = {"bg_pos": 0.25, "fg_pos": 0.25, "neg": 0.5}  # psa train_aff.py:101-109


def affinity_loss(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """psa ``train_aff.py:101-109``: 1/4 bg+ + 1/4 fg+ + 1/2 neg, each a mean of -log terms."""
    terms = affinity_terms(aff, {"bg_pos": bg_pos, "fg_pos": fg_pos, "neg": neg}, eps)
    return sum(AFFINITY_WEIGHTS[k] * v for k, v in terms.items())
