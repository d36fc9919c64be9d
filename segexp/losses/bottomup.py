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
* ``line_distance`` (Eq. 2, whose form is stripped from the seed: "abs vs square" in
  ``shared/methods/bottomup.md`` s.10): ``abs`` (default) uses ``|mu . f|`` in La and Lr as above;
  ``squared`` uses ``(mu . f)^2`` (La = mean sin^2, Lr = mean cos^2): a pull that vanishes near
  orthogonal and is twice as steep near alignment (on the testbed it aligns entities *more*:
  ``experiments/study_bottomup/results.md``).
* ``attraction_margin`` (not in the paper; 0 = Eq. 5 as above): a hinge ``max(0, 1 - sim - m)``, no pull
  on a pixel already within ``m`` of its line, as in De Brabandere et al.'s discriminative loss. A probe
  of Table 5's premise: the paper's discriminative losses leave entities loosely aligned (intra-entity
  similarity 0.152), which the plain Eq. 5 here does not (0.74); with a margin they stay loose by design,
  and whether L_s then lifts them is the mechanism Table 5 measures.
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

All terms are computed in float32 (autocast off). Target lines: per image with ``torch.linalg.eigh``
(``lines.solver: eigh``) or power iteration (``power``). ``lines.detach`` (default true) stops
gradients through ``mu`` and hence through ``T``: the eigenvector derivative has
``1/(lambda_1 - lambda_2)`` terms that explode for entities whose features are still spread out.

GT preparation: every entity mask (and the background) is eroded with a ``erosion x erosion``
square; eroded-away pixels, padding (``valid`` false) and ``ignore_index`` pixels take part in no
loss. The kernel of the paper is not recoverable (3 = one-pixel band, *choice*).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
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
    counts = torch.bincount(labels, minlength=num_groups)
    return _sorted_lines(features[torch.argsort(labels)], counts, solver, power_iters, detach)


def _sorted_lines(
    features: torch.Tensor, counts: torch.Tensor, solver: str, power_iters: int, detach: bool
) -> torch.Tensor:
    """:func:`target_lines` of features already sorted by group (``counts[g]`` rows of group g)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = features.float()
        if detach:
            f = f.detach()
        d = f.shape[1]
        scatters = [
            chunk.T @ chunk if chunk.shape[0] else f.new_zeros(d, d)
            for chunk in torch.split(f, counts.tolist())
        ]
        lines = _principal_eigvec(torch.stack(scatters), solver, power_iters)
        return lines * (counts > 0)[:, None]


# ------------------------------------------------------------------------------------ terms


def unit_length_loss(raw: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: mean over (valid) pixels of (||F_p|| - 1)^2 on the raw (B,D,H,W) output."""
    return _unit_length(raw.float().norm(dim=1), valid)


