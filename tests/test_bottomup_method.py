"""The bottom-up method end to end: inference on oracle features, metrics, dumps, multi-resolution,
padding, gradients, learning on synthetic images, the entity data mix, experiment smoke runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segexp.data.io import read_image, rgb_to_id
from segexp.losses.bottomup import BottomUpLoss
from segexp.methods.bottomup import BottomUp, LineSimilarity, segment_scores
from segexp.metrics.entity import EntitySimilarity
from segexp.reporting.entity_dump import EntityDump
from tests.conftest import compose

SCHEDULE = {
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    "lr_mult": {},
    "scheduler": {"name": "cosine", "warmup_steps": 0},
}
INFERENCE = {
    "seed": 0,
    "meanshift": {
        "bandwidth_deg": 45.0,
        "num_seeds": 32,
        "seed_rounds": 3,
        "max_iter": 50,
        "tol": 1e-5,
        "merge_deg": None,
        "min_cluster_pixels": 0,
        "max_points": None,
    },
    "multires": {"scales": [1.0], "contain": 0.8, "refine_iou": 0.7, "min_pixels": 4},
}
WEIGHTS = {"attraction": 1.0, "repulsion": 1.0, "contrast": 0.125, "mse": 0.025, "grad": 0.05, "reg": 1.0}


def make_method(model: nn.Module, scales=(1.0,), ap: bool = False, **loss_kwargs) -> BottomUp:
    inference = {**INFERENCE, "multires": {**INFERENCE["multires"], "scales": list(scales)}}
    loss = BottomUpLoss(weights=WEIGHTS, contrast={"num_queries": 16, "num_negatives": 16}, **loss_kwargs)
    return BottomUp(
        model=model,
        loss=loss,
        inference=inference,
        num_classes=2,
        class_names=["background", "entity"],
        schedule=SCHEDULE,
        metrics={"iou_thresholds": [0.5], "ap": ap},
    )


class OracleFeatures(nn.Module):
    """Reads the entity id from the image's first channel; one orthonormal line per id (0.9 x
    a basis vector, as a tanh output would be), with a random sign per pixel."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.basis = nn.Parameter(torch.linalg.qr(torch.randn(dim, dim))[0] * 0.9, requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ids = images[:, 0].round().long().clamp(0, self.basis.shape[0] - 1)
        signs = torch.where(torch.rand(ids.shape) < 0.5, -1.0, 1.0)
        return self.basis[ids].permute(0, 3, 1, 2) * signs[:, None]


