"""Bottom-up losses (segexp.losses.bottomup) on hand-built feature maps with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segexp.losses.bottomup import (
    BottomUpLoss,
    _multinomial_cpu,
    _UnitRows,
    attraction_loss,
    entity_groups,
    eroded_keep,
    gradient_matching_loss,
    reco_loss,
    repulsion_loss,
    segment_space_losses,
    segment_transform,
    target_lines,
)


def _parallel(u, v):
    return abs(float(torch.dot(F.normalize(u, dim=0), F.normalize(v, dim=0))))


def _map(columns: list[torch.Tensor], h: int = 1) -> torch.Tensor:
    """(D,h,W) map from a list of W feature columns (each repeated over h rows)."""
    return torch.stack(columns, 1)[:, None, :].expand(-1, h, -1).contiguous()


# ------------------------------------------------------------------------------------ target lines


@pytest.mark.parametrize("solver", ["eigh", "power"])
def test_target_line_is_principal_eigenvector_and_sign_invariant(solver):
    g = torch.Generator().manual_seed(0)
    d, n = 16, 200
    axis = F.normalize(torch.randn(d, generator=g), dim=0)
    f = F.normalize(axis + 0.4 * torch.randn(n, d, generator=g), dim=1)
    labels = torch.zeros(n, dtype=torch.long)
    scatter = (f.T @ f).double().numpy()
    w, v = np.linalg.eigh(scatter)
    truth = torch.from_numpy(v[:, -1]).float()
    line = target_lines(f, labels, 1, solver=solver, power_iters=100)[0]
    assert _parallel(line, truth) == pytest.approx(1.0, abs=1e-5)
    # flipping the sign of any feature (lines, f == -f) leaves the line unchanged up to sign
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    flipped = target_lines(f * signs[:, None], labels, 1, solver=solver, power_iters=100)[0]
    assert _parallel(flipped, line) == pytest.approx(1.0, abs=1e-5)
    # ... whereas the signed mean of the flipped features is no longer that line
    assert _parallel((f * signs[:, None]).mean(0), truth) < 0.9


def test_target_lines_are_detached_by_default_and_differentiable_on_request():
    f = F.normalize(torch.randn(30, 4), dim=1).requires_grad_()
    labels = torch.arange(30) % 2
    assert not target_lines(f, labels, 2).requires_grad
    lines = target_lines(f, labels, 2, detach=False)
    lines[0, 0].backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_erosion_drops_a_band_along_label_changes_but_not_at_the_image_border():
    ent = torch.zeros(1, 6, 6, dtype=torch.long)
    ent[0, :, 3:] = 1
    keep = eroded_keep(ent, 3)[0]
    assert keep[:, [0, 1, 4, 5]].all() and not keep[:, [2, 3]].any()
    valid = torch.ones(1, 6, 6, dtype=torch.bool)
    valid[0, 0] = False
    assert not eroded_keep(ent, 1, valid)[0, 0].any()
    assert eroded_keep(ent, 1)[0].all()


# ------------------------------------------------------------------------------------ attraction / repulsion


def _three_group_image(theta: float, phi: float):
    """D=3: entity 1 at +-theta around e1, entity 2 along e2, background at angle phi from e3
    towards e2 (one row, seven pixels: bg, e1, e1, e2, e2, bg, bg)."""
    c, s = math.cos(theta), math.sin(theta)
    e1a, e1b = torch.tensor([c, s, 0.0]), torch.tensor([c, -s, 0.0])
    e2 = torch.tensor([0.0, 1.0, 0.0])
    bg = torch.tensor([0.0, math.sin(phi), math.cos(phi)])
    fmap = _map([bg, e1a, -e1b, e2, -e2, bg, bg])  # sign flips must not matter
    ent = torch.tensor([[0, 5, 5, 9, 9, 0, 0]])
    return fmap, ent


def test_attraction_and_repulsion_hand_computed():
    theta, phi = 0.3, 0.2
    fmap, ent = _three_group_image(theta, phi)
    groups = entity_groups(ent, torch.ones_like(ent, dtype=torch.bool))
    assert groups.num_entities == 2 and groups.has_background
    f = fmap.reshape(3, -1).T[groups.index]
    lines = target_lines(f, groups.labels, 3)
    assert _parallel(lines[1], torch.tensor([1.0, 0, 0])) == pytest.approx(1, abs=1e-6)
    att = attraction_loss(f, lines, groups)
    assert float(att) == pytest.approx((1 - math.cos(theta)) / 2, abs=1e-6)
    st, sp = math.sin(theta), math.sin(phi)
    # e1 pixels vs mu_2 and mu_0, e2 pixels vs mu_0, background pixels vs mu_2 (vs mu_1: 0)
    total = st + st * sp + sp + sp
    for norm, z in (("entities", 2), ("groups", 3), ("pairs", 6)):
        rep = repulsion_loss(f, lines, groups, norm)
        assert float(rep) == pytest.approx(total / z, abs=1e-6)


def test_squared_line_distance_hand_computed_and_batched():
    """``line_distance: squared`` (Eq. 2 as (mu.f)^2): La = mean sin^2, Lr = mean cos^2, on the image
    above; the batched loss gives the same numbers as the per-image functions."""
    theta, phi = 0.3, 0.2
    fmap, ent = _three_group_image(theta, phi)
    groups = entity_groups(ent, torch.ones_like(ent, dtype=torch.bool))
    f = fmap.reshape(3, -1).T[groups.index]
    lines = target_lines(f, groups.labels, 3)
    att = attraction_loss(f, lines, groups, form="squared")
    assert float(att) == pytest.approx(math.sin(theta) ** 2 / 2, abs=1e-6)
    st, sp = math.sin(theta), math.sin(phi)
    total = st**2 + (st * sp) ** 2 + sp**2 + sp**2
    rep = repulsion_loss(f, lines, groups, "entities", form="squared")
    assert float(rep) == pytest.approx(total / 2, abs=1e-6)
    loss = BottomUpLoss(weights={"attraction": 1, "repulsion": 1}, erosion=1, line_distance="squared")
    out, _ = loss(fmap[None], ent[None])
    assert float(out["attraction"]) == pytest.approx(float(att), abs=1e-6)
    assert float(out["repulsion"]) == pytest.approx(total / 2, abs=1e-6)
    with pytest.raises(ValueError, match="loss.line_distance"):
        BottomUpLoss(weights={"attraction": 1}, line_distance="cosine")


def test_attraction_margin_is_a_hinge_on_the_line_distance():
    """``attraction_margin`` m: La = mean max(0, 1 - |mu.f| - m); the entity above is 1 - cos(theta) from its
    line, so a margin below that lowers La by m (per entity), one above it silences La."""
    theta, phi = 0.3, 0.2
    fmap, ent = _three_group_image(theta, phi)
    distance = 1 - math.cos(theta)  # entity 1's pixels; entity 2's lie on their line
    for margin, expected in ((0.0, distance / 2), (0.02, (distance - 0.02) / 2), (0.05, 0.0)):
        loss = BottomUpLoss(weights={"attraction": 1}, erosion=1, attraction_margin=margin)
        out, _ = loss(fmap[None], ent[None])
        assert float(out["attraction"]) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="loss.attraction_margin"):
        BottomUpLoss(weights={"attraction": 1}, attraction_margin=1.0)


def test_attraction_and_repulsion_vanish_for_parallel_within_orthogonal_across():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    ent = torch.randint(0, 4, (10, 12), generator=g)  # 0 = background, 1..3 entities
    fmap = basis[:, ent]  # (D,H,W): each group one orthonormal direction
    fmap = fmap * torch.where(torch.rand(10, 12, generator=g) < 0.5, -1.0, 1.0)  # antipodal flips
    loss = BottomUpLoss(weights={"attraction": 1, "repulsion": 1, "mse": 1, "grad": 1}, erosion=1)
    out, diag = loss(fmap[None], ent[None])
    for term in ("attraction", "repulsion", "mse", "grad"):
        assert float(out[term]) == pytest.approx(0.0, abs=1e-5), term
    assert diag["degenerate_fraction"] == 0.0


# ------------------------------------------------------------------------------------ segment space


def test_left_inverse_maps_each_target_line_to_its_basis_vector():
    g = torch.Generator().manual_seed(2)
    lines = F.normalize(torch.randn(3, 8, generator=g), dim=1)  # independent, not orthogonal
    t = segment_transform(lines)
    assert t is not None and t.shape == (3, 8)
    torch.testing.assert_close(t @ lines.T, torch.eye(3), atol=1e-5, rtol=0)


def test_degenerate_lines_are_detected():
    a = F.normalize(torch.randn(8), dim=0)
    b = F.normalize(a + 1e-3 * torch.randn(8), dim=0)
    assert segment_transform(torch.stack([a, -b, torch.eye(8)[0]])) is None
    assert segment_transform(torch.stack([a, torch.eye(8)[1]]), max_line_cos=0.999) is not None


def test_degenerate_image_is_skipped_without_nan():
    """Two entities with the same features: T does not exist; the segment-space terms skip that
    image, every loss and gradient stays finite."""
    same = F.normalize(torch.ones(4), dim=0)
    other = torch.tensor([0.5, -0.5, 0.5, -0.5])  # orthogonal to `same`
    raw = torch.stack([same, same, same, same, other, other], 1)[:, None, :].repeat(1, 2, 1)
    raw = raw[None].clone().requires_grad_()
    ent = torch.tensor([[1, 1, 2, 2, 0, 0]] * 2)[None]
    loss = BottomUpLoss(
        weights={"attraction": 1, "repulsion": 1, "contrast": 0.125, "mse": 0.025, "grad": 0.05, "reg": 1},
        erosion=1,
    )
    out, diag = loss(raw, ent)
    assert diag["degenerate_fraction"] == 1.0
    assert float(out["mse"].detach()) == 0.0 and float(out["grad"].detach()) == 0.0
    total = sum(out.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(raw.grad).all()
    # repulsion: each entity's pixels are parallel to the other entity's line -> 2 * 1 / N(=2)
    assert float(out["repulsion"].detach()) == pytest.approx(1.0, abs=1e-5)


def test_segment_space_mse_hand_computed():
    """Two entities on e1/e2, one pixel of entity 1 tilted by theta towards e3 (outside the span):
    s_1 = cos(theta) there, so MSE = (1 - cos theta)^2 / #pixels / 2 channels."""
    theta = 0.5
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    tilted = torch.tensor([math.cos(theta), 0.0, math.sin(theta)])
    fmap = _map([e1, e1, tilted, e1, e2, e2])
    ent = torch.tensor([[1, 1, 1, 1, 2, 2]])
    keep = torch.ones_like(ent, dtype=torch.bool)
    groups = entity_groups(ent, keep)
    lines = torch.stack([torch.zeros(3), e1, e2])
    out = segment_space_losses(fmap, segment_transform(lines[1:]), ent, keep, groups, scales=1)
    assert float(out["mse"]) == pytest.approx((1 - math.cos(theta)) ** 2 / 6 / 2, abs=1e-6)
    # residual of channel 1 is -(1 - cos) at one pixel with two kept x-neighbours: 2 jumps / 6 px
    assert float(out["grad"]) == pytest.approx(2 * (1 - math.cos(theta)) / 6 / 2, abs=1e-6)


