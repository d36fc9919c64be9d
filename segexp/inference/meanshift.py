"""Mean-shift on the projective sphere, batched in torch, and the coarse-to-fine cluster merge.

Why not scikit-learn's ``MeanShift``: it shifts one seed at a time in Python with a ball-tree
radius query per step (every pixel is a seed unless binned), and its Euclidean kernel does not
know that ``f`` and ``-f`` are the same feature. Here all seeds move together: one
``(seeds x pixels)`` matrix product per iteration gives every seed's neighbours.

Kernel (flat, as sklearn's): a point ``x`` is a neighbour of mode ``m`` when the *line* angle is
within the bandwidth, ``|x . m| >= cos(bandwidth)``; neighbours are sign-aligned to the mode
before averaging (``m <- normalize(sum sign(x . m) x)``), so the result is antipodal-invariant.
The paper's bandwidth is 45 degrees (two orthogonal entities are then cleanly apart).

Seeding: ``num_seeds`` random pixels; further rounds (``seed_rounds``) seed again from the pixels
no mode covers yet, so small entities are not lost to an unlucky draw. Converged modes are merged
like sklearn does: by decreasing support (points within the bandwidth), a mode within
``merge_deg`` of a stronger one is dropped. Every pixel is then assigned to its closest mode by
line angle; clusters under ``min_cluster_pixels`` give their pixels to the next closest mode.

Multi-resolution refinement (paper Sec. 4.1, thresholds in the unavailable supplement, so
*choices*): label maps from coarse to fine, all at the output size. A fine cluster ``c`` is
compared with the current segment ``o`` it overlaps most. If ``|c & o| / |c| < contain`` the
cluster straddles segments and the coarse decision stays; if ``IoU(c, o) >= refine_iou`` it is a
sharper version of ``o`` (its pixels take ``o``'s id, so the boundary moves); otherwise it
subdivides ``o`` and becomes a new segment (when it has at least ``min_pixels``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["spherical_meanshift", "segment_features", "multires_merge"]


def _shift(
    seeds: torch.Tensor, points: torch.Tensor, cos_bw: float, max_iter: int, tol: float
) -> torch.Tensor:
    """Move all seeds (S,D) to their modes over ``points`` (N,D) with the flat line kernel."""
    modes = seeds
    for _ in range(max_iter):
        sim = modes @ points.T
        weights = torch.where(sim.abs() >= cos_bw, torch.sign(sim), torch.zeros_like(sim))
        moved = weights @ points
        norm = moved.norm(dim=1, keepdim=True)
        moved = torch.where(norm > 0, moved / norm.clamp(min=1e-12), modes)
        done = float((1.0 - (moved * modes).sum(1).abs()).max()) < tol
        modes = moved
        if done:
            break
    return modes


def _merge_modes(modes: torch.Tensor, points: torch.Tensor, cos_bw: float, cos_merge: float) -> torch.Tensor:
    support = ((modes @ points.T).abs() >= cos_bw).sum(1)
    modes = modes[torch.argsort(support, descending=True, stable=True)]
    close = (modes @ modes.T).abs() >= cos_merge
    keep = torch.ones(len(modes), dtype=torch.bool, device=modes.device)
    for i in range(len(modes)):
        if keep[i]:
            keep[i + 1 :] &= ~close[i, i + 1 :]
    return modes[keep]


@torch.no_grad()
def spherical_meanshift(
    features: torch.Tensor,
    bandwidth_deg: float = 45.0,
    num_seeds: int = 256,
    seed_rounds: int = 3,
    max_iter: int = 50,
    tol: float = 1e-5,
    merge_deg: float | None = None,
    min_cluster_pixels: int = 0,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster unit features (N,D) on the projective sphere -> (labels (N,) in 0..K-1 ordered by
    decreasing cluster size, modes (K,D)). ``max_points`` subsamples the points the kernel sums
    run over (the assignment always covers every point)."""
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    x = F.normalize(features.float(), dim=1)
    n = x.shape[0]
    device = x.device
    cos_bw = math.cos(math.radians(bandwidth_deg))
    cos_merge = math.cos(math.radians(bandwidth_deg if merge_deg is None else merge_deg))
    pts = x
    if max_points is not None and n > max_points:
        pts = x[torch.randperm(n, device=device, generator=generator)[:max_points]]
    found = x.new_zeros(0, x.shape[1])
    uncovered = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(max(1, seed_rounds)):
        candidates = uncovered.nonzero().squeeze(1)
        if candidates.numel() == 0:
            break
        pick = candidates[torch.randperm(candidates.numel(), device=device, generator=generator)[:num_seeds]]
        found = torch.cat([found, _shift(x[pick], pts, cos_bw, max_iter, tol)])
        uncovered = (x @ found.T).abs().max(1).values < cos_bw
    modes = _merge_modes(found, pts, cos_bw, cos_merge)
    labels = (x @ modes.T).abs().argmax(1)
    if min_cluster_pixels > 0 and len(modes) > 1:
        sizes = torch.bincount(labels, minlength=len(modes))
        big = sizes >= min_cluster_pixels
        if bool(big.any()) and not bool(big.all()):
            modes = modes[big]
            labels = (x @ modes.T).abs().argmax(1)
    sizes = torch.bincount(labels, minlength=len(modes))
    order = torch.argsort(sizes, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=device)
    return rank[labels], modes[order]


