"""FBR: NROI contrast on a hand-made batch (value, gradient routing faithful vs released), active
negative sampling statistics, the FIFO bank, uncertain-pixel selection, the released ECR slip."""

from __future__ import annotations

import math

import pytest
import torch

from segexp.losses.fbr import (
    class_prototypes,
    contrast_pseudo_labels,
    fg_active_contrast_loss,
    max_onehot_bg_last_slip,
    negative_class_probs,
    nroi_centroids,
    nroi_contrast_loss,
    sample_negative_pixels,
    uncertain_mask,
)
from segexp.losses.seam import max_onehot
from segexp.models.fbr import NROIBank
from tests.conftest import config_inference, config_weights


def _hand_batch():
    """6 pixels: 2 uncertain of class 1 (features [1, 0] = its prototype), 1 sure pixel of class 1,
    class 2 present without uncertain pixels, 2 background pixels. One NROI [0, 1] in the bank."""
    feats = torch.tensor(
        [[1.0, 0.0], [2.0, 0.0], [0.5, 0.5], [0.0, 3.0], [1.0, 1.0], [0.3, 0.1]], requires_grad=True
    )
    pseudo = torch.tensor([1, 1, 1, 2, 0, 0])
    uncertain = torch.tensor([True, True, False, False, False, False])
    prototypes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    bank = NROIBank(size=4, dim=2)
    bank.push(torch.tensor([[0.0, 1.0]]))
    return feats, pseudo, uncertain, prototypes, bank


def test_nroi_contrast_value_and_gradient_reach_the_queries_in_faithful_mode():
    feats, pseudo, uncertain, prototypes, bank = _hand_batch()
    k, tau = 4, 0.5
    loss = nroi_contrast_loss(feats, pseudo, uncertain, prototypes, bank, num_negatives=k, tau=tau)
    # each query: cos to the prototype 1, to the NROI 0 -> -log(e^2 / (e^2 + 4)); class 2 counts with 0
    per_query = math.log(1 + k * math.exp(-1 / tau))
    assert loss.item() == pytest.approx(per_query / 2, rel=1e-5)
    loss.backward()
    grad_rows = feats.grad.abs().sum(1) > 0
    # queries [1,0] sit on their prototype: the gradient is orthogonal to them (away from [0,1])
    assert grad_rows.tolist() == [True, True, False, False, False, False]
    assert feats.grad[0, 1] > 0 and feats.grad[1, 1] > 0  # descent direction: away from the NROI


def test_nroi_contrast_released_quirks_value_and_no_gradient():
    feats, pseudo, uncertain, prototypes, bank = _hand_batch()
    k, tau = 4, 0.5
    loss = nroi_contrast_loss(
        feats, pseudo, uncertain, prototypes, bank, num_negatives=k, tau=tau, official_quirks=True
    )
    # cosine over the 1 + k keys per channel: channel 0 compares (1,...,1) with (1, 0, 0, 0, 0) -> 1/sqrt(5),
    # channel 1 compares a zero vector -> 0; CE over the D = 2 channel "classes", target 0
    logits = torch.tensor([1 / math.sqrt(1 + k), 0.0]) / tau
    expect = -torch.log_softmax(logits, 0)[0].item()
    assert loss.item() == pytest.approx(expect / 2, rel=1e-5)
    loss.backward()
    assert feats.grad is None or not feats.grad.any()


def test_fg_active_contrast_gradient_reaches_only_the_queries():
    torch.manual_seed(0)
    feats = torch.randn(12, 8, requires_grad=True)
    pseudo = torch.tensor([1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0, 0])
    uncertain = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).bool()
    prototypes = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss = fg_active_contrast_loss(feats, pseudo, uncertain, prototypes, num_negatives=16, tau=0.5)
    loss.backward()
    assert (feats.grad.abs().sum(1) > 0).tolist() == uncertain.tolist()  # keys are detached
    # a single present class has no negatives: 0
    single = fg_active_contrast_loss(feats, torch.where(pseudo > 1, 1, pseudo), uncertain, prototypes)
    assert single.item() == 0.0