def test_gradient_matching_counts_only_kept_neighbours_over_four_scales():
    res = torch.zeros(1, 8, 8)
    res[0, :, 4:] = 1.0  # one vertical step between columns 3 and 4
    keep = torch.ones(8, 8, dtype=torch.bool)
    # scale 1: 8 jumps / 64 px; scale 2 (cols 0,2,4,6): 4 jumps / 16; scale 4: 2 / 4; scale 8: 0 / 1
    expected = 8 / 64 + 4 / 16 + 2 / 4 + 0.0
    assert float(gradient_matching_loss(res, keep, 4)) == pytest.approx(expected)
    keep[:, 3] = False  # the jump's left neighbour is not kept at scale 1 -> that scale loses it
    expected = 0 / 56 + 4 / 16 + 2 / 4
    assert float(gradient_matching_loss(res, keep, 4)) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ contrast


def test_reco_is_zero_when_aligned_lower_when_separated_and_grads_reach_queries_only():
    g = torch.Generator().manual_seed(3)
    d = 8
    basis = torch.eye(d)
    labels = torch.arange(60) % 3  # background 0, entities 1, 2
    groups = entity_groups(labels.view(1, 60), torch.ones(1, 60, dtype=torch.bool))
    aligned = basis[labels]
    lines = basis[:3]
    assert float(reco_loss(aligned, lines, groups, generator=g)) == 0.0  # no hard queries
    noisy = F.normalize(aligned + 0.3 * torch.randn(60, d, generator=g), dim=1)
    random = F.normalize(torch.randn(60, d, generator=g), dim=1)
    sep = reco_loss(
        noisy, target_lines(noisy, groups.labels, 3), groups, num_queries=64, num_negatives=32, generator=g
    )
    mixed = reco_loss(
        random, target_lines(random, groups.labels, 3), groups, num_queries=64, num_negatives=32, generator=g
    )
    assert 0 < float(sep) < float(mixed)
    leaf = random.clone().requires_grad_()
    reco_loss(
        leaf, target_lines(random, groups.labels, 3), groups, num_queries=16, num_negatives=8, generator=g
    ).backward()
    grad_rows = leaf.grad.abs().sum(1) > 0
    assert grad_rows.any() and not grad_rows[groups.labels == 0].any()  # background is never a query


