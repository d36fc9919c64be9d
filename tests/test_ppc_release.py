"""method=ppc against the PPC release: loss values and gradients on seeded inputs.

The expected numbers were produced by the release's own code, run on CPU next to segexp on exactly
the inputs built by :func:`_inputs` (the code itself is not part of segexp):
``usr922/wseg@c62f0d2c1afa0d77563c7e3daf1d53082aa76fb2`` (branch ``esp``, the EPS base),
``module/train.py:train_contrast`` (the loss lines after the forward; ``pred`` = ``F.avg_pool2d`` of
the CAM, as ``network/resnet38_contrast.py:Net.forward``) with ``module/train.py:get_contrast_loss``,
``get_er_loss``, ``adaptive_min_pooling_loss``, ``max_onehot`` and ``eps.py:get_eps_loss``; view 2
of size 32 (the released 128), contrast grid 16 (released). Only change to the release: its per-class
``random.sample(range(n), n // 2)`` drew ``torch.randperm(n)[: n // 2]`` after ``torch.manual_seed(123)``,
so both sides sample the same pixels.

The release puts the background in the last channel; here it is channel 0 (:data:`BG_FIRST`).
``cls_amp`` = ``loss_cls`` of the release = our ``cls + amp``; ``ppc_cross`` / ``ppc_cross_cam`` /
``ppc_intra`` = ``loss_cross_nce`` / ``loss_cross_nce2`` / ``loss_intra_nce`` (gamma 0.1 included).
"""

from __future__ import annotations

import pytest
import torch

from segexp.methods.ppc import PPC
from segexp.models.backbone import Backbone
from segexp.models.fbr import FBRNet
from tests.conftest import config_inference, config_weights

N, K, D, GRID1, GRID2, VIEW = 2, 20, 8, 24, 16, 32
BG_FIRST = [K, *range(K)]  # release channel order (bg last) -> segexp's (bg first)

RELEASE = {
    "cls_amp": 0.6929870843887329,
    "sal": 0.13907432556152344,
    "er": 0.018502356484532356,
    "ecr": 0.4369094967842102,
    "ppc_cross": 0.30472999811172485,
    "ppc_cross_cam": 0.3051607310771942,
    "ppc_intra": 0.21531926095485687,
}
RELEASE_GRADS = {  # (term, leaf, flat index into the leaf): d term / d leaf
    ("cls_amp", "rv2", 8850): 0.00390625,
    ("cls_amp", "rv2", 8762): 0.00390625,
    ("cls_amp", "cam1", 575): 1.1205409464309923e-05,
    ("sal", "rv2", 10557): 0.00011023332626791671,
    ("sal", "rv2", 8870): 9.791965567274019e-05,
    ("sal", "cam1", 16224): 7.027071842458099e-05,
    ("er", "cam2", 688): -0.0013523474335670471,
    ("er", "cam2", 2019): -0.0010520074283704162,
    ("er", "cam1", 19953): -0.0008482345729134977,
    ("ecr", "rv2", 7361): -0.006270784884691238,
    ("ecr", "rv1", 16230): -0.006013838574290276,
    ("ecr", "rv1", 20125): -0.0054123359732329845,
    ("ppc_cross", "f2", 2570): -9.345122089143842e-05,
    ("ppc_cross", "f2", 524): -8.594305108999833e-05,
    ("ppc_cross", "f1", 2735): 6.0658352595055476e-05,
    ("ppc_cross_cam", "f2", 3154): 9.525089262751862e-05,
    ("ppc_cross_cam", "f2", 2570): -9.239163773600012e-05,
    ("ppc_cross_cam", "f1", 5783): -6.401362043106928e-05,
    ("ppc_intra", "f2", 3513): -0.00019104103557765484,
    ("ppc_intra", "f2", 3448): -0.00018495375115890056,
    ("ppc_intra", "f1", 6686): -0.0001352373801637441,
}
FAITHFUL = {  # segexp's default (official_quirks: false); not release numbers
    "ecr": 0.4659539461135864,
    "ppc_intra": 0.24556361138820648,
}


