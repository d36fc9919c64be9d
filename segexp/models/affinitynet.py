"""AffinityNet (Ahn & Kwak, CVPR 2018): a backbone whose multi-level features are projected and
concatenated into a pixel embedding on the stride-8 grid; the affinity of two grid cells is
``exp(-mean_c |f_i - f_j|)``.

As released (``jiwoon-ahn/psa : network/resnet38_aff.py``, identical in ``YudeWang/SEAM``): on
ResNet-38, ELU(1x1 conv 512->64) on ``conv4``, ELU(1x1 1024->128) on ``conv5``, ELU(1x1 4096->256) on
``conv6``, concatenated (448) and ELU(1x1 448->448); all 1x1 convs without bias, the three
projections Kaiming-normal and the last one Xavier-uniform with gain 4. ``taps`` index the feature
levels of any :class:`~segexp.models.backbone.Backbone` (ResNet-38: 2, 3, 4 = conv4, conv5, conv6;
a timm ResNet at output stride 8: layer2, layer3, layer4).

Pairs: every pair of grid cells closer than ``radius`` (5) cells, listed once (the forward-half
offsets of :func:`segexp.losses.affinity.pair_offsets`), in the order of
:func:`segexp.losses.affinity.affinity_labels`' pair masks: offset-major, then row-major over
the cells whose partner lies inside the grid. psa only uses "from" cells away from the left,
right and bottom borders (``get_indices_of_pairs``); keeping the border pairs too is this
implementation's choice (more supervision, same pairs in the interior). As in psa, a grid smaller
than ``2 * radius + 1`` cells uses ``radius = (min side - 1) // 2``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import segexp.models.resnet38d  # noqa: F401  (registers timm "resnet38d")
from segexp.losses.affinity import pair_offsets

__all__ = ["AffinityNet", "effective_radius", "pair_indices", "pair_affinity", "grid_pair_affinity"]


def effective_radius(h: int, w: int, radius: int) -> int:
    """psa's radius for an ``h x w`` grid: ``radius``, or ``(min side - 1) // 2`` on small grids."""
    side = min(h, w)
    return (side - 1) // 2 if side < 2 * radius + 1 else radius


def _pair_windows(h: int, w: int, radius: int):
    """Per offset, the (row, column) slices of the "from" cells and of their partners, in pair order."""
    for dy, dx in pair_offsets(radius):
        x0, x1 = max(0, -dx), min(w, w - dx)
        yield (slice(0, h - dy), slice(x0, x1)), (slice(dy, h), slice(x0 + dx, x1 + dx))


@functools.lru_cache(maxsize=32)
def _pair_indices_np(h: int, w: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
    src, dst = [], []
    for start, end in _pair_windows(h, w, radius):
        src.append(grid[start].reshape(-1))
        dst.append(grid[end].reshape(-1))
    empty = np.zeros(0, np.int64)
    return np.concatenate([empty, *src]), np.concatenate([empty, *dst])


def pair_indices(
    h: int, w: int, radius: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (from, to) of every pair of cells of an ``h x w`` grid within ``radius``
    (already reduced by :func:`effective_radius` if wanted)."""
    src, dst = _pair_indices_np(h, w, radius)
    return torch.from_numpy(src).to(device), torch.from_numpy(dst).to(device)


def pair_affinity(emb: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``exp(-mean_c |f_src - f_dst|)`` of embeddings (N, D, h, w): (N, P)."""
    f = emb.flatten(2)
    return torch.exp(-(f[:, :, src] - f[:, :, dst]).abs().mean(1))


def grid_pair_affinity(emb: torch.Tensor, radius: int) -> torch.Tensor:
    """:func:`pair_affinity` of every pair of :func:`pair_indices` (same order), by shifted slices.

    Why: gathering both ends of every pair (as psa does) materialises two (N, D, P) copies and its
    backward is a scatter-add over them; a slice per offset of a channels-last view reads the
    embedding in place, and its backward is a strided copy (values identical to float rounding).
    """
    n, _, h, w = emb.shape
    f = emb.permute(0, 2, 3, 1).contiguous()  # (N, h, w, D): the channel mean runs over contiguous memory
    out = [
        (f[(slice(None), *start)] - f[(slice(None), *end)]).abs().mean(-1).reshape(n, -1)
        for start, end in _pair_windows(h, w, radius)
    ]
    return torch.exp(-torch.cat(out, 1))


class AffinityNet(nn.Module):
    """``backbone`` + per-tap ELU(1x1) projections, concatenated, + ELU(1x1) -> embedding (N, out_dim, h, w).

    Args:
        backbone: a :class:`~segexp.models.backbone.Backbone` (feature list).
        taps: backbone feature levels that are projected (all at the output stride).
        tap_dims: projection widths (psa: 64, 128, 256).
        out_dim: width of the final 1x1 conv (psa: 448 = 64 + 128 + 256).
    """

    def __init__(
        self,
        backbone: nn.Module,
        taps: Sequence[int] = (2, 3, 4),
        tap_dims: Sequence[int] = (64, 128, 256),
        out_dim: int = 448,
    ):
        super().__init__()
        if len(taps) != len(tap_dims):
            raise ValueError(f"AffinityNet: {len(taps)} taps but {len(tap_dims)} tap_dims")
        n_levels = len(backbone.out_channels)
        if any(not -n_levels <= t < n_levels for t in taps):
            raise ValueError(
                f"AffinityNet: taps {list(taps)} outside the backbone's {n_levels} feature levels"
            )
        strides = {backbone.reductions[t] for t in taps}
        if len(strides) != 1:
            raise ValueError(f"AffinityNet: taps {list(taps)} have different strides {sorted(strides)}")
        self.backbone = backbone
        self.taps = tuple(taps)
        self.stride = strides.pop()
        self.proj = nn.ModuleList(
            nn.Conv2d(backbone.out_channels[t], d, 1, bias=False) for t, d in zip(self.taps, tap_dims)
        )
        self.fuse = nn.Conv2d(sum(tap_dims), out_dim, 1, bias=False)
        for conv in self.proj:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        parts = [F.elu(p(feats[t])) for p, t in zip(self.proj, self.taps)]
        return F.elu(self.fuse(torch.cat(parts, 1)))
