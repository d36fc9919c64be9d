"""Box2Seg losses (Kulharia et al., ECCV 2020) as functions of tensors.

Notation (``shared/methods/box2seg.md``): ``L`` foreground classes, channel 0 = background.

* ``box_masks``: ``B`` (N, L+1, H, W) bool. ``B[:, c]`` (c >= 1) = inside some box of class c;
  ``B[:, 0]`` = outside **every** box (certain background) and a valid (non-padded) pixel.
* ``grabcut_ce``: L_GC, pixel-wise CE with the GrabCut mask M (ignore pixels skipped).
* ``attention_fg_ce``: L_fg = - sum_c 1/|B_c| sum_i alpha(i,c) B(i,c) log y(i,c), per image, per
  class present (the per-class normaliser is the natural reading of the equation; [RECON]).
* ``background_ce``: L_bg = - 1/|B_0| sum_i B(i,0) log y(i,0).
* ``filling_rate_hinge``: L_fr = sum_c max(0, gamma eta_c - eta'_c), eta_c = |M_c & B_c| / |B_c| (the
  GrabCut filling rate), eta'_c = sum_i alpha B_c / |B_c| (the attention's).
* ``affinity_loss``: L_A = mean_{i,j} (A(i,j) - t_i . t_j)^2 with A the cosine affinity of the
  embeddings beta and t = softmax y (main phase) or the one-hot GrabCut mask (embedding pretraining).

Every term is averaged over the images of the batch that have something to say (an image without
a box of class c contributes no class-c term; an image whose every pixel is in a box no L_bg).
Sums in the paper are turned into means over pixels/pairs so the weights do not depend on the
resolution; the class sum of L_fg / L_fr is kept.

The affinity term never builds a full-resolution (HW)^2 matrix: probabilities and embeddings are
average-pooled to a ``stride`` grid (8 by default; embeddings re-normalised), then at most
``max_pixels`` valid pixels per image are kept (a random subset when there are more). Memory bound:
``N * max_pixels^2`` floats per pairwise tensor (A, t.t^T, their difference; plus autograd's copies),
i.e. 4 MiB per image and tensor at max_pixels=1024, independent of the image size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segexp.losses.weights import term_weights

__all__ = [
    "Box2SegLoss",
    "affinity_loss",
    "attention_fg_ce",
    "background_ce",
    "box_masks",
    "filling_rate_hinge",
    "grabcut_ce",
    "pairwise_affinity_loss",
]


def box_masks(
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    num_classes: int,
    size: tuple[int, int],
    valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``B`` (N, num_classes, H, W) bool from per-image boxes (xyxy pixels, max exclusive) and classes.

    Box edges are rounded outwards (floor/ceil), as when rasterising the boxes for GrabCut.
    Channel 0 is "outside every box" restricted to ``valid`` pixels (padding is never background).
    """
    h, w = size
    n = len(boxes)
    device = device if device is not None else (valid.device if valid is not None else "cpu")
    out = torch.zeros(n, num_classes, h, w, dtype=torch.bool, device=device)
    for b in range(n):
        bx = torch.as_tensor(boxes[b], dtype=torch.float32).reshape(-1, 4)
        lb = torch.as_tensor(labels[b], dtype=torch.long).reshape(-1)
        for (x0, y0, x1, y1), c in zip(bx.tolist(), lb.tolist()):
            if not 0 < c < num_classes:
                continue
            xa, ya = max(0, int(x0 // 1)), max(0, int(y0 // 1))
            xb, yb = min(w, int(-(-x1 // 1))), min(h, int(-(-y1 // 1)))
            if xb > xa and yb > ya:
                out[b, c, ya:yb, xa:xb] = True
    out[:, 0] = ~out[:, 1:].any(dim=1)
    if valid is not None:
        out[:, 0] &= valid.to(device=device, dtype=torch.bool)
    return out


def grabcut_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """L_GC: mean CE over the pixels whose target is not ``ignore_index`` (0 if there are none)."""
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def _mean_over_present(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Sum over classes of ``values`` (N, C) where ``present``, averaged over images with any class."""
    has_any = present.any(dim=1)
    if not has_any.any():
        return values.sum() * 0.0
    per_image = torch.where(present, values, torch.zeros_like(values)).sum(dim=1)
    return per_image[has_any].mean()


def attention_fg_ce(
    log_probs: torch.Tensor, alpha: torch.Tensor, boxes: torch.Tensor, normalise: str = "class"
) -> torch.Tensor:
    """L_fg: attention-weighted CE of the foreground classes inside their boxes.

    ``log_probs`` (N, L+1, H, W) log-softmax of the segmentation; ``alpha`` (N, L, H, W) attention in
    [0, 1] for classes 1..L; ``boxes`` the ``B`` of :func:`box_masks`. Pixels outside the class-c
    boxes never contribute to class c, whatever alpha or y are there.

    ``normalise``: ``"class"`` divides each class's sum by its own box area |B_c| and sums over the
    classes (the per-class reading of the equation: every present class weighs 1, however small);
    ``"pixels"`` divides the sum over all classes by the total box area sum_c |B_c| (the reading
    with the normaliser outside the class sum: a mean over box pixels, like L_GC's mean over pixels).
    """
    bc = boxes[:, 1:].to(log_probs.dtype)
    area = bc.flatten(2).sum(-1)  # (N, L)
    weighted = -(alpha * bc * log_probs[:, 1:]).flatten(2).sum(-1)  # (N, L)
    if normalise == "class":
        return _mean_over_present(weighted / area.clamp(min=1), area > 0)
    if normalise == "pixels":
        total = area.sum(1)
        keep = total > 0
        return (weighted.sum(1)[keep] / total[keep]).mean() if keep.any() else log_probs.sum() * 0.0
    raise ValueError(f"fg normalise must be 'class' or 'pixels', got {normalise!r}")


def background_ce(log_probs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """L_bg: mean of -log y(i, 0) over the pixels outside every box, per image, then over images."""
    b0 = boxes[:, 0].to(log_probs.dtype)
    area = b0.flatten(1).sum(-1)
    term = -(b0 * log_probs[:, 0]).flatten(1).sum(-1) / area.clamp(min=1)
    keep = area > 0
    return term[keep].mean() if keep.any() else log_probs.sum() * 0.0


def filling_rate_hinge(
    alpha: torch.Tensor,
    target: torch.Tensor,
    boxes: torch.Tensor,
    gamma: float = 0.8,
    ignore_index: int = 255,
) -> torch.Tensor:
    """L_fr: sum over present classes of max(0, gamma * eta_c - eta'_c), averaged over images.

    ``target`` (N, H, W) the GrabCut class map M. eta_c is the fraction of the class-c box area that
    M labels c; eta'_c the mean attention over that area. Zero as soon as the attention covers
    gamma times the GrabCut filling rate; its gradient is -1/|B_c| on every box pixel otherwise.
    """
    num_fg = alpha.shape[1]
    bc = boxes[:, 1:].to(alpha.dtype)
    area = bc.flatten(2).sum(-1)
    classes = torch.arange(1, num_fg + 1, device=target.device).view(1, -1, 1, 1)
    m = (target.unsqueeze(1) == classes).to(alpha.dtype) * bc
    eta = m.flatten(2).sum(-1) / area.clamp(min=1)
    eta_att = (alpha * bc).flatten(2).sum(-1) / area.clamp(min=1)
    term = F.relu(gamma * eta.detach() - eta_att)
    return _mean_over_present(term, area > 0)


def _map_cosine(cos: torch.Tensor, mapping: str) -> torch.Tensor:
    if mapping == "clamp":
        return cos.clamp(min=0.0)
    if mapping == "shift":
        return (cos + 1.0) * 0.5
    if mapping == "none":
        return cos
    raise ValueError(f"affinity mapping must be 'clamp', 'shift' or 'none', got {mapping!r}")


def pairwise_affinity_loss(
    emb: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None, mapping: str = "clamp"
) -> torch.Tensor:
    """mean_{i,j} (map(cos(e_i, e_j)) - t_i . t_j)^2 over the P pixels of each image.

    ``emb`` (N, P, D) L2-normalised embeddings; ``targets`` (N, P, K) probability / one-hot vectors;
    ``weight`` (N, P) 0/1 pixel validity (pairs count when both pixels are valid). Builds
    (N, P, P) tensors: keep P bounded (see :func:`affinity_loss`).
    """
    aff = _map_cosine(emb @ emb.transpose(1, 2), mapping)
    agree = targets @ targets.transpose(1, 2)
    sq = (aff - agree).pow(2)
    if weight is None:
        return sq.mean()
    pair_w = weight.unsqueeze(2) * weight.unsqueeze(1)
    return (sq * pair_w).sum() / pair_w.sum().clamp(min=1)


def _pool_to_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if x.shape[-2:] == tuple(size) else F.adaptive_avg_pool2d(x, size)


def affinity_loss(
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    image_size: tuple[int, int] | None = None,
    stride: int = 8,
    max_pixels: int = 1024,
    mapping: str = "clamp",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_A on the stride-``stride`` grid, with at most ``max_pixels`` sampled pixels per image.

    ``embeddings`` (N, D, h, w) at any resolution; ``targets`` (N, K, H, W) probabilities or one-hot
    at any resolution (both pooled to the grid of ``image_size / stride``); ``valid`` (N, H, W)
    pixels that may take part (non-ignored pseudo label, non-padding). A grid cell is valid when
    more than half of its pixels are. Memory: O(N * min(grid pixels, max_pixels)^2).
    """
    n = embeddings.shape[0]
    ref = image_size or targets.shape[-2:]
    grid = (max(1, ref[0] // stride), max(1, ref[1] // stride))
    emb = F.normalize(_pool_to_grid(embeddings, grid), dim=1).flatten(2).transpose(1, 2)  # N, P, D
    tgt = _pool_to_grid(targets, grid).flatten(2).transpose(1, 2)  # N, P, K
    if valid is not None:
        w = (_pool_to_grid(valid.unsqueeze(1).to(emb.dtype), grid).flatten(1) > 0.5).to(emb.dtype)
    else:
        w = torch.ones(emb.shape[:2], dtype=emb.dtype, device=emb.device)
    p = emb.shape[1]
    if p > max_pixels:
        # per image, sample among the valid cells first (random scores, valid ones ranked first)
        scores = torch.rand(n, p, generator=generator, device="cpu").to(emb.device) + w * 2.0
        idx = scores.topk(max_pixels, dim=1).indices
        emb = emb.gather(1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
        tgt = tgt.gather(1, idx.unsqueeze(-1).expand(-1, -1, tgt.shape[-1]))
        w = w.gather(1, idx)
    return pairwise_affinity_loss(emb, tgt, w, mapping)


def affinity_memory_bytes(batch: int, image_size: tuple[int, int], stride: int = 8, max_pixels: int = 1024,
                          bytes_per_float: int = 4) -> int:
    """Size of one (N, P, P) pairwise tensor of :func:`affinity_loss` (a handful exist at once)."""
    p = min(max(1, image_size[0] // stride) * max(1, image_size[1] // stride), max_pixels)
    return batch * p * p * bytes_per_float


class Box2SegLoss(nn.Module):
    """All Box2Seg terms with their own weights; a term with weight 0 (or ``enabled[name]=False``)
    is not computed (its value is not returned either).

    Terms: ``gc`` (L_GC), ``fg`` (L_fg), ``bg`` (L_bg), ``fr`` (L_fr), ``aff`` (L_A, main phase) and
    ``pretrain`` (the embedding-pretraining L_A with the GrabCut one-hot targets). Defaults (the
    paper's values are unknown; see ``conf/loss/box2seg.yaml`` for the reasoning): ``gc``, ``bg``,
    ``pretrain`` 1; ``fg`` 0.2 (at 1 it outweighed L_GC per pixel and pulled the predictions towards
    the boxes on shapes); ``fr`` 2.0 = 10 x ``fg`` (at a ratio of 1 the attention collapsed to 0);
    ``aff`` 0.1; gamma 0.8, stride 8, 1024 sampled pixels, cosine clamped at 0.
    """

    TERMS = ("gc", "fg", "bg", "fr", "aff", "pretrain")

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        enabled: Mapping[str, bool] | None = None,
        gamma: float = 0.8,
        ignore_index: int = 255,
        affinity: Mapping[str, Any] | None = None,
        fg_normalise: str = "class",
    ):
        super().__init__()
        w = term_weights(weights, self.TERMS, "loss.weights")  # conf/loss/box2seg.yaml
        unknown = set(enabled or {}) - set(w)
        if unknown:
            raise KeyError(f"loss.enabled: unknown terms {sorted(unknown)}; terms: {list(self.TERMS)}")
        on = {k: True for k in w}
        on.update({k: bool(v) for k, v in (enabled or {}).items()})
        self.weights = {k: (w[k] if on[k] else 0.0) for k in self.TERMS}
        self.gamma = float(gamma)
        if fg_normalise not in ("class", "pixels"):
            raise ValueError(f"fg_normalise must be 'class' or 'pixels', got {fg_normalise!r}")
        self.fg_normalise = fg_normalise
        self.ignore_index = ignore_index
        aff = {"stride": 8, "max_pixels": 1024, "mapping": "clamp", "detach_embeddings": False}
        aff.update(dict(affinity or {}))
        self.affinity = aff

    def active(self, name: str) -> bool:
        return self.weights[name] != 0.0

    def _affinity(self, emb, targets, valid, size):
        a = self.affinity
        if a.get("detach_embeddings"):
            emb = emb.detach()
        return affinity_loss(emb, targets, valid, size, int(a["stride"]), int(a["max_pixels"]), a["mapping"])

    def pretrain(
        self, embeddings: torch.Tensor, target: torch.Tensor, num_classes: int
    ) -> dict[str, torch.Tensor]:
        """Embedding pretraining: affinities agree with GrabCut same-label pairs (one-hot targets)."""
        if not self.active("pretrain"):
            return {}
        valid = target != self.ignore_index
        onehot = F.one_hot(torch.where(valid, target, 0), num_classes).permute(0, 3, 1, 2)
        onehot = onehot.to(embeddings.dtype)
        loss = self._affinity(embeddings, onehot, valid, tuple(target.shape[-2:]))
        return {"pretrain": self.weights["pretrain"] * loss}

    def forward(
        self,
        logits: torch.Tensor,
        alpha: torch.Tensor | None,
        embeddings: torch.Tensor | None,
        target: torch.Tensor,
        boxes: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Main-phase terms. ``logits`` (N, L+1, H, W) and ``alpha`` (N, L, H, W) at the size of ``target``
        (N, H, W); ``embeddings`` (N, D, h, w) any resolution; ``boxes`` from :func:`box_masks`."""
        out: dict[str, torch.Tensor] = {}
        log_probs = F.log_softmax(logits, dim=1)
        if self.active("gc"):
            out["gc"] = self.weights["gc"] * grabcut_ce(logits, target, self.ignore_index)
        if self.active("fg"):
            if alpha is None:
                raise ValueError("the fg term needs the attention head (alpha)")
            out["fg"] = self.weights["fg"] * attention_fg_ce(log_probs, alpha, boxes, self.fg_normalise)
        if self.active("bg"):
            out["bg"] = self.weights["bg"] * background_ce(log_probs, boxes)
        if self.active("fr"):
            if alpha is None:
                raise ValueError("the fr term needs the attention head (alpha)")
            hinge = filling_rate_hinge(alpha, target, boxes, self.gamma, self.ignore_index)
            out["fr"] = self.weights["fr"] * hinge
        if self.active("aff"):
            if embeddings is None:
                raise ValueError("the aff term needs the embedding head (beta)")
            keep = target != self.ignore_index
            if valid is not None:
                keep = keep & valid.bool()
            probs = log_probs.exp()
            aff = self._affinity(embeddings, probs, keep, tuple(target.shape[-2:]))
            out["aff"] = self.weights["aff"] * aff
        return out
