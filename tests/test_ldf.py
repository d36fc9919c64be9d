"""LDF: label decoupling on a worked mask, the stage cache, forward shapes, loss, schedule, ablation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segexp.data import decouple as dec
from segexp.losses.ldf import LDFLoss, iou_loss
from segexp.methods.ldf import edge_band, triangular_factor
from segexp.models.backbone import Backbone
from segexp.models.ldf import LDFNet
from segexp.stages.ldf_maps import LDFLabels


def _worked_mask() -> np.ndarray:
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 3:13] = 255  # 8 x 10 rectangle
    return m


def test_released_decoupling_on_a_worked_mask():
    mask = _worked_mask()
    body, detail = dec.split_map_code(mask)
    assert body.dtype == np.uint8 and detail.dtype == np.uint8
    # 5x5 blur spreads the mask 2 px; the L2 distance of the blurred mask to its zeros along the
    # middle row is 0 1 2 3 4 5 6 6 6 6 5 4 3 2 1 0, and body = floor(sqrt(d) / sqrt(6) * 255)
    profile = [0, 104, 147, 180, 208, 232, 255, 255, 255, 255, 232, 208, 180, 147, 104, 0]
    assert body[8].tolist() == profile
    assert profile[1:7] == [math.floor(math.sqrt(d) / math.sqrt(6) * 255) for d in range(1, 7)]
    # halo: body > 0 on the two rings outside the mask, where mask - body < 0 is clipped to 0
    outside = mask == 0
    assert body[2, 1] == 104 and body[3, 2] == 147 and mask[2, 1] == 0 and mask[3, 2] == 0
    assert (body[outside] > 0).sum() > 0 and (detail[outside] == 0).all()
    # inside, detail = 255 - body; the first interior pixel already has body 180 (sqrt profile)
    inside = mask > 0
    np.testing.assert_array_equal(detail[inside], 255 - body[inside])
    assert body[8, 3] == 180 and detail[8, 3] == 75 and detail[8, 7] == 0
    # float / bool masks give the same maps
    b2, d2 = dec.split_map_code(mask > 0)
    np.testing.assert_array_equal(b2, body)
    np.testing.assert_array_equal(d2, detail)


# weijun88/LDF@d49ff024c528a6e2bfea0021120df0a3df716049 utils.py:split_map on _soft_mask() written to and
# read back from PNG (cv2.imread(.., 0)); body / detail as its cv2.imwrite stores them (uint8, saturated)
RELEASE_SOFT_BODY_ROW9 = [0, 0, 90, 127, 156, 180, 201, 217, 231, 248, 254, 255, 254, 248, 231, 217, 201, 180,
                          156, 127, 90, 0]
RELEASE_SOFT_DETAIL_ROW9 = [0, 0, 0, 0, 0, 0, 0, 0, 24, 7, 1, 0, 1, 7, 24, 0, 0, 0, 0, 0, 0, 0]
RELEASE_SOFT_BODY_ROW0 = [156, 127, 90] + [0] * 19
RELEASE_SOFT_SUMS = {"body": 37382, "detail": 682, "body_px": 246, "detail_px": 32}


def _soft_mask() -> np.ndarray:
    """18 x 22 uint8: an ellipse with a grey ramp on its boundary and one faint pixel (40) at (0, 0)."""
    yy, xx = np.mgrid[0:18, 0:22]
    r = np.hypot(yy - 9.0, (xx - 11.0) / 1.3)
    m = np.clip((4.0 - r) * 80 + 128, 0, 255).round().astype(np.uint8)
    m[0, 0] = 40
    return m


@pytest.mark.parametrize("as_float", [False, True])
def test_raw_soft_masks_reproduce_the_released_split_map(as_float):
    mask = _soft_mask()
    body, detail = dec.split_map_code(mask / 255.0 if as_float else mask, soft_masks="raw")
    assert body[9].tolist() == RELEASE_SOFT_BODY_ROW9 and detail[9].tolist() == RELEASE_SOFT_DETAIL_ROW9
    assert body[0].tolist() == RELEASE_SOFT_BODY_ROW0  # the faint pixel is foreground for the release
    sums = {"body": int(body.sum()), "detail": int(detail.sum()),
            "body_px": int((body > 0).sum()), "detail_px": int((detail > 0).sum())}
    assert sums == RELEASE_SOFT_SUMS
    # the default cuts the mask at 0.5 first (the paper's binary mask): other maps
    b0, d0 = dec.split_map_code(mask / 255.0 if as_float else mask)
    np.testing.assert_array_equal(b0, dec.split_map_code(mask > 127)[0])
    assert b0[0].tolist() == [0] * 22 and np.abs(b0.astype(int) - body).max() == 156
    assert np.abs(d0.astype(int) - detail).max() == 83
    with pytest.raises(ValueError, match="soft_masks"):
        dec.decouple(mask, "code", "nope")


def test_wrapper_decouples_raw_soft_masks_when_told(tmp_path):
    class Reader(torch.utils.data.Dataset):
        name = "soft"

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": np.zeros((18, 22, 3), np.uint8), "saliency": _soft_mask() / 255.0,
                    "meta": {"id": "s"}}

    raw = LDFLabels(Reader(), source="code", cache_dir=tmp_path, soft_masks="raw")[0]
    assert np.rint(raw["body"][9] * 255).astype(int).tolist() == RELEASE_SOFT_BODY_ROW9
    assert np.rint(raw["detail"][9] * 255).astype(int).tolist() == RELEASE_SOFT_DETAIL_ROW9
    cut = LDFLabels(Reader(), source="code", cache_dir=tmp_path)[0]
    assert cut["body"][0, 0] == 0 and raw["body"][0, 0] > 0


def test_paper_decoupling_has_no_halo_and_a_linear_profile():
    mask = _worked_mask()
    body, detail = dec.split_map_paper(mask)
    assert (body[mask == 0] == 0).all()
    assert body[8].tolist()[3:7] == [63, 127, 191, 255]  # distance 1..4, linear
    np.testing.assert_array_equal(detail.astype(int) + body, mask.astype(int))
    band = dec.edge_map(mask)
    assert band[8].tolist() == [0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0]
    t = torch.from_numpy(mask > 0).float()[None, None]
    np.testing.assert_array_equal(edge_band(t)[0, 0].numpy() * 255, band)


def test_wrapper_maps_survive_augmentation_and_the_stage_cache(tmp_path, monkeypatch):
    body, detail = dec.split_map_code(_worked_mask())

    class Reader(torch.utils.data.Dataset):
        name = "worked"
        stems = ["a"]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": np.zeros((16, 16, 3), np.uint8), "saliency": _worked_mask() / 255.0,
                    "meta": {"id": "a"}}

    first = LDFLabels(Reader(), source="code", cache_dir=tmp_path)[0]
    np.testing.assert_allclose(first["body"] * 255, body, atol=1e-4)
    np.testing.assert_allclose(first["detail"] * 255, detail, atol=1e-4)
    # the declared float maps move with the image: a horizontal flip flips them, 0 where padded
    import albumentations as A

    from segexp.data.transforms import SampleTransform

    ops = [A.HorizontalFlip(p=1.0), A.PadIfNeeded(20, 20, border_mode=0, position="top_left")]
    out = SampleTransform(ops, extra_maps=LDFLabels.map_kinds)(first)
    np.testing.assert_allclose(out["body"][:16, :16].numpy() * 255, body[:, ::-1], atol=1e-4)
    np.testing.assert_allclose(out["detail"][:16, :16].numpy() * 255, detail[:, ::-1], atol=1e-4)
    assert out["body"].dtype == torch.float32 and out["body"][16:].abs().sum() == 0
    import segexp.stages.ldf_maps as ldf_maps

    monkeypatch.setattr(ldf_maps, "decouple", lambda *a, **k: pytest.fail("cache miss"))  # the name it calls
    again = LDFLabels(Reader(), source="code", cache_dir=tmp_path)[0]  # served from the cache
    for key in dec.MAP_KEYS:
        np.testing.assert_array_equal(again[key], first[key])
    # another decoupling is another cache directory
    assert LDFLabels(Reader(), source="paper", cache_dir=tmp_path).cache.dir != \
        LDFLabels(Reader(), source="code", cache_dir=tmp_path).cache.dir
    raw = LDFLabels(Reader(), source="code", cache_dir=tmp_path, soft_masks="raw")
    assert raw.cache.dir != LDFLabels(Reader(), source="code", cache_dir=tmp_path).cache.dir
    assert LDFLabels(Reader(), source="code", cache_dir=tmp_path, soft_masks="threshold").cache.dir == \
        LDFLabels(Reader(), source="code", cache_dir=tmp_path).cache.dir  # the default keeps its cache
    with pytest.raises(ValueError, match="soft_masks"):
        LDFLabels(Reader(), source="code", cache_dir=tmp_path, soft_masks="nope")
    with pytest.raises(ValueError, match="coarse_ckpt"):
        LDFLabels(Reader(), source="coarse", cache_dir=tmp_path)


def test_forward_shapes():
    net = LDFNet(Backbone("resnet18", out_indices=[1, 2, 3, 4]), channels=16).eval()
    with torch.no_grad():
        for size in (64, 72):  # 72: stride-32 sizes do not divide evenly, feedback is resized
            outs = net(torch.randn(1, 3, size, size))
            assert len(outs) == 6
            assert all(o.shape == (1, 1, size, size) for o in outs)
        assert net(torch.randn(1, 3, 64, 64), shape=(40, 50))[-1].shape == (1, 1, 40, 50)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.body.conv1.weight", "backbone.body.bn1.weight", "backbone.body.bn1.bias"}


def test_loss_terms_and_iou():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    expected = 1 - (inter + 1) / ((p + target).sum() - inter + 1)  # train.py: iou_loss
    assert iou_loss(logits, target).item() == pytest.approx(expected.item())
    outs = [torch.randn(2, 1, 8, 8) for _ in range(6)]
    tgt = {k: torch.rand(2, 1, 8, 8) for k in ("branch1", "branch2", "saliency")}
    terms = LDFLoss()(outs, tgt)
    assert set(terms) == {"body", "detail", "sal_bce", "sal_iou"}
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = 0.5 * (bce(outs[0], tgt["branch1"]) + bce(outs[3], tgt["branch1"]))
    assert terms["body"].item() == pytest.approx(want.item(), rel=1e-6)


def test_triangular_schedule():
    assert [round(triangular_factor(e, 3), 3) for e in range(3)] == [0.5, 1.0, 0.5]
    f = [triangular_factor(e, 48) for e in range(48)]
    assert max(f) == pytest.approx(1 - 1 / 49) and f[0] == pytest.approx(2 / 49)


@pytest.mark.slow
def test_ldf_trains_on_shapes_sod_and_beats_a_constant_map(data_dir, tmp_path):
    from tests.test_cas import train_short

    metrics, const = train_short("ldf_shapes_sod", data_dir, tmp_path)
    print("LDF", {k: metrics[f"test/{k}"] for k in ("MAE", "S")}, "constant", const)
    assert metrics["test/MAE"] < const["MAE"]
    assert metrics["test/S"] > const["S"]


# Release numbers: weijun88/LDF@d49ff024 train-coarse/train.py (iou_loss, lines 18-23, and the loss lines
# 57-64) run on _release_inputs(), 2026-12-04, torch 2.14.1, CPU. Gradients: d loss / d out1 and out2.
RELEASE_LDF = {"lossb1": 0.9821397066116333, "lossd1": 1.044958472251892, "loss1": 2.006826162338257,
               "lossb2": 1.0837228298187256, "lossd2": 1.0853140354156494, "loss2": 2.019054412841797,
               "loss": 4.1110076904296875}  # fmt: skip
RELEASE_LDF_GRADS = {  # (output index, flat index): d loss / d output
    (2, 73): -0.002156337955966592,
    (2, 38): -0.0021553440019488335,
    (2, 130): 0.001995871774852276,
    (5, 27): -0.0021857907995581627,
    (5, 6): -0.002185340039432049,
    (5, 130): 0.0014739955076947808,
}


def _release_inputs():
    """Six seeded logit maps (B 2), soft body / detail targets, and a binary mask whose second image is
    empty (the IoU's +1 smoothing decides that image)."""
    g = torch.Generator().manual_seed(7)
    outs = [torch.randn(2, 1, 12, 10, generator=g) * 2 for _ in range(6)]
    body, detail = torch.rand(2, 1, 12, 10, generator=g), torch.rand(2, 1, 12, 10, generator=g)
    mask = (torch.rand(2, 1, 12, 10, generator=g) > 0.6).float()
    mask[1] = 0.0
    return outs, {"branch1": body, "branch2": detail, "saliency": mask}


def test_loss_terms_and_gradients_match_the_release_numbers():
    """Body + detail + saliency BCE + per-image IoU on both iterations, halved: the release's values."""
    outs, targets = _release_inputs()
    outs = [o.requires_grad_() for o in outs]
    terms = LDFLoss()(outs, targets)
    rel = RELEASE_LDF
    assert terms["body"].item() == pytest.approx((rel["lossb1"] + rel["lossb2"]) / 2, rel=1e-6)
    assert terms["detail"].item() == pytest.approx((rel["lossd1"] + rel["lossd2"]) / 2, rel=1e-6)
    saliency = terms["sal_bce"] + terms["sal_iou"]
    assert saliency.item() == pytest.approx((rel["loss1"] + rel["loss2"]) / 2, rel=1e-6)
    total = sum(terms.values())
    assert total.item() == pytest.approx(rel["loss"], rel=1e-6)
    grads = torch.autograd.grad(total, [outs[2], outs[5]])
    for (which, i), want in RELEASE_LDF_GRADS.items():
        assert grads[0 if which == 2 else 1].flatten()[i].item() == pytest.approx(want, rel=1e-5, abs=1e-9)
