"""SEAM losses (Wang et al., CVPR 2020) as released in ``YudeWang/SEAM : train_SEAM.py:16-24,104-142``.

Pure tensor functions; :class:`segexp.methods.seam.SEAM` only wires them. Nothing here writes into
a tensor in place: the released ``max_onehot`` and the background rewrite ``cam1[:, 0] = 1 - max``
mutate storage shared with tensors autograd saved; here they are functional (same values).

Channel 0 is the background in every 21-channel map below; ``labels_bg`` is the (N, C) label with
``labels_bg[:, 0] = 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "max_norm",
    "released_min_max",
    "max_onehot",
    "with_background",
    "er_loss",
    "ecr_loss",
    "ohem_mean",
    "adaptive_min_pooling_loss",
]


def max_norm(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``tool/visualization.py:max_norm`` (torch branch, 4-D): per (image, channel)
    ``ReLU(p' - min p' - eps) / (max p' - min p' + eps)`` with ``p' = ReLU(p)``."""
    p = F.relu(p)
    flat = p.flatten(2)
    pmax = flat.amax(-1)[..., None, None]
    pmin = flat.amin(-1)[..., None, None]
    return F.relu(p - pmin - eps) / (pmax - pmin + eps)


def released_min_max(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per (image, channel) min-max of ``ReLU(p)`` written the way the released inference and
    pseudo-label code writes it (SEAM ``infer_SEAM.py:72-77``, FBR/PPC ``module/train.py:
    get_contrast_loss``): pixels below ``min + eps`` are set to 0 *before* ``(p - min - eps) /
    (max - min + eps)``, so they end at ``-(min + eps) / (max - min + eps)`` - slightly below 0
    when the minimum is 0 (after the ReLU, the usual case), well below 0 when every value is
    positive (-0.71 in ``tests/test_seam.py``), -1 on a constant channel (an absent, label-masked
    class). :func:`max_norm` (and segexp's default min-max) maps them to 0, as a min-max
    normalisation does by definition; every other pixel is equal."""
    p = F.relu(p)
    flat = p.flatten(2)
    pmax = flat.amax(-1)[..., None, None]
    pmin = flat.amin(-1)[..., None, None]
    kept = torch.where(p < pmin + eps, torch.zeros_like(p), p)
    return (kept - pmin - eps) / (pmax - pmin + eps)


def with_background(y: torch.Tensor) -> torch.Tensor:
    """``y`` with channel 0 replaced by ``1 - max_{c>=1} y_c`` (train_SEAM.py:131-132, functional)."""
    return torch.cat([1.0 - y[:, 1:].amax(1, keepdim=True), y[:, 1:]], 1)


def max_onehot(x: torch.Tensor) -> torch.Tensor:
    """Foreground channels that are not the per-pixel foreground maximum set to 0; background kept
    (``train_SEAM.py:max_onehot`` without its in-place write)."""
    fg = x[:, 1:]
    fg = torch.where(fg != fg.amax(1, keepdim=True), torch.zeros_like(fg), fg)
    return torch.cat([x[:, :1], fg], 1)


def er_loss(y_o: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """Equivariant regularisation: mean |A(F(I)) - F(A(I))| over the foreground channels (line 129).

    ``y_o``: normalised CAM of the original view, already transformed by A (downscaled) and masked by
    the label; ``y_t``: normalised CAM of the transformed view, masked. Computed before the
    background channel is rewritten (channel 0 is excluded anyway)."""
    return (y_o[:, 1:] - y_t[:, 1:]).abs().mean()


def ohem_mean(err: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """Per sample, the mean of the ``int(ratio * C*h*w)`` largest elements over channels x pixels,
    then the mean over samples (``torch.mean(torch.topk(e.view(n, -1), k)[0])``).
    ``ratio >= 1``: plain mean."""
    n = err.shape[0]
    flat = err.reshape(n, -1)
    if ratio >= 1.0:
        return flat.mean()
    k = max(1, int(flat.shape[1] * ratio))
    return flat.topk(k, dim=-1)[0].mean()


def ecr_loss(
    y_o: torch.Tensor, y_t: torch.Tensor, rv_o: torch.Tensor, rv_t: torch.Tensor, ohem_ratio: float = 0.2
) -> torch.Tensor:
    """Equivariant cross regularisation with OHEM (lines 131-139).

    ``y_*``: normalised, label-masked CAMs of both views (``y_o`` transformed to the small grid);
    ``rv_*``: the PCM outputs, normalised and masked likewise. Targets are
    ``max_onehot(with_background(y).detach())``: the CAMs give no gradient here, only the PCM
    outputs do. Returns ``ohem(|ybar_t - rv_o|) + ohem(|ybar_o - rv_t|)``.
    """
    target_t = max_onehot(with_background(y_t.detach()))
    target_o = max_onehot(with_background(y_o.detach()))
    return ohem_mean((target_t - rv_o).abs(), ohem_ratio) + ohem_mean((target_o - rv_t).abs(), ohem_ratio)


def adaptive_min_pooling_loss(x: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """``train_SEAM.py:16-24``: per image, the max over channels of ``x`` (the label-masked
    foreground PCM output), its ``k = h*w*fraction`` (released: ``h*w//4``) smallest values,
    ReLU, sum / (k n).
    Released comment: "does not affect the highest performance, but changes the optimal background score"."""
    n, _, h, w = x.shape
    k = max(1, int(h * w * fraction)) if fraction != 0.25 else max(1, h * w // 4)
    m = x.amax(1).reshape(n, -1)
    low = m.topk(k, dim=-1, largest=False)[0]
    return F.relu(low).sum() / (k * n)
