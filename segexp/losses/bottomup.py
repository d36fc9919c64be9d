"""Losses of the bottom-up entity segmentation (Dille et al., arXiv 2409.13687), on tensors only.

Features live on the real projective sphere: unit vectors with ``f == -f``, so every similarity
here is a *line* similarity ``|f . g|`` (never a signed cosine). Per image and entity ``k`` the
target line ``mu_k`` is the principal eigenvector of the entity's feature scatter
``C_k = sum_p f_p f_p^T`` (Eq. 4); the unlabeled background (id 0) gets its own "primary
orientation" ``mu_0`` the same way but is never attracted, only repelled (Sec. 3.3).

Terms (equations as reconstructed in ``shared/methods/bottomup.md`` §4; choices marked *choice*):

* ``reg``: ``mean_p (||F_p|| - 1)^2`` on the raw (tanh) output over the valid pixels (Eq. 3).
* ``attraction``: ``1/N sum_k mean_{p in S_k} (1 - |mu_k . f_p|)`` over the N entities (Eq. 5).
* ``repulsion``: ``1/Z sum_k sum_{l != k} mean_{p in S_k} |mu_l . f_p|`` over entities *and* the
  background group (Eq. 6). ``Z`` is ``repulsion_norm``: ``entities`` (N, default: the paper says
  normalising by the pair count made the term ineffective for many segments; N is the reading
  that "balances few and many entities"), ``pairs`` (N(N+1), or N(N-1) without background) or
  ``groups`` (N + 1 with background).
* ``contrast``: ReCo regional contrast (Liu et al., ICLR'22) with entities as classes. *Choice*
  for the projective space: the positive key is the target line ``mu_k`` (a signed mean can cancel
  out), hard queries are pixels with ``|mu_k . f| < strong_threshold``, negatives are pixels of
  other groups (background included) drawn with group probabilities
  ``softmax(|mu_k . mu_j| / tau)`` (harder = more similar), logits ``|q . key| / tau``; keys under
  ``no_grad``, gradients through the queries only (as in ReCo). Background pixels are never queries.
* ``mse`` / ``grad`` (segment space, Eq. 7-8): ``T = (M^T M)^-1 M^T`` maps each target line to its
  basis vector; ``s_k = |T f|_k``; MSE against the binary entity maps over the non-eroded pixels,
  and the MegaDepth multi-scale gradient loss of the residual ``s_k - G_k`` (4 scales, stride
  ``2^m``, finite differences only between valid neighbours, normalised by the valid count). An
  image whose lines are degenerate (``max |mu_k . mu_l| > max_line_cos`` or ``cond(M^T M) >
  max_condition``) is skipped for these two terms (and counted in ``degenerate_fraction``); the
  paper gives no threshold: 0.95 (18 degrees) and 1e4 are *choices*.

Weights (Eq. 9): ``L = L_a + L_r + 0.125 L_c + 0.025 L_s + 0.05 L_g + w_reg L_reg``. The paper gives
the three numbers but the stripped text does not say which term carries which: the assignment
(contrast, MSE, gradient) follows the order the terms are introduced in; ``w_reg`` is not given
(1.0, like the unweighted La/Lr, *choice*).

Target lines: computed in float32 (autocast off) per image with ``torch.linalg.eigh``
(``lines.solver: eigh``) or power iteration (``power``). ``lines.detach`` (default true) stops
gradients through ``mu`` and hence through ``T``: the eigenvector derivative has
``1/(lambda_1 - lambda_2)`` terms that explode for entities whose features are still spread out.

GT preparation: every entity mask (and the background) is eroded with a ``erosion x erosion``
square; eroded-away pixels, padding (``valid`` false) and ``ignore_index`` pixels take part in no
loss. The kernel of the paper is not recoverable (3 = one-pixel band, *choice*).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BottomUpLoss",
    "EntityGroups",
    "eroded_keep",
    "entity_groups",
    "target_lines",
    "attraction_loss",
    "repulsion_loss",
    "segment_transform",
    "segment_space_losses",
    "gradient_matching_loss",
    "reco_loss",
    "unit_length_loss",
    "group_mean",
]

TERMS = ("reg", "attraction", "repulsion", "contrast", "mse", "grad")


# ------------------------------------------------------------------------------------ GT preparation


def eroded_keep(
    entities: torch.Tensor, kernel: int, valid: torch.Tensor | None = None, ignore_index: int | None = 255
) -> torch.Tensor:
    """Pixels kept by the losses (B,H,W) bool: their ``kernel x kernel`` window holds one id only
    (every region, background included, loses a band along its contour). Outside the image does
    not erode (only real label changes do); ``valid`` false and ``ignore_index`` pixels are dropped."""
    keep = torch.ones_like(entities, dtype=torch.bool)
    if kernel > 1:
        x = entities[:, None].float()
        pad = kernel // 2
        hi = F.max_pool2d(x, kernel, stride=1, padding=pad)
        lo = -F.max_pool2d(-x, kernel, stride=1, padding=pad)
        keep = (hi == lo)[:, 0, : entities.shape[-2], : entities.shape[-1]]
    if valid is not None:
        keep &= valid.bool()
    if ignore_index is not None:
        keep &= entities != ignore_index
    return keep


@dataclass
class EntityGroups:
    """The pixels of one image grouped for the losses (only kept pixels).

    ``labels`` (n,) group index of each kept pixel: 0 = background, 1..N = entities (contiguous);
    ``index`` (n,) their flat pixel positions; ``has_background``: whether group 0 has pixels;
    ``num_entities`` = N.
    """

    labels: torch.Tensor
    index: torch.Tensor
    num_entities: int
    has_background: bool


def entity_groups(entities: torch.Tensor, keep: torch.Tensor) -> EntityGroups:
    """Group the kept pixels of one (H,W) entity map: 0 stays background, ids -> 1..N."""
    index = keep.reshape(-1).nonzero().squeeze(1)
    ids = entities.reshape(-1)[index]
    uniq, inv = torch.unique(ids, return_inverse=True)
    has_bg = bool(uniq.numel()) and int(uniq[0]) == 0
    labels = inv if has_bg else inv + 1
    return EntityGroups(labels, index, int(uniq.numel()) - int(has_bg), has_bg)


# ------------------------------------------------------------------------------------ target lines


def _principal_eigvec(scatter: torch.Tensor, solver: str, iters: int) -> torch.Tensor:
    if solver == "eigh":
        return torch.linalg.eigh(scatter)[1][..., -1]
    if solver == "power":
        # start from each matrix's row of largest norm (C's column space, so not orthogonal to the
        # top eigenvector unless C = 0)
        rows = scatter.norm(dim=-1).argmax(-1)
        v = F.normalize(scatter[torch.arange(scatter.shape[0], device=scatter.device), rows], dim=-1)
        for _ in range(iters):
            v = F.normalize((scatter @ v[..., None]).squeeze(-1), dim=-1)
        return v
    raise ValueError(f"loss.lines.solver={solver!r}: choose eigh or power")


def target_lines(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_groups: int,
    solver: str = "eigh",
    power_iters: int = 20,
    detach: bool = True,
) -> torch.Tensor:
    """Principal line of every group (G,D) from unit features (n,D) and group labels (n,) in [0,G).

    ``C_g = F_g^T F_g`` is formed from each group's own pixels (cost n D^2 per image in total, not
    G n D^2), in float32; a group without pixels gets a zero line. The sign is arbitrary (lines).
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = features.float()
        if detach:
            f = f.detach()
        order = torch.argsort(labels)
        counts = torch.bincount(labels, minlength=num_groups).tolist()
        d = f.shape[1]
        scatters = [
            chunk.T @ chunk if chunk.shape[0] else f.new_zeros(d, d)
            for chunk in torch.split(f[order], counts)
        ]
        lines = _principal_eigvec(torch.stack(scatters), solver, power_iters)
        present = torch.tensor(counts, device=f.device) > 0
        return lines * present[:, None]