def entity_batch(h: int = 24, w: int = 32):
    ent = torch.zeros(2, h, w, dtype=torch.long)
    ent[:, :, : w // 2] = 1
    ent[:, :, w // 2 :] = 2
    ent[0, 4:12, 4:10] = 3
    ent[1, 10:20, 20:28] = 4
    ent[:, 0, :] = 0  # an unlabeled row: background, never a GT segment
    images = ent[:, None].float().repeat(1, 3, 1, 1)
    return {
        "image": images,
        "instances": ent,
        "valid": torch.ones(2, h, w, dtype=torch.bool),
        "meta": [{"id": "a", "orig_size": (h, w)}, {"id": "b", "orig_size": (h, w)}],
    }


def test_oracle_features_give_perfect_entity_metrics_above_the_trivial_prediction(tmp_path):
    torch.manual_seed(0)
    method = make_method(OracleFeatures(), ap=True)
    batch = entity_batch()
    pred = method._eval_step(batch, "test")
    assert pred.shape == batch["instances"].shape and int(pred.min()) >= 1
    ours = method.entity_metrics["test_pred"].compute()
    trivial = method.entity_metrics["test_trivial"].compute()
    assert ours["recall@0.5"] == 1.0 and ours["mIoU"] > 0.95 and ours["mBIoU"] > 0.9
    assert trivial["recall@0.5"] < 0.5 and trivial["mIoU"] < 0.5
    sim = method.similarity["test_line"].compute()
    assert sim["intra_sim"] == pytest.approx(1.0, abs=1e-5) and sim["inter_sim"] == pytest.approx(
        0.0, abs=1e-5
    )
    assert method.ap_metrics["test"].compute()["AP50"] > 0.5

    method.dump = EntityDump(tmp_path)
    method.test_step(batch, 0)
    method.dump.finish()
    for i, name in enumerate(("a", "b")):
        ids = rgb_to_id(read_image(tmp_path / "predictions" / f"{name}.png"))
        assert np.array_equal(ids, pred[i].numpy())
    info = json.loads((tmp_path / "predictions.json").read_text())
    segs = info["annotations"][0]["segments_info"]
    assert sorted(s["id"] for s in segs) == sorted(pred[0].unique().tolist())
    assert sum(s["area"] for s in segs) == pred[0].numel()
    rows = (tmp_path / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("id,num_gt") and len(rows) == 3


def test_line_similarity_ignores_antipodal_flips_that_break_the_mean_vector():
    ent = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]])
    f = torch.zeros(1, 2, 1, 8)
    f[0, 0, 0, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    f[0, 1, 0, 4:] = 1.0
    line, mean = LineSimilarity(ignore_index=255), EntitySimilarity(ignore_index=255)
    line.update(f, ent)
    mean.update(f, ent)
    assert line.compute()["intra_sim"] == pytest.approx(1.0)
    assert mean.compute()["intra_sim"] < 0.6
    scores = segment_scores(f[0], ent[0])
    torch.testing.assert_close(scores, torch.ones(2))


def test_multires_and_padding_give_full_maps_with_zero_outside_the_valid_area():
    torch.manual_seed(0)
    method = make_method(OracleFeatures(), scales=(0.5, 1.0))
    batch = entity_batch(24, 32)
    batch["valid"][1, 20:, :] = False
    batch["valid"][1, :, 28:] = False
    pred, feats = method.segment(batch["image"], [(24, 32), (20, 28)])
    assert pred.shape == (2, 24, 32) and feats.shape == (2, 8, 24, 32)
    assert (pred[1, 20:] == 0).all() and (pred[1, :, 28:] == 0).all() and (pred[1, :20, :28] > 0).all()
    # fine level refines the coarse one: every GT entity is still found
    gt = batch["instances"][0]
    for k in (1, 2, 3):
        inside = pred[0][gt == k]
        assert (inside == inside.mode().values).float().mean() > 0.9


def test_training_losses_reach_every_parameter():
    from segexp.models.backbone import Backbone
    from segexp.models.bottomup import BottomUpNet

    torch.manual_seed(0)
    net = BottomUpNet(Backbone("resnet18", out_indices=[1, 2, 3, 4]), embed_dim=16, decoder_channels=16)
    method = make_method(net)
    batch = entity_batch(32, 32)
    batch["image"] = torch.randn(2, 3, 32, 32)
    losses = method.compute_losses(batch)
    assert set(losses) == set(WEIGHTS)
    sum(losses.values()).backward()
    # timm zero-initialises each residual block's last BN scale, so the convs inside the blocks get
    # zero gradients at step 0 by design; everything else (stem, decoder, head) must get one
    missing = [
        n
        for n, p in net.named_parameters()
        if (p.grad is None or not p.grad.abs().sum() > 0) and not n.startswith("backbone.body.layer")
    ]
    assert not missing, missing
    assert net.backbone.body.layer4[1].bn2.weight.grad.abs().sum() > 0


PALETTE = 0.8 * torch.tensor(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], dtype=torch.float
)


