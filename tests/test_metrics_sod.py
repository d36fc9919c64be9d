"""SOD metrics: hand-computed tiny cases and agreement with py_sod_metrics 1.6.2 to 1e-6."""

from __future__ import annotations

import warnings

import numpy as np
import py_sod_metrics as psm
import pytest
import torch

from segexp.metrics.sod import SODMetrics, sod_per_image, summarise

KEYS = ("MAE", "maxF", "meanF", "adpF", "S", "maxE", "meanE", "adpE", "wF")


def reference(preds, gts, normalize=True) -> dict:
    """What PySODEvalToolkit reports, from the reference classes, plus its curves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure's deprecation notice
        fm, mae, sm = psm.Fmeasure(), psm.MAE(), psm.Smeasure()
        em, wfm = psm.Emeasure(), psm.WeightedFmeasure()
        for p, g in zip(preds, gts):
            for m in (fm, mae, sm, em, wfm):
                m.step(p, g, normalize=normalize)
    f, e = fm.get_results(), em.get_results()["em"]
    p, r = f["pr"]["p"], f["pr"]["r"]
    num = 1.3 * p * r
    return {
        "MAE": mae.get_results()["mae"], "maxF": f["fm"]["curve"].max(), "meanF": f["fm"]["curve"].mean(),
        "adpF": f["fm"]["adp"], "S": sm.get_results()["sm"], "maxE": e["curve"].max(),
        "meanE": e["curve"].mean(), "adpE": e["adp"], "wF": wfm.get_results()["wfm"],
        "maxF_pr": (num / np.where(num == 0, 1, 0.3 * p + r)).max(),
        "f_curve": f["fm"]["curve"][::-1], "e_curve": e["curve"][::-1], "p": p[::-1], "r": r[::-1],
    }


def ours(preds, gts, batch=4) -> dict:
    m = SODMetrics()
    for i in range(0, len(preds), batch):
        m.update(torch.from_numpy(np.stack(preds[i:i + batch])), torch.from_numpy(np.stack(gts[i:i + batch])))
    return m.compute()


def assert_agree(preds, gts, normalize=True, tol=1e-6):
    ref, got = reference(preds, gts, normalize), ours(preds, gts)
    for k in (*KEYS, "maxF_pr"):
        assert got[k] == pytest.approx(float(ref[k]), abs=tol), k
    assert np.abs(got["f_curve"].numpy() - ref["f_curve"]).max() < tol
    assert np.abs(got["e_curve"].numpy() - ref["e_curve"]).max() < tol
    assert np.abs(got["precision"].numpy() - ref["p"]).max() < tol
    assert np.abs(got["recall"].numpy() - ref["r"]).max() < tol
    return got


def _blobs(rng, n, h=36, w=44):
    gts, preds = [], []
    yy, xx = np.ogrid[:h, :w]
    for _ in range(n):
        cy, cx, r = rng.integers(5, h - 5), rng.integers(5, w - 5), rng.integers(3, 15)
        g = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8) * 255
        preds.append(np.clip(g * rng.uniform(0.2, 0.9) + rng.random((h, w)) * rng.uniform(20, 200), 0, 255)
                     .astype(np.uint8))
        gts.append(g)
    return preds, gts


# ----------------------------------------------------------------------------- hand-computed

def test_hand_computed_2x2():
    gt = torch.tensor([[[True, False], [False, False]]])
    pred = torch.tensor([[[0.8, 0.2], [0.0, 0.0]]], dtype=torch.float64)
    v = sod_per_image(pred, gt)
    assert v["mae"].item() == pytest.approx(0.1)  # (0.2 + 0.2) / 4
    assert v["adpF"].item() == pytest.approx(1.0)  # threshold 2 * 0.25 keeps only the object pixel
    # quantised map: 204, 51, 0, 0 -> thresholds 0 | 1..51 | 52..204 | 205..255
    f0 = 1.3 * 0.25 / (0.3 * 0.25 + 1)
    f1 = 1.3 * 0.5 / (0.3 * 0.5 + 1)
    f = v["f_curve"][0]
    assert f[0].item() == pytest.approx(f0)
    assert f[1].item() == pytest.approx(f1) and f[51].item() == pytest.approx(f1)
    assert f[52].item() == pytest.approx(1.0) and f[204].item() == pytest.approx(1.0)
    assert f[205].item() == 0 and f[255].item() == 0
    r = summarise({k: x.sum(0) for k, x in v.items()}, 1)
    assert r["meanF"] == pytest.approx((f0 + 51 * f1 + 153) / 256)
    assert r["maxF_curve"] == pytest.approx(1.0) and r["maxF_pr"] == pytest.approx(1.0)


def test_perfect_prediction():
    g = np.zeros((10, 12), bool)
    g[2:6, 3:9] = True
    v = sod_per_image(g[None].astype(np.float64), g[None])
    n = g.size
    assert v["mae"].item() == 0
    assert v["S"].item() == pytest.approx(1.0)
    assert v["wF"].item() == pytest.approx(1.0)
    # every pixel aligned: enhanced matrix all ones, sum n, divided by (n - 1) as in the reference
    assert v["e_curve"].max().item() == pytest.approx(n / (n - 1))
    assert v["f_curve"].max().item() == pytest.approx(1.0)


def test_empty_gt_and_full_gt_closed_forms():
    pred = np.full((1, 6, 5), 0.25)
    empty = np.zeros((1, 6, 5), bool)
    v = sod_per_image(pred, empty)
    assert v["S"].item() == pytest.approx(0.75)  # 1 - mean(pred)
    assert v["wF"].item() == 0 and v["adpF"].item() == 0
    v = sod_per_image(pred, ~empty)
    assert v["S"].item() == pytest.approx(0.25)  # mean(pred)
    # all-zero map on empty GT: the adaptive threshold is 0, so every pixel is predicted -> adpE 0
    v = sod_per_image(np.zeros((1, 6, 5)), empty)
    assert v["adpE"].item() == 0
    assert v["e_curve"][0, 1].item() == pytest.approx(30 / 29)  # t >= 1: nothing predicted, all aligned


def test_gt_binarisation_rule():
    gt = np.array([[[128, 129], [0, 255]]], np.uint8)  # > 128 is object, as in the reference
    pred = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    assert sod_per_image(pred, gt)["mae"].item() == 0


# ----------------------------------------------------------------------------- reference agreement

def test_agree_uint8_random():
    rng = np.random.default_rng(0)
    preds, gts = _blobs(rng, 10)
    got = assert_agree(preds, gts)
    assert got["maxF_pr"] >= got["meanF"]


def test_agree_float64_and_float32():
    rng = np.random.default_rng(1)
    preds, gts = _blobs(rng, 6)
    preds64 = [p / 255.0 for p in preds]
    assert_agree(preds64, [g > 128 for g in gts], normalize=False)
    preds32 = [rng.random(p.shape).astype(np.float32) * 0.5 + (g > 128) * np.float32(0.4)
               for p, g in zip(preds, gts)]
    assert_agree(preds32, [g > 128 for g in gts], normalize=False)


def test_agree_edge_cases():
    rng = np.random.default_rng(2)
    h, w = 24, 30
    preds, gts = _blobs(rng, 3, h, w)
    zero, one = np.zeros((h, w), np.uint8), np.full((h, w), 255, np.uint8)
    cases_p = [preds[0], preds[1], zero, one, np.full((h, w), 128, np.uint8), zero, one, preds[2],
               rng.integers(0, 256, (h, w), dtype=np.uint8)]
    cases_g = [zero, one, gts[0], gts[1], gts[2], zero, one, rng.integers(0, 256, (h, w), dtype=np.uint8),
               rng.integers(0, 256, (h, w), dtype=np.uint8)]  # last two: non-binary GT
    assert_agree(cases_p, cases_g)
    # the same on the float path (constant 0, 1 and 0.5 maps)
    fp = [np.full((h, w), v) for v in (0.0, 1.0, 0.5)] + [p / 255.0 for p in preds]
    fg = [gts[0] > 128, np.ones((h, w), bool), np.zeros((h, w), bool), np.ones((h, w), bool),
          np.zeros((h, w), bool), gts[2] > 128]
    assert_agree(fp, fg, normalize=False)


def test_divergence_centroid_on_last_row_is_finite():
    """Documented divergence: GT only on the last row -> an empty quadrant; reference gives NaN."""
    g = np.zeros((8, 8), bool)
    g[7, 2:6] = True
    p = np.random.default_rng(3).random((8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = psm.Smeasure()
        sm.step(p, g, normalize=False)
    v = sod_per_image(p[None], g[None])["S"].item()
    assert np.isfinite(v) and 0 <= v <= 1
    assert np.isnan(sm.get_results()["sm"])


def test_batch_split_and_inputs_shapes_equivalent():
    rng = np.random.default_rng(4)
    preds, gts = _blobs(rng, 5)
    a = ours(preds, gts, batch=5)
    b = ours(preds, gts, batch=2)
    for k in KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-12)
    v1 = sod_per_image(torch.from_numpy(np.stack(preds))[:, None], torch.from_numpy(np.stack(gts))[:, None])
    v2 = sod_per_image(np.stack(preds), np.stack(gts))
    assert torch.equal(v1["S"], v2["S"])


def test_bad_inputs():
    with pytest.raises(ValueError):
        sod_per_image(np.full((1, 4, 4), 1.5), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError):
        sod_per_image(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), bool))
