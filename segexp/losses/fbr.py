"""FBR losses (Yin et al., TCSVT 2024; released code ``XuYin94/FBR``): pure tensor functions.

Layout: 21-channel-style maps have the **background in channel 0** (``bg_index``), as in SEAM; the
released PPC model puts it last - only the ECR slip (:func:`max_onehot_bg_last_slip`) depends on
that, and it is reproduced explicitly.

Pieces, in the order a step uses them (released file:function in brackets):

* :func:`contrast_pseudo_labels` - per-class min-max normalised CAM, background score a constant,
  ``softmax(scores * label)`` and its argmax (``module/train.py:get_contrast_loss``).
* :func:`uncertain_mask` - the query pixels: not *sure* (class score at most the 60th percentile of
  that class's scores > 0.05 inside its own pseudo-label region, per image) and of *high entropy*
  (foreground softmax entropy above the per-image 10% quantile, background pixels counting as 0)
  (``get_reliable_pseudo_label``; the AMN variant, ``AMN/region_utils.py``: 40th percentile, 25%
  quantile over every pixel's entropy - ``foreground_entropy_only=False``).
* :func:`region_masked_scores` - the scores as the released ``get_reliable_pseudo_label`` leaves them
  (each present class zeroed outside its region, in place there): what the AMN variant's prototypes
  read under ``official_quirks`` (:mod:`segexp.methods.amn`).
* :func:`class_prototypes` - score-weighted mean feature over the top-k scores of each class across
  the batch, L2-normalised, no gradient.
* :func:`nroi_centroids` - per image, k-means (k = 8) over its background pixels' NROI features;
  images with <= k background pixels contribute their raw features (``Bank_contrast_loss``).
  Batched torch k-means (:mod:`segexp.utils.kmeans`) instead of one sklearn call per image.
* :func:`nroi_contrast_loss` - pixel-to-NROI contrast: uncertain pixels of each present class
  against their prototype (positive) and NROIs sampled uniformly from the bank (negatives).
* :func:`fg_active_contrast_loss` - intra-foreground contrast with negatives of the other present
  classes; class j drawn with probability ``softmax_j(cos(P_i, P_j) / tau)``
  (:func:`negative_class_probs`), then a pixel of class j uniformly (``compute_fg_reco_loss``).
* :func:`background_seg_loss`, :func:`decorrelation_loss` - the auxiliary BG segmentation BCE and
  the FG/BG cosine term.

``official_quirks`` (the released behaviour) in :func:`contrast_logits`: anchors detached and the
cosine taken over ``dim=1`` - across the 1 + K keys, separately per feature channel - which turns the
"logits" into a (Q, D) matrix and the cross-entropy into one over D pseudo-classes. That cosine is
not invariant to the scale of each key, so the positive key matters as given: the release passes
the *raw* prototype (``tmp_prototypes``, :func:`class_prototypes` with ``normalise=False``) next to
raw NROI centroids, and the method hands that one to :func:`nroi_contrast_loss` under quirks (the
L2-normalised one otherwise; the faithful cosine over D does not see the scale). The anchors' scale
does not matter in either mode. The released term has no gradient, so this moves the logged value
only (``tests/test_fbr.py`` holds the release's number). In :func:`contrast_pseudo_labels` quirks
mode uses the released min-max arithmetic (pixels at a channel's minimum slightly below 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segexp.losses.seam import max_norm, max_onehot, ohem_mean, released_min_max, with_background
from segexp.utils.kmeans import kmeans

__all__ = [
    "contrast_pseudo_labels",
    "uncertain_mask",
    "region_masked_scores",
    "class_prototypes",
    "nroi_centroids",
    "contrast_logits",
    "nroi_contrast_loss",
    "negative_class_probs",
    "sample_negative_pixels",
    "fg_active_contrast_loss",
    "background_target",
    "background_seg_loss",
    "decorrelation_loss",
    "max_onehot_bg_last_slip",
    "ecr_loss_bg_last_slip",
]


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A zero that keeps ``like`` in the graph (so DDP sees every parameter used)."""
    return like.sum() * 0.0


