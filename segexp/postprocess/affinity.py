"""AffinityNet pieces (``jiwoon-ahn/psa``, identical in SEAM): pixel pairs within a radius, affinity
labels from low/high-alpha CRF maps, the affinity of embedded features, the affinity loss.

The AffinityNet *training stage* (a network on ResNet-38 trained with these labels) is not wired
into the pipeline yet; :func:`dense_affinity` turns any embedding (or a hand-built one) into the
dense matrix :func:`segexp.postprocess.random_walk.random_walk` consumes.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pair_offsets", "affinity_labels", "dense_affinity", "affinity_loss"]


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


def _pairs(label: np.ndarray, radius: int, ignore: int = 255):
    h, w = label.shape
    a, b = [], []
    for dy, dx in pair_offsets(radius):
        y0, y1 = 0, h - dy
        x0, x1 = max(0, -dx), min(w, w - dx)
        a.append(label[y0:y1, x0:x1].reshape(-1))
        b.append(label[y0 + dy : y1 + dy, x0 + dx : x1 + dx].reshape(-1))
    a, b = np.concatenate(a), np.concatenate(b)
    valid = (a != ignore) & (b != ignore)
    return {
        "bg_pos": valid & (a == 0) & (b == 0),
        "fg_pos": valid & (a == b) & (a != 0),
        "neg": valid & (a != b),
    }


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


def affinity_loss(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """psa ``train_aff.py:101-109``: 1/4 bg+ + 1/4 fg+ + 1/2 neg, each a mean of -log terms."""

    def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if x.numel() else x.sum()

    l_bg = mean_or_zero(-torch.log(aff[bg_pos] + eps))
    l_fg = mean_or_zero(-torch.log(aff[fg_pos] + eps))
    l_neg = mean_or_zero(-torch.log(1.0 + eps - aff[neg]))
    return 0.25 * l_bg + 0.25 * l_fg + 0.5 * l_neg
