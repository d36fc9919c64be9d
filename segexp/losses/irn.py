"""IRN's inter-pixel relations (Ahn, Cho & Kwak, CVPR 2019; ``jiwoon-ahn/irn``): the path index, the
boundary-to-affinity map and the loss terms of the boundary and displacement branches.

* **Path index** (:class:`PathIndex`, the release's ``misc/indexing.py : PathIndex``): the pairs of a
  grid are a source cell and every forward-half offset within ``radius`` (the offsets of
  :func:`segexp.losses.affinity.pair_offsets`); each pair has a *path*, the cells of the box spanned by
  its two ends that lie closer than one cell to the segment joining them, farthest first (so the
  first cell is the destination). Offsets are grouped by path length (shortest first), so one
  gather and one max per group turn a boundary map into all pair affinities. Source cells are the
  window ``[0, h - r + 1) x [r - 1, w - r + 1)`` whose every partner lies inside the grid.
* **Affinity** of a pair = ``1 - max`` of the boundary probability along its path
  (:func:`boundary_affinity`; release ``AffinityDisplacementLoss.to_affinity``).
* **Terms** (:func:`irn_terms`; release ``step/train_irn.py`` and ``AffinityDisplacementLoss.forward``):
  ``bg_pos`` / ``fg_pos`` = mean ``-log(a + eps)`` over background / same-class foreground pairs,
  ``neg`` = mean ``-log(1 + eps - a)`` over pairs of different labels (pairs touching the ignore label
  in none of them; :func:`segexp.losses.affinity.pair_masks`, :func:`~segexp.losses.affinity.affinity_terms`),
  ``dp_fg`` = mean ``|d(src) - d(dst) - (dy, dx)|`` over foreground pairs and both coordinates,
  ``dp_bg`` = mean ``|d(src) - d(dst)|`` over background pairs. The release averages with
  ``sum / (count + 1e-5)`` (``sum / (2 count + 1e-5)`` for the displacements): the same as the mean
  here to a relative 1e-5 / count.

Weights (``conf/method/irn.yaml``): the default is L = L_B + L_D^fg + L_D^bg with L_B = fg+/2 + bg+/2 + neg,
i.e. 1/2, 1/2, 1, 1, 1 on the terms above; ``official_quirks`` halves all five, which is the release's total
``(pos + neg) / 2 + (dp_fg + dp_bg) / 2`` with ``pos = bg_pos / 2 + fg_pos / 2`` (``tests/test_irn.py``). That
default is the paper's total as issue #20 recorded it (Sec. 3); the text (arXiv 1904.05044) was searched
for but not found, so neither the equation nor whether its L1 displacement error sums the two coordinates
(then 2 x ``dp_fg`` / ``dp_bg`` here) is verified. The two branches share no parameter: the weights only
rescale each branch's gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from segexp.losses.affinity import affinity_terms, pair_masks, pair_offsets

__all__ = [
    "IRN_TERMS",
    "PathIndex",
    "path_cells",
    "path_index",
    "boundary_affinity",
    "displacement_terms",
    "irn_terms",
]

IRN_TERMS = ("bg_pos", "fg_pos", "neg", "dp_fg", "dp_bg")


def path_cells(dy: int, dx: int) -> np.ndarray:
    """(L, 2) offsets of the path from (0, 0) to (dy, dx): cells of the spanned box at squared distance
    below 1 from the segment's line, sorted by decreasing ``|y| + |x|`` (stable), destination first."""
    length_sq = dy * dy + dx * dx
    cells = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq  # (distance to the line)^2 < 1, in integers
    ]
    cells.sort(key=lambda c: -abs(c[0]) - abs(c[1]))
    return np.asarray(cells, np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class PathIndex:
    """Pairs and paths of an ``h x w`` grid (module docstring). ``directions`` (D, 2) are the pair offsets
    in group order; ``src`` (S,) the source cells; ``paths[g]`` (D_g, L_g, S) the flat cells of each path
    of group ``g``; ``dst`` (D, S) each pair's destination cell."""

    radius: int
    height: int
    width: int
    directions: np.ndarray
    src: np.ndarray
    paths: tuple[np.ndarray, ...]
    dst: np.ndarray

    def pairs(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (from, to) indices of every pair, (D * S,) each, in the order of ``boundary_affinity``."""
        src = np.tile(self.src, len(self.directions))
        return torch.from_numpy(src).to(device), torch.from_numpy(self.dst.reshape(-1)).to(device)


@functools.lru_cache(maxsize=64)
def path_index(radius: int, height: int, width: int) -> PathIndex:
    """The :class:`PathIndex` of pairs closer than ``radius`` cells on an ``height x width`` grid."""
    margin = int(np.ceil(radius)) - 1  # the release's radius_floor
    rows, cols = height - margin, width - 2 * margin
    if rows < 1 or cols < 1:
        raise ValueError(f"a {height}x{width} grid is too small for pair radius {radius}")
    groups: dict[int, list[np.ndarray]] = {}
    for dy, dx in pair_offsets(int(radius)):
        path = path_cells(dy, dx)
        groups.setdefault(len(path), []).append(path)
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)

    def cells_at(dy: int, dx: int) -> np.ndarray:
        return grid[dy : dy + rows, margin + dx : margin + dx + cols].reshape(-1)

    paths = []
    for length in sorted(groups):
        paths.append(np.stack([np.stack([cells_at(y, x) for y, x in p]) for p in groups[length]]))
    directions = np.concatenate([np.stack([p[0] for p in groups[n]]) for n in sorted(groups)])
    dst = np.concatenate([p[:, 0] for p in paths])
    return PathIndex(int(radius), height, width, directions, cells_at(0, 0), tuple(paths), dst)


def boundary_affinity(boundary: torch.Tensor, index: PathIndex) -> torch.Tensor:
    """Pair affinities (N, D, S) = ``1 - max`` boundary probability on each pair's path; ``boundary``
    (N, h, w) or (N, 1, h, w) probabilities on the grid of ``index``."""
    flat = boundary.reshape(boundary.shape[0], -1)
    parts = []
    for cells in index.paths:
        along = flat[:, torch.from_numpy(cells).to(flat.device)]  # (N, D_g, L_g, S)
        parts.append(1.0 - along.amax(2))
    return torch.cat(parts, 1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (N, 2, D, S) over the pairs of ``mask`` (N, D, S) and both coordinates; 0 (with
    a gradient path) when the mask is empty."""
    m = mask[:, None].expand_as(values)
    return values[m].mean() if bool(m.any()) else values.sum() * 0.0


def displacement_terms(
    disp: torch.Tensor, index: PathIndex, masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``dp_fg`` / ``dp_bg`` of the displacement field ``disp`` (N, 2, h, w) (module docstring); ``masks``
    are :func:`~segexp.losses.affinity.pair_masks` of ``index.pairs()`` as (N, D * S)."""
    flat = disp.flatten(2)
    src = torch.from_numpy(index.src).to(disp.device)
    dst = torch.from_numpy(index.dst).to(disp.device)
    pair = flat[:, :, src][:, :, None] - flat[:, :, dst]  # (N, 2, D, S): d(src) - d(dst)
    target = torch.from_numpy(index.directions.T.copy()).to(pair)[None, :, :, None]
    shape = (disp.shape[0], *index.dst.shape)
    return {
        "dp_fg": _masked_mean((pair - target).abs(), masks["fg_pos"].reshape(shape)),
        "dp_bg": _masked_mean(pair.abs(), masks["bg_pos"].reshape(shape)),
    }


def irn_terms(
    boundary_logits: torch.Tensor,
    disp: torch.Tensor,
    labels: torch.Tensor,
    index: PathIndex,
    ignore_index: int = 255,
    eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Unweighted :data:`IRN_TERMS` of one batch: boundary logits (N, 1, h, w), displacements
    (N, 2, h, w) and inter-pixel relation labels (N, h, w) on the same grid."""
    aff = boundary_affinity(torch.sigmoid(boundary_logits), index).flatten(1)
    src, dst = index.pairs(labels.device)
    masks = pair_masks(labels, src, dst, ignore_index)
    return {**affinity_terms(aff, masks, eps), **displacement_terms(disp, index, masks)}