def _inputs() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Leaves in the release's layout (background last): CAM and PCM output of view 1 (24 x 24) and
    view 2 (16 x 16), projected features (D = 8), saliency (48 x 48), labels. In view 2, class 3
    (release channel 2, present in image 0 only) wins a single pixel, so the intra-view term meets a
    one-pixel class."""
    g = torch.Generator().manual_seed(0)
    cam1, rv1 = (torch.randn(N, K + 1, GRID1, GRID1, generator=g) for _ in range(2))
    cam2, rv2 = (torch.randn(N, K + 1, GRID2, GRID2, generator=g) for _ in range(2))
    rv2[0, 2] = -1.0
    rv2[0, 2, 3, 5] = 5.0
    rv2[0, 7, 3, 5] = -1.0
    f1, f2 = torch.rand(N, D, GRID1, GRID1, generator=g), torch.rand(N, D, GRID2, GRID2, generator=g)
    saliency = torch.rand(N, 48, 48, generator=g)
    labels = torch.zeros(N, K)
    labels[0, [2, 7]] = 1
    labels[1, [7, 13]] = 1
    leaves = {"cam1": cam1, "rv1": rv1, "cam2": cam2, "rv2": rv2, "f1": f1, "f2": f2}
    return {k: v.requires_grad_() for k, v in leaves.items()}, saliency, labels


def _method(official_quirks: bool) -> PPC:
    torch.manual_seed(0)
    net = FBRNet(
        Backbone("resnet18", output_stride=8),
        num_classes=K + 1,
        background_first=True,
        pcm={},
        fbr={"dim": D, "background": False},
        dropout=0.0,
    )
    names = [str(i) for i in range(K + 1)]
    return PPC(
        model=net,
        num_classes=K + 1,
        class_names=names,
        schedule={},
        weights=config_weights("method=ppc"),
        view_size=VIEW,
        contrast_size=GRID2,
        official_quirks=official_quirks,
        inference=config_inference("method=ppc"),
    )


def _losses(official_quirks: bool):
    """segexp's PPC terms on :func:`_inputs` (the release's defaults: method=ppc's)."""
    x, saliency, labels = _inputs()
    method = _method(official_quirks)
    views = tuple(
        {"cam": x[f"cam{v}"][:, BG_FIRST], "cam_rv": x[f"rv{v}"][:, BG_FIRST], "f_proj": x[f"f{v}"]}
        for v in (1, 2)
    )
    batch = {"labels": labels, "saliency": saliency}
    grids = method.contrast_grids(views, labels)
    torch.manual_seed(123)  # the hard-pixel sampling draws, as on the release side
    losses = method.base_losses(views, batch, grids)
    losses["cls_amp"] = losses.pop("cls") + losses.pop("amp")
    return losses, x


def test_method_ppc_defaults_are_the_releases():
    method = _method(False)
    assert method.tap_threshold is None and method.mask_background is False
    assert (method.bg_score, method.top_fraction, method.temperature) == (0.10, 1 / 16, 0.1)
    assert method.intra == {"skip": 3, "negatives": 10, "pixel_fraction": 0.5, "pixel_pool": 0.6}
    assert {k: method.weights[k] for k in ("ppc_cross", "ppc_cross_cam", "ppc_intra")} == {
        "ppc_cross": 0.1,
        "ppc_cross_cam": 0.1,
        "ppc_intra": 0.1,
    }


def test_every_term_and_its_gradients_match_the_release_with_official_quirks():
    losses, x = _losses(official_quirks=True)
    assert set(losses) == set(RELEASE)
    for term, expected in RELEASE.items():
        assert losses[term].item() == pytest.approx(expected, rel=1e-6, abs=1e-7), term
    for term in RELEASE:
        entries = {(leaf, i): v for (t, leaf, i), v in RELEASE_GRADS.items() if t == term}
        grads = torch.autograd.grad(losses[term], list(x.values()), retain_graph=True, allow_unused=True)
        by_leaf = dict(zip(x, grads))
        for (leaf, i), expected in entries.items():
            got = by_leaf[leaf].flatten()[i].item()
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-9), (term, leaf, i)


def test_faithful_mode_differs_from_the_release_only_in_ecr_and_the_intra_view_term():
    losses, _ = _losses(official_quirks=False)
    for term, expected in RELEASE.items():
        if term in FAITHFUL:
            assert losses[term].item() == pytest.approx(FAITHFUL[term], rel=1e-6), term
            assert losses[term].item() != pytest.approx(expected, rel=1e-3), term
        else:
            assert losses[term].item() == pytest.approx(expected, rel=1e-6, abs=1e-7), term