# -- pseudo labels, query pixels, prototypes ------------------------------------------------------
@torch.no_grad()
def contrast_pseudo_labels(
    cam: torch.Tensor, labels: torch.Tensor, bg_score: float = 0.10, official_quirks: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cam`` (N, 1+K, h, w), background first; ``labels`` (N, K) multi-hot.

    Returns ``scores`` (foreground min-max normalised, background = ``bg_score``), ``probs`` =
    softmax over channels of ``scores * [1, labels]`` (absent classes score 0 but stay in the
    softmax, as released) and the hard ``pseudo`` labels (N, h, w) = its argmax.

    Min-max: by default SEAM's :func:`~segexp.losses.seam.max_norm` (a channel's minimum maps to
    0); ``official_quirks`` the released arithmetic (:func:`~segexp.losses.seam.released_min_max`:
    pixels within 1e-5 of the minimum get ``-(min + 1e-5) / (max - min + 1e-5)``), which moves
    ``probs`` (hence the entropy of uncertain pixels) and, where a class has fewer than k positive
    scores in the batch, its prototype; the pseudo labels are the same (the background's positive
    score beats 0 and any negative score alike).
    """
    fg = (released_min_max if official_quirks else max_norm)(cam[:, 1:].detach())
    scores = torch.cat([torch.full_like(fg[:, :1], bg_score), fg], 1)
    lab = torch.cat([torch.ones_like(labels[:, :1]), labels], 1).to(scores)[..., None, None]
    probs = F.softmax(scores * lab, 1)
    return scores, probs, probs.argmax(1)


@torch.no_grad()
def uncertain_mask(
    pseudo: torch.Tensor,
    scores: torch.Tensor,
    probs: torch.Tensor,
    sure_rate: float = 0.6,
    min_score: float = 0.05,
    entropy_rate: float = 0.1,
    bg_index: int = 0,
    foreground_entropy_only: bool = True,
) -> torch.Tensor:
    """Bool (N, h, w): pixels that are neither *sure* nor of low entropy (the released
    ``reliable_pseudo_label == 255``). Background pixels are never uncertain.

    Sure, per image and present foreground class c: ``s = scores[c]`` zeroed outside the pixels
    labelled c; with ``v`` = sorted values of ``s > min_score``, sure = ``s > v[int(len(v) * sure_rate)]``
    (no value above ``min_score``: no sure pixel). High entropy: entropy of ``probs`` above its
    per-image ``entropy_rate`` quantile; the entropy is set to 0 on background pixels before the
    quantile (PPC variant, ``module/train.py``) unless ``foreground_entropy_only=False`` (AMN
    variant, ``AMN/region_utils.py``: the quantile runs over every pixel's entropy).
    """
    n = pseudo.shape[0]
    fg = pseudo != bg_index
    entropy = -(probs * torch.log(probs + 1e-10)).sum(1)
    if foreground_entropy_only:
        entropy = entropy * fg
    threshold = torch.quantile(entropy.reshape(n, -1), entropy_rate, dim=1)
    high = entropy > threshold[:, None, None]
    sure = torch.zeros_like(fg)
    for i in range(n):
        for c in pseudo[i][fg[i]].unique().tolist():
            s = torch.where(pseudo[i] == c, scores[i, c], torch.zeros_like(scores[i, c]))
            v = s[s > min_score].sort()[0]
            if v.numel():
                sure[i] |= s > v[int(v.numel() * sure_rate)]
    return ~sure & high & fg  # released: background pixels may get 255 too, but are never queried


@torch.no_grad()
def region_masked_scores(scores: torch.Tensor, pseudo: torch.Tensor, bg_index: int = 0) -> torch.Tensor:
    """``scores`` (N, C, h, w) with each foreground class that ``pseudo`` (N, h, w) assigns in an
    image zeroed outside that class's pixels of the image (other channels untouched): the state the
    released ``get_reliable_pseudo_label`` leaves its score tensor in (in-place zeroing), which the
    release's prototypes then read."""
    out = scores.clone()
    for i in range(pseudo.shape[0]):
        for c in pseudo[i].unique().tolist():
            if c != bg_index:
                out[i, c].masked_fill_(pseudo[i] != c, 0.0)
    return out


@torch.no_grad()
def class_prototypes(
    feats: torch.Tensor, scores: torch.Tensor, top_fraction: float = 1 / 16, normalise: bool = True
) -> torch.Tensor:
    """(C, D) prototypes: for each channel c of ``scores`` (N, C, h, w), the score-weighted mean of
    ``feats`` (N, D, h, w) over the ``k = int(h * w * top_fraction)`` highest scores of c in the
    whole batch (released: ``k = hw // 16``), L2-normalised unless ``normalise=False`` (the
    release's ``tmp_prototypes``, which its NROI and FG terms receive). A channel whose k scores
    sum to 0 gives a zero prototype."""
    n, d, h, w = feats.shape
    f = feats.detach().permute(0, 2, 3, 1).reshape(-1, d)
    s = scores.detach().transpose(0, 1).reshape(scores.shape[1], -1)
    k = max(1, int(h * w * top_fraction))
    top_v, top_i = s.topk(min(k, s.shape[1]), dim=-1)
    weight = top_v.sum(1, keepdim=True)
    proto = (top_v[..., None] * f[top_i]).sum(1) / torch.where(weight == 0, torch.ones_like(weight), weight)
    return F.normalize(proto, dim=-1) if normalise else proto


@torch.no_grad()
def nroi_centroids(
    feats: torch.Tensor, bg_mask: torch.Tensor, k: int = 8, n_init: int = 1, max_iter: int = 50, seed: int = 0
) -> torch.Tensor:
    """NROIs of a batch: (M, D) rows = per image the ``k`` k-means centroids of its background
    pixels' features (``feats`` (N, D, h, w), ``bg_mask`` (N, h, w)); images with at most ``k``
    background pixels give their raw features, images with none give nothing."""
    n, d = feats.shape[:2]
    x = feats.detach().flatten(2).transpose(1, 2).float()  # (N, hw, D)
    valid = bg_mask.reshape(n, -1)
    counts = valid.sum(1)
    rows = [x[i][valid[i]] for i in range(n) if 0 < counts[i] <= k]
    big = counts > k
    if bool(big.any()):
        result = kmeans(x[big], k, n_init=n_init, max_iter=max_iter, seed=seed, valid=valid[big])
        rows.append(result.centers.reshape(-1, d))
    return torch.cat(rows, 0).to(feats.dtype) if rows else feats.new_zeros(0, d)


# -- the two contrasts ----------------------------------------------------------------------------
def contrast_logits(
    anchors: torch.Tensor,
    positive: torch.Tensor,
    pool: torch.Tensor,
    index: torch.Tensor,
    official_quirks: bool = False,
) -> torch.Tensor:
    """Cosine "logits" of anchors (Q, D) against the keys ``[positive, pool[index[q]]]`` (positive
    (D,), pool (P, D), index (Q, K)). Faithful: (Q, 1 + K), cosine over the feature dimension of
    each key. ``official_quirks``: ``cosine_similarity(anchor[:, None], keys, dim=1)`` as released,
    i.e. over the key axis per channel -> (Q, D), with detached anchors."""
    if official_quirks:
        keys = torch.cat([positive.expand(anchors.shape[0], 1, -1), pool[index]], 1)
        return F.cosine_similarity(anchors.detach()[:, None], keys, dim=1)
    a = F.normalize(anchors, dim=-1)
    pos = a @ F.normalize(positive, dim=0)
    rows, inverse = index.unique(return_inverse=True)
    keys = F.normalize(pool[rows], dim=-1)
    if rows.numel() <= 8 * index.shape[1]:  # few distinct keys: one (Q, rows) product, then pick
        neg = (a @ keys.T).gather(1, inverse)
    else:  # a large bank: gather the (Q, K, D) keys instead of a (Q, bank) product
        neg = torch.einsum("qd,qkd->qk", a, keys[inverse])
    return torch.cat([pos[:, None], neg], 1)


def _info_nce(logits: torch.Tensor, tau: float) -> torch.Tensor:
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits / tau, target)