# ------------------------------------------------------------------------------------ terms


def unit_length_loss(raw: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: mean over (valid) pixels of (||F_p|| - 1)^2 on the raw (B,D,H,W) output."""
    err = (raw.float().norm(dim=1) - 1.0) ** 2
    if valid is None:
        return err.mean()
    v = valid.to(err.dtype)
    return (err * v).sum() / v.sum().clamp(min=1)


def group_mean(values: torch.Tensor, labels: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values`` (n, ...) over the pixels of each group -> (G, ...); 0 for empty groups."""
    sums = values.new_zeros(num_groups, *values.shape[1:]).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=num_groups).clamp(min=1).to(values.dtype)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


def attraction_loss(features: torch.Tensor, lines: torch.Tensor, groups: EntityGroups) -> torch.Tensor:
    """Eq. 5 for one image: mean over entities of mean_{p in S_k} (1 - |mu_k . f_p|)."""
    n = groups.num_entities
    if n == 0:
        return features.sum() * 0.0
    own = (features * lines[groups.labels]).sum(1).abs()
    per_group = group_mean(1.0 - own, groups.labels, n + 1)
    return per_group[1:].mean()


def repulsion_normaliser(num_entities: int, has_background: bool, mode: str) -> float:
    groups = num_entities + int(has_background)
    if mode == "entities":
        return float(max(num_entities, 1))
    if mode == "groups":
        return float(max(groups, 1))
    if mode == "pairs":
        return float(max(groups * (groups - 1), 1))
    raise ValueError(f"loss.repulsion_norm={mode!r}: choose entities, groups or pairs")