def rectangles(n: int, size: int = 32, seed: int = 0):
    """Images of 2-3 flat rectangles on a flat background, all entities, each region a different
    colour of a 6-colour palette (a colour is not an entity: it changes role between images)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, size, size)
    ent = torch.ones(n, size, size, dtype=torch.long)
    for i in range(n):
        colours = torch.randperm(len(PALETTE), generator=g)
        images[i] = PALETTE[colours[0]].view(3, 1, 1)
        for k in range(2, 2 + int(torch.randint(2, 4, (1,), generator=g))):
            y0, x0 = torch.randint(0, size - 12, (2,), generator=g).tolist()
            hh, ww = torch.randint(8, 13, (2,), generator=g).tolist()
            images[i, :, y0 : y0 + hh, x0 : x0 + ww] = PALETTE[colours[k - 1]].view(3, 1, 1)
            ent[i, y0 : y0 + hh, x0 : x0 + ww] = k
    return images, ent


def test_learns_entities_of_synthetic_images_beyond_the_trivial_prediction():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 8, 1),
        nn.Tanh(),
    )
    method = make_method(net, erosion=3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(80):
        images, ent = rectangles(8, seed=step)
        opt.zero_grad()
        sum(method.compute_losses({"image": images, "instances": ent}).values()).backward()
        opt.step()
    images, ent = rectangles(16, seed=10_000)
    with torch.no_grad():
        method._eval_step({"image": images, "instances": ent}, "val")
    ours = method.entity_metrics["val_pred"].compute()
    trivial = method.entity_metrics["val_trivial"].compute()
    assert ours["recall@0.5"] > trivial["recall@0.5"] + 0.4
    assert ours["mIoU"] > trivial["mIoU"] + 0.3
    sim = method.similarity["val_line"].compute()
    assert sim["intra_sim"] > 0.8 and sim["inter_sim"] < 0.3


# ------------------------------------------------------------------------------------ data


def test_mixed_reader_concatenates_sources_and_stuff_becomes_entities(tmp_path):
    from segexp.data.io import DatasetError
    from tests.fixtures_formats import reader_from_config, write_ade_challenge, write_coco_panoptic

    coco = write_coco_panoptic(tmp_path / "coco", "train2017")
    ade = write_ade_challenge(tmp_path / "ADEChallengeData2016", "training")
    no_shapes = {"reader.sources.shapes.splits.train": None}
    keys = ["image", "instances"]
    partial = r"has \d+ images, the official release 20210 \(data.reader.sources.ade.expected_sizes\)"
    with pytest.raises(DatasetError, match=partial):
        reader_from_config("coco_ade_mix", tmp_path, "train", keys=keys, overrides=no_shapes)
    reader = reader_from_config(
        "coco_ade_mix",
        tmp_path,
        "train",
        keys=["image", "instances"],
        overrides={**no_shapes, "reader.sources.ade.expected_sizes": None},  # the fixture is a 2-image ADE
    )
    assert len(reader) == len(coco) + len(ade)
    first = reader[0]
    assert first["meta"]["id"].startswith("coco/") and set(first) == {"image", "instances", "meta"}
    assert np.array_equal(first["instances"], coco[3]["instances"])
    sample = reader[len(coco)]
    assert sample["meta"]["id"].startswith("ade/") and "mask" not in sample
    truth = next(iter(ade.values()))
    inst = sample["instances"]
    # two person instances + sky + flag (stuff classes) = 4 entities, "other" stays background
    assert len(np.unique(inst[inst > 0])) == 4
    assert len(np.unique(inst[:6])) == 1 and inst[0, 0] > 0  # sky: one entity
    assert np.array_equal(inst[6:, 8:] > 0, truth["instances"][6:, 8:] > 0)
    gone = sorted((tmp_path / "coco" / "train2017").glob("*.jpg"))[1]  # a listed image missing: refused
    gone.unlink()
    with pytest.raises(DatasetError, match=rf"{gone.name}: not found, nor the files of 0 more of the"):
        reader_from_config("coco_ade_mix", tmp_path, "train", keys=keys,
                           overrides={**no_shapes, "reader.sources.ade.expected_sizes": None})  # fmt: skip
    with pytest.raises(KeyError, match="splits has no entry"):
        reader_from_config(
            "coco_ade_mix",
            tmp_path,
            "train",
            keys=["image", "instances"],
            overrides={"splits.train": "bogus"},
        )


# ------------------------------------------------------------------------------------ experiments

# Settings that keep a fast_dev_run of the real-data experiments small (ConvNeXt-T, 32 px).
SMOKE = [
    "debug=fdr",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
    "backbone.pretrained=false",
    "backbone.name=convnext_tiny",
    "method.model.decoder_channels=32",
    "data.image_size=32",
    "method.inference.multires.scales=[0.5,1.0]",
]


def entity_fixture(data_dir: Path) -> tuple[Path, dict[str, list[str]]]:
    """Tiny ADEChallengeData2016 (training + validation), COCO panoptic (train2017) and EVICAN
    (train + val + eval levels) trees under ``data_dir/entityfix``, and the extra overrides each
    bottom-up real-data experiment needs there (the generated shapes part of the mix kept small)."""
    from tests import fixtures_formats as fx

    root = data_dir / "entityfix"
    if not root.exists():
        for split in ("training", "validation"):
            fx.write_ade_challenge(root / "ADEChallengeData2016", split, h=40, w=48)
        fx.write_coco_panoptic(root / "coco", "train2017", h=40, w=48)
        evican = root / "EVICAN"
        fx.write_evican(evican)
        (evican / "val2019").symlink_to(evican / "train2019")
        ann = evican / "annotations"
        (ann / "instances_val2019.json").write_text((ann / "instances_train2019.json").read_text())
    extra = {  # the fixtures hold a few images, not the official counts
        "bottomup_coco_ade": [
            "data.prepare.num_images=12",
            "data.prepare.size=64",
            "data.reader.sources.ade.expected_sizes=null",
        ],
        "bottomup_ade": ["data.expected_sizes=null"],
    }
    return root, extra


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bottomup_ade", "bottomup_evican", "bottomup_coco_ade"])
def test_real_data_experiments_run_fast_dev_run_on_format_fixtures(name, tmp_path):
    from segexp.runner import train

    root, extra = entity_fixture(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose(
        [f"+experiment={name}", *SMOKE, f"paths.data_dir={root}", *extra.get(name, [])], out_dir=run
    )
    metrics = train(cfg)
    assert "test/mIoU" in metrics and "val/mIoU" in metrics
    if name == "bottomup_evican":
        assert "test/AP50" in metrics
