"""PPC base: thresholded average pooling, the EPS saliency loss and the prototype contrasts on
hand-made inputs; a few training steps of method=ppc, of FBR's variant (ppc_fbr) and of FBR on it.
Parity with the release: tests/test_ppc_release.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segexp.losses.ppc import (
    ContrastGrid,
    eps_saliency_loss,
    eps_saliency_prediction,
    hard_pixel_indices,
    ppc_contrast_losses,
    ppc_intra_view_loss,
    prototype_nce,
    semi_hard_negatives,
    tap_logits,
    thresholded_avg_pool,
)


# -- thresholded average pooling --------------------------------------------------------------------
def test_tap_averages_only_values_above_a_tenth_of_the_channel_max():
    # channel 0: max 10 -> cut 1.0; kept 10, 2 (1.0 is not > 1.0, 0.5 and 0 dropped) -> 6
    # channel 1: all zero -> no kept value -> 0 (not NaN); channel 2: constant 3 -> 3
    feats = torch.tensor([[[[10.0, 1.0], [0.5, 2.0]], [[0.0, 0.0], [0.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    assert thresholded_avg_pool(feats, 0.1).tolist() == [[6.0, 0.0, 3.0]]
    # threshold 0 keeps every positive value: the mean over positive positions (10+1+.5+2)/4
    assert thresholded_avg_pool(feats, 0.0)[0, 0].item() == pytest.approx(13.5 / 4)
    # logits = classifier applied to the pooled vector
    weight = torch.tensor([[1.0, 5.0, 0.0], [0.0, 0.0, -1.0]])[..., None, None]
    assert tap_logits(feats, weight, 0.1).tolist() == [[6.0, -3.0]]


def test_tap_differs_from_gap_on_a_peaked_map():
    feats = torch.zeros(1, 1, 4, 4)
    feats[0, 0, 0, 0] = 16.0
    assert thresholded_avg_pool(feats).item() == 16.0  # GAP would give 1.0


# -- EPS saliency loss ------------------------------------------------------------------------------
def _eps_batch():
    """One image, 2x2 grid, K = 2 classes both present. Logits put each pixel on one channel with
    probability ~1: [[bg, c1], [c2, c1]]. Saliency marks the c1 pixels and the c2 pixel's partner
    zero, so c1 overlaps it fully (-> foreground) and c2 not at all (-> background)."""
    big = 30.0
    order = torch.tensor([[0, 1], [2, 1]])  # channel per pixel (bg first)
    cam = F.one_hot(order, 3).permute(2, 0, 1).float()[None] * big
    saliency = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    labels = torch.tensor([[1.0, 1.0]])
    return cam, saliency, labels


def test_eps_prediction_selects_overlapping_classes_as_foreground():
    cam, saliency, labels = _eps_batch()
    pred, target = eps_saliency_prediction(cam, saliency, labels, tau=0.4, alpha=0.5)
    # c1 overlap = 2 / (2 + 1e-4 * 4) > 0.4 -> fg; c2 overlap 0 -> bg (with the bg channel)
    # fg_map = p_c1; bg_map = 1 - (p_bg + p_c2); pred = 0.5 fg + 0.5 bg
    expect = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # bg pixel 0.5*0+0.5*0, c1: 0.5+0.5, c2: 0
    assert torch.allclose(pred[0, 0], expect, atol=1e-6)
    assert torch.equal(target[0, 0], saliency[0])
    assert eps_saliency_loss(cam, saliency, labels).item() == pytest.approx(0.0, abs=1e-10)


def test_eps_loss_value_and_absent_classes_take_no_part():
    cam, saliency, labels = _eps_batch()
    # drop class 2 from the labels: its probability is in neither map, so its pixel predicts
    # 0.5 * 0 + 0.5 * (1 - p_bg - 0) = 0.5 against saliency 0 -> MSE = 0.25 / 4 pixels
    loss = eps_saliency_loss(cam, saliency, torch.tensor([[1.0, 0.0]]), tau=0.4, alpha=0.5)
    assert loss.item() == pytest.approx(0.25 / 4, rel=1e-5)
    # alpha weighs fg against 1 - bg: with alpha 1 the c2 pixel predicts 0 -> no error there
    assert eps_saliency_loss(cam, saliency, torch.tensor([[1.0, 0.0]]), alpha=1.0).item() == pytest.approx(
        0.0, abs=1e-10
    )
    # tau above c1's overlap turns c1 into background: its pixels predict 0.5 * 0 + 0.5 * (1 - 1) = 0
    high_tau = eps_saliency_loss(cam, saliency, labels, tau=1.0)
    assert high_tau.item() == pytest.approx(2 * 1.0 / 4, rel=1e-5)


def test_eps_saliency_is_resized_to_the_cam_grid_nearest_and_gradients_reach_the_cam():
    cam = torch.randn(2, 4, 3, 3, requires_grad=True)
    saliency = torch.rand(2, 12, 12)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    pred, target = eps_saliency_prediction(cam, saliency, labels)
    assert target.shape == (2, 1, 3, 3)
    assert torch.equal(target, F.interpolate(saliency[:, None], (3, 3), mode="nearest"))
    eps_saliency_loss(cam, saliency, labels).backward()
    assert cam.grad.abs().sum() > 0


# -- prototype contrast ----------------------------------------------------------------------------
def test_prototype_nce_value_on_a_tiny_batch():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    prototypes = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([1, 1, 0])
    mask = torch.tensor([True, True, False])
    t = 0.1
    # pixel 0: cos 1 to its prototype, 0 to the other; pixel 1: 0 to its own, 1 to the other
    l0 = math.log(1 + math.exp(-1 / t))
    l1 = -math.log(1 / (1 + math.exp(1 / t)))
    assert prototype_nce(feats, prototypes, targets, mask, t).item() == pytest.approx((l0 + l1) / 3, rel=1e-5)


def _grid(f, pseudo, prototypes):
    z = torch.zeros(1, 2, *pseudo.shape[-2:])
    return ContrastGrid(f_proj=f, scores=z, probs=z, pseudo=pseudo, prototypes=prototypes)


@pytest.mark.parametrize("mask_background", [False, True])
def test_ppc_cross_view_terms_pair_views_as_released_and_prototypes_are_detached(mask_background):
    torch.manual_seed(0)
    f1 = torch.randn(1, 4, 2, 2, requires_grad=True)
    f2 = torch.randn(1, 4, 2, 2, requires_grad=True)
    p1 = F.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    p2 = F.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    y1 = torch.tensor([[[0, 1], [2, 2]]])
    y2 = torch.tensor([[[1, 1], [0, 2]]])
    cross, cross_cam = ppc_contrast_losses(_grid(f1, y1, p1), _grid(f2, y2, p2), 0.1, mask_background)

    def nce(f, p, y):
        f = F.normalize(f.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
        y = y.reshape(-1)
        mask = y != 0 if mask_background else torch.ones_like(y, dtype=torch.bool)
        return prototype_nce(f, p, y, mask, 0.1)

    assert cross.item() == pytest.approx(0.5 * (nce(f1, p2, y1) + nce(f2, p1, y2)).item(), rel=1e-6)
    assert cross_cam.item() == pytest.approx(0.5 * (nce(f1, p1, y2) + nce(f2, p2, y1)).item(), rel=1e-6)
    (cross + cross_cam).backward()
    assert f1.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0
    assert p1.grad is None and p2.grad is None  # prototypes are targets, never trained through


def test_semi_hard_negatives_skip_the_most_similar_and_exclude_the_positive():
    prototypes = torch.eye(6)
    feats = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])  # similarity ranks 0 > 1 > 2 > 3 > 4 > 5
    target = torch.tensor([2])
    # without the positive (2): ranked 0, 1, 3, 4, 5 -> skip 1 -> [1, 3]
    assert semi_hard_negatives(feats, prototypes, target, skip=1, count=2).tolist() == [[1, 3]]
    # the release ranks the positive too: 0, 1, 2, 3, ... -> skip 1 -> [1, 2]
    assert semi_hard_negatives(feats, prototypes, target, 1, 2, exclude_positive=False).tolist() == [[1, 2]]
    # fewer prototypes than skip + count: what is left (here 2 of the 5 others after skipping 3)
    assert semi_hard_negatives(feats, prototypes, target, skip=3, count=10).tolist() == [[4, 5]]


def test_hard_pixels_are_the_least_similar_after_dropping_the_very_least():
    similarity = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    idx = hard_pixel_indices(similarity, fraction=0.5, pool=0.6, generator=torch.Generator().manual_seed(0))
    drawn, hard = idx[:5], idx[5:]
    assert len(set(drawn.tolist())) == 5  # 10 // 2 drawn without replacement
    # 6 least similar: 9 (0.0), 1, 5, 3, 7, 2 (0.5); the least similar 6 - 5 = 1 dropped
    assert hard.tolist() == [1, 5, 3, 7, 2]


def test_intra_view_term_value_and_the_release_quirks():
    t = 0.1
    prototypes = torch.eye(3)
    feats = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [1.0, 0.0, 0.3], [0.0, 1.0, 0.1]]), dim=-1)
    targets = torch.tensor([0, 0, 1])  # class 1 has one pixel: no sample, no share of the mean
    kwargs = {"temperature": t, "skip": 0, "count": 1, "fraction": 0.5, "pool": 0.5}
    gen = torch.Generator().manual_seed(0)
    loss = ppc_intra_view_loss(feats, prototypes, targets, generator=gen, **kwargs)
    # class 0: the most similar other prototype is the negative; pixels: 1 drawn + the least similar
    drawn = torch.randperm(2, generator=torch.Generator().manual_seed(0))[:1].item()
    hard = int((feats[:, 0][:2]).argmin())

    def nll(i):
        negative = 1 + int(feats[i, 2] > feats[i, 1])
        logits = torch.stack([feats[i, 0], feats[i, negative]]) / t
        return (torch.logsumexp(logits, 0) - logits[0]).item()

    assert loss.item() == pytest.approx((nll(drawn) + nll(hard)) / 2, rel=1e-5)
    quirks = ppc_intra_view_loss(
        feats, prototypes, targets, official_quirks=True, generator=torch.Generator().manual_seed(0), **kwargs
    )
    # released: the one-pixel class counts in the mean (/ 2) and the positive, ranked first, is the
    # only "negative" (count 1, skip 0): -log(e^s / 2 e^s) = log 2 per pixel
    assert quirks.item() == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_ppc_contrast_rejects_unaligned_grids():
    a = _grid(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.randn(3, 4))
    b = _grid(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), torch.randn(3, 4))
    with pytest.raises(ValueError, match="contrast grids differ"):
        ppc_contrast_losses(a, b)


# -- the method: a few steps ------------------------------------------------------------------------
def _method(name: str, *extra: str, **overrides):
    import hydra

    from tests.conftest import compose

    cfg = compose(
        [
            f"method={name}",
            "data=shapes",
            "backbone=resnet18",
            "backbone.pretrained=false",
            "backbone.output_stride=8",
            *extra,
            *[f"method.{k}={v}" for k, v in overrides.items()],
        ]
    )
    return hydra.utils.instantiate(cfg.method)


def _batch(n: int = 2, size: int = 48):
    torch.manual_seed(0)
    labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1.0, 0, 0, 0]])[:n]
    return {"image": torch.randn(n, 3, size, size), "labels": labels, "saliency": torch.rand(n, size, size)}


@pytest.mark.parametrize("name", ["ppc", "ppc_fbr", "fbr_ppc"])
def test_method_steps_and_every_term_is_finite(name):
    method = _method(name, view_size=24, contrast_size=6)
    opt = torch.optim.SGD(method.parameters(), lr=1e-3)
    for _ in range(2):
        losses = method.compute_losses(_batch())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
    expected = {"cls", "amp", "er", "ecr", "sal", "ppc_cross", "ppc_cross_cam"}
    if name == "ppc":
        expected |= {"ppc_intra"}  # FBR's variant has no PPC intra-view term (FBR's fg takes its place)
    if name == "fbr_ppc":
        expected |= {"sim", "bg_seg", "nroi", "fg"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    cams = method.single_scale_cams(_batch()["image"])
    assert cams.shape == (2, 5, 48, 48) and float(cams.amax()) <= 1.0


@pytest.mark.parametrize("name", ["ppc", "ppc_fbr"])
def test_classification_pools_by_gap_in_ppc_and_by_tap_in_fbrs_variant(name):
    method = _method(name, view_size=24, contrast_size=6)
    method.eval()  # no dropout anyway (model.dropout 0); deterministic
    batch = _batch()
    out1, out2 = method._views(batch["image"])
    losses = method.view_losses(out1, out2, batch["labels"])
    from segexp.losses.cam import multilabel_soft_margin

    weight = method.model.head.classifier.weight
    if name == "ppc":
        assert method.tap_threshold is None
        logits = [o["cam"].mean((2, 3))[:, 1:] for o in (out1, out2)]
    else:
        assert method.tap_threshold == 0.10
        logits = [tap_logits(o["features"], weight, 0.10)[:, 1:] for o in (out1, out2)]
    expect = 0.5 * sum(multilabel_soft_margin(lg, batch["labels"]) for lg in logits)
    assert losses["cls"].item() == pytest.approx(expect.item(), rel=1e-6)


def test_ppc_rejects_unknown_weights_and_needs_saliency():
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"unknown term\(s\) \['nroi'\]"):
        _method("ppc", "+method.weights.nroi=0.1")
    with pytest.raises(InstantiationException, match="must include 'saliency'"):
        _method("ppc", train_keys="[image,labels]")


def test_official_quirks_swaps_in_the_released_ecr_on_the_ppc_base():
    from segexp.losses.fbr import ecr_loss_bg_last_slip
    from segexp.losses.seam import ecr_loss

    torch.manual_seed(1)
    y_o, y_t, rv_o, rv_t = (torch.rand(2, 6, 4, 4) for _ in range(4))
    faithful = _method("ppc").ecr(y_o, y_t, rv_o, rv_t)
    quirks = _method("ppc", official_quirks=True).ecr(y_o, y_t, rv_o, rv_t)
    assert faithful.item() == pytest.approx(ecr_loss(y_o, y_t, rv_o, rv_t, 0.2).item())
    assert quirks.item() == pytest.approx(ecr_loss_bg_last_slip(y_o, y_t, rv_o, rv_t, 0.2).item())
    assert quirks.item() != pytest.approx(faithful.item())