def test_active_sampler_draws_classes_with_softmax_of_prototype_similarity():
    protos = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.2]])
    tau = 0.5
    probs = negative_class_probs(protos, anchor=1, others=[2, 3, 4], tau=tau)
    cos = torch.tensor([1 / math.sqrt(2), 0.0, -1 / math.sqrt(1.04)])
    assert torch.allclose(probs, torch.softmax(cos / tau, 0), atol=1e-6)
    pools = [torch.arange(0, 3), torch.arange(10, 17), torch.arange(20, 21)]
    q, k = 200, 256
    gen = torch.Generator().manual_seed(0)
    cls, idx = sample_negative_pixels(pools, probs, (q, k), gen)
    n = q * k
    freq = torch.bincount(cls.flatten(), minlength=3).double() / n
    sd = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() < 4 * sd).all()  # binomial 4-sigma band
    for j, pool in enumerate(pools):  # every index comes from the drawn class's pool, uniformly
        picked = idx[cls == j]
        assert torch.isin(picked, pool).all()
        counts = torch.stack([(picked == p).sum() for p in pool]).double()
        expect = picked.numel() / len(pool)
        chi2 = ((counts - expect) ** 2 / expect).sum().item()
        assert chi2 < 3 * (len(pool) - 1) + 10  # far below what a non-uniform draw would give


def test_bank_is_fifo_bounded_and_checkpointed():
    bank = NROIBank(size=5, dim=2)
    rows = torch.arange(14, dtype=torch.float32).view(7, 2)
    bank.push(rows[:3])
    assert len(bank) == 3 and torch.equal(bank.entries(), rows[:3])
    bank.push(rows[3:])
    assert len(bank) == 5 and bank.bank.shape == (5, 2)
    assert torch.equal(bank.entries(), rows[2:])  # oldest two dropped, order kept
    many = torch.arange(24, dtype=torch.float32).view(12, 2) + 100
    bank.push(many)
    assert torch.equal(bank.entries(), many[-5:])
    restored = NROIBank(size=5, dim=2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.entries(), bank.entries()) and len(restored) == 5
    idx = restored.sample_index((3, 7), torch.Generator().manual_seed(0))
    assert idx.shape == (3, 7) and idx.max() < 5
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        bank.push(torch.zeros(3, 4))


def test_uncertain_pixels_on_a_worked_example():
    # one image, 6 pixels in a row; channels: background, class 1, class 2
    pseudo = torch.tensor([[[1, 1, 1, 1, 0, 2]]])
    scores = torch.zeros(1, 3, 1, 6)
    scores[0, 1, 0] = torch.tensor([0.9, 0.5, 0.3, 0.04, 0.2, 0.0])
    scores[0, 2, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.8])
    probs = torch.full((1, 3, 1, 6), 1 / 3)
    probs[0, :, 0, 3] = torch.tensor([0.0, 1.0, 0.0])  # a confident (zero-entropy) pixel
    # class 1 region scores > 0.05: [0.3, 0.5, 0.9] -> threshold index int(3 * 0.6) = 1 -> 0.5: pixel 0 sure;
    # class 2: [0.8] -> threshold 0.8, nothing above it; entropy 10% quantile = 0 (pixels 3 and 4)
    got = uncertain_mask(pseudo, scores, probs, sure_rate=0.6, min_score=0.05, entropy_rate=0.1)
    assert got[0, 0].tolist() == [False, True, True, False, False, True]


def test_contrast_pseudo_labels_use_a_constant_background_and_the_image_labels():
    cam = torch.zeros(1, 3, 1, 4)
    cam[0, 1, 0] = torch.tensor([4.0, 2.0, 0.2, 0.0])
    cam[0, 2, 0] = torch.tensor([0.0, 3.0, 1.0, 0.0])
    scores, probs, pseudo = contrast_pseudo_labels(cam, torch.tensor([[1.0, 1.0]]), bg_score=0.1)
    assert pseudo[0, 0].tolist() == [1, 2, 2, 0]
    assert torch.allclose(scores[0, 0], torch.full((1, 4), 0.1))
    _, _, only1 = contrast_pseudo_labels(cam, torch.tensor([[1.0, 0.0]]), bg_score=0.1)
    assert only1[0, 0].tolist() == [1, 1, 0, 0]  # class 1 at pixel 2: 0.2 / 4 = 0.05 < 0.1


def test_prototypes_are_weighted_means_of_the_top_scores():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]]).T.reshape(1, 2, 2, 2)
    scores = torch.tensor([[0.1, 0.2, 0.0, 0.9], [0.5, 0.5, 0.5, 0.0]]).reshape(1, 2, 2, 2)
    protos = class_prototypes(feats, scores, top_fraction=0.5)  # k = 2
    expect0 = torch.nn.functional.normalize(
        0.9 * torch.tensor([3.0, 0.0]) + 0.2 * torch.tensor([0.0, 1.0]), dim=0
    )
    assert torch.allclose(protos[0], expect0, atol=1e-6)