def nroi_contrast_loss(
    feats: torch.Tensor,
    pseudo: torch.Tensor,
    uncertain: torch.Tensor,
    prototypes: torch.Tensor,
    bank,
    num_negatives: int = 256,
    tau: float = 0.5,
    official_quirks: bool = False,
    bg_index: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pixel-to-NROI contrast. ``feats`` (P, D) query-space features of all pixels (with gradient),
    ``pseudo``/``uncertain`` (P,), ``prototypes`` (C, D) (L2-normalised; the raw ones to reproduce the
    release under ``official_quirks``), ``bank`` an
    :class:`~segexp.models.fbr.NROIBank`. Mean over the present foreground classes of the InfoNCE of
    that class's uncertain pixels (classes without such pixels add 0 but count, as released)."""
    classes = [c for c in pseudo.unique().tolist() if c != bg_index]
    if not classes or len(bank) == 0:
        return _zero(feats)
    total = _zero(feats)
    for c in classes:
        anchors = feats[(pseudo == c) & uncertain]
        if anchors.shape[0] == 0:
            continue
        index = bank.sample_index((anchors.shape[0], num_negatives), generator)
        logits = contrast_logits(
            anchors, prototypes[c], bank.filled().to(feats.dtype), index, official_quirks
        )
        total = total + _info_nce(logits, tau)
    return total / len(classes)


@torch.no_grad()
def negative_class_probs(
    prototypes: torch.Tensor, anchor: int, others: list[int], tau: float = 0.5
) -> torch.Tensor:
    """Probability of drawing a negative from class ``others[j]`` for queries of class ``anchor``:
    ``softmax_j(cos(P_anchor, P_others[j]) / tau)`` - similar (confusable) classes more often."""
    sim = F.cosine_similarity(prototypes[anchor][None], prototypes[others], dim=1)
    return F.softmax(sim / tau, 0)


@torch.no_grad()
def sample_negative_pixels(
    pools: list[torch.Tensor],
    probs: torch.Tensor,
    shape: tuple[int, int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Active sampling: for each of ``shape`` = (Q, K) draws, a class j ~ ``probs`` then a pixel index
    uniformly from ``pools[j]`` (1-D index tensors). Returns (class draws, pixel indices), both (Q, K)."""
    q, k = shape
    cls = torch.multinomial(probs, q * k, replacement=True, generator=generator).view(q, k)
    sizes = torch.tensor([len(p) for p in pools], device=probs.device)
    offsets = torch.cumsum(sizes, 0) - sizes
    u = torch.rand(q, k, device=probs.device, generator=generator)
    pick = offsets[cls] + (u * sizes[cls]).long().clamp(max=sizes[cls] - 1)
    return cls, torch.cat(pools)[pick]


def fg_active_contrast_loss(
    feats: torch.Tensor,
    pseudo: torch.Tensor,
    uncertain: torch.Tensor,
    prototypes: torch.Tensor,
    num_negatives: int = 256,
    tau: float = 0.5,
    bg_index: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Intra-foreground contrast: per present foreground class i, its uncertain pixels (with
    gradient) against ``P_i`` and ``num_negatives`` pixels of the other present classes, actively
    sampled (negative keys detached, as in ReCo); mean over the present classes; 0 with fewer than
    two classes."""
    classes = [c for c in pseudo.unique().tolist() if c != bg_index]
    if len(classes) < 2:
        return _zero(feats)
    keys = feats.detach()
    pools = {c: (pseudo == c).nonzero().flatten() for c in classes}
    total = _zero(feats)
    for c in classes:
        anchors = feats[(pseudo == c) & uncertain]
        if anchors.shape[0] == 0:
            continue
        others = [o for o in classes if o != c]
        probs = negative_class_probs(prototypes, c, others, tau)
        _, idx = sample_negative_pixels(
            [pools[o] for o in others], probs, (anchors.shape[0], num_negatives), generator
        )
        total = total + _info_nce(contrast_logits(anchors, prototypes[c], keys, idx), tau)
    return total / len(classes)


# -- auxiliary terms ------------------------------------------------------------------------------
@torch.no_grad()
def background_target(cam_fg: torch.Tensor, labels: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """(N, h, w) float: 1 where the sum over present classes of the max-normalised ReLU(CAM) is below
    ``threshold`` (``get_background_label``)."""
    cam = F.relu(cam_fg.detach()) * labels.to(cam_fg)[..., None, None]
    norm = cam / (cam.flatten(2).amax(-1)[..., None, None] + 1e-5)
    return (norm.sum(1) < threshold).to(cam_fg.dtype)


def background_seg_loss(
    bg_logit: torch.Tensor, cam_fg: torch.Tensor, labels: torch.Tensor, threshold: float = 0.05
) -> torch.Tensor:
    """BCE of the background classifier (N, 1, h, w) against :func:`background_target` of the CAM."""
    target = background_target(cam_fg, labels, threshold)
    if target.shape[-2:] != bg_logit.shape[-2:]:
        raise ValueError(
            f"background logit grid {tuple(bg_logit.shape[-2:])} != CAM grid {tuple(target.shape[-2:])}"
        )
    return F.binary_cross_entropy_with_logits(bg_logit[:, 0], target)


def decorrelation_loss(f_fg: torch.Tensor, f_bg: torch.Tensor) -> torch.Tensor:
    """``L_sim``: mean over pixels of cos(f_fg, f_bg) (both already ReLU'd, (N, D, h, w))."""
    return F.cosine_similarity(f_fg, f_bg, dim=1).mean()


# -- the released ECR's background-channel slip ---------------------------------------------------
def max_onehot_bg_last_slip(x: torch.Tensor) -> torch.Tensor:
    """SEAM's ``max_onehot`` applied as the released FBR-PPC does: that model keeps the background in
    the *last* channel while ``max_onehot`` keeps channel 0, so the first foreground class is kept
    untouched and the real background joins the foreground argmax. ``x`` is background-first here;
    it is moved last, ``max_onehot`` applied, and moved back."""
    last = torch.cat([x[:, 1:], x[:, :1]], 1)
    out = max_onehot(last)
    return torch.cat([out[:, -1:], out[:, :-1]], 1)


def ecr_loss_bg_last_slip(
    y_o: torch.Tensor, y_t: torch.Tensor, rv_o: torch.Tensor, rv_t: torch.Tensor, ohem_ratio: float = 0.2
) -> torch.Tensor:
    """:func:`segexp.losses.seam.ecr_loss` with :func:`max_onehot_bg_last_slip` targets."""
    target_t = max_onehot_bg_last_slip(with_background(y_t.detach()))
    target_o = max_onehot_bg_last_slip(with_background(y_o.detach()))
    return ohem_mean((target_t - rv_o).abs(), ohem_ratio) + ohem_mean((target_o - rv_t).abs(), ohem_ratio)
