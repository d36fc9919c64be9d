"""Class-agnostic segmentation (CAS) loss (Sharma et al., arXiv 2010.14793 / 2108.04226).

The loss sees a per-pixel descriptor ``s(x)`` (the network's softmax over C channels) and a
*partition* of the image into regions r_1..r_N taken from the ground truth; which region carries
which label does not matter. Two terms:

* uniformer: the variance of ``s`` inside each region, normalised by the region's area;
* discriminator: squared distances between the region means.

Two variants:

``paper`` (default), the poster's formula (``seeds/000_b56d83e5bbd5515a.txt``)::

    L = alpha * sum_i 1/|r_i| sum_{x in r_i} ||s(x) - mean_i||^2
        - (1 - alpha) * sum_i sum_{j != i} ||mean_i - mean_j||^2

  per image, averaged over the images of the batch (the actual batch size). It is symmetric in the
  regions (invariant to permuting region labels, which the low-fidelity claim rests on) and works
  for any number of regions. Choices where the poster is silent, and why:

  - the double sum runs over *ordered* pairs (each pair counted twice), as written on the poster;
  - regions absent from an image do not take part (no empty-region means), so an image with a
    single region has only the uniformer;
  - pixels with ``valid == False`` (padding, ignore label) belong to no region.

  Bounds: the uniformer is >= 0 and every softmax mean lies in the simplex, so each squared
  distance is <= 2 and ``L >= -(1 - alpha) * 2 * N * (N - 1)`` (-2 for N=2, alpha=0.5).

``official``, the released code (``sofmonk/class_agnostic_loss_saliency@def297f : cas.py : lss``; first
uploaded as ``m_loss2.py``, deleted in a4c3e06),
  for parity: binary masks only, ``g = m + eps``, ``gbar = 1 - m + eps`` (eps = 3e-5), soft means
  over the whole image weighted by g / gbar, uniformer on the foreground only
  (``sum_x g^2 (s - mean_fg)^2 / (sum_x g + eps)``), the FG/BG pair counted once, and the batch
  *sum* divided by a constant (``BATCH_SIZE = 40`` in ``config.py``). Not symmetric in FG/BG.

Soft (float) targets, both variants: binarised at ``threshold`` (0.5, strictly above = foreground)
before the loss. This is the release's pipeline: ``dataset.py : saliencydata.load_mask`` divides the
mask by 255 and sets ``<= 0.5`` to 0 and ``> 0.5`` to 1, so ``lss`` only ever sees binary masks.
``lss`` itself would weight pixels by a soft mask (``g = m + eps``), but no released code path feeds
it one, so segexp has no such mode; the poster's partition is binary too. Checked in
``tests/test_cas.py`` against the release's loader + ``lss`` on a soft 256 x 256 mask (equal to
2e-10; ``lss`` on the raw ``mask / 255`` would differ by 5e-4 there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cas_loss_paper", "cas_loss_official", "CASLoss", "VARIANTS"]

VARIANTS = ("paper", "official")
OFFICIAL_EPS = 3e-5  # cas.py: eps = 0.00003
OFFICIAL_DIVISOR = 40.0  # config.py: BATCH_SIZE = 40


def _region_onehot(regions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) integer region labels -> (B, R, H*W) float one-hot over the labels present in
    the batch (any integer values; only the partition matters)."""
    b = regions.shape[0]
    flat = regions.reshape(b, -1)
    keep = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.reshape(b, -1).bool()
    labels, inverse = torch.unique(flat, return_inverse=True)
    onehot = F.one_hot(inverse, num_classes=labels.numel()).permute(0, 2, 1).to(torch.float32)
    return onehot * keep[:, None, :]