def repulsion_loss(
    features: torch.Tensor, lines: torch.Tensor, groups: EntityGroups, norm: str = "entities"
) -> torch.Tensor:
    """Eq. 6 for one image: every group's pixels pushed orthogonal to every *other* group's line
    (background pixels to all entity lines, entity pixels to the background line too)."""
    n_groups = groups.num_entities + 1
    present = torch.zeros(n_groups, dtype=torch.bool, device=features.device)
    present[1:] = True
    present[0] = groups.has_background
    if int(present.sum()) < 2:
        return features.sum() * 0.0
    dots = (features @ lines.T).abs()  # (n, G)
    per_group = group_mean(dots, groups.labels, n_groups)  # (G_pixels, G_lines)
    other = present[:, None] & present[None, :] & ~torch.eye(n_groups, dtype=torch.bool, device=dots.device)
    total = (per_group * other).sum()
    return total / repulsion_normaliser(groups.num_entities, groups.has_background, norm)


def reco_loss(
    features: torch.Tensor,
    lines: torch.Tensor,
    groups: EntityGroups,
    temperature: float = 0.5,
    num_queries: int = 256,
    num_negatives: int = 512,
    strong_threshold: float = 0.97,
    generator: torch.Generator | None = None,
    dense_keys: bool | None = None,
) -> torch.Tensor:
    """ReCo regional contrast on the projective sphere for one image (see module docstring).

    ``dense_keys``: how the negative logits are formed -- one (queries x pixels) product then a
    gather (True), or a gather of the (queries x negatives x D) keys (False); same values. None
    picks the product when there are more negative keys than pixels.
    """
    n_groups = groups.num_entities + 1
    labels = groups.labels
    counts = torch.bincount(labels, minlength=n_groups)
    present = counts > 0
    if groups.num_entities == 0 or int(present.sum()) < 2:
        return features.sum() * 0.0
    device = features.device
    own = (features * lines[labels]).sum(1).abs()
    order = torch.argsort(labels)
    starts = torch.cumsum(counts, 0) - counts
    losses = []
    for k in range(1, n_groups):
        hard = ((labels == k) & (own < strong_threshold)).nonzero().squeeze(1)
        if hard.numel() == 0:
            continue
        q_idx = hard[torch.randint(hard.numel(), (num_queries,), device=device, generator=generator)]
        queries = features[q_idx]  # (Q, D), gradient flows here only
        with torch.no_grad():
            sim = (lines[k] @ lines.T).abs() / temperature
            sim[k] = float("-inf")
            sim[~present] = float("-inf")
            probs = torch.softmax(sim, 0)
            neg_groups = torch.multinomial(
                probs, num_queries * num_negatives, replacement=True, generator=generator
            )
            offset = (
                torch.rand(neg_groups.shape, device=device, generator=generator) * counts[neg_groups]
            ).long()
            neg_index = order[starts[neg_groups] + offset].view(num_queries, num_negatives)
            pos = lines[k].detach()
        if dense_keys if dense_keys is not None else num_queries * num_negatives >= features.shape[0]:
            # more negative keys than pixels: one GEMM against every pixel, then pick (same values,
            # far less memory traffic than gathering a (Q, negatives, D) tensor)
            neg_logits = (queries @ features.detach().T).gather(1, neg_index)
        else:
            neg_logits = torch.einsum("qd,qnd->qn", queries, features.detach()[neg_index])
        logits = torch.cat([(queries @ pos)[:, None], neg_logits], 1).abs() / temperature
        losses.append(F.cross_entropy(logits, torch.zeros(num_queries, dtype=torch.long, device=device)))
    if not losses:
        return features.sum() * 0.0
    return torch.stack(losses).mean()