def test_nroi_centroids_per_image():
    torch.manual_seed(0)
    feats = torch.randn(3, 4, 5, 5)
    bg = torch.zeros(3, 5, 5, dtype=torch.bool)
    bg[0] = True  # 25 background pixels -> 8 centroids
    bg[1, 0, :3] = True  # 3 pixels -> raw features
    out = nroi_centroids(feats, bg, k=8)
    assert out.shape == (11, 4)
    raw = feats[1].flatten(1).T[bg[1].flatten()]
    assert any(torch.allclose(out[i : i + 3], raw) for i in range(out.shape[0] - 2))


def test_released_ecr_keeps_the_first_class_and_lets_background_compete():
    x = torch.tensor([0.6, 0.2, 0.5, 0.1]).view(1, 4, 1, 1)  # background first
    assert max_onehot(x).flatten().tolist() == pytest.approx([0.6, 0.0, 0.5, 0.0])
    assert max_onehot_bg_last_slip(x).flatten().tolist() == pytest.approx([0.6, 0.2, 0.0, 0.0])


@pytest.mark.parametrize("quirks", [False, True])
def test_method_nroi_term_trains_proj_fg_only_when_faithful(quirks):
    from segexp.methods.fbr import FBR
    from segexp.models.backbone import Backbone
    from segexp.models.fbr import FBRNet

    torch.manual_seed(0)
    net = FBRNet(Backbone("resnet18", output_stride=8), num_classes=4, background_first=True, pcm={})
    weights = {
        "cls": 0.0,
        "er": 0.0,
        "ecr": 0.0,
        "amp": 0.0,
        "sim": 0.0,
        "bg_seg": 0.0,
        "nroi": 1.0,
        "fg": 0.0,
    }
    m = FBR(
        model=net,
        num_classes=4,
        class_names=list("abcd"),
        schedule={},
        weights=weights,
        official_quirks=quirks,
        contrast_size=8,
        bank_size=64,
        entropy_rate=0.0,
        bg_score=0.5,
        inference=config_inference(),
    )
    m.banks[0].push(torch.randn(16, 128))
    m.banks[1].push(torch.randn(16, 128))
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    losses = m.compute_losses({"image": torch.randn(2, 3, 64, 64), "labels": labels})
    assert losses["nroi"].item() > 0
    sum(losses.values()).backward()
    grad = m.model.fbr_heads.proj_fg.weight.grad
    assert bool(grad is not None and grad.abs().sum() > 0) is (not quirks)


def test_unknown_loss_weight_is_rejected_with_its_name():
    from segexp.methods.fbr import FBR
    from segexp.models.backbone import Backbone
    from segexp.models.fbr import FBRNet

    net = FBRNet(Backbone("resnet18", output_stride=8), num_classes=3, background_first=True, pcm={})
    with pytest.raises(ValueError, match="nroj"):
        FBR(model=net, num_classes=3, class_names=list("abc"), schedule={},
            weights=config_weights("method=fbr", nroj=0.1), inference=config_inference())


def test_fbr_heads_are_built_as_released():
    """resnet38_contrast.py: proj_fg/proj_bg/bg_classifier are bias-free 1x1 convs with Xavier
    weights; the background branch drops single elements (nn.Dropout), not whole channels."""
    import torch
    from torch import nn

    from segexp.models.fbr import FBRHeads

    torch.manual_seed(0)
    heads = FBRHeads(in_channels=256, dim=128)
    for conv in (heads.proj_fg, heads.proj_bg, heads.bg_classifier):
        assert conv.bias is None
        fan_in, fan_out = conv.weight.shape[1], conv.weight.shape[0]
        bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier_uniform_, gain 1
        largest = float(conv.weight.detach().abs().max())
        assert 0.9 * bound < largest <= bound
    assert type(heads.bg_dropout) is nn.Dropout and heads.bg_dropout.p == 0.5