def cas_loss_paper(
    probs: torch.Tensor,
    regions: torch.Tensor,
    alpha: float = 0.5,
    valid: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Paper CAS loss. ``probs`` (B, C, H, W) descriptors (softmax), ``regions`` (B, H, W) integer
    partition labels, ``valid`` optional (B, H, W) bool. Returns the batch mean (or per image with
    ``reduction="none"``)."""
    if probs.shape[0] != regions.shape[0] or probs.shape[-2:] != regions.shape[-2:]:
        raise ValueError(f"probs {tuple(probs.shape)} and regions {tuple(regions.shape)} do not match")
    b, c = probs.shape[:2]
    s = probs.reshape(b, c, -1)  # (B, C, P)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    onehot = _region_onehot(regions, valid).to(s.dtype)  # (B, R, P)
    area = onehot.sum(-1)  # (B, R)
    present = area > 0
    means = torch.einsum("brp,bcp->brc", onehot, s) / area.clamp(min=1)[..., None]  # (B, R, C)
    # sum_x in r ||s(x) - m_r||^2 = sum_x in r ||s||^2 - |r| ||m_r||^2 would cancel badly; go direct.
    dev = s[:, None] - means[..., None]  # (B, R, C, P)
    var = (dev.pow(2).sum(2) * onehot).sum(-1) / area.clamp(min=1)  # (B, R)
    uniformer = (var * present).sum(1)
    diff = (means[:, :, None] - means[:, None]).pow(2).sum(-1)  # (B, R, R), zero on the diagonal
    pair = (present[:, :, None] & present[:, None, :]).float()
    discriminator = (diff * pair).sum((1, 2))  # ordered pairs i != j
    per_image = alpha * uniformer - (1 - alpha) * discriminator
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()


def cas_loss_official(
    probs: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.5,
    eps: float = OFFICIAL_EPS,
    divisor: float | None = OFFICIAL_DIVISOR,
) -> torch.Tensor:
    """The released loss in closed form. ``mask`` (B, H, W) binary (1 = foreground), broadcast to
    every channel as ``train.py`` does. ``divisor=None`` divides by the actual batch size."""
    m = mask.to(probs.dtype)[:, None]  # (B, 1, H, W)
    g = m + eps
    gc = (1 - m) + eps
    n = g.sum((2, 3))  # (B, 1)
    mu = (probs * g).sum((2, 3)) / n  # (B, C)
    mu_c = (probs * gc).sum((2, 3)) / gc.sum((2, 3))
    term2 = (mu - mu_c).pow(2).sum(1)
    term1 = ((g.pow(2) * (probs - mu[..., None, None]).pow(2)).sum((2, 3)) / (n + eps)).sum(1)
    total = alpha * term1.sum() - (1 - alpha) * term2.sum()
    return total / (divisor if divisor is not None else probs.shape[0])


class CASLoss(nn.Module):
    """CAS loss on logits: softmax over channels, regions from the target.

    ``forward(logits, target, valid=None)``: ``target`` is either a float saliency map in [0, 1]
    (binarised at ``threshold``, ``> threshold`` = FG, as the released loader does: regions FG/BG)
    or an integer partition (B, H, W); ``valid`` marks
    pixels that belong to a region (padding excluded). The ``official`` variant needs a binary target
    and ignores ``valid`` (the released code has no padding).
    """

    region_based = True  # the method passes regions, not class targets

    def __init__(
        self,
        variant: str = "paper",
        alpha: float = 0.5,
        threshold: float = 0.5,
        official_eps: float = OFFICIAL_EPS,
        official_divisor: float | None = OFFICIAL_DIVISOR,
        weight: float = 1.0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown CAS variant {variant!r}; choose one of {VARIANTS}")
        self.variant = variant
        self.alpha = alpha
        self.threshold = threshold
        self.official_eps = official_eps
        self.official_divisor = official_divisor
        self.weight = weight

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        probs = logits.float().softmax(1)
        regions = (target > self.threshold).long() if target.is_floating_point() else target.long()
        if self.variant == "official":
            if regions.max() > 1:
                raise ValueError("variant=official supports binary (FG/BG) targets only")
            loss = cas_loss_official(probs, regions, self.alpha, self.official_eps, self.official_divisor)
        else:
            loss = cas_loss_paper(probs, regions, self.alpha, valid)
        return self.weight * loss

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, alpha={self.alpha}"