@pytest.mark.parametrize("num_negatives", [5, 120])  # 120 > 90 pixels: "sampled" falls back to dense
def test_reco_negative_logit_paths_give_the_same_loss_and_gradient(num_negatives):
    labels = torch.arange(90) % 3
    groups = entity_groups(labels.view(1, 90), torch.ones(1, 90, dtype=torch.bool))
    f = F.normalize(torch.randn(90, 6, generator=torch.Generator().manual_seed(4)), dim=1)
    lines = target_lines(f, groups.labels, 3)
    values, grads = [], []
    for keys in ("sampled", "dense", "gather"):
        leaf = f.clone().requires_grad_()
        loss = reco_loss(
            leaf,
            lines,
            groups,
            num_queries=8,
            num_negatives=num_negatives,
            keys=keys,
            generator=torch.Generator().manual_seed(0),
        )
        loss.backward()
        values.append(loss.detach())
        grads.append(leaf.grad)
    assert float(values[0]) > 0 and grads[0].abs().sum() > 0
    for value, grad in zip(values[1:], grads[1:]):
        torch.testing.assert_close(value, values[0])
        torch.testing.assert_close(grad, grads[0])


def test_negative_groups_are_torch_multinomials_draws_on_cpu():
    """ReCo draws its negative groups with torch.multinomial's CPU algorithm, vectorised (float32
    running sums, a double uniform per draw): the very same draws, zero-probability groups never;
    few groups (a pass per group) and many (a binary search) alike."""
    g = torch.Generator().manual_seed(7)
    for n in [2, 3, 10, 33, 60] * 8:
        sim = torch.rand(n, generator=g) / 0.5
        sim[torch.rand(n, generator=g) < 0.3] = float("-inf")
        sim[int(torch.randint(n, (1,), generator=g))] = 0.0
        probs = torch.softmax(sim, 0)
        seed = int(torch.randint(1 << 30, (1,), generator=g))
        expected = torch.multinomial(probs, 4000, True, generator=torch.Generator().manual_seed(seed))
        uniforms = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        drawn = _multinomial_cpu(probs, uniforms)
        assert torch.equal(drawn, expected)
        assert (probs[drawn] > 0).all()


