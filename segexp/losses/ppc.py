"""PPC losses (EPS + PCM + pixel-to-prototype contrast; Lee et al. CVPR 2021 / Du et al. CVPR 2022):
pure tensors. Released code: ``usr922/wseg`` branch ``esp`` (the EPS base, image labels + saliency):
``module/train.py``, ``eps.py``; FBR's release (``XuYin94/FBR``) runs the same base with two changes
(background pixels masked out of the cross-view terms, its own intra-view term) - see
:mod:`segexp.methods.ppc`.

Layout: every 1+K channel map has the **background in channel 0** (segexp's convention, as in
SEAM). The release keeps it last (channel 20); each function says where that matters.

* :func:`thresholded_avg_pool` / :func:`tap_logits` - Thresholded Average Pooling (FBR's network
  only; PPC's release pools by GAP): per feature channel keep the values above ``threshold`` x its
  spatial max and average the kept positions, then the 1x1 classifier.
* :func:`eps_saliency_prediction` / :func:`eps_saliency_loss` - EPS: the saliency predicted from
  the softmax of the CAM; present classes whose (rounded) map overlaps the (rounded) saliency by
  more than ``tau`` are foreground, the background channel and the other present classes are
  background; ``alpha * fg + (1 - alpha) * (1 - bg)`` is compared with the saliency map by MSE.
* :func:`contrast_grid` - one view on the contrast grid: projected features, pseudo labels and
  prototypes (the functions of :mod:`segexp.losses.fbr`, shared with FBR).
* :func:`prototype_nce` / :func:`ppc_contrast_losses` - the two cross-view terms: each view's pixels
  against the other view's prototypes, and against their own view's prototypes with the other
  view's pseudo labels (temperature 0.1, softmax over all 1+K prototypes).
* :func:`semi_hard_negatives` / :func:`hard_pixel_indices` / :func:`ppc_intra_view_loss` - the
  intra-view term: each pixel against its own view's prototype and a window of semi-hard negative
  prototypes, on a per-class sample of random + hard pixels, averaged over classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segexp.losses.fbr import class_prototypes, contrast_pseudo_labels, region_masked_scores

__all__ = [
    "thresholded_avg_pool",
    "tap_logits",
    "eps_saliency_prediction",
    "eps_saliency_loss",
    "ContrastGrid",
    "contrast_grid",
    "prototype_nce",
    "flat_features",
    "ppc_contrast_losses",
    "semi_hard_negatives",
    "hard_pixel_indices",
    "ppc_intra_view_loss",
]


# -- classification: thresholded average pooling ---------------------------------------------------
def thresholded_avg_pool(feats: torch.Tensor, threshold: float = 0.10) -> torch.Tensor:
    """(N, C) from (N, C, h, w): per channel the mean of the values ``> threshold * max`` (values
    that are not positive do not count; a channel with no kept value gives 0)."""
    flat = feats.flatten(2)
    cut = flat.amax(-1, keepdim=True) * threshold
    kept = torch.where(flat > cut, flat, torch.zeros_like(flat))
    count = (kept > 0).sum(-1).clamp(min=1)
    return kept.sum(-1) / count


def tap_logits(feats: torch.Tensor, weight: torch.Tensor, threshold: float = 0.10) -> torch.Tensor:
    """Image logits (N, K_out) = 1x1 classifier ``weight`` (K_out, C[, 1, 1]) applied to the TAP
    vector of ``feats``: linear, so equal to summing the classifier's map of the averaged features."""
    return thresholded_avg_pool(feats, threshold) @ weight.flatten(1).T