# -- parity with the release (XuYin94/FBR@fd1aeb850e5d704228b1d0537032d2226736e732) ------------------
# Numbers produced by the release's own code on the seeded inputs below (its code is not part of
# segexp); the release keeps the background in the last channel, here it is channel 0.
K_REL = 20
BG_FIRST = [K_REL, *range(K_REL)]
# region_utils.py:Bank_contrast_loss.forward on _nroi_inputs() (bank prefilled, enqueue skipped, its
# np.random.randint replaced by the indices NROIBank.sample_index draws with generator seed 7)
RELEASE_NROI = 1.7099261283874512
SEGEXP_NROI_NORMALISED_POSITIVE = 1.664621353149414  # segexp before the fix (L2-normalised positive)
# module/train.py:get_contrast_loss, the prototype loop (tmp_prototypes1, raw) on _proto_inputs():
# release channel 2 and channel 20 (background), first three features
RELEASE_RAW_PROTO = {
    2: [0.3362080752849579, 0.49917909502983093, 0.1697157323360443],
    20: [0.6877046823501587, 0.29842913150787354, 0.7056719660758972],
}
# module/train.py:get_contrast_loss, ReLU + min-max (values below min + 1e-5 set to 0 first), background
# := bg_thres 0.10, softmax(cam * label), on _grid_cam() (release order: class 0, class 1, background)
RELEASE_SCORES = [
    [[-1.1782443834817968e-05, -1.1782443834817968e-05, -1.1782443834817968e-05],
     [-1.1782443834817968e-05, 0.999976396560669, 0.8153440952301025],
     [-1.1782443834817968e-05, -1.1782443834817968e-05, 0.37970682978630066]],
    [[-0.344606876373291, 0.7546839714050293, 0.7154208421707153],
     [0.6688320636749268, 0.9999906420707703, 0.5238513350486755],
     [0.5387571454048157, 0.30394047498703003, 0.6057451963424683]],
    [[0.10000000149011612] * 3] * 3,
]
RELEASE_PROBS = [
    [[0.3554050326347351, 0.23628662526607513, 0.24094903469085693],
     [0.2464776337146759, 0.4155251085758209, 0.4471929371356964],
     [0.261843204498291, 0.28898492455482483, 0.33226683735847473]],
    [[0.2518070340156555, 0.5025732517242432, 0.4927579462528229],
     [0.48111921548843384, 0.4155310094356537, 0.33411905169487],
     [0.4487719237804413, 0.39163362979888916, 0.41653764247894287]],
    [[0.3927879333496094, 0.2611401677131653, 0.2662930190563202],
     [0.27240312099456787, 0.1689438819885254, 0.2186880111694336],
     [0.2893849015235901, 0.3193815052509308, 0.2511955201625824]],
]


def _nroi_inputs():
    """Raw pixel features (32, 8), raw prototypes (21, 8, release order), 12 raw NROIs, release
    pseudo labels (classes 2 and 7, background 20) and 7 uncertain pixels."""
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(32, 8, generator=g) * 2.0
    protos = torch.rand(K_REL + 1, 8, generator=g) * 3.0 + 0.5
    bank = torch.randn(12, 8, generator=g)
    pseudo = torch.full((32,), K_REL)
    pseudo[:12], pseudo[12:20] = 2, 7
    uncertain = torch.zeros(32, dtype=torch.bool)
    uncertain[[0, 3, 5, 7, 12, 13, 17]] = True
    return feats, protos, bank, pseudo, uncertain


def test_nroi_quirks_reproduce_the_release_with_the_raw_prototype():
    feats, protos, rows, pseudo, uncertain = _nroi_inputs()
    bank = NROIBank(size=64, dim=8)
    bank.push(rows)
    ours_pseudo = torch.where(pseudo == K_REL, 0, pseudo + 1)

    def loss(prototypes):
        return nroi_contrast_loss(
            torch.nn.functional.normalize(feats, dim=-1), ours_pseudo, uncertain, prototypes, bank,
            num_negatives=16, tau=0.5, official_quirks=True, generator=torch.Generator().manual_seed(7),
        ).item()

    assert loss(protos[BG_FIRST]) == pytest.approx(RELEASE_NROI, rel=1e-6)
    normalised = torch.nn.functional.normalize(protos, dim=-1)[BG_FIRST]
    assert loss(normalised) == pytest.approx(SEGEXP_NROI_NORMALISED_POSITIVE, rel=1e-6)
    assert abs(loss(normalised) - RELEASE_NROI) > 0.04  # the key's scale matters under dim=1
    # the anchors' scale does not: raw anchors (the release's f_fea) give the same value
    raw_anchor = nroi_contrast_loss(
        feats, ours_pseudo, uncertain, protos[BG_FIRST], bank, num_negatives=16, tau=0.5,
        official_quirks=True, generator=torch.Generator().manual_seed(7),
    ).item()
    assert raw_anchor == pytest.approx(RELEASE_NROI, rel=1e-6)


