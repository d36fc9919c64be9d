"""AffinityNet stage: affinity labels, the affinity loss, the random-walk stage, the pipeline with rw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segexp.inference.random_walk import sparse_affinity
from segexp.losses.affinity import affinity_labels, affinity_loss, pair_offsets
from segexp.methods.affinitynet import AffinityNetMethod, labels_on_grid, pair_masks
from segexp.models.affinitynet import grid_pair_affinity, pair_affinity, pair_indices
from tests.conftest import config_weights

CLASSES = ["background", "a", "b"]


class ColourEmbedding(nn.Module):
    """A hand-set "AffinityNet": the image colour averaged over each 8x8 cell, times ``scale``."""

    stride = 8

    def __init__(self, scale: float = 4.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.stride) * self.scale


class FixedEmbedding(nn.Module):
    stride = 1

    def __init__(self, emb: torch.Tensor):
        super().__init__()
        self.emb = nn.Parameter(emb.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb.expand(x.shape[0], -1, -1, -1)


# independent numpy oracle of pair_masks (psa voc12/data.py ExtractAffinityLabelInRadius)

def _pairs(label: np.ndarray, radius: int, ignore: int = 255):
    h, w = label.shape
    a, b = [], []
    for dy, dx in pair_offsets(radius):
        y0, y1 = 0, h - dy
        x0, x1 = max(0, -dx), min(w, w - dx)
        a.append(label[y0:y1, x0:x1].reshape(-1))
        b.append(label[y0 + dy : y1 + dy, x0 + dx : x1 + dx].reshape(-1))
    a, b = np.concatenate(a), np.concatenate(b)
    valid = (a != ignore) & (b != ignore)
    return {
        "bg_pos": valid & (a == 0) & (b == 0),
        "fg_pos": valid & (a == b) & (a != 0),
        "neg": valid & (a != b),
    }


def _method(model: nn.Module, radius: int = 5) -> AffinityNetMethod:
    return AffinityNetMethod(
        model=model, radius=radius, weights=config_weights("method=affinitynet"), num_classes=3,
        class_names=CLASSES, schedule={},
    )


# -- affinity labels ---------------------------------------------------------------------------------
def test_affinity_labels_from_hand_made_low_and_high_alpha_maps():
    la = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [0, 0, 0, 0]])  # low alpha: confident foreground
    ha = np.array([[0, 1, 1, 1], [2, 2, 2, 1], [0, 0, 1, 1]])  # high alpha: confident background
    want = np.array([[0, 255, 1, 1], [255, 2, 2, 1], [0, 0, 255, 255]])
    np.testing.assert_array_equal(affinity_labels(la, ha), want)


def test_pairs_follow_the_label_rule_and_the_order_of_affinity_labels_pairs():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (7, 9))
    label[0, :3] = 255
    src, dst = pair_indices(7, 9, 5)
    masks = pair_masks(torch.from_numpy(label)[None], src, dst)
    ref = _pairs(label, 5)
    for kind in ("bg_pos", "fg_pos", "neg"):
        np.testing.assert_array_equal(masks[kind][0].numpy(), ref[kind])
    # by hand on a 1 x 3 row: [0, 0, 1] -> pairs (0,1) bg+, (1,2) neg, (0,2) neg
    row = pair_masks(torch.tensor([[[0, 0, 1]]]), *pair_indices(1, 3, 3))
    assert [int(row[k].sum()) for k in ("bg_pos", "fg_pos", "neg")] == [1, 0, 2]


def test_labels_reach_the_grid_at_the_cell_centres():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 4, 4] = 2  # centre of cell (0, 0)
    labels[0, 0, 8] = 1  # corner of cell (0, 1): not sampled
    grid = labels_on_grid(labels, (2, 2))
    assert grid.tolist() == [[[2, 0], [0, 0]]]


# -- the loss ------------------------------------------------------------------------------------------
def test_affinity_loss_on_a_hand_made_batch():
    """5 x 5 grid, 1-channel embedding, radius 2 (pairs at distance 1 and sqrt 2), brute-force reference."""
    f = torch.tensor([0.0, 0.2, 1.0, 1.5, 3.0]).repeat(5, 1)  # one value per column
    labels = torch.tensor([[0, 0, 1, 1, 255]] * 4 + [[0, 0, 2, 1, 255]])
    method = _method(FixedEmbedding(f.view(1, 1, 5, 5)), radius=2)
    losses = method.compute_losses({"image": torch.zeros(1, 3, 5, 5), "pseudo": labels[None]})
    eps, terms = 1e-5, {"bg_pos": [], "fg_pos": [], "neg": []}
    cells = [(y, x) for y in range(5) for x in range(5)]
    for i, (y0, x0) in enumerate(cells):
        for y1, x1 in cells[i + 1 :]:
            la, lb = int(labels[y0, x0]), int(labels[y1, x1])
            if (y1 - y0) ** 2 + (x1 - x0) ** 2 >= 4 or 255 in (la, lb):
                continue
            a = np.exp(-abs(float(f[y0, x0] - f[y1, x1])))
            if la != lb:
                terms["neg"].append(-np.log(1 + eps - a))
            else:
                terms["bg_pos" if la == 0 else "fg_pos"].append(-np.log(a + eps))
    for kind, w in (("bg_pos", 0.25), ("fg_pos", 0.25), ("neg", 0.5)):
        assert losses[kind].item() == pytest.approx(w * np.mean(terms[kind]), rel=2e-4, abs=1e-6), (
            kind
        )  # fp32 near a = 1
    # equals the psa loss of segexp.losses.affinity with the default weights
    aff, masks = method.labelled_pairs(torch.zeros(1, 3, 5, 5), labels[None])
    ref = affinity_loss(aff[0], masks["bg_pos"][0], masks["fg_pos"][0], masks["neg"][0])
    assert sum(losses.values()).item() == pytest.approx(ref.item(), rel=1e-6)
    # negatives across columns 1 | 2 push them apart; column 4 (ignored) gets no gradient
    sum(losses.values()).backward()
    g = method.model.emb.grad.view(5, 5)
    assert g[:, 1].sum() > 0 > g[:, 2].sum() and torch.all(g[:, 4] == 0)


def test_weights_are_config_and_unknown_kinds_are_rejected():
    f = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]).repeat(5, 1).view(1, 1, 5, 5)
    batch = {"image": torch.zeros(1, 3, 5, 5), "pseudo": torch.tensor([[0, 0, 1, 1, 1]] * 5)[None]}
    base = _method(FixedEmbedding(f), radius=2).compute_losses(batch)
    method = AffinityNetMethod(
        model=FixedEmbedding(f),
        radius=2,
        weights=config_weights("method=affinitynet", neg=1.0),  # psa: 0.5
        num_classes=3,
        class_names=CLASSES,
        schedule={},
    )
    assert method.compute_losses(batch)["neg"].item() == pytest.approx(2 * base["neg"].item())
    with pytest.raises(ValueError, match="unknown term"):
        AffinityNetMethod(
            model=FixedEmbedding(f), weights={"pos": 1.0}, num_classes=3, class_names=CLASSES, schedule={}
        )


def test_affinity_is_symmetric_with_unit_diagonal_and_zero_beyond_the_radius():
    emb = torch.randn(1, 4, 6, 7)
    src, dst = pair_indices(6, 7, 3)
    dense = sparse_affinity(pair_affinity(emb, src, dst)[0], src, dst, 42).to_dense()
    assert torch.allclose(dense, dense.T) and torch.all(dense.diagonal() == 1)
    yy, xx = np.divmod(np.arange(42), 7)
    far = torch.from_numpy((yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2 >= 9)
    assert torch.all(dense[far] == 0) and torch.all(dense[~far] > 0)


@pytest.mark.parametrize("h,w,radius", [(6, 7, 3), (9, 5, 2), (16, 16, 5)])
def test_grid_affinity_is_the_gathered_affinity_in_the_same_pair_order(h, w, radius):
    """The shifted-slice affinity (training and inference) against the psa-style gather, values and
    gradient; a wrong offset, border or order moves both by O(1)."""
    torch.manual_seed(0)
    emb = torch.randn(2, 5, h, w, requires_grad=True)
    src, dst = pair_indices(h, w, radius)
    gathered, sliced = pair_affinity(emb, src, dst), grid_pair_affinity(emb, radius)
    assert sliced.shape == gathered.shape == (2, len(src))
    torch.testing.assert_close(sliced, gathered, rtol=0, atol=1e-6)
    weights = torch.randn_like(gathered)
    (g_gathered,) = torch.autograd.grad((gathered * weights).sum(), emb)
    (g_sliced,) = torch.autograd.grad((sliced * weights).sum(), emb)
    torch.testing.assert_close(g_sliced, g_gathered, rtol=0, atol=1e-6)


# -- the rw stage on a synthetic image -------------------------------------------------------------------
class TinyReader:
    """A reader of three 96 x 96 images with a coloured square (class 2) on grey; CAM = a blob."""

    provides = frozenset({"image", "labels", "mask"})
    num_classes = 3
    class_names = CLASSES

    def __init__(self, root: Path):
        from segexp.data.io import write_rgb_png

        self.root = root
        self.ids = ["im0", "im1", "im2"]
        for k, image_id in enumerate(self.ids):
            if not self.image_path(image_id).is_file():
                write_rgb_png(self.image_path(image_id), self._sample(k)["image"])

    def image_path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def _sample(k: int) -> dict:
        mask = np.zeros((96, 96), np.uint8)
        mask[24 + 8 * k : 72, 24:72] = 2
        image = np.where(mask[..., None] == 2, [220, 40, 40], [90, 90, 90]).astype(np.uint8)
        return {"image": image, "mask": mask, "labels": np.array([0.0, 1.0], np.float32)}

    def __getitem__(self, index: int) -> dict:
        from segexp.data.io import read_image

        sample = self._sample(index)
        sample["image"] = read_image(self.image_path(self.ids[index]))
        return sample


def _blob_cams(sample: dict) -> dict:
    """A Gaussian CAM centred on the square: it misses the corners and spills over the edges."""
    yy, xx = np.mgrid[0:96, 0:96]
    cy, cx = np.argwhere(sample["mask"] == 2).mean(0)
    cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 16.0**2)).astype(np.float32)
    return {"cams": cam[None].astype(np.float16), "classes": np.array([2])}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture()
def rw_setup(tmp_path):
    from omegaconf import OmegaConf

    from segexp.stages.affinity_labels import AffinityLabelStage
    from segexp.stages.cam import CAMStage

    class BlobCAMs(CAMStage):
        def settings(self):
            return {"blob": 1}

        def compute(self, sample):
            return _blob_cams(sample)

    cache = tmp_path / "cache"
    cams = BlobCAMs(method={}, ckpt_path=None, scales=[1.0], flip=False, bg_threshold=0.2, cache_dir=cache,
                    device="cpu", progress=False)
    run = tmp_path / "aff_run"
    (run / "checkpoints").mkdir(parents=True)
    method_cfg = {
        "_target_": "segexp.methods.affinitynet.AffinityNetMethod",
        "model": {"_target_": f"{__name__}.ColourEmbedding"},
        "weights": config_weights("method=affinitynet"),
        "num_classes": 3,
        "class_names": CLASSES,
        "schedule": {},
    }
    OmegaConf.save(OmegaConf.create({"method": method_cfg}), run / "config.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    labels = AffinityLabelStage(cams, cache_dir=cache, progress=False)
    return TinyReader(tmp_path / "images"), cams, labels, ckpt, cache


def test_rw_stage_spreads_cams_keeps_image_classes_and_reuses_its_cache(rw_setup):
    from segexp.stages.cam import cams_to_label, dense_cams
    from segexp.stages.random_walk import RandomWalkStage

    reader, cams, labels, ckpt, cache = rw_setup
    stage = RandomWalkStage(cams, affinity_ckpt=ckpt, cache_dir=cache, device="cpu", progress=False)
    first = stage.run(reader, evaluate=True)
    assert first["computed"] == 3 and first["reused"] == 0 and first["seconds_per_image"] > 0
    assert "peak_memory_MB" not in first  # measured on CUDA only; the CPU walk holds the sparse T
    ious_rw, ious_cam = [], []
    for i in range(3):
        label, gt = stage.get(reader, i), reader[i]["mask"]
        assert set(np.unique(label)) <= {0, 2}  # background + the image's class only
        cam_label = cams_to_label(dense_cams(cams.load(reader, i), 2), 0.26)
        ious_rw.append(_iou(label == 2, gt == 2))
        ious_cam.append(_iou(cam_label == 2, gt == 2))
    assert min(ious_rw) > 0.9 and np.mean(ious_rw) > np.mean(ious_cam) + 0.1
    assert first["pseudo"]["mIoU"] > 0.9

    again = RandomWalkStage(cams, affinity_ckpt=ckpt, cache_dir=cache, device="cpu", progress=False)
    second = again.run(reader, evaluate=True)
    assert second["computed"] == 0 and second["reused"] == 3
    assert second["pseudo"]["mIoU"] == first["pseudo"]["mIoU"]
    other = RandomWalkStage(cams, affinity_ckpt=ckpt, cache_dir=cache, device="cpu", progress=False, beta=4)
    assert other.cache_for(reader).dir != again.cache_for(reader).dir and other.missing(reader) == reader.ids


def test_affinity_label_stage_caches_combined_crf_maps(rw_setup):
    reader, cams, labels, _, _ = rw_setup
    report = labels.run(reader, evaluate=True)
    assert report["computed"] == 3 and 0 < report["confident_fraction"] < 1
    for i in range(3):
        key = labels.keys(reader)[reader.ids[i]]
        want = affinity_labels(labels.la.get(reader, i, key), labels.ha.get(reader, i, key))
        np.testing.assert_array_equal(labels.get(reader, i), want)
    assert report["pseudo"]["mIoU"] > 0.8  # confident pixels are mostly right
    assert labels.run(reader)["computed"] == 0


def test_rw_stage_without_a_trained_affinitynet_says_how_to_get_one(rw_setup, tmp_path):
    from omegaconf import OmegaConf

    from segexp.stages.random_walk import RandomWalkStage

    reader, cams, labels, _, cache = rw_setup
    from segexp.utils.errors import UserError

    stage = RandomWalkStage(cams, cache_dir=cache, device="cpu", progress=False)
    with pytest.raises(UserError, match="stage.affinity_ckpt"):
        stage.run(reader)
    other = tmp_path / "cam_run" / "checkpoints" / "last.ckpt"  # another method's checkpoint
    other.parent.mkdir(parents=True)
    config = OmegaConf.create({"method": {"_target_": "segexp.methods.cam.CAM"}})
    OmegaConf.save(config, other.parents[1] / "config.yaml")
    torch.save({"state_dict": {}}, other)
    wrong = RandomWalkStage(cams, affinity_ckpt=other, cache_dir=cache, device="cpu", progress=False)
    with pytest.raises(UserError, match="not AffinityNet"):
        wrong.method_config()


# -- the pipeline -------------------------------------------------------------------------------------
def test_pipeline_with_crf_and_rw_trains_affinitynet_and_scores_rw_labels(tmp_path):
    from segexp.pipeline import run
    from segexp.utils.hashing import file_key
    from tests.test_cam_pipeline import TINY

    overrides = [
        "+experiment=cam_shapes",
        f"paths.data_dir={tmp_path / 'data'}",
        "pipeline.refine=[crf,rw]",
        *TINY,
    ]
    report = run(overrides, str(tmp_path / "pipe"), stop_after="refine")
    for name in ("crf", "rw"):  # every image's labels scored (1 epoch on 14 images: near the trivial score)
        assert report[name]["scored_images"] == report[name]["images"] and report[name]["pseudo_mIoU"] > 0.05
    assert report["rw"]["computed"] == report["rw"]["images"] > 0
    assert 0.0 < report["aff_labels"]["confident_fraction"] < 1.0
    assert "val/aff_balanced_acc" in report["rw_affinity"]
    record = json.loads((tmp_path / "pipe" / "rw_affinity" / "done.json").read_text())
    last = Path(record["ckpt"]).parent / "last.ckpt"
    # the walk used the AffinityNet the affinity step trained, its final weights (psa/SEAM: weights last)
    settings = json.loads((Path(report["rw"]["cache_dir"]) / "settings.json").read_text())["settings"]
    assert settings["affinity"]["ckpt"] == file_key(last)
    again = run(overrides, str(tmp_path / "pipe"), stop_after="refine")
    assert again["rw"]["computed"] == 0 and again["rw"]["pseudo_mIoU"] == report["rw"]["pseudo_mIoU"]


def test_affinity_run_drops_cam_method_overrides_and_both_papers_settings_compose():
    from segexp.pipeline.compose import compose, method_config, without_method

    args = [
        "+experiment=x",
        "method.inference.scales=[1.0]",
        "+method.foo=1",
        "method=seam",
        "schedule.epochs=2",
    ]
    assert without_method(args) == ["+experiment=x", "schedule.epochs=2"]
    # the AffinityNet method node is composed on its own: an experiment's method block never leaks in
    node = method_config("affinitynet", ["method.radius=3"])
    assert node._target_.endswith("AffinityNetMethod") and node.radius == 3
    seam_cfg = compose(["+experiment=cam_shapes"]).pipeline
    psa_cfg = compose(["+experiment=cam_shapes", "pipeline/affinity=psa"]).pipeline
    seam, psa = seam_cfg.stages.rw, psa_cfg.stages.rw_psa
    assert (seam.beta, seam.logt, seam.alpha) == (8, 6, 6) and (psa.beta, psa.logt, psa.alpha) == (8, 8, 16)
    assert (seam_cfg.affinity.labels.la_alpha, seam_cfg.affinity.labels.ha_alpha) == (4.0, 24.0)
    assert (psa_cfg.affinity.labels.la_alpha, psa_cfg.affinity.labels.ha_alpha) == (4.0, 32.0)
    assert "schedule.optimizer.lr=0.1" in psa_cfg.affinity.overrides and psa.name == "rw_psa"
    assert "schedule.optimizer.lr=0.1" not in seam_cfg.affinity.overrides
    # train_aff.py's 8 epochs of batch 8, not the experiment's own (cam_shapes: 20, 16) carried over
    for cfg in (seam_cfg, psa_cfg):
        schedule = f"schedule={cfg.affinity.schedule}"
        run_cfg = compose(["+experiment=cam_shapes", schedule, *cfg.affinity.overrides])
        assert run_cfg.schedule.epochs == 8 and run_cfg.schedule.optimizer._target_ == "torch.optim.SGD"
        assert run_cfg.data.batch_size == 8