def segment_transform(
    entity_lines: torch.Tensor, max_line_cos: float = 0.95, max_condition: float = 1e4
) -> torch.Tensor | None:
    """Left inverse ``T = (M^T M)^-1 M^T`` (N,D) of ``M = [mu_1 .. mu_N]``, or ``None`` when the
    lines are degenerate (two nearly parallel lines, or an ill-conditioned Gram matrix)."""
    with torch.autocast(device_type=entity_lines.device.type, enabled=False):
        m = entity_lines.float()  # (N, D): rows are the lines
        gram = m @ m.T
        n = gram.shape[0]
        if n > 1:
            off = gram.abs() - torch.eye(n, device=gram.device)
            if float(off.max()) > max_line_cos:
                return None
        if float(torch.linalg.cond(gram)) > max_condition:
            return None
        return torch.linalg.solve(gram, m)


def gradient_matching_loss(residual: torch.Tensor, keep: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """MegaDepth multi-scale gradient loss of residual maps (K,H,W) on the kept pixels (H,W):
    sum over scales m of (sum |dR/dx| + |dR/dy| between kept neighbours) / #kept at that scale."""
    total = residual.new_zeros(())
    for m in range(scales):
        step = 2**m
        r, v = residual[:, ::step, ::step], keep[::step, ::step]
        if v.sum() == 0:
            continue
        vx = (v[:, 1:] & v[:, :-1]).to(r.dtype)
        vy = (v[1:, :] & v[:-1, :]).to(r.dtype)
        gx = ((r[:, :, 1:] - r[:, :, :-1]).abs() * vx).sum(dim=(1, 2))
        gy = ((r[:, 1:, :] - r[:, :-1, :]).abs() * vy).sum(dim=(1, 2))
        total = total + (gx + gy) / v.sum().to(r.dtype)
    return total.mean() if total.dim() else total


def segment_space_losses(
    features_map: torch.Tensor,
    transform: torch.Tensor,
    entities: torch.Tensor,
    keep: torch.Tensor,
    groups: EntityGroups,
    scales: int = 4,
) -> dict[str, torch.Tensor]:
    """Eq. 8 for one image: ``s = |T f|`` (N,H,W) vs the binary entity maps, MSE + gradient loss.

    ``features_map`` (D,H,W) unit features; ``entities`` (H,W) ids; the entity of channel k is the
    k-th id in increasing order (the order of :func:`entity_groups`)."""
    d, h, w = features_map.shape
    with torch.autocast(device_type=features_map.device.type, enabled=False):
        seg = (transform @ features_map.float().reshape(d, h * w)).abs().view(-1, h, w)
    ids = torch.unique(entities.reshape(-1)[groups.index])
    ids = ids[ids != 0]
    target = (entities[None] == ids[:, None, None]).to(seg.dtype)
    residual = seg - target
    kf = keep.to(seg.dtype)
    mse = ((residual**2) * kf).sum(dim=(1, 2)) / kf.sum().clamp(min=1)
    grad = gradient_matching_loss(residual, keep, scales)
    return {"mse": mse.mean(), "grad": grad}


# ------------------------------------------------------------------------------------ the module


class BottomUpLoss(nn.Module):
    """All terms for a batch: raw output (B,D,H,W), entity maps (B,H,W), optional ``valid`` (B,H,W).

    Returns ``{term: weighted value}`` for the enabled terms with non-zero weight, plus (under
    ``diagnostics``, not part of the loss) the fraction of images skipped as degenerate.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        enabled: Mapping[str, bool] | None = None,
        erosion: int = 3,
        ignore_index: int | None = 255,
        repulsion_norm: str = "entities",
        lines: Mapping | None = None,
        contrast: Mapping | None = None,
        segment_space: Mapping | None = None,
    ):
        super().__init__()
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise KeyError(f"loss.weights has unknown terms {sorted(unknown)}; terms are {list(TERMS)}")
        enabled = dict(enabled or {})
        unknown = set(enabled) - set(TERMS)
        if unknown:
            raise KeyError(f"loss.enabled has unknown terms {sorted(unknown)}; terms are {list(TERMS)}")
        self.weights = {t: float(weights.get(t, 0.0)) for t in TERMS}
        self.active_terms = tuple(t for t in TERMS if enabled.get(t, True) and self.weights[t] != 0.0)
        self.erosion = int(erosion)
        self.ignore_index = ignore_index
        self.repulsion_norm = repulsion_norm
        repulsion_normaliser(1, True, repulsion_norm)  # fail on a bad name at construction
        self.lines = {"solver": "eigh", "power_iters": 20, "detach": True, **dict(lines or {})}
        self.contrast = {
            "temperature": 0.5,
            "num_queries": 256,
            "num_negatives": 512,
            "strong_threshold": 0.97,
            **dict(contrast or {}),
        }
        self.segment_space = {
            "max_line_cos": 0.95,
            "max_condition": 1e4,
            "scales": 4,
            **dict(segment_space or {}),
        }

    def active(self, term: str) -> bool:
        return term in self.active_terms

    def forward(
        self, raw: torch.Tensor, entities: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        feats = F.normalize(raw.float(), dim=1)
        keep = eroded_keep(entities, self.erosion, valid, self.ignore_index)
        b, d = feats.shape[:2]
        per_image: dict[str, list[torch.Tensor]] = {t: [] for t in TERMS if t != "reg"}
        degenerate = considered = 0
        for i in range(b):
            groups = entity_groups(entities[i], keep[i])
            if groups.num_entities == 0:
                continue
            fmap = feats[i]
            f = fmap.reshape(d, -1).T[groups.index]
            lines = target_lines(
                f,
                groups.labels,
                groups.num_entities + 1,
                self.lines["solver"],
                int(self.lines["power_iters"]),
                bool(self.lines["detach"]),
            )
            if self.active("attraction"):
                per_image["attraction"].append(attraction_loss(f, lines, groups))
            if self.active("repulsion"):
                per_image["repulsion"].append(repulsion_loss(f, lines, groups, self.repulsion_norm))
            if self.active("contrast"):
                c = self.contrast
                per_image["contrast"].append(
                    reco_loss(
                        f,
                        lines,
                        groups,
                        float(c["temperature"]),
                        int(c["num_queries"]),
                        int(c["num_negatives"]),
                        float(c["strong_threshold"]),
                    )
                )
            if self.active("mse") or self.active("grad"):
                considered += 1
                s = self.segment_space
                transform = segment_transform(lines[1:], float(s["max_line_cos"]), float(s["max_condition"]))
                if transform is None:
                    degenerate += 1
                    continue
                terms = segment_space_losses(fmap, transform, entities[i], keep[i], groups, int(s["scales"]))
                for t in ("mse", "grad"):
                    if self.active(t):
                        per_image[t].append(terms[t])
        zero = feats.sum() * 0.0
        out: dict[str, torch.Tensor] = {}
        for t in self.active_terms:
            if t == "reg":
                value = unit_length_loss(raw, valid)
            else:
                value = torch.stack(per_image[t]).mean() if per_image[t] else zero
            out[t] = self.weights[t] * value
        diagnostics = {"degenerate_fraction": degenerate / considered if considered else 0.0}
        return out, diagnostics