def test_raw_class_prototypes_are_the_released_tmp_prototypes():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, K_REL + 1, 8, 8, generator=g)  # release order
    feats = torch.rand(2, 8, 8, 8, generator=g)
    raw = class_prototypes(feats, scores[:, BG_FIRST], 1 / 16, normalise=False)
    for rel_c, ours_c in ((2, 3), (20, 0)):
        assert raw[ours_c, :3].tolist() == pytest.approx(RELEASE_RAW_PROTO[rel_c], rel=1e-6)
    unit = class_prototypes(feats, scores[:, BG_FIRST], 1 / 16)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=-1))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(K_REL + 1))


def _grid_cam():
    g = torch.Generator().manual_seed(0)
    cam = torch.randn(1, 3, 3, 3, generator=g)  # release order: class 0, class 1, background
    cam[0, 1] += 2.0  # class 1 positive everywhere: its minimum is > 0
    return cam, torch.tensor([[1.0, 1.0]])


def test_contrast_pseudo_labels_quirks_use_the_released_min_max():
    cam, labels = _grid_cam()
    order = [2, 0, 1]  # -> background first
    rel_scores = torch.tensor(RELEASE_SCORES)[order][None]
    rel_probs = torch.tensor(RELEASE_PROBS)[order][None]
    rel_pseudo = torch.tensor(RELEASE_PROBS).argmax(0)
    rel_pseudo = torch.where(rel_pseudo == 2, 0, rel_pseudo + 1)
    scores, probs, pseudo = contrast_pseudo_labels(cam[:, order], labels, 0.10, official_quirks=True)
    torch.testing.assert_close(scores, rel_scores, rtol=0, atol=1e-7)
    torch.testing.assert_close(probs, rel_probs, rtol=0, atol=1e-7)
    assert torch.equal(pseudo[0], rel_pseudo)
    # default: a channel's minimum maps to 0 - class 1's minimum pixel moves by 0.34, labels do not
    scores0, probs0, pseudo0 = contrast_pseudo_labels(cam[:, order], labels, 0.10)
    torch.testing.assert_close(scores0, rel_scores.clamp(min=0), rtol=0, atol=1e-7)
    assert (scores0 - rel_scores).abs().max().item() == pytest.approx(0.344606876373291, rel=1e-6)
    assert (probs0 - rel_probs).abs().max().item() > 0.05
    assert torch.equal(pseudo0, pseudo)


@pytest.mark.parametrize("quirks", [False, True])
def test_method_passes_the_raw_prototype_to_the_nroi_term_only_under_quirks(quirks, monkeypatch):
    import segexp.methods.fbr as fbr_module
    from segexp.methods.fbr import FBR
    from segexp.models.backbone import Backbone
    from segexp.models.fbr import FBRNet

    seen = []
    real = fbr_module.nroi_contrast_loss

    def spy(feats, pseudo, uncertain, prototypes, *args, **kwargs):
        seen.append(prototypes)
        return real(feats, pseudo, uncertain, prototypes, *args, **kwargs)

    monkeypatch.setattr(fbr_module, "nroi_contrast_loss", spy)
    torch.manual_seed(0)
    net = FBRNet(Backbone("resnet18", output_stride=8), num_classes=4, background_first=True, pcm={})
    weights = {k: 0.0 for k in ("cls", "er", "ecr", "amp", "sim", "bg_seg", "fg")} | {"nroi": 1.0}
    m = FBR(model=net, num_classes=4, class_names=list("abcd"), schedule={}, weights=weights,
            official_quirks=quirks, contrast_size=8, bank_size=64, entropy_rate=0.0, bg_score=0.5,
            inference=config_inference())
    views = m._views(torch.randn(2, 3, 64, 64))
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    grids = m.contrast_grids(views, labels)
    for out, grid, bank in zip(views, grids, m.banks):
        m._fbr_terms(out, grid, labels, bank)
    assert len(seen) == 2
    for protos, grid in zip(seen, grids):
        want = grid.raw_prototypes if quirks else grid.prototypes
        assert protos is want
        unit = torch.nn.functional.normalize(grid.raw_prototypes, dim=-1)
        torch.testing.assert_close(grid.prototypes, unit)