def test_weights_and_switches_follow_the_config():
    loss = BottomUpLoss(
        weights={"attraction": 1, "repulsion": 1, "contrast": 0.125, "mse": 0.025, "grad": 0.05, "reg": 1},
        enabled={"grad": False},
        erosion=1,
    )
    assert loss.active_terms == ("reg", "attraction", "repulsion", "contrast", "mse")
    with pytest.raises(KeyError, match="unknown terms"):
        BottomUpLoss(weights={"atraction": 1})
    with pytest.raises(ValueError, match="repulsion_norm"):
        BottomUpLoss(weights={"repulsion": 1}, repulsion_norm="bogus")
    raw = torch.randn(2, 6, 8, 8)
    ent = torch.randint(0, 3, (2, 8, 8))
    out, _ = loss(raw, ent)
    unweighted, _ = BottomUpLoss(weights={"mse": 1.0}, erosion=1)(raw, ent)
    assert float(out["mse"]) == pytest.approx(0.025 * float(unweighted["mse"]), rel=1e-5)


# ------------------------------------------------------------------------------------ fast path vs reference


def _reference_loss(raw, ent, valid, weights, erosion, contrast):
    """All terms the plain way (per image, per entity, dense keys, torch.multinomial): the
    definitions of the module docstring, against which BottomUpLoss's batched path is checked."""
    q, k, tau, thr = contrast["num_queries"], contrast["num_negatives"], contrast["temperature"], 0.97
    feats = F.normalize(raw, dim=1)
    keep = eroded_keep(ent, erosion, valid)
    d = raw.shape[1]
    per = {t: [] for t in ("attraction", "repulsion", "contrast", "mse", "grad")}
    for i in range(raw.shape[0]):
        groups = entity_groups(ent[i], keep[i])
        n = groups.num_entities
        if n == 0:
            continue
        f = feats[i].reshape(d, -1).T[groups.index]
        labels = groups.labels
        lines = target_lines(f, labels, n + 1)
        counts = torch.bincount(labels, minlength=n + 1)
        own = (f * lines[labels]).sum(1).abs()
        per["attraction"].append(torch.stack([(1 - own[labels == e]).mean() for e in range(1, n + 1)]).mean())
        rep = sum(
            (f[labels == a] @ lines[b]).abs().mean()
            for a in range(n + 1)
            for b in range(n + 1)
            if a != b and counts[a] > 0 and counts[b] > 0
        )
        per["repulsion"].append(rep / n)
        # ReCo: hard queries of entity e, negatives: a group j ~ softmax(|mu_e . mu_j| / tau) over the
        # other present groups, then a pixel of j uniformly (the offset-th in argsort(labels) order)
        order, starts = torch.argsort(labels), torch.cumsum(counts, 0) - counts
        reco = []
        for e in range(1, n + 1):
            hard = ((labels == e) & (own < thr)).nonzero().squeeze(1)
            if hard.numel() == 0:
                continue
            queries = f[hard[torch.randint(hard.numel(), (q,))]]
            sim = (lines[e] @ lines.T).abs() / tau
            sim[e] = float("-inf")
            sim[counts == 0] = float("-inf")
            neg_groups = torch.multinomial(torch.softmax(sim, 0), q * k, replacement=True)
            offset = (torch.rand(neg_groups.shape) * counts[neg_groups]).long()
            keys = f.detach()[order[starts[neg_groups] + offset]].view(q, k, d)
            logits = torch.cat([(queries @ lines[e])[:, None], torch.einsum("qd,qkd->qk", queries, keys)], 1)
            reco.append(F.cross_entropy(logits.abs() / tau, torch.zeros(q, dtype=torch.long)))
        per["contrast"].append(torch.stack(reco).mean())
        # segment space on the whole map (only kept pixels count)
        t = segment_transform(lines[1:])
        assert t is not None
        seg = (t @ feats[i].reshape(d, -1)).abs().view(n, *ent.shape[1:])
        ids = torch.unique(ent[i].reshape(-1)[groups.index])
        residual = seg - (ent[i][None] == ids[ids != 0][:, None, None]).float()
        kf = keep[i].float()
        per["mse"].append((((residual**2) * kf).sum(dim=(1, 2)) / kf.sum()).mean())
        per["grad"].append(gradient_matching_loss(residual, keep[i], 4))
    v = valid.float()
    out = {"reg": weights["reg"] * (((raw.norm(dim=1) - 1) ** 2) * v).sum() / v.sum()}
    out.update({t: weights[t] * torch.stack(vals).mean() for t, vals in per.items()})
    return out