# -- EPS saliency loss ------------------------------------------------------------------------------
def eps_saliency_prediction(
    cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = 0.4, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency predicted from ``cam`` (N, 1+K, h, w; background channel 0) and the target resized
    to the CAM grid (nearest, as released). ``saliency`` (N, H, W) or (N, 1, H, W) in [0, 1];
    ``labels`` (N, K). Returns ``(prediction, target)``, both (N, 1, h, w).

    Overlap of class c (no gradient): ``sum(round(p_c) * round(S)) / (sum(round(p_c)) + 1e-4 h w)``
    (the release adds 1e-4 to every pixel before summing). Present classes above ``tau`` form the
    foreground map; the background channel plus the present classes at or below ``tau`` the
    background map; absent classes take part in neither (only in the softmax)."""
    if saliency.dim() == 3:
        saliency = saliency[:, None]
    h, w = cam.shape[-2:]
    target = F.interpolate(saliency.to(cam.dtype), size=(h, w), mode="nearest")
    probs = F.softmax(cam, 1)
    fg = probs[:, 1:]
    with torch.no_grad():
        hard = fg.detach().round()
        overlap = (hard * target.round()).flatten(2).sum(-1) / (hard.flatten(2).sum(-1) + 1e-4 * h * w)
        present = labels.to(torch.bool)
        fg_sel = (present & (overlap > tau)).to(cam.dtype)[..., None, None]
        bg_sel = (present & (overlap <= tau)).to(cam.dtype)[..., None, None]
    fg_map = (fg * fg_sel).sum(1, keepdim=True)
    bg_map = 1.0 - (probs[:, :1] + (fg * bg_sel).sum(1, keepdim=True))
    return alpha * fg_map + (1.0 - alpha) * bg_map, target


def eps_saliency_loss(
    cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = 0.4, alpha: float = 0.5
) -> torch.Tensor:
    """MSE between :func:`eps_saliency_prediction` and the saliency map (``eps.py:get_eps_loss``)."""
    pred, target = eps_saliency_prediction(cam, saliency, labels, tau, alpha)
    return F.mse_loss(pred, target)


# -- prototype contrast -----------------------------------------------------------------------------
@dataclass
class ContrastGrid:
    """One view on the contrast grid. ``f_proj`` (N, D, s, s) keeps its gradient; the rest is
    detached: ``scores``/``probs`` (N, 1+K, s, s), ``pseudo`` (N, s, s), ``prototypes`` (1+K, D)
    L2-normalised and ``raw_prototypes`` before the normalisation (the release's
    ``tmp_prototypes``); ``b_proj`` (NROI features) when the model has FBR's background branch."""

    f_proj: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    pseudo: torch.Tensor
    prototypes: torch.Tensor
    b_proj: torch.Tensor | None = None
    raw_prototypes: torch.Tensor | None = None

    @classmethod
    def of(cls, f_proj, scores, probs, pseudo, raw_prototypes, b_proj=None) -> ContrastGrid:
        """The grid with its prototypes L2-normalised from the raw ones (both kept)."""
        prototypes = F.normalize(raw_prototypes, dim=-1)
        return cls(f_proj, scores, probs, pseudo, prototypes, b_proj, raw_prototypes)


def contrast_grid(
    out: dict[str, torch.Tensor],
    labels: torch.Tensor,
    size: int = 16,
    bg_score: float = 0.10,
    top_fraction: float = 1 / 16,
    official_quirks: bool = False,
    region_masked_prototypes: bool = False,
) -> ContrastGrid:
    """Resize ``f_proj`` / ``b_proj`` / the PCM output ``cam_rv`` of a view to ``size`` x ``size``
    (bilinear, align_corners) and derive pseudo labels and prototypes (``get_contrast_loss``;
    ``official_quirks``: its min-max arithmetic, see
    :func:`~segexp.losses.fbr.contrast_pseudo_labels`). ``region_masked_prototypes``: the prototypes
    read the scores with each class zeroed outside its pseudo-label region
    (:func:`~segexp.losses.fbr.region_masked_scores`), as FBR's release does by a side effect; the
    grid keeps the unmasked scores."""

    def grid(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, (size, size), mode="bilinear", align_corners=True)

    f_proj = grid(out["f_proj"])
    scores, probs, pseudo = contrast_pseudo_labels(grid(out["cam_rv"]), labels, bg_score, official_quirks)
    proto_scores = region_masked_scores(scores, pseudo) if region_masked_prototypes else scores
    raw = class_prototypes(f_proj, proto_scores, top_fraction, normalise=False)
    b_proj = grid(out["b_proj"]) if "b_proj" in out else None
    return ContrastGrid.of(f_proj, scores, probs, pseudo, raw, b_proj)


def prototype_nce(
    feats: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """``mean_p mask_p * -log softmax_c(f_p . P_c / T)[targets_p]`` over *all* pixels (masked ones
    count as 0). ``feats`` (P, D) L2-normalised, ``prototypes`` (C, D) (detached here)."""
    logits = feats @ prototypes.detach().T / temperature
    nll = F.cross_entropy(logits, targets, reduction="none")
    return (nll * mask.to(nll.dtype)).mean()


def ppc_contrast_losses(
    view1: ContrastGrid,
    view2: ContrastGrid,
    temperature: float = 0.1,
    mask_background: bool = False,
    bg_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPC's two cross-view terms on two spatially aligned grids (``get_contrast_loss``):

    cross     = 1/2 [NCE(f1, P2, y1) + NCE(f2, P1, y2)]   (the other view's prototypes),
    cross_cam = 1/2 [NCE(f1, P1, y2) + NCE(f2, P2, y1)]   (the other view's pseudo labels).

    Every pixel counts (PPC's release); ``mask_background`` zeroes the pixels whose target is the
    background, still dividing by all pixels (FBR's release, ``mask_s`` / ``mask_t``)."""
    if view1.f_proj.shape[-2:] != view2.f_proj.shape[-2:]:
        raise ValueError(
            f"contrast grids differ: {tuple(view1.f_proj.shape[-2:])} vs {tuple(view2.f_proj.shape[-2:])}"
        )

    f1, f2 = flat_features(view1.f_proj), flat_features(view2.f_proj)
    y1, y2 = view1.pseudo.reshape(-1), view2.pseudo.reshape(-1)
    p1, p2 = view1.prototypes, view2.prototypes
    if mask_background:
        m1, m2 = y1 != bg_index, y2 != bg_index
    else:
        m1 = m2 = torch.ones_like(y1, dtype=torch.bool)
    nce = prototype_nce
    cross = 0.5 * (nce(f1, p2, y1, m1, temperature) + nce(f2, p1, y2, m2, temperature))
    cross_cam = 0.5 * (nce(f1, p1, y2, m2, temperature) + nce(f2, p2, y1, m1, temperature))
    return cross, cross_cam


def flat_features(x: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) -> (N h w, D), L2-normalised per pixel."""
    return F.normalize(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), dim=-1)


# -- intra-view contrast ----------------------------------------------------------------------------
@torch.no_grad()
def semi_hard_negatives(
    feats: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    skip: int = 3,
    count: int = 10,
    exclude_positive: bool = True,
) -> torch.Tensor:
    """(P, k) prototype indices, per pixel: prototypes ranked by similarity to the pixel, the ``skip``
    most similar dropped (under noisy pseudo labels the most similar "negatives" are often the true
    class), the next ``count`` kept; fewer when there are not enough prototypes. The pixel's own
    prototype is not a candidate unless ``exclude_positive`` is false (the release ranks it too)."""
    sim = feats @ prototypes.T
    available = sim.shape[1]
    if exclude_positive:
        sim = sim.scatter(1, targets[:, None], float("-inf"))
        available -= 1
    top = min(skip + count, available)
    return sim.topk(top, dim=1).indices[:, min(skip, top) :]


@torch.no_grad()
def hard_pixel_indices(
    similarity: torch.Tensor,
    fraction: float = 0.5,
    pool: float = 0.6,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices into one class's ``n`` pixels (``similarity`` (n,) to their prototype): ``m = int(n *
    fraction)`` drawn uniformly without replacement, then of the ``k = int(n * pool)`` least similar
    pixels all but the ``k - m`` least similar of all (likely mislabelled). The two sets may overlap;
    a pixel then counts twice, as released."""
    n = similarity.numel()
    m = int(n * fraction)
    drawn = torch.randperm(n, generator=generator)[:m].to(similarity.device)
    k = int(n * pool)
    hard = similarity.topk(k, largest=False).indices[max(k - m, 0) :]
    return torch.cat([drawn, hard])


def ppc_intra_view_loss(
    feats: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.1,
    skip: int = 3,
    count: int = 10,
    fraction: float = 0.5,
    pool: float = 0.6,
    official_quirks: bool = False,
    generator: torch.Generator | None = None,
    bg_index: int = 0,
) -> torch.Tensor:
    """PPC's intra-view term of one view. ``feats`` (P, D) L2-normalised (with gradient),
    ``prototypes`` (C, D) of the same view (detached here), ``targets`` (P,) its pseudo labels.

    Per pixel: ``-log softmax`` of its own prototype against :func:`semi_hard_negatives`; per pseudo
    class with at least 2 pixels, the mean over :func:`hard_pixel_indices`; then the mean over those
    classes. Classes are visited foreground first, background last (the release's channel order), so
    that a seeded run draws the same pixels as the release. ``official_quirks`` (released): the
    positive is ranked with the negatives (it can then sit in the denominator twice) and classes
    with a single pixel count in the class mean."""
    protos = prototypes.detach()
    negatives = semi_hard_negatives(feats.detach(), protos, targets, skip, count, not official_quirks)
    pos = (feats * protos[targets]).sum(-1)
    neg = torch.einsum("pd,pkd->pk", feats, protos[negatives])
    logits = torch.cat([pos[:, None], neg], 1) / temperature
    nll = torch.logsumexp(logits, 1) - logits[:, 0]
    similarity = (pos.detach() + 1) / 2
    total, classes = feats.sum() * 0.0, 0
    for c in sorted(targets.unique().tolist(), key=lambda c: c == bg_index):
        idx = (targets == c).nonzero()[:, 0]
        if idx.numel() < 2:
            classes += int(official_quirks)
            continue
        pick = hard_pixel_indices(similarity[idx], fraction, pool, generator)
        total = total + nll[idx[pick]].mean()
        classes += 1
    return total / max(classes, 1)
