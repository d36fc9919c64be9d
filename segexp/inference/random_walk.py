"""AffinityNet random walk (Ahn & Kwak, CVPR 2018; ``jiwoon-ahn/psa : infer_aff.py``, same in SEAM).

    T = A^beta / (1^T A^beta)        (column-normalised transition; A symmetric, unit diagonal)
    v_rw = v T^(2^logt)              (v: [bg, CAMs] scores on the affinity grid, (C, hw))

Defaults: SEAM beta 8, logt 6, alpha 6 (background ``(1 - max)^alpha``); psa beta 8, logt 8, alpha 16.

How it is computed (why it differs from the releases): psa and SEAM form T^(2^logt) by ``logt`` dense
(hw)^2 squarings - at stride 8 on a 500x375 image hw = 2,961, i.e. 35 MB matrices and ~1e11 flops,
seconds per image. Only ``v T^(2^logt)`` is needed, for a few class rows, and T is sparse (pairs
within the affinity radius), so here ``v`` is multiplied by the sparse T ``2^logt`` times: the same
product in another order (equal to float rounding, same labels), linear in the number of pairs, with
no dense (hw)^2 matrix anywhere. ``python -m segexp.bench wsss`` measures both on one image.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["sparse_affinity", "transition", "random_walk", "rw_scores"]


def sparse_affinity(aff: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """Symmetric (n, n) sparse affinity of one image from its pair affinities (P,), unit diagonal,
    zero beyond the radius: the sparse form of psa's ``to_dense`` matrix."""
    diag = torch.arange(n, device=aff.device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    values = torch.cat([aff, aff, torch.ones(n, dtype=aff.dtype, device=aff.device)])
    indices = torch.stack([rows, cols])
    return torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=False).coalesce()


def transition(affinity: torch.Tensor, beta: float = 8.0) -> torch.Tensor:
    """T = A^beta, column-normalised, as a sparse COO matrix (``affinity`` dense or sparse (n, n))."""
    a = affinity if affinity.is_sparse else affinity.to_sparse()
    a = a.coalesce()
    cols = a.indices()[1]
    powered = a.values().pow(beta)
    col_sum = torch.zeros(a.shape[1], dtype=powered.dtype, device=powered.device).index_add_(0, cols, powered)
    values = powered / col_sum[cols]
    return torch.sparse_coo_tensor(a.indices(), values, a.shape, check_invariants=False).coalesce()


def random_walk(
    scores: torch.Tensor, affinity: torch.Tensor, beta: float = 8.0, logt: int = 6
) -> torch.Tensor:
    """Propagate ``scores`` (C, h, w) with the ``affinity`` (hw, hw; dense or sparse) of the same grid:
    ``v T^(2^logt)`` as ``2^logt`` sparse products (module docstring)."""
    c, h, w = scores.shape
    with warnings.catch_warnings():  # CSR is "beta" in torch; its mat-mul is 10x COO's here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        t_transposed = transition(affinity.to(scores.dtype), beta).t().coalesce().to_sparse_csr()
    v = scores.reshape(c, -1).t().contiguous()  # (hw, C): v T == (T^T v^T)^T
    for _ in range(2 ** int(logt)):
        v = t_transposed @ v
    return v.t().reshape(c, h, w)


def rw_scores(cams: torch.Tensor, alpha: float = 6.0, stride: int = 8) -> torch.Tensor:
    """[bg = (1 - max cams)^alpha, cams] (K+1, H, W) average-pooled by ``stride`` (psa infer_aff.py)."""
    bg = (1.0 - cams.amax(0, keepdim=True)).clamp(min=0).pow(alpha)
    v = torch.cat([bg, cams], 0)[None]
    return F.avg_pool2d(v, stride, stride, ceil_mode=True)[0] if stride > 1 else v[0]
