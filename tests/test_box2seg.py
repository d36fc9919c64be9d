"""Box2Seg losses on hand-made tensors, the three-head network, the method's phases, and (slow)
end-to-end training against the box-rectangle baseline and DDP on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from segexp.losses.box2seg import (
    Box2SegLoss,
    affinity_loss,
    affinity_memory_bytes,
    attention_fg_ce,
    background_ce,
    box_masks,
    filling_rate_hinge,
    grabcut_ce,
    pairwise_affinity_loss,
)
from tests.conftest import REPO, SMALL_SYNTH, config_weights, run_cli

# one 4x4 image, classes {0, 1, 2}; a class-1 box over columns 0-1 (rows 0-3), a class-2 box at (3, 3)
BOXES = [torch.tensor([[0.0, 0.0, 2.0, 4.0], [3.0, 3.0, 4.0, 4.0]])]
LABELS = [torch.tensor([1, 2])]


def _b():
    return box_masks(BOXES, LABELS, 3, (4, 4))


def test_box_masks_channels_union_and_valid():
    b = _b()
    assert b.shape == (1, 3, 4, 4)
    assert b[0, 1, :, :2].all() and not b[0, 1, :, 2:].any()
    assert b[0, 2].sum() == 1 and b[0, 2, 3, 3]
    assert b[0, 0].sum() == 16 - 8 - 1  # outside every box
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0, 3] = False  # padding is never certain background
    assert box_masks(BOXES, LABELS, 3, (4, 4), valid)[0, 0].sum() == 6
    frac = box_masks([torch.tensor([[0.5, 0.5, 1.2, 1.2]])], [torch.tensor([1])], 2, (4, 4))
    assert frac[0, 1].sum() == 4  # rounded outwards


def test_grabcut_ce_matches_cross_entropy_and_ignores():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(grabcut_ce(logits, target), ref)
    assert grabcut_ce(logits, torch.full_like(target, 255)) == 0


def test_attention_fg_ce_value_gradient_and_outside_pixels():
    b = _b()
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    alpha = torch.rand(1, 2, 4, 4, requires_grad=True)
    logp = F.log_softmax(logits, 1)
    loss = attention_fg_ce(logp, alpha, b)
    # by hand: class 1 over its 8 box pixels, class 2 over its 1 pixel
    ref = -(alpha[0, 0, :, :2] * logp[0, 1, :, :2]).sum() / 8 - alpha[0, 1, 3, 3] * logp[0, 2, 3, 3]
    assert torch.allclose(loss, ref)
    loss.backward()
    outside = ~b[0, 1:]
    assert (alpha.grad[0][outside] == 0).all()  # alpha outside its boxes gets no gradient
    assert (logits.grad[0, :, :, 2][:, :3] == 0).all()  # columns 2.. rows 0-2 are in no box
    # changing y or alpha outside the boxes leaves the loss unchanged
    logits2 = logits.detach().clone()
    logits2[0, :, :3, 2:] += torch.randn(3, 3, 2) * 5
    alpha2 = alpha.detach().clone()
    alpha2[0][outside] = torch.rand(int(outside.sum()))
    assert torch.allclose(attention_fg_ce(F.log_softmax(logits2, 1), alpha2, b), loss.detach())
    # zero attention = zero loss; no box at all = zero
    assert attention_fg_ce(logp.detach(), torch.zeros_like(alpha), b) == 0
    nob = box_masks([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 3, (4, 4))
    assert attention_fg_ce(logp.detach(), alpha.detach(), nob) == 0


def test_attention_fg_ce_pixel_normalisation_is_a_mean_over_box_pixels():
    b = _b()
    logp = F.log_softmax(torch.randn(1, 3, 4, 4), 1)
    alpha = torch.rand(1, 2, 4, 4)
    # the 8 class-1 box pixels and the 1 class-2 pixel share one normaliser: 9 box pixels
    ref = -((alpha[0, 0, :, :2] * logp[0, 1, :, :2]).sum() + alpha[0, 1, 3, 3] * logp[0, 2, 3, 3]) / 9
    assert torch.allclose(attention_fg_ce(logp, alpha, b, normalise="pixels"), ref)
    # per class, the small class-2 box weighs as much as the 8-pixel class-1 box; per pixel, 1/9
    per_class = attention_fg_ce(logp, alpha, b, normalise="class")
    assert not torch.allclose(per_class, ref)
    nob = box_masks([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 3, (4, 4))
    assert attention_fg_ce(logp, alpha, nob, normalise="pixels") == 0
    with pytest.raises(ValueError, match="normalise"):
        attention_fg_ce(logp, alpha, b, normalise="box")


def test_background_ce_only_outside_every_box():
    b = _b()
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    logp = F.log_softmax(logits, 1)
    loss = background_ce(logp, b)
    ref = -(logp[0, 0][b[0, 0]]).mean()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert (logits.grad[0][:, ~b[0, 0]] == 0).all()
    full = box_masks([torch.tensor([[0.0, 0.0, 4.0, 4.0]])], [torch.tensor([1])], 3, (4, 4))
    assert background_ce(logp.detach(), full) == 0  # every pixel in a box: no term


def test_filling_rate_hinge_zero_when_attention_covers_and_gradient_otherwise():
    b = _b()
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1  # GrabCut keeps 4 of the 8 class-1 box pixels: eta_1 = 0.5
    target[0, 3, 3] = 2  # eta_2 = 1
    gamma = 0.8
    covered = torch.zeros(1, 2, 4, 4)
    covered[0, 0, :, :2] = 0.4  # eta'_1 = 0.4 = gamma * eta_1
    covered[0, 1, 3, 3] = 0.9  # eta'_2 = 0.9 > 0.8
    assert filling_rate_hinge(covered, target, b, gamma) == 0
    alpha = torch.zeros(1, 2, 4, 4, requires_grad=True)
    loss = filling_rate_hinge(alpha, target, b, gamma)
    assert torch.allclose(loss, torch.tensor(gamma * 0.5 + gamma * 1.0))
    loss.backward()
    assert torch.allclose(alpha.grad[0, 0, :, :2], torch.full((4, 2), -1 / 8))
    assert alpha.grad[0, 1, 3, 3] == -1 and (alpha.grad[0, 0, :, 2:] == 0).all()
    # the hinge alone is minimised by attention >= gamma*eta, not by alpha -> 0 (no collapse)
    high = torch.ones(1, 2, 4, 4)
    assert filling_rate_hinge(high, target, b, gamma) == 0


def test_pairwise_affinity_loss_values():
    e = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    onehot = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert pairwise_affinity_loss(e, onehot) == 0  # orthogonal across classes, equal within
    flipped = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])  # pixel 1 has the wrong label
    # pairs (0,1), (1,0), (1,2), (2,1) disagree by 1 each: 4 / 9
    assert torch.allclose(pairwise_affinity_loss(e, flipped), torch.tensor(4 / 9))
    anti = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert pairwise_affinity_loss(anti, t, mapping="clamp") == 0  # cos -1 clamps to 0
    assert torch.allclose(pairwise_affinity_loss(anti, t, mapping="shift"), torch.tensor(0.0))
    w = torch.tensor([[1.0, 0.0, 1.0]])  # pixel 1 invalid: only pairs among 0 and 2 count
    assert pairwise_affinity_loss(e, flipped, w) == 0


def test_affinity_loss_grid_sampling_bound_and_gradients():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(2, 8, 64, 64), dim=1).requires_grad_(True)
    probs = torch.softmax(torch.randn(2, 3, 256, 256, requires_grad=True), 1)
    loss = affinity_loss(emb, probs, image_size=(256, 256), stride=4, max_pixels=100)
    loss.backward()
    assert math.isfinite(loss.item()) and emb.grad.abs().sum() > 0
    # 64x64 grid = 4096 pixels per image, capped at 100: one pairwise tensor is 2 x 100 x 100 floats
    assert affinity_memory_bytes(2, (256, 256), 4, 100) == 2 * 100 * 100 * 4
    assert affinity_memory_bytes(16, (512, 512), 8, 1024) == 16 * 1024 * 1024 * 4
    # perfect embeddings of a two-region map give (near) zero loss on the grid
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    onehot = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    assert affinity_loss(onehot.clone(), onehot, stride=8) < 1e-6


def test_box2seg_loss_weights_and_switches():
    torch.manual_seed(0)
    b = _b()
    logits = torch.randn(1, 3, 4, 4)
    alpha = torch.rand(1, 2, 4, 4)
    emb = F.normalize(torch.randn(1, 4, 4, 4), dim=1)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1
    w = config_weights("loss=box2seg")
    full_loss = Box2SegLoss(weights=w, affinity={"stride": 1})
    full_weights = full_loss.weights
    full = full_loss(logits, alpha, emb, target, b)
    assert set(full) == {"gc", "fg", "bg", "fr", "aff"}
    half = Box2SegLoss(weights={**w, "fg": 0.5}, enabled={"aff": False}, affinity={"stride": 1})(
        logits, alpha, emb, target, b
    )
    assert "aff" not in half and torch.allclose(half["fg"], full["fg"] / full_weights["fg"] * 0.5)
    off = Box2SegLoss(weights={**w, "gc": 0, "fg": 0, "bg": 0, "fr": 0, "aff": 0})
    assert off(logits, None, None, target, b) == {}
    with pytest.raises(ValueError, match="unknown term"):
        Box2SegLoss(weights={**w, "typo": 1.0})
    with pytest.raises(ValueError, match=r"no weight for \['fr'\]"):  # never a silent default
        Box2SegLoss(weights={k: v for k, v in w.items() if k != "fr"})
    pre = Box2SegLoss(weights=w, affinity={"stride": 1}).pretrain(emb, target, 3)
    assert set(pre) == {"pretrain"} and pre["pretrain"] > 0


def _tiny_method(**kw):
    from segexp.methods.box2seg import Box2Seg
    from segexp.models.backbone import Backbone
    from segexp.models.box2seg import Box2SegNet

    model = Box2SegNet(Backbone("resnet18", output_stride=16), num_classes=3, embed_dim=8, head_channels=16,
                       aspp_channels=32, decoder_channels=32, **kw)
    sched = {"optimizer": {}, "lr_mult": {}, "scheduler": {}}
    loss = Box2SegLoss(weights=config_weights("loss=box2seg"))
    return Box2Seg(model, loss, num_classes=3, class_names=["bg", "a", "b"], schedule=sched,
                   pretrain_epochs=1)


def _batch():
    torch.manual_seed(0)
    pseudo = torch.zeros(2, 64, 64, dtype=torch.long)
    pseudo[:, 10:30, 10:30] = 1
    return {
        "image": torch.randn(2, 3, 64, 64),
        "pseudo": pseudo,
        "boxes": [torch.tensor([[8.0, 8.0, 32.0, 32.0]]),
                  torch.tensor([[8.0, 8.0, 32.0, 32.0], [40, 40, 60, 60]])],
        "box_labels": [torch.tensor([1]), torch.tensor([1, 2])],
        "box_difficult": [torch.tensor([False]), torch.tensor([False, True])],
        "valid": torch.ones(2, 64, 64, dtype=torch.bool),
    }


@pytest.mark.parametrize("shared", [True, False])
def test_network_heads_and_test_time_segmentation_only(shared):
    m = _tiny_method(shared_decoder=shared).model.eval()
    x = torch.randn(1, 3, 64, 64)
    out = m(x)
    assert out["seg"].shape == (1, 3, 64, 64) and out["att"].shape == (1, 2, 64, 64)
    assert out["emb"].shape == (1, 8, 16, 16)
    assert torch.allclose(out["emb"].norm(dim=1), torch.ones(1, 16, 16), atol=1e-5)
    assert set(m(x, heads=("seg",))) == {"seg"}
    assert torch.allclose(m.segment(x), out["seg"], atol=1e-5)


def test_method_phases_and_every_parameter_gets_a_gradient():
    method = _tiny_method()
    method.train()
    batch = _batch()
    assert method.in_pretraining()  # epoch 0 < pretrain_epochs
    losses = method.compute_losses(batch)
    assert set(losses) == {"pretrain"}
    sum(losses.values()).backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)  # unused heads take part with zero weight (DDP)
    method.zero_grad()
    method.pretrain_epochs = 0
    losses = method.compute_losses(batch)
    assert set(losses) == {"gc", "fg", "bg", "fr", "aff"}
    sum(losses.values()).backward()
    assert method.model.att_head.out.weight.grad.abs().sum() > 0
    method.use_difficult = False  # the difficult class-2 box leaves B(i, 2)
    b = method.box_masks(batch, (64, 64))
    assert not b[1, 2].any() and b[1, 0, 50, 50]
    assert method.predict(batch["image"]).shape == (2, 3, 64, 64)


@pytest.mark.slow
def test_grabcut_masks_beat_the_box_rectangles_as_targets(data_dir, tmp_path):
    """What the Box2Seg study shows in miniature (experiments/study_box2seg, 3 seeds): CE on GrabCut
    masks 0.634 +- 0.006 vs the box rectangles 0.613 +- 0.003 test mIoU on the clutter set; one seed of
    each, exactly as configured (~3 min each on 2 idle cores). Box2Seg's own terms do not beat CE on
    GrabCut there (0.576 +- 0.019): that claim is not asserted because it does not hold."""
    scores = {}
    for variant in ("box_rect", "gc_only"):
        run_dir = tmp_path / variant
        args = ["+experiment=study_box2seg", "hydra.mode=RUN", f"variant={variant}", "seed=0",
                f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]  # fmt: skip
        proc = run_cli("segexp.train", args, cwd=REPO, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        scores[variant] = json.loads((run_dir / "metrics.json").read_text())["test/mIoU"]
    print("test mIoU:", scores)
    assert scores["gc_only"] > scores["box_rect"] + 0.005


@pytest.mark.slow
def test_box2seg_ddp_cpu_one_epoch(data_dir, tmp_path):
    proc = run_cli(
        "segexp.train",
        ["+experiment=box2seg_shapes", *SMALL_SYNTH, f"paths.data_dir={data_dir}", "trainer=ddp_cpu",
         "schedule.epochs=2", "method.pretrain_epochs=1", "data.num_workers=0", "data.batch_size=4",
         "test=false", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "val/mIoU" in json.loads((tmp_path / "metrics.json").read_text())
    panels = list((tmp_path / "csv").rglob("train_panels_*.png"))  # image | pseudo label | prediction
    assert panels, "no training panel with the GrabCut pseudo labels"