def _unit_length(norms: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    err = (norms - 1.0) ** 2
    if valid is None:
        return err.mean()
    v = valid.to(err.dtype).reshape(err.shape)
    return (err * v).sum() / v.sum().clamp(min=1)


def group_mean(values: torch.Tensor, labels: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values`` (n, ...) over the pixels of each group -> (G, ...); 0 for empty groups."""
    sums = values.new_zeros(num_groups, *values.shape[1:]).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=num_groups).clamp(min=1).to(values.dtype)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


LINE_DISTANCES = ("abs", "squared")


def line_similarity(dots: torch.Tensor, form: str = "abs") -> torch.Tensor:
    """Similarity of lines from their unit dot products (Eq. 2): ``|dots|`` or ``dots^2``."""
    if form == "abs":
        return dots.abs()
    if form == "squared":
        return dots.square()
    raise ValueError(f"loss.line_distance={form!r}: choose one of {list(LINE_DISTANCES)}")


def attraction_loss(
    features: torch.Tensor,
    lines: torch.Tensor,
    groups: EntityGroups,
    form: str = "abs",
    margin: float = 0.0,
) -> torch.Tensor:
    """Eq. 5 for one image: mean over entities of mean_{p in S_k} (1 - sim(mu_k, f_p)) (hinged at
    ``margin``: see the module docstring)."""
    if groups.num_entities == 0:
        return features.sum() * 0.0
    similarity = line_similarity(features @ lines.T, form)
    return _attraction(similarity, groups.labels, groups.num_entities, margin)


def _attraction(
    similarity: torch.Tensor, labels: torch.Tensor, num_entities: int, margin: float = 0.0
) -> torch.Tensor:
    """Eq. 5 from the line similarity (n, G) of every pixel and line."""
    distance = 1.0 - similarity.gather(1, labels[:, None]).squeeze(1)
    if margin:
        distance = (distance - margin).clamp(min=0.0)
    return group_mean(distance, labels, num_entities + 1)[1:].mean()


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
    features: torch.Tensor,
    lines: torch.Tensor,
    groups: EntityGroups,
    norm: str = "entities",
    form: str = "abs",
) -> torch.Tensor:
    """Eq. 6 for one image: every group's pixels pushed orthogonal to every *other* group's line
    (background pixels to all entity lines, entity pixels to the background line too)."""
    return _repulsion(line_similarity(features @ lines.T, form), groups, norm)


def _repulsion(
    similarity: torch.Tensor, groups: EntityGroups, norm: str, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 6 from the line similarity (n, G); ``labels``: the rows' groups when not ``groups.labels``."""
    n_groups = groups.num_entities + 1
    if groups.num_entities + int(groups.has_background) < 2:
        return similarity.sum() * 0.0
    present = torch.ones(n_groups, dtype=torch.bool, device=similarity.device)
    present[0] = groups.has_background
    per_group = group_mean(similarity, groups.labels if labels is None else labels, n_groups)
    other = (
        present[:, None] & present[None, :] & ~torch.eye(n_groups, dtype=torch.bool, device=present.device)
    )
    total = (per_group * other).sum()
    return total / repulsion_normaliser(groups.num_entities, groups.has_background, norm)


class _SampledDots(torch.autograd.Function):
    """``out[r, j] = queries[r] . keys[index[r, j]]`` as a sampled dense-dense product through a CSR
    pattern: R x N dot products, neither an (R x pixels) product nor an (R, N, D) copy of the keys
    (on CPU ~8x faster than the product at ReCo's 256 x 512 per entity). Gradient to the queries
    only: ``sum_j grad[r, j] keys[index[r, j]]``, a weighted ``embedding_bag`` (2.7x the sparse x
    dense product through the same pattern on CPU, same values to float rounding)."""

    @staticmethod
    def _pattern(index: torch.Tensor, num_keys: int, values: torch.Tensor) -> torch.Tensor:
        r, n = index.shape
        crow = torch.arange(0, r * n + 1, n, device=index.device)
        with warnings.catch_warnings():  # CSR is "beta" in torch
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                crow, index.reshape(-1), values, (r, num_keys), check_invariants=False
            )

    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        pattern = _SampledDots._pattern(index, keys.shape[0], queries.new_zeros(index.numel()))
        torch.sparse.sampled_addmm(pattern, queries, keys.T, beta=0.0, out=pattern)  # in place: no copy
        ctx.save_for_backward(keys, index)
        return pattern.values().view(index.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keys, index = ctx.saved_tensors
        return F.embedding_bag(index, keys, per_sample_weights=grad.contiguous(), mode="sum"), None, None


def _negative_logits(
    queries: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, mode: str, chunk: int
) -> torch.Tensor:
    """``queries[r] . keys[index[r, j]]`` (R, N); ``keys`` without gradient (see :func:`reco_loss`)."""
    if mode == "sampled" and index.shape[1] <= keys.shape[0]:  # (sampled_addmm: no more entries than cells)
        return _SampledDots.apply(queries, keys, index)
    mode = "dense" if mode == "sampled" else mode  # more negatives than pixels: the product is cheaper
    rows = []
    for s in range(0, queries.shape[0], chunk):  # one entity's queries at a time: bounded memory
        q, idx = queries[s : s + chunk], index[s : s + chunk]
        if mode == "dense":
            rows.append((q @ keys.T).gather(1, idx))
        elif mode == "gather":
            rows.append(torch.einsum("qd,qnd->qn", q, keys[idx]))
        else:
            raise ValueError(f"reco keys={mode!r}: choose sampled, dense or gather")
    return torch.cat(rows)


def _multinomial_cpu(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``torch.multinomial(probs, n, replacement=True)`` on CPU from its ``n`` double uniforms
    (``torch.rand(n, dtype=float64)`` of the same generator): its own inverse CDF (float32 running
    sums over the (G,) probabilities divided by the total, the last bound 1; the first bucket whose
    bound is >= the draw), so the very same draws, without its per-draw binary search."""
    cum = np.cumsum(probs.numpy(), dtype=np.float32)
    bounds = (cum / cum[-1])[:-1].astype(np.float64).tolist()  # the last bound (1) is never < u
    if len(bounds) > 32:
        return torch.searchsorted(torch.tensor(bounds, dtype=torch.float64), uniforms)
    drawn = torch.zeros(uniforms.shape, dtype=torch.uint8)
    for bound in bounds:  # count the bounds below each draw: one cheap pass per group
        drawn += uniforms > bound
    return drawn.long()


def reco_loss(
    features: torch.Tensor,
    lines: torch.Tensor,
    groups: EntityGroups,
    temperature: float = 0.5,
    num_queries: int = 256,
    num_negatives: int = 512,
    strong_threshold: float = 0.97,
    generator: torch.Generator | None = None,
    keys: str | None = None,
) -> torch.Tensor:
    """ReCo regional contrast on the projective sphere for one image (see module docstring).

    ``keys``: how the negative logits are formed -- ``sampled`` (the Q x N dot products only, a
    sparse sampled product; ``dense`` when N exceeds the pixel count), ``dense`` (a (queries x
    pixels) product, then a gather) or ``gather`` (a (Q, N, D) gather of the keys); same values.
    None: ``sampled`` on CPU, elsewhere ``dense`` when there are more negative keys than pixels,
    else ``gather``.
    """
    order = torch.argsort(groups.labels)
    f = features[order]
    own = (f.detach() * lines.detach()[groups.labels[order]]).sum(1).abs()
    counts = torch.bincount(groups.labels, minlength=groups.num_entities + 1)
    return _reco(
        f,
        groups.labels,
        order,
        counts,
        own,
        lines,
        temperature,
        num_queries,
        num_negatives,
        strong_threshold,
        generator,
        keys,
    )


def _reco(
    f: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    own: torch.Tensor,
    lines: torch.Tensor,
    temperature: float,
    num_queries: int,
    num_negatives: int,
    strong_threshold: float,
    generator: torch.Generator | None,
    keys: str | None,
) -> torch.Tensor:
    """:func:`reco_loss` on features sorted by group: ``f = features[order]`` with ``order =
    argsort(labels)`` (``labels`` in pixel order), ``own`` = ``|mu_label . f|`` of the sorted rows.

    Sampling, per entity k in turn (the random stream of the per-entity formulation): Q hard pixels
    of k uniformly, in pixel order (``randint``); Q*N negative groups ~ softmax(|mu_k . mu_j| / tau)
    (on CPU by torch.multinomial's own inverse CDF, vectorised: the same draws); a pixel of each
    group uniformly, the offset-th in ``order`` (``rand``). Then one batch for all entities."""
    n_groups = counts.numel()
    present = counts > 0
    if n_groups < 2 or int(present.sum()) < 2:
        return f.sum() * 0.0
    device, (n, d) = f.device, f.shape
    q_n, k_n = num_queries, num_negatives
    position = torch.empty_like(order)
    position[order] = torch.arange(n, device=device)  # pixel order -> sorted row
    hard_mask = torch.zeros(n, dtype=torch.bool, device=device)
    hard_mask[order] = own < strong_threshold
    hard = (hard_mask & (labels > 0)).nonzero().squeeze(1)  # in pixel order, as the definition
    hard_labels = labels[hard]
    cpu = device.type == "cpu"
    pos_lines = lines.detach()
    starts = torch.cumsum(counts, 0) - counts
    sizes = counts.to(torch.float32)
    neg_rows = torch.empty(n_groups - 1, q_n * k_n, dtype=torch.long, device=device)
    entities, queries = [], []
    for k in range(1, n_groups):
        hard_k = hard[hard_labels == k]
        if hard_k.numel() == 0:
            continue
        e = len(entities)
        entities.append(k)
        queries.append(hard_k[torch.randint(hard_k.numel(), (q_n,), device=device, generator=generator)])
        sim = (pos_lines[k] @ pos_lines.T).abs() / temperature
        sim[k] = float("-inf")
        sim[~present] = float("-inf")
        probs = torch.softmax(sim, 0)
        if cpu:
            uniforms = torch.rand(q_n * k_n, dtype=torch.float64, generator=generator)
            neg_groups = _multinomial_cpu(probs, uniforms)
        else:
            neg_groups = torch.multinomial(probs, q_n * k_n, replacement=True, generator=generator)
        offsets = torch.rand(q_n * k_n, device=device, generator=generator)
        # the offset-th pixel of the group (float32 product, truncated: as rand * counts[g])
        torch.index_select(starts, 0, neg_groups, out=neg_rows[e])
        neg_rows[e] += offsets.mul_(sizes.index_select(0, neg_groups)).long()
    if not entities:
        return f.sum() * 0.0
    num = len(entities)
    neg_rows = neg_rows[:num].view(num * q_n, k_n)
    q = f[position[torch.cat(queries)]]  # (num*Q, D), gradient flows here only
    pos = torch.bmm(q.view(num, q_n, d), pos_lines[entities][:, :, None]).view(num * q_n).abs() / temperature
    if keys is None:
        keys = "sampled" if cpu else ("dense" if q_n * k_n >= n else "gather")
    neg = _negative_logits(q, f.detach(), neg_rows, keys, q_n).abs() / temperature
    # cross-entropy with the positive as class 0, without concatenating the logits
    nll = torch.logaddexp(pos, torch.logsumexp(neg, 1)) - pos
    return nll.view(num, q_n).mean(1).mean()


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
    return _segment_space(seg, entities, keep, groups, scales)


def _segment_space(
    seg: torch.Tensor, entities: torch.Tensor, keep: torch.Tensor, groups: EntityGroups, scales: int
) -> dict[str, torch.Tensor]:
    """Eq. 8 from the maps ``s`` (N,H,W); only kept pixels count (others may hold anything finite)."""
    ids = torch.unique(entities.reshape(-1)[groups.index])
    ids = ids[ids != 0]
    target = (entities[None] == ids[:, None, None]).to(seg.dtype)
    residual = seg - target
    kf = keep.to(seg.dtype)
    mse = ((residual**2) * kf).sum(dim=(1, 2)) / kf.sum().clamp(min=1)
    grad = gradient_matching_loss(residual, keep, scales)
    return {"mse": mse.mean(), "grad": grad}


_EPS = 1e-12  # F.normalize's


class _UnitRows(torch.autograd.Function):
    """``F.normalize(raw, dim=1)`` read at the given pixels of some images, as one (n_i, D) tensor
    of rows per image, and the norms of all pixels (B, H*W). Instead of the graph of
    normalise-then-select (a normalised copy of the whole output, then a full-size gradient per
    selected image and several per term): one channels-last copy of the output, whose pixel rows
    are contiguous, a row gather per image, and one full-size gradient in the same layout, filled
    by a row-wise ``index_add_`` (the pixels are distinct; an accumulating ``index_put_`` into the
    channels-first map was 0.3 s of a 1 s loss at the paper's settings). The gradient goes back
    channels-last (same shape, other strides)."""

    @staticmethod
    def forward(ctx, raw: torch.Tensor, images: list[int], pixels: list[torch.Tensor]):
        ctx.set_materialize_grads(False)
        b, d = raw.shape[:2]
        pixel_rows = raw.permute(0, 2, 3, 1).contiguous().view(b, -1, d)  # free for a channels-last raw
        norms = torch.linalg.vector_norm(pixel_rows, dim=2)
        units, row_norms = [], []
        for i, pix in zip(images, pixels):
            row_norms.append(norms[i].index_select(0, pix))
            units.append(pixel_rows[i].index_select(0, pix).div_(row_norms[-1].clamp_min(_EPS)[:, None]))
        ctx.images, ctx.shape = images, raw.shape
        ctx.save_for_backward(pixel_rows, norms, *pixels, *units, *row_norms)
        return (norms, *units)

    @staticmethod
    def backward(ctx, g_norms: torch.Tensor | None, *g_units: torch.Tensor | None):
        pixel_rows, norms, *rest = ctx.saved_tensors
        k = len(ctx.images)
        pixels, units, row_norms = rest[:k], rest[k : 2 * k], rest[2 * k :]
        if g_norms is not None:  # d|x|/dx = x / |x|, 0 at x = 0 (as torch's norm)
            grad = pixel_rows * (g_norms / norms).masked_fill_(norms == 0, 0.0)[:, :, None]
        else:
            grad = torch.zeros_like(pixel_rows)
        for i, pix, unit, row_norm, g in zip(ctx.images, pixels, units, row_norms, g_units):
            if g is None:
                continue
            # x / max(|x|, eps): (g - u (u . g)) / |x|, or g / eps below eps; one buffer, in place
            rows = torch.mul(g, unit)
            radial = rows.sum(1).masked_fill_(row_norm < _EPS, 0.0)
            torch.mul(unit, radial[:, None], out=rows)
            torch.sub(g, rows, out=rows).div_(row_norm.clamp_min(_EPS)[:, None])
            grad[i].index_add_(0, pix, rows)
        b, d, h, w = ctx.shape
        return grad.view(b, h, w, d).permute(0, 3, 1, 2), None, None


# ------------------------------------------------------------------------------------ the module


class BottomUpLoss(nn.Module):
    """All terms for a batch: raw output (B,D,H,W), entity maps (B,H,W), optional ``valid`` (B,H,W).

    Returns ``{term: weighted value}`` for the enabled terms with non-zero weight, plus (under
    ``diagnostics``, not part of the loss) the fraction of images skipped as degenerate.

    Cost: the kept pixels of all images are gathered once, as unit rows sorted by group; per image
    one product ``f [mu; T]^T`` serves attraction, repulsion, ReCo's hard queries and the segment
    maps; ReCo samples per entity and then forms only its Q x N logits, for all entities at once.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        enabled: Mapping[str, bool] | None = None,
        erosion: int = 3,
        ignore_index: int | None = 255,
        repulsion_norm: str = "entities",
        line_distance: str = "abs",
        attraction_margin: float = 0.0,
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
        self.line_distance = line_distance
        line_similarity(torch.zeros(1), line_distance)  # likewise
        if not 0.0 <= attraction_margin < 1.0:
            raise ValueError(f"loss.attraction_margin={attraction_margin}: must be in [0, 1)")
        self.attraction_margin = float(attraction_margin)
        self.lines = {"solver": "eigh", "power_iters": 20, "detach": True, **dict(lines or {})}
        self.contrast = {
            "temperature": 0.5,
            "num_queries": 256,
            "num_negatives": 512,
            "strong_threshold": 0.97,
            "keys": None,  # how the negative logits are formed (reco_loss); None: by device
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
        with torch.autocast(device_type=raw.device.type, enabled=False):  # float32 throughout
            return self._forward(raw.float(), entities, valid)

    def _forward(
        self, raw: torch.Tensor, entities: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        b, d, h, w = raw.shape
        keep = eroded_keep(entities, self.erosion, valid, self.ignore_index)
        images = []  # (image, groups, order = argsort(labels))
        if any(t != "reg" for t in self.active_terms):
            for i in range(b):
                groups = entity_groups(entities[i], keep[i])
                if groups.num_entities:
                    images.append((i, groups, torch.argsort(groups.labels)))
        norms, pixels, rows = None, [groups.index[order] for _, groups, order in images], []
        if images:
            norms, *rows = _UnitRows.apply(raw, [i for i, _, _ in images], pixels)
        per_image: dict[str, list[torch.Tensor]] = {t: [] for t in TERMS if t != "reg"}
        degenerate = considered = 0
        s, c = self.segment_space, self.contrast
        for (i, groups, order), pix, f in zip(images, pixels, rows):
            labels = groups.labels[order]
            n_groups = groups.num_entities + 1
            counts = torch.bincount(labels, minlength=n_groups)
            lines = _sorted_lines(
                f, counts, self.lines["solver"], int(self.lines["power_iters"]), bool(self.lines["detach"])
            )
            transform = None
            if self.active("mse") or self.active("grad"):
                considered += 1
                transform = segment_transform(lines[1:], float(s["max_line_cos"]), float(s["max_condition"]))
                degenerate += transform is None
            dots = f @ (lines if transform is None else torch.cat([lines, transform])).T
            sim = line_similarity(dots[:, :n_groups], self.line_distance)
            if self.active("attraction"):
                pull = _attraction(sim, labels, groups.num_entities, self.attraction_margin)
                per_image["attraction"].append(pull)
            if self.active("repulsion"):
                per_image["repulsion"].append(_repulsion(sim, groups, self.repulsion_norm, labels))
            if self.active("contrast"):
                own = dots[:, :n_groups].detach().abs().gather(1, labels[:, None]).squeeze(1)
                per_image["contrast"].append(
                    _reco(
                        f,
                        groups.labels,
                        order,
                        counts,
                        own,
                        lines,
                        float(c["temperature"]),
                        int(c["num_queries"]),
                        int(c["num_negatives"]),
                        float(c["strong_threshold"]),
                        None,
                        c["keys"],
                    )
                )
            if transform is not None:
                seg = dots[:, n_groups:].abs()  # kept pixels only: the others count in no term
                seg = seg.new_zeros(h * w, seg.shape[1]).index_copy(0, pix, seg).T.reshape(-1, h, w)
                terms = _segment_space(seg, entities[i], keep[i], groups, int(s["scales"]))
                for t in ("mse", "grad"):
                    if self.active(t):
                        per_image[t].append(terms[t])
        out: dict[str, torch.Tensor] = {}
        for t in self.active_terms:
            if t == "reg":
                value = unit_length_loss(raw, valid) if norms is None else _unit_length(norms, valid)
            else:
                value = torch.stack(per_image[t]).mean() if per_image[t] else raw.sum() * 0.0
            out[t] = self.weights[t] * value
        diagnostics = {"degenerate_fraction": degenerate / considered if considered else 0.0}
        return out, diagnostics