# -- FBR's variant of the PPC base (method=ppc_fbr) against XuYin94/FBR@fd1aeb85 ---------------------
# Release numbers: FBR's module/train.py:get_contrast_loss run on _inputs() (cam_rv1/2, fg feats f1/f2,
# gamma 0.10, bg_thres 0.10, as contrast_train calls it), 2026-12-04, torch 2.14.1, CPU (.cuda() made a
# no-op; its FG-reco and memory-bank terms replaced by 0, the two cross terms read from its locals), and
# util/imutils.py:ThresholdedAvgPool2d(0.10) on _tap_inputs(). Gradients: the two largest |d/d leaf|.
RELEASE_FBR = {"ppc_cross": 0.16453677415847778, "ppc_cross_cam": 0.1649780124425888}
RELEASE_FBR_GRADS = {
    ("ppc_cross", "f1", 671): -4.660531703848392e-05,
    ("ppc_cross", "f1", 1131): -4.3700041715055704e-05,
    ("ppc_cross", "f2", 2570): -9.278790821554139e-05,
    ("ppc_cross", "f2", 548): -8.533229265594855e-05,
    ("ppc_cross_cam", "f1", 5783): -6.363758438965306e-05,
    ("ppc_cross_cam", "f1", 5780): -5.5654487368883565e-05,
    ("ppc_cross_cam", "f2", 268): -7.187142909970134e-05,
    ("ppc_cross_cam", "f2", 292): -6.707172724418342e-05,
}
RELEASE_TAP = [
    [-0.018519967794418335, -1.2437059879302979, -0.2817143201828003, 2.1778781414031982],
    [-0.9915598630905151, -0.4677547216415405, -0.8866826295852661, 0.7081931829452515],
]


def _tap_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Features (2, 6, 5, 7) with a channel that has no positive value and one that is all 0, and a
    1x1 classifier weight (4, 6, 1, 1)."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 6, 5, 7, generator=g)
    feats[0, 2] = -torch.rand(5, 7, generator=g)
    feats[1, 4] = 0.0
    return feats, torch.randn(4, 6, 1, 1, generator=g)


def test_fbr_variant_cross_terms_mask_the_background_as_the_fbr_release():
    """PPC's cross-view terms with background pixels masked out (still divided by all pixels), on
    FBR's settings under official_quirks: the release's values and gradients, and not PPC's."""
    from segexp.losses.ppc import ppc_contrast_losses
    from segexp.methods.ppc import PPCasFBR

    x, _, labels = _inputs()
    torch.manual_seed(0)
    net = FBRNet(Backbone("resnet18", output_stride=8), num_classes=K + 1, background_first=True, pcm={},
                 fbr={"dim": D, "background": False}, dropout=0.0)  # fmt: skip
    method = PPCasFBR(model=net, num_classes=K + 1, class_names=[str(i) for i in range(K + 1)], schedule={},
                      weights=config_weights("method=ppc_fbr"), view_size=VIEW, contrast_size=GRID2,
                      official_quirks=True, inference=config_inference("method=ppc_fbr"))  # fmt: skip
    assert method.mask_background and method.tap_threshold == pytest.approx(0.10)
    views = tuple({"cam": x[f"cam{v}"][:, BG_FIRST], "cam_rv": x[f"rv{v}"][:, BG_FIRST], "f_proj": x[f"f{v}"]}
                  for v in (1, 2))  # fmt: skip
    grids = method.contrast_grids(views, labels)
    cross, cross_cam = ppc_contrast_losses(grids[0], grids[1], method.temperature, method.mask_background)
    terms = {"ppc_cross": method.weights["ppc_cross"] * cross,
             "ppc_cross_cam": method.weights["ppc_cross_cam"] * cross_cam}  # fmt: skip
    for term, expected in RELEASE_FBR.items():
        assert terms[term].item() == pytest.approx(expected, rel=1e-6), term
        assert abs(terms[term].item() - RELEASE[term]) > 0.1  # PPC's unmasked value is far off
        grads = torch.autograd.grad(terms[term], [x["f1"], x["f2"]], retain_graph=True)
        by_leaf = dict(zip(("f1", "f2"), grads))
        for (t, leaf, i), want in RELEASE_FBR_GRADS.items():
            if t == term:
                got = by_leaf[leaf].flatten()[i].item()
                assert got == pytest.approx(want, rel=1e-5, abs=1e-9), (term, leaf, i)


def test_thresholded_average_pooling_is_the_fbr_release():
    """TAP (0.10): per channel the mean of the values above 0.10 x its max, a channel with none giving 0."""
    from segexp.losses.ppc import tap_logits

    feats, weight = _tap_inputs()
    # the release divides every pixel by the count before its 1x1 conv: equal to float rounding
    expected = [pytest.approx(row, rel=1e-5, abs=1e-7) for row in RELEASE_TAP]
    assert tap_logits(feats, weight, 0.10).tolist() == expected
