"""AffinityNet random walk (Ahn & Kwak, CVPR 2018; ``jiwoon-ahn/psa : infer_aff.py``, same in SEAM).

    T = A^beta / (1^T A^beta)        (column-normalised transition; A symmetric, unit diagonal)
    T <- T^(2^logt)                  (logt squarings)
    v_rw = v T                       (v: [bg, CAMs] scores on the affinity grid, (C, hw))

Defaults: SEAM beta 8, logt 6, alpha 6 (background ``(1 - max)^alpha``); psa beta 8, logt 8, alpha 16.
Memory: T is dense (hw)^2 - at stride 8 on a 500x375 image hw = 63*47 = 2,961 -> 35 MB per matrix
(the squaring holds two), measured by ``segexp.bench.wsss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["transition_matrix", "random_walk", "rw_scores"]


def transition_matrix(affinity: torch.Tensor, beta: float = 8.0, logt: int = 6) -> torch.Tensor:
    """(hw, hw) affinity -> T^(2^logt) with T = A^beta column-normalised."""
    a = affinity.pow(beta)
    t = a / a.sum(0, keepdim=True)
    for _ in range(int(logt)):
        t = t @ t
    return t


def random_walk(
    scores: torch.Tensor, affinity: torch.Tensor, beta: float = 8.0, logt: int = 6
) -> torch.Tensor:
    """Propagate ``scores`` (C, h, w) with the dense ``affinity`` (hw, hw) of the same grid."""
    c, h, w = scores.shape
    t = transition_matrix(affinity.to(scores.dtype), beta, logt)
    return (scores.reshape(c, -1) @ t).reshape(c, h, w)


def rw_scores(cams: torch.Tensor, alpha: float = 6.0, stride: int = 8) -> torch.Tensor:
    """[bg = (1 - max cams)^alpha, cams] (K+1, H, W) average-pooled by ``stride`` (psa infer_aff.py)."""
    bg = (1.0 - cams.amax(0, keepdim=True)).clamp(min=0).pow(alpha)
    v = torch.cat([bg, cams], 0)[None]
    return F.avg_pool2d(v, stride, stride, ceil_mode=True)[0] if stride > 1 else v[0]
