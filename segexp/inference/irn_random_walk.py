"""IRN's semantic labels (``jiwoon-ahn/irn : step/make_sem_seg_labels.py``, ``misc/indexing.py :
propagate_to_edge``; the same in ``gaviotas/AMN``): a random walk of the CAMs on affinities from IRNet's
class-boundary map.

Per image:

1. boundary map: IRNet on the image zero-padded (right, bottom) to ``pad_size`` (release 512, the crop
   of ``EdgeDisplacement``) and on its mirror image; logits averaged, sigmoid, cut to the
   ``ceil(H / 4) x ceil(W / 4)`` grid (:func:`boundary_map`);
2. affinity of pairs closer than ``radius`` (5) = ``1 - max`` boundary along the pair's path
   (:func:`boundary_pairs`; the release pads the map with 1 by ``radius`` left, right and below and keeps
   the pairs inside: the same pairs);
3. ``v T^(2^exp_times)`` with ``T = A^beta`` column-normalised (beta 10, exp_times 8) and
   ``v = CAMs * (1 - boundary)`` on the grid: :func:`segexp.inference.random_walk.random_walk`, the same
   operation as AffinityNet's walk, as ``2^exp_times`` sparse products (the release squares the dense
   ``(hw)^2`` matrix 8 times; equal to float rounding);
4. x4 bilinear upsampling, crop, division by the global maximum, background = the constant
   ``bg_threshold`` (``sem_seg_bg_thres`` 0.25), argmax (:func:`walk_labels`). The background is not
   walked, in IRN as in AMN.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segexp.inference.random_walk import random_walk, sparse_affinity
from segexp.losses.irn import boundary_affinity, path_index

__all__ = ["boundary_map", "boundary_pairs", "irn_random_walk", "walk_labels"]


@torch.no_grad()
def boundary_map(
    model: torch.nn.Module, x: torch.Tensor, pad_size: int | None = 512, flip: bool = True
) -> torch.Tensor:
    """Boundary probabilities (ceil(H / s), ceil(W / s)) of one normalised image ``x`` (1, 3, H, W) from
    an :class:`~segexp.models.irn.IRNet` of stride ``s`` (release ``EdgeDisplacement.forward``)."""
    h, w = x.shape[-2:]
    stride = int(model.stride)
    grid = (-(-h // stride), -(-w // stride))
    batch = torch.cat([x, x.flip(-1)]) if flip else x  # mirrored, then padded (the release's order)
    if pad_size:
        batch = F.pad(batch, (0, max(pad_size, w) - w, 0, max(pad_size, h) - h))
    logits = model(batch)[0][:, 0, : grid[0], : grid[1]]
    if flip:
        logits = torch.stack([logits[0], logits[1].flip(-1)])
    return torch.sigmoid(logits.mean(0))


def boundary_pairs(
    boundary: torch.Tensor, radius: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affinities (P,) and flat (from, to) indices of every pair of the ``h x w`` grid closer than
    ``radius`` cells, from the boundary probabilities (h, w)."""
    h, w = boundary.shape
    index = path_index(radius, h + radius, w + 2 * radius)
    padded = F.pad(boundary, (radius, radius, 0, radius), value=1.0)
    aff = boundary_affinity(padded[None], index)[0].reshape(-1)
    src, dst = index.pairs()
    sy, sx = np.divmod(src.numpy(), w + 2 * radius)
    dy, dx = np.divmod(dst.numpy(), w + 2 * radius)
    inside = (sy < h) & (dy < h) & (sx >= radius) & (sx < w + radius) & (dx >= radius) & (dx < w + radius)
    keep = torch.from_numpy(inside).to(aff.device)

    def flat(y: np.ndarray, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y[inside] * w + x[inside] - radius).to(aff.device)

    return aff[keep], flat(sy, sx), flat(dy, dx)


def irn_random_walk(
    cams: torch.Tensor, boundary: torch.Tensor, beta: float = 10.0, exp_times: int = 8, radius: int = 5
) -> torch.Tensor:
    """Walked scores (K, h, w) of ``cams`` (K, h, w) on the grid of ``boundary`` (h, w) (module docstring)."""
    h, w = boundary.shape
    aff, src, dst = boundary_pairs(boundary, radius)
    affinity = sparse_affinity(aff, src, dst, h * w)
    return random_walk(cams * (1.0 - boundary), affinity.to(cams.dtype), beta=beta, logt=exp_times)


def walk_labels(
    walked: torch.Tensor, size: tuple[int, int], stride: int = 4, bg_threshold: float = 0.25
) -> torch.Tensor:
    """Index map (H, W) into ``[background, *walked]``: x``stride`` bilinear, crop to ``size``, divided by
    the maximum over all classes, background = ``bg_threshold``."""
    up = F.interpolate(walked[None], scale_factor=stride, mode="bilinear", align_corners=False)[0]
    up = up[:, : size[0], : size[1]]
    up = up / up.max().clamp_min(torch.finfo(up.dtype).tiny)
    return F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_threshold).argmax(0)