def _fast_path_inputs():
    g = torch.Generator().manual_seed(11)
    raw = torch.tanh(torch.randn(3, 16, 20, 20, generator=g))
    ent = torch.zeros(3, 20, 20, dtype=torch.long)
    ent[0, 4:, :9], ent[0, 4:12, 9:], ent[0, 12:, 9:] = 3, 7, 12  # background band on top
    ent[1, :, :10], ent[1, :, 10:] = 1, 2  # no background, an ignored patch, padding on the right
    ent[1, 5:9, 3:7] = 255
    ent[2, :5] = 255  # no entity: only the unit-length term sees it
    valid = torch.ones(3, 20, 20, dtype=torch.bool)
    valid[1, :, 17:] = False
    return raw, ent, valid


def test_batched_loss_matches_the_plain_reference_values_and_gradient():
    weights = {"attraction": 1, "repulsion": 1, "contrast": 0.125, "mse": 0.025, "grad": 0.05, "reg": 1.0}
    contrast = {"num_queries": 24, "num_negatives": 40, "temperature": 0.5}
    raw, ent, valid = _fast_path_inputs()
    results = []
    for fn in (BottomUpLoss(weights=weights, contrast=contrast), _reference_loss):
        leaf = raw.clone().requires_grad_()
        torch.manual_seed(5)  # the same queries and negatives on both sides
        if fn is _reference_loss:
            out = fn(leaf, ent, valid, weights, 3, contrast)
        else:
            out = fn(leaf, ent, valid)[0]
        sum(out.values()).backward()
        results.append(({t: v.detach() for t, v in out.items()}, leaf.grad))
    (fast, fast_grad), (ref, ref_grad) = results
    assert set(fast) == set(ref)
    for term in ref:
        assert float(ref[term]) > 0, term
        torch.testing.assert_close(fast[term], ref[term], rtol=1e-5, atol=1e-6, msg=term)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-7)
    # the reference is sensitive to the sampling: another draw of queries/negatives changes the contrast
    torch.manual_seed(6)
    other = BottomUpLoss(weights={"contrast": 1.0}, contrast=contrast)(raw, ent, valid)[0]["contrast"]
    assert abs(float(other) - float(ref["contrast"]) / 0.125) > 1e-4


