"""Batched k-means in torch (k-means++ seeding, Lloyd iterations, best of ``n_init`` restarts).

Why not scikit-learn: FBR clusters the background pixels of *every image of every step* (sklearn on
CPU per image dominates the step), and SC-CAM wants clusterings that are reproducible for a seed
across library versions (sklearn's ``n_init`` default changed in 1.4). One batched torch routine
serves both: a batch of independent problems ``(B, N, D)`` with a ``valid`` mask for problems of
different sizes, deterministic for a given ``seed`` on a given device (its own ``torch.Generator``).

Algorithm as scikit-learn's "lloyd": greedy k-means++ seeding (``2 + log k`` candidates per
centre), assignments to the nearest centre, centres = member means, stop when the squared centre
shift is below ``tol x mean feature variance``; an empty cluster is moved to the point farthest from
its centre (sklearn relocates empty clusters to far points too). The restart with the lowest
inertia (sum of squared distances) wins, per problem.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["KMeansResult", "kmeans", "assign"]


class KMeansResult(NamedTuple):
    centers: torch.Tensor  # (B, k, D)
    labels: torch.Tensor  # (B, N) int64, -1 where not valid
    inertia: torch.Tensor  # (B,)
    iterations: torch.Tensor  # (B,) Lloyd iterations of the winning restart


def _sq_dists(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, N, k) squared Euclidean distances (clamped at 0 against round-off)."""
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ centers.transpose(1, 2) + (centers * centers).sum(-1)[:, None]
    return d.clamp_(min=0)


def assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre per point: ``labels (B, N)``, ``squared distance (B, N)``."""
    d, labels = _sq_dists(x, centers).min(-1)
    return labels, d


def _kmeans_pp(x: torch.Tensor, valid: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding for every problem of the batch at once."""
    b, n, _ = x.shape
    trials = 2 + int(math.log(k))
    weights = valid.float()
    first = torch.multinomial(weights, 1, generator=gen)[:, 0]
    centers = [x[torch.arange(b), first]]
    closest = _sq_dists(x, centers[0][:, None]).squeeze(-1) * weights
    for _ in range(1, k):
        prob = closest + 1e-12 * weights  # all-duplicate problems still draw a valid point
        cand = torch.multinomial(prob, trials, replacement=True, generator=gen)  # (B, trials)
        cand_x = torch.gather(x, 1, cand[..., None].expand(-1, -1, x.shape[-1]))  # (B, trials, D)
        d = torch.minimum(closest[:, None], _sq_dists(x, cand_x).transpose(1, 2) * weights[:, None])
        best = d.sum(-1).argmin(-1)  # (B,)
        centers.append(cand_x[torch.arange(b), best])
        closest = d[torch.arange(b), best]
    return torch.stack(centers, 1)


def _lloyd(
    x: torch.Tensor, valid: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, d = x.shape
    k = centers.shape[1]
    w = valid.to(x.dtype)
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    iterations = torch.zeros(b, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        labels, dist = assign(x, centers)
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype) * w[..., None]  # (B, N, k)
        counts = onehot.sum(1)  # (B, k)
        sums = onehot.transpose(1, 2) @ x  # (B, k, D)
        new = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centers)
        empty = counts == 0
        if empty.any():  # move each empty centre to the farthest valid point of its problem
            far = (dist * w - (1 - w)).argsort(-1, descending=True)  # valid points first, farthest first
            for bi, ci in empty.nonzero().tolist():
                j = int((empty[bi, :ci]).sum())  # the j-th empty centre takes the j-th farthest point
                new[bi, ci] = x[bi, far[bi, j]]
        shift = ((new - centers) ** 2).sum((-1, -2))
        centers = torch.where(done[:, None, None], centers, new)
        iterations += (~done).long()
        done |= shift <= tol
        if bool(done.all()):
            break
    labels, dist = assign(x, centers)
    inertia = (dist * w).sum(-1)
    return centers, labels, inertia, iterations


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    valid: torch.Tensor | None = None,
) -> KMeansResult:
    """Cluster ``x`` (N, D) or a batch of problems (B, N, D) into ``k`` clusters each.

    ``valid`` (B, N) bool marks the points of each problem (padding elsewhere); every problem needs at
    least ``k`` valid points. Computation is float32 (float64 input stays float64). The result is a
    function of ``(x, k, n_init, max_iter, tol, seed)`` on a given device.
    """
    single = x.dim() == 2
    if single:
        x = x[None]
        valid = None if valid is None else valid[None]
    if x.dim() != 3:
        raise ValueError(f"kmeans expects (N, D) or (B, N, D) points, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    b, n, _ = x.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
    few = valid.sum(-1) < k
    if bool(few.any()):
        raise ValueError(
            f"kmeans: k={k} clusters but problem(s) {few.nonzero().flatten().tolist()} have fewer "
            f"valid points ({valid.sum(-1)[few].tolist()})"
        )
    w = valid.to(x.dtype)
    count = w.sum(-1, keepdim=True)
    mean = (x * w[..., None]).sum(1) / count
    var = (((x - mean[:, None]) ** 2) * w[..., None]).sum(1) / count  # (B, D)
    tol_abs = tol * var.mean(-1)  # sklearn: tol relative to the mean per-feature variance
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed))
    best: KMeansResult | None = None
    for _ in range(max(1, int(n_init))):
        init = _kmeans_pp(x, valid, k, gen)
        centers, labels, inertia, iters = _lloyd(x, valid, init, int(max_iter), tol_abs)
        if best is None:
            best = KMeansResult(centers, labels, inertia, iters)
            continue
        better = inertia < best.inertia
        best = KMeansResult(
            torch.where(better[:, None, None], centers, best.centers),
            torch.where(better[:, None], labels, best.labels),
            torch.where(better, inertia, best.inertia),
            torch.where(better, iters, best.iterations),
        )
    assert best is not None
    labels = best.labels.masked_fill(~valid, -1)
    out = KMeansResult(best.centers, labels, best.inertia, best.iterations)
    if single:
        out = KMeansResult(out.centers[0], out.labels[0], out.inertia[0], out.iterations[0])
    return out
