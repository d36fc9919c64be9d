"""CAS loss: hand-computed values and gradients, permutation invariance, official parity, bounds;
the CAS method trains on shapes_sod and beats a constant map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segexp.losses.cas import CASLoss, cas_loss_official, cas_loss_paper


def _probs_1x4(values):
    """One image, 1x4 pixels, 2 channels: channel 1 = values, channel 0 = 1 - values."""
    s1 = torch.tensor(values, dtype=torch.float64).view(1, 1, 1, 4)
    return torch.cat([1 - s1, s1], dim=1)


def test_paper_value_and_gradient_on_a_hand_computed_partition():
    probs = _probs_1x4([0.9, 0.7, 0.2, 0.4]).requires_grad_(True)
    regions = torch.tensor([[[1, 1, 0, 0]]])
    loss = cas_loss_paper(probs, regions, alpha=0.5)
    # FG mean (0.2, 0.8), BG mean (0.7, 0.3); every pixel is 0.1 off its mean in both channels:
    # variance per region 2 * 0.01 = 0.02, uniformer 0.04; ||m_fg - m_bg||^2 = 2 * 0.25 = 0.5,
    # counted for both ordered pairs -> 1.0.  L = 0.5 * 0.04 - 0.5 * 1.0 = -0.48.
    assert loss.item() == pytest.approx(-0.48, abs=1e-12)
    loss.backward()
    # dL/ds_c(x), x in r: alpha * 2 (s_c - m_c) / |r| - (1 - alpha) * 4 (m_c - m'_c) / |r|
    expected_c1 = torch.tensor([0.05 - 0.5, -0.05 - 0.5, -0.05 + 0.5, 0.05 + 0.5], dtype=torch.float64)
    expected_c0 = torch.tensor([-0.05 + 0.5, 0.05 + 0.5, 0.05 - 0.5, -0.05 - 0.5], dtype=torch.float64)
    torch.testing.assert_close(probs.grad[0, 1, 0], expected_c1)
    torch.testing.assert_close(probs.grad[0, 0, 0], expected_c0)


def test_paper_three_regions_and_invalid_pixels():
    # 1x6 image, regions 0,0,1,1,2,2 with one-hot descriptors in 3 channels: zero variance, each of
    # the 6 ordered pairs at distance 2 -> L = -0.5 * 12 = -6 (the lower bound for N = 3).
    probs = torch.eye(3, dtype=torch.float64).repeat_interleave(2, 0).T.reshape(1, 3, 1, 6)
    regions = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    assert cas_loss_paper(probs, regions).item() == pytest.approx(-6.0)
    # an invalid pixel joins no region: moving it anywhere does not change the loss
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    valid[0, 0, 5] = False
    other = probs.clone()
    other[0, :, 0, 5] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert cas_loss_paper(other, regions, valid=valid).item() == pytest.approx(-6.0)


def test_paper_invariant_to_permuting_region_labels():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 4, 8, 8, generator=g).softmax(1)
    regions = torch.randint(0, 3, (3, 8, 8), generator=g)
    base = cas_loss_paper(probs, regions)
    for perm in ([2, 0, 1], [1, 2, 0], [0, 2, 1]):
        permuted = torch.tensor(perm)[regions]
        torch.testing.assert_close(cas_loss_paper(probs, permuted), base)
    torch.testing.assert_close(cas_loss_paper(probs, regions * 7 + 5), base)  # any label values
    # binary saliency: swapping FG/BG gives the same loss (the low-fidelity property)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    sal = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    loss = CASLoss("paper")
    torch.testing.assert_close(loss(logits, sal), loss(logits, 1 - sal))


# sofmonk/class_agnostic_loss_saliency@def297f: m_loss2.py:lss.forward (alpha 0.5, batch_size 40,
# eps 3e-5; both channels = the mask, as train.py builds them), float64, run on the inputs below
RELEASE_LSS_WORKED = -0.00599925380551492  # _probs_1x4([0.9, 0.7, 0.2, 0.4]), mask [1, 1, 0, 0]
RELEASE_LSS_RANDOM = 0.007770095517956729  # the seeded random batch of the test


def test_official_equals_released_formula_on_a_worked_example():
    probs = _probs_1x4([0.9, 0.7, 0.2, 0.4])
    mask = torch.tensor([[[1, 1, 0, 0]]])
    ours = cas_loss_official(probs, mask)
    assert ours.item() == pytest.approx(RELEASE_LSS_WORKED, rel=1e-12)
    # by hand (eps ignored): uniformer FG only 0.02, pair once 0.5 -> (0.01 - 0.25) / 40
    assert ours.item() == pytest.approx((0.5 * 0.02 - 0.5 * 0.5) / 40, rel=1e-3)
    # random batch
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(5, 2, 6, 7, generator=g, dtype=torch.float64).softmax(1)
    mask = (torch.rand(5, 6, 7, generator=g) > 0.6).long()
    assert cas_loss_official(probs, mask).item() == pytest.approx(RELEASE_LSS_RANDOM, rel=1e-12)
    # not FG/BG symmetric (uniformer on the foreground only)
    assert not torch.allclose(cas_loss_official(probs, mask), cas_loss_official(probs, 1 - mask))


# sofmonk/class_agnostic_loss_saliency@def297f44e555b1d1f5015e3896c0c76ba7320dc: dataset.py:saliencydata
# .load_mask (PNG -> L, resize to 256 x 256, / 255, <= 0.5 -> 0, > 0.5 -> 1) then cas.py:lss.forward
# (ALPHA 0.5, BATCH_SIZE 40; both channels = the mask, as train.py builds them), float64, on
# _soft_masks() / _cas_logits(); and lss fed the unbinarised mask / 255 (no released path does this)
RELEASE_LOADER_LSS = 0.0034385914517590884
RELEASE_LSS_ON_RAW_MASK = 0.00292140540744238


def _soft_masks() -> np.ndarray:
    """Two 256 x 256 uint8 masks: a disc with an 8-level-per-pixel grey ramp (all 256 levels,
    127 and 128 included) and its vertical flip."""
    yy, xx = np.mgrid[0:256, 0:256]
    m = np.clip((70 - np.hypot(yy - 120, xx - 136)) * 8 + 128, 0, 255).round().astype(np.uint8)
    return np.stack([m, m[::-1]])


def _cas_logits() -> torch.Tensor:
    return torch.randn(2, 2, 256, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_soft_targets_are_binarised_as_the_released_loader_does():
    masks = _soft_masks()
    assert (masks == 127).any() and (masks == 128).any()
    soft = torch.from_numpy(masks.astype(np.float64) / 255.0)
    ours = CASLoss("official")(_cas_logits(), soft).item()
    assert ours == pytest.approx(RELEASE_LOADER_LSS, rel=1e-6)
    assert abs(ours - RELEASE_LSS_ON_RAW_MASK) > 4e-4  # weighting by mask / 255 is not the release
    # the paper variant sees the same partition: thresholding == passing the binary regions
    regions = torch.from_numpy((masks > 127).astype(np.int64))
    paper = CASLoss("paper")
    torch.testing.assert_close(paper(_cas_logits(), soft), paper(_cas_logits(), regions))


def test_boundedness():
    g = torch.Generator().manual_seed(2)
    loss = CASLoss("paper", alpha=0.5)
    for scale in (0.1, 1.0, 10.0, 100.0):
        logits = torch.randn(4, 2, 16, 16, generator=g) * scale
        sal = (torch.rand(4, 16, 16, generator=g) > 0.5).float()
        assert loss(logits, sal).item() >= -2.0 - 1e-6
    # perfect separation reaches the bound -(1 - alpha) * 2 * N (N - 1) = -2
    sal = torch.zeros(1, 8, 8)
    sal[:, 2:6, 2:6] = 1
    logits = torch.stack([-(sal * 2 - 1) * 50, (sal * 2 - 1) * 50], 1)
    assert loss(logits, sal).item() == pytest.approx(-2.0, abs=1e-6)
    assert cas_loss_official(logits.softmax(1), sal.long(), divisor=1).item() >= -1.0 - 1e-6


def test_official_variant_rejects_multi_region_targets():
    with pytest.raises(ValueError, match="binary"):
        CASLoss("official")(torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4)))
    with pytest.raises(ValueError, match="variant"):
        CASLoss("nope")


def _cas_method(**kw):
    from segexp.methods.cas import CAS

    return CAS(model=torch.nn.Conv2d(3, 2, 1), loss=CASLoss(), num_classes=2,
                       class_names=["background", "salient"], schedule={}, **kw)


def _two_channel(p1: float, p0: float, fg: torch.Tensor) -> torch.Tensor:
    """(1, 2, H, W) softmax-like map: channel 1 = p1 on ``fg`` and p0 elsewhere."""
    s1 = torch.where(fg.bool(), torch.tensor(p1), torch.tensor(p0))[None]
    return torch.stack([1 - s1, s1], 1)


def test_salient_channel_is_chosen_on_the_contrast_summed_over_ranks(monkeypatch):
    import segexp.methods.cas as cas

    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    gt[:, 1:3, 1:3] = 1
    # "rank 0" holds one image where channel 0 looks salient (contrast of channel 1: -0.2), "rank 1"
    # two images where channel 1 is (+0.5 each): over the whole validation set channel 1 wins.
    rank0 = cas.channel_contrast(_two_channel(0.4, 0.6, gt[0]), gt)
    rank1 = cas.channel_contrast(torch.cat([_two_channel(0.9, 0.4, gt[0])] * 2), gt.repeat(2, 1, 1))
    torch.testing.assert_close(rank0, torch.tensor([0.2, -0.2], dtype=torch.float64))
    torch.testing.assert_close(rank1, torch.tensor([-1.0, 1.0], dtype=torch.float64))
    images = [_two_channel(0.4, 0.6, gt[0])] + [_two_channel(0.9, 0.4, gt[0])] * 2
    whole = cas.channel_contrast(torch.cat(images), gt.repeat(3, 1, 1))
    torch.testing.assert_close(rank0 + rank1, whole)  # contrasts are additive over images

    method = _cas_method()
    method._contrast = rank0.clone()
    assert method.choose_salient_channel() == (0, pytest.approx(0.2))  # single process: its own data
    assert float(method._contrast.abs().sum()) == 0  # reset for the next epoch

    def all_reduce(t, op=None):  # what the other rank contributes to the sum
        assert op == cas.dist.ReduceOp.SUM
        t += rank1.to(t)

    monkeypatch.setattr(cas.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(cas.dist, "all_reduce", all_reduce)
    method._contrast = rank0.clone()
    channel, contrast = method.choose_salient_channel()
    assert channel == 1 and contrast == pytest.approx(0.8)
    assert int(method.salient_channel) == 1
    assert torch.equal(method._contrast, torch.zeros(2, dtype=torch.float64))


def test_adaptive_saliency_map_binarises_at_twice_the_mean():
    from segexp.methods.cas import adaptive_binary

    p = torch.tensor([0.1, 0.1, 0.4, 0.6]).view(1, 1, 2, 2)  # mean 0.3 -> threshold 0.6
    assert adaptive_binary(p).flatten().tolist() == [0, 0, 0, 1]
    assert adaptive_binary(torch.full((1, 1, 2, 2), 0.9)).sum() == 0  # threshold capped at 1
    method = _cas_method(saliency_map="adaptive", salient_channel=0)
    sal = method.saliency(torch.randn(2, 3, 8, 8))
    assert sal.shape == (2, 1, 8, 8) and set(sal.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="saliency_map"):
        _cas_method(saliency_map="argmax")


# ----------------------------------------------------------------------------- end to end

def constant_baseline(cfg) -> dict[str, float]:
    """Best MAE and best S of constant maps (0, 0.5 and the training foreground fraction) on the
    test split of the configured data: what a method must beat to have learnt anything."""
    import hydra

    from segexp.metrics.sod import SODMetrics

    dm = hydra.utils.instantiate(cfg.data, train_keys=["image", "saliency"], eval_keys=["image", "saliency"])
    dm.prepare_data()
    train = dm.reader(split=dm.splits["train"], keys=["image", "saliency"])
    test = dm.reader(split=dm.splits["test"], keys=["image", "saliency"])
    fg = float(np.mean([(train[i]["saliency"] > 0.5).mean() for i in range(len(train))]))
    gts = np.stack([test[i]["saliency"] > 0.5 for i in range(len(test))])
    best = {"MAE": 1.0, "S": 0.0}
    for c in (0.0, 0.5, fg):
        metric = SODMetrics()
        metric.update(np.full(gts.shape, c, np.float32), gts)
        r = metric.compute()
        best = {"MAE": min(best["MAE"], r["MAE"]), "S": max(best["S"], r["S"])}
    return best


def train_short(name: str, data_dir, out_dir, extra=()) -> tuple[dict, dict]:
    """Train experiment ``name`` as configured (its own data size and budget: a few minutes on
    one core) and return its metrics and the constant-map baseline of its test split."""
    from segexp.runner import train
    from tests.conftest import compose

    cfg = compose([f"+experiment={name}", f"paths.data_dir={data_dir}", "data.num_workers=0",
                   "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false",
                   "callbacks.progress_bar.refresh_rate=1000", *extra], out_dir=out_dir)
    return train(cfg), constant_baseline(cfg)


@pytest.mark.slow
def test_cas_trains_on_shapes_sod_and_beats_a_constant_map(data_dir, tmp_path):
    metrics, const = train_short("cas_shapes_sod", data_dir, tmp_path)
    print("CAS", {k: metrics[f"test/{k}"] for k in ("MAE", "S")}, "constant", const)
    assert metrics["test/MAE"] < const["MAE"]
    assert metrics["test/S"] > const["S"]