def test_unit_rows_match_normalise_then_select_including_zero_and_tiny_norms():
    g = torch.Generator().manual_seed(12)
    raw = torch.randn(2, 5, 4, 4, generator=g)
    raw[0, :, 1, 1] = 0.0  # F.normalize's eps: a zero pixel stays zero, with gradient g / eps
    raw[1, :, 2, 3] = 1e-14
    pixels = [torch.tensor([5, 0, 9, 3]), torch.tensor([11, 14, 2])]
    up = [torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)]
    up_norm = torch.randn(2, 16, generator=g)
    grads = []
    for fast in (True, False):
        leaf = raw.clone().requires_grad_()
        if fast:
            norms, *rows = _UnitRows.apply(leaf, [0, 1], pixels)
        else:
            unit = F.normalize(leaf, dim=1).reshape(2, 5, 16)
            rows = [unit[i].T[p] for i, p in enumerate(pixels)]
            norms = leaf.norm(dim=1).reshape(2, 16)
        if fast:
            fast_rows, fast_norms = rows, norms
        else:
            for a, b in zip(fast_rows, rows):  # the same unit features, up to the summation order
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(fast_norms, norms, rtol=1e-6, atol=0.0)
        (sum((r * u).sum() for r, u in zip(rows, up)) + (norms * up_norm).sum()).backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 1e10  # g / eps at the zero pixel
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
