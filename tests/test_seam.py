"""SEAM: loss terms on hand-made tensors, PCM propagation, gradient routing, ResNet-38 weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segexp.losses.seam import (
    adaptive_min_pooling_loss,
    er_loss,
    max_norm,
    max_onehot,
    ohem_mean,
    with_background,
)
from segexp.models.pcm import pcm_affinity, pcm_input, pcm_propagate
from tests.conftest import config_inference, config_weights


def _down(x, size):
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


def test_er_is_zero_for_an_equivariant_map_and_positive_otherwise():
    # Linear ramps: bilinear rescaling (align_corners=True) samples them exactly and keeps min/max,
    # so F(x) = ramp is equivariant to A and A(max_norm(F(I))) == max_norm(F(A(I))).
    h = w = 41
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    cam = torch.stack([xx, yy, xx + 2 * yy, 0.5 * xx + yy])[None]  # (1, 4, h, w), ch 0 = bg
    small = (13, 13)
    y_o = _down(max_norm(cam), small)
    yy2, xx2 = torch.meshgrid(torch.linspace(0, 1, 13), torch.linspace(0, 1, 13), indexing="ij")
    cam_small = torch.stack([xx2, yy2, xx2 + 2 * yy2, 0.5 * xx2 + yy2])[None]
    y_t = max_norm(cam_small)
    assert er_loss(y_o, y_t) < 1e-5
    shifted = max_norm(torch.roll(cam_small, 3, dims=-1))
    assert er_loss(y_o, shifted) > 1e-2


def test_ohem_keeps_exactly_the_top_20_percent():
    torch.manual_seed(0)
    err = torch.rand(2, 21, 4, 5, requires_grad=True)  # 420 elements per sample -> k = 84
    loss = ohem_mean(err, 0.2)
    k = int(21 * 4 * 5 * 0.2)
    expect = torch.stack([e.flatten().sort(descending=True)[0][:k].mean() for e in err.detach()]).mean()
    assert torch.allclose(loss, expect)
    loss.backward()
    assert [(g != 0).sum().item() for g in err.grad] == [k, k]  # gradient only on the kept elements
    kept = err.grad[0] != 0
    assert err[0][kept].min() >= err[0][~kept].max()


def test_max_onehot_and_background_do_not_mutate_inputs():
    x = torch.tensor([[0.9, 0.2, 0.7, 0.1]]).T.reshape(1, 4, 1, 1).repeat(1, 1, 2, 2)
    before = x.clone()
    y = max_onehot(with_background(x))
    assert torch.equal(x, before)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.3, 0.0, 0.7, 0.0]))


def test_pcm_columns_sum_to_one_and_reproduce_a_hand_computed_propagation():
    # three pixels: 0 and 1 share a feature direction, 2 is orthogonal
    feats = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]).reshape(1, 2, 1, 3)
    aff = pcm_affinity(feats)[0]
    assert torch.allclose(aff.sum(0), torch.ones(3), atol=1e-4)
    assert torch.allclose(aff, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), atol=1e-4)
    cam = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).reshape(1, 2, 1, 3)
    out = pcm_propagate(cam, feats)
    assert torch.allclose(out.reshape(2, 3), torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), atol=1e-4)
    # chunked == dense
    torch.manual_seed(0)
    f, c = torch.randn(2, 8, 6, 7), torch.rand(2, 5, 6, 7)
    assert torch.allclose(pcm_propagate(c, f, chunk_size=5), pcm_propagate(c, f), atol=1e-5)


def test_pcm_input_normalisation_matches_the_released_block():
    cam = torch.tensor([[-1.0, 2.0], [4.0, 1.0], [2.0, 3.0]]).reshape(1, 3, 1, 2)  # bg, fg1, fg2
    out = pcm_input(cam)
    # released: relu, /max (+1e-5), bg = 1 - max fg, non-max fg zeroed
    fg1 = torch.tensor([4.0, 1.0]) / (4 + 1e-5)
    fg2 = torch.tensor([2.0, 3.0]) / (3 + 1e-5)
    fgmax = torch.maximum(fg1, fg2)
    expect = torch.stack([1 - fgmax, torch.where(fg1 < fgmax, 0, fg1), torch.where(fg2 < fgmax, 0, fg2)])
    assert torch.allclose(out.reshape(3, 2), expect, atol=1e-4)
    assert not out.requires_grad


def test_adaptive_min_pooling_uses_the_lowest_quarter():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) - 2.0  # lowest 4: -2, -1, 0, 1 -> relu sum = 1
    assert torch.isclose(adaptive_min_pooling_loss(x), torch.tensor(1.0 / 4))


@pytest.fixture(scope="module")
def seam_method():
    from segexp.methods.seam import SEAM
    from segexp.models.backbone import Backbone
    from segexp.models.cam_head import CAMNet

    torch.manual_seed(0)
    backbone = Backbone("resnet18", pretrained=False, output_stride=8, freeze_bn=True)
    model = CAMNet(
        backbone,
        num_classes=4,
        background_first=True,
        pcm_taps=(2, 3),
        pcm={"tap_dims": (8, 16), "out_dim": 12},
    )
    sched = {"optimizer": None, "lr_mult": {}, "scheduler": {}}
    return SEAM(model=model, num_classes=4, class_names=["bg", "a", "b", "c"], schedule=sched,
                weights=config_weights("method=seam"), inference=config_inference("method=seam"))


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def _nonzero(grads):
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("term", ["ecr", "amp"])
def test_ecr_and_amp_train_only_the_pcm(seam_method, term):
    m = seam_method
    m.train()
    m.zero_grad(set_to_none=True)
    batch = {"image": torch.randn(2, 3, 64, 64), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    losses = m.compute_losses(batch)
    assert set(losses) == {"cls", "amp", "er", "ecr"}
    losses[term].backward()
    assert not _nonzero(_grads(m.model.backbone))
    assert not _nonzero(_grads(m.model.head))
    assert _nonzero(_grads(m.model.pcm))


def test_cls_and_er_train_backbone_and_fc8_never_its_background_channel(seam_method):
    m = seam_method
    m.train()
    m.zero_grad(set_to_none=True)
    batch = {"image": torch.randn(2, 3, 64, 64), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    losses = m.compute_losses(batch)
    (losses["cls"] + losses["er"]).backward()
    assert _nonzero(_grads(m.model.backbone))
    w = m.model.head.classifier.weight.grad
    assert w[1:].abs().sum() > 0 and w[0].abs().sum() == 0
    assert not _nonzero(_grads(m.model.pcm))


def test_pcm_inference_at_scale_2_is_chunked(seam_method):
    m = seam_method.eval()
    with torch.no_grad():
        out = m.multiscale_cams(torch.randn(1, 3, 40, 52), torch.tensor([[1.0, 0, 1]]), scales=(1.0, 2.0))
    assert out.shape == (1, 3, 40, 52) and out[0, 1].abs().sum() == 0
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert m.model.pcm.chunk_size == 2048


def test_inference_upsamples_twice_as_released(seam_method):
    """infer_SEAM: the network returns the PCM map at its input's size (align_corners=True); the
    pass is then resized to the original size with align_corners=False. Not once from the grid."""
    import torch.nn.functional as F

    m = seam_method.eval()
    image = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        half = F.interpolate(image, (24, 20), mode=m.resize_mode, align_corners=False)
        grid = m(half)["cam_rv"][:, 1:]
        twice = F.interpolate(
            F.interpolate(grid, (24, 20), mode="bilinear", align_corners=True),
            (48, 40), mode="bilinear", align_corners=False,
        )  # fmt: skip
        once = F.interpolate(grid, (48, 40), mode="bilinear", align_corners=False)
        got = m.multiscale_cams(image, scales=(0.5,), flip=False)
    from segexp.methods.cam import normalise_cams

    assert torch.allclose(got, normalise_cams(twice, m.cam_norm), atol=1e-6)
    assert not torch.allclose(got, normalise_cams(once, m.cam_norm), atol=1e-3)


def test_resnet38d_loads_a_converted_state_dict(tmp_path):
    from segexp.models.resnet38d import ResNet38d, build_backbone

    torch.manual_seed(0)
    full = ResNet38d(num_classes=10)  # psa key names + a classifier the features model lacks
    sd = full.state_dict()
    assert "conv1a.weight" in sd and "b4_5.conv_branch2b1.weight" in sd and "b7.conv_branch2b2.weight" in sd
    path = tmp_path / "resnet38d.pth"
    torch.save(sd, path)
    del full
    bb = build_backbone(pretrained=str(path), output_stride=8, frozen_stages=1, freeze_bn=True)
    assert sorted(bb.weights_report.unexpected) == ["fc.bias", "fc.weight"] and not bb.weights_report.missing
    assert torch.equal(bb.body.state_dict()["b6.conv_branch1.weight"], sd["b6.conv_branch1.weight"])
    assert bb.out_channels == [128, 256, 512, 1024, 4096] and bb.output_stride == 8
    assert (
        not bb.body.b2_2.conv_branch2a.weight.requires_grad and bb.body.b3.conv_branch2a.weight.requires_grad
    )
    bb.train()
    assert not bb.body.b5.bn_branch2a.training
    del sd
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 4, 4]
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone(output_stride=16)


# Release numbers: YudeWang/SEAM@3212261b9d008581576b8b5429e32413d892c10b infer_SEAM.py:72-77 (the
# normalisation of ``sum_cam``: negatives to 0, values below min + 1e-5 to 0, then
# (s - min - 1e-5) / (max - min + 1e-5)), run on :func:`_summed_cam` (channels 0, 1, 2).
SEAM_RELEASE_NORM = [
    [[-4.956049673472289e-06, -4.956049673472289e-06, -4.956049673472289e-06, 0.49535684508990113],
     [-4.956049673472289e-06, -4.956049673472289e-06, -4.956049673472289e-06, -4.956049673472289e-06],
     [-4.956049673472289e-06, 0.7551144447691545, 0.16040282844133869, 0.999990087900653]],
    [[0.987350380971184, 0.015861261169280744, 0.5496978625633995, 0.6593332262534815],
     [0.5834691126558229, 0.2599468871986285, 0.0018629625458043474, 0.22142799150168513],
     [-0.7132288188856611, 0.0600010128814144, 0.9999917761840074, 0.9012018447633298]],
    [[-1.0] * 4] * 3,
]


def _summed_cam() -> torch.Tensor:
    """A summed CAM (1, 3, 3, 4): channel 0 with negatives (min 0 after ReLU), channel 1 all
    positive (min > 0), channel 2 label-masked to 0 (an absent class)."""
    g = torch.Generator().manual_seed(0)
    cam = torch.randn(1, 3, 3, 4, generator=g, dtype=torch.float64)
    cam[0, 1] += 3.0
    cam[0, 2] = 0.0
    return cam


def test_cam_norm_minmax_release_reproduces_infer_seam_and_minmax_clamps_the_minimum():
    from segexp.methods.cam import normalise_cams

    release = torch.tensor(SEAM_RELEASE_NORM, dtype=torch.float64)[None]
    cam = _summed_cam()
    torch.testing.assert_close(normalise_cams(cam, "minmax_release"), release, rtol=0, atol=1e-12)
    # the default min-max maps each channel's minimum to 0 (and an absent class to 0, not -1);
    # every other pixel is the release's value
    ours = normalise_cams(cam, "minmax")
    torch.testing.assert_close(ours, release.clamp(min=0), rtol=0, atol=1e-12)
    assert (ours - release).abs().max().item() == pytest.approx(1.0)  # the absent class
    assert release[0, 1].min().item() == pytest.approx(-0.7132288188856611)  # min > 0: far below 0
    assert ours.flatten(2).amin(-1).tolist() == [[0.0, 0.0, 0.0]]
    # training's max_norm (tool/visualization.py) clamps too: it is the default's arithmetic
    torch.testing.assert_close(max_norm(cam), ours, rtol=0, atol=1e-12)
