"""Bottom-up losses (segexp.losses.bottomup) on hand-built feature maps with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segexp.losses.bottomup import (
    BottomUpLoss,
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


def test_reco_dense_and_gathered_negative_keys_give_the_same_loss_and_gradient():
    labels = torch.arange(90) % 3
    groups = entity_groups(labels.view(1, 90), torch.ones(1, 90, dtype=torch.bool))
    f = F.normalize(torch.randn(90, 6, generator=torch.Generator().manual_seed(4)), dim=1)
    lines = target_lines(f, groups.labels, 3)
    values, grads = [], []
    for dense in (True, False):
        leaf = f.clone().requires_grad_()
        loss = reco_loss(
            leaf,
            lines,
            groups,
            num_queries=8,
            num_negatives=5,
            dense_keys=dense,
            generator=torch.Generator().manual_seed(0),
        )
        loss.backward()
        values.append(loss.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])


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
