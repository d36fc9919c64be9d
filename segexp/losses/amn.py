"""AMN losses (Lee et al., CVPR 2022; ``gaviotas/AMN@75c1999c``) and the contrast grid of FBR's AMN
variant (``XuYin94/FBR@fd1aeb85``, ``AMN/region_utils.py``): pure tensor functions, background in
channel 0 (as released).

* :func:`smoothed_balanced_ce` - AMN's only training term ``L_pcl`` (``step/train_amn.py``:
  ``balanced_cross_entropy`` on label-smoothed one-hot targets): per pixel the cross-entropy against
  ``1 - eps`` on the IR label's class and ``eps / (C - 1)`` on every other channel (ignored pixels
  count as background in the target but are left out of both means), then the mean of the
  background-pixel mean and the foreground-pixel mean;
* :func:`min_max` - the per-(image, channel) min-max ``(p - min) / (max - min + 1e-5)`` the AMN
  release applies to softmax probabilities (``make_amn_cam.py``; FBR's ``get_contrast_loss``);
* :func:`amn_cams` - AMN's CAMs as ``make_amn_cam.py`` writes them: softmax over all channels of
  the pass-averaged logits, min-max normalised - except, when the IR labels are given, on pixels
  the IR labels call background, which keep the raw probabilities;
* :func:`amn_contrast_grid` - FBR's AMN-variant pseudo labels (argmax of the min-max normalised
  softmax, background included) and prototypes (top ``hw/32`` over the batch), on the logit grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segexp.losses.fbr import class_prototypes, region_masked_scores
from segexp.losses.ppc import ContrastGrid

__all__ = ["smoothed_balanced_ce", "min_max", "amn_cams", "amn_contrast_grid"]


def smoothed_balanced_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 0.4,
    ignore_index: int = 255,
    bg_index: int = 0,
) -> torch.Tensor:
    """``L_pcl``: ``logits`` (N, C, h, w), ``target`` (N, h, w) IR labels on the same grid.

    Released: a side without pixels divides 0 by 0 (NaN); here it adds 0 (the other side still
    counts half)."""
    n_ch = logits.shape[1]
    logp = F.log_softmax(logits, 1)
    target = target.long()
    hard = torch.where(target == ignore_index, torch.full_like(target, bg_index), target)
    logp_target = logp.gather(1, hard[:, None])[:, 0]
    per_pixel = -((1.0 - eps) * logp_target + eps / (n_ch - 1) * (logp.sum(1) - logp_target))
    bg = target == bg_index
    fg = ~bg & (target != ignore_index)

    def side_mean(mask: torch.Tensor) -> torch.Tensor:
        count = mask.sum()
        return (per_pixel * mask).sum() / count.clamp(min=1)

    return 0.5 * (side_mean(bg) + side_mean(fg))


def min_max(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per (image, channel) of (N, C, H, W): ``(p - min) / (max - min + eps)``."""
    flat = p.flatten(2)
    pmin = flat.amin(-1)[..., None, None]
    pmax = flat.amax(-1)[..., None, None]
    return (p - pmin) / (pmax - pmin + eps)


def amn_cams(
    mean_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    ir_label: torch.Tensor | None = None,
    bg_index: int = 0,
) -> torch.Tensor:
    """Foreground CAMs (N, C - 1, H, W) from pass-averaged logits (N, C, H, W) (``make_amn_cam.py``).

    Softmax over all C channels; the release keeps the background and the labelled classes and
    min-max normalises each over the image (absent classes here: 0). With ``ir_label`` (N, H, W),
    pixels it labels background keep the raw probabilities (released behaviour, which reads the IR
    labels at inference)."""
    probs = F.softmax(mean_logits, 1)[:, 1:]
    if labels is not None:
        present = labels.to(torch.bool)[..., None, None]
    else:
        present = torch.ones(probs.shape[:2], dtype=torch.bool, device=probs.device)[..., None, None]
    norm = min_max(probs)
    if ir_label is not None:
        norm = torch.where((ir_label == bg_index)[:, None], probs, norm)
    return torch.where(present, norm, torch.zeros_like(norm))


@torch.no_grad()
def amn_contrast_grid(
    logits: torch.Tensor,
    f_proj: torch.Tensor,
    b_proj: torch.Tensor | None = None,
    top_fraction: float = 1 / 32,
    official_quirks: bool = False,
    bg_index: int = 0,
) -> ContrastGrid:
    """FBR's AMN-variant grid (``get_contrast_loss``): ``probs`` = softmax of the logits, ``scores``
    = their per-channel :func:`min_max`, ``pseudo`` = argmax (background included), prototypes from
    ``f_proj`` over the top ``top_fraction * hw`` scores of each channel in the batch.

    ``official_quirks``: the prototypes read the scores after the release's in-place zeroing of
    each present class outside its own pseudo-label region (:func:`region_masked_scores`, a side
    effect of ``get_reliable_pseudo_label``); by default they read the scores as computed.
    ``f_proj`` keeps its gradient in the returned grid (the caller decides whether it flows)."""
    probs = F.softmax(logits.detach().float(), 1)
    scores = min_max(probs)
    pseudo = scores.argmax(1)
    proto_scores = region_masked_scores(scores, pseudo, bg_index) if official_quirks else scores
    raw = class_prototypes(f_proj, proto_scores, top_fraction, normalise=False)
    return ContrastGrid.of(f_proj, scores, probs, pseudo, raw, b_proj)