def segment_features(features: torch.Tensor, **meanshift) -> torch.Tensor:
    """Entity maps (B,H,W), ids 1..K per image (0 unused), from unit feature maps (B,D,H,W)."""
    b, d, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(b, h * w, d)
    return torch.stack([spherical_meanshift(f, **meanshift)[0] + 1 for f in flat]).view(b, h, w)


def _merge_level(
    current: torch.Tensor, finer: torch.Tensor, contain: float, refine_iou: float, min_pixels: int
) -> torch.Tensor:
    """One coarse-to-fine step on (H,W) id maps at the same size (ids >= 1)."""
    cur_ids, cur = torch.unique(current, return_inverse=True)
    fin_ids, fin = torch.unique(finer, return_inverse=True)
    n_c, n_f = len(cur_ids), len(fin_ids)
    inter = torch.bincount((fin * n_c + cur).reshape(-1), minlength=n_f * n_c).view(n_f, n_c)
    area_f, area_c = inter.sum(1), inter.sum(0)
    best_inter, best = inter.max(1)
    iou = best_inter / (area_f + area_c[best] - best_inter).clamp(min=1)
    contained = best_inter >= contain * area_f
    refines = contained & (iou >= refine_iou)
    subdivides = contained & ~refines & (area_f >= min_pixels)
    new_id = torch.full((n_f,), -1, dtype=torch.long, device=current.device)
    new_id[refines] = cur_ids[best[refines]].long()
    next_id = int(cur_ids.max()) + 1
    new_id[subdivides] = torch.arange(next_id, next_id + int(subdivides.sum()), device=current.device)
    mapped = new_id[fin]
    return torch.where(mapped >= 0, mapped, current.long())


def multires_merge(
    levels: Sequence[torch.Tensor], contain: float = 0.8, refine_iou: float = 0.7, min_pixels: int = 16
) -> torch.Tensor:
    """Merge (H,W) id maps given coarse first (all at the output size) into one map, ids 1..K."""
    if not levels:
        raise ValueError("multires_merge needs at least one label map")
    out = levels[0].long()
    for finer in levels[1:]:
        if finer.shape != out.shape:
            raise ValueError(f"label maps differ in size: {tuple(out.shape)} vs {tuple(finer.shape)}")
        out = _merge_level(out, finer, contain, refine_iou, min_pixels)
    return torch.unique(out, return_inverse=True)[1] + 1
