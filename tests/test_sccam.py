"""SC-CAM: sub-category labels, the clustering stage, the loss and heads, merged CAMs, resumable rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from segexp.losses.sccam import sccam_losses
from segexp.methods.sccam import SCCAM, batch_sub_labels
from segexp.models.sccam_head import SubCategoryCAMNet
from segexp.stages.subcategory import (
    FeatureStage,
    SubCategoryLabels,
    SubCategoryStage,
    cluster_per_class,
    subcategory_labels,
)
from segexp.utils.kmeans import kmeans
from tests.conftest import config_inference


# -- sub-category labels ------------------------------------------------------------------------
def test_subcategory_labels_one_bit_per_present_parent_at_parent_times_k_plus_cluster():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], np.float32)
    clusters = np.array([[2, -1, 0], [-1, 1, -1], [0, 3, 1]])
    out = subcategory_labels(labels, clusters, 4)
    assert out.shape == (3, 12)
    assert np.flatnonzero(out[0]).tolist() == [0 * 4 + 2, 2 * 4 + 0]
    assert np.flatnonzero(out[1]).tolist() == [1 * 4 + 1]
    assert np.flatnonzero(out[2]).tolist() == [0, 4 + 3, 8 + 1]
    assert (out.reshape(3, 3, 4).sum(-1) == labels).all()  # exactly one bit per present parent


def test_subcategory_labels_reject_a_cluster_outside_k():
    with pytest.raises(ValueError, match="cluster 4 is not in 0..3"):
        subcategory_labels(np.array([[1, 0]]), np.array([[4, -1]]), 4)


def test_multi_label_images_join_the_clustering_of_each_of_their_classes():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 6, generator=g).numpy()
    labels = np.zeros((30, 2), np.float32)
    labels[:20, 0] = 1
    labels[12:, 1] = 1  # images 12..19 have both classes
    clusters, stats = cluster_per_class(feats, labels, 3, n_init=2, random_state=5, backend="torch")
    assert (clusters[:12, 1] == -1).all() and (clusters[20:, 0] == -1).all()
    assert (clusters[12:20] >= 0).all()
    for c, members in ((0, np.arange(20)), (1, np.arange(12, 30))):
        ref = kmeans(torch.from_numpy(feats[members]), 3, n_init=2, seed=5)
        assert np.array_equal(clusters[members, c], ref.labels.numpy())
        assert stats[str(c)]["images"] == len(members) and sum(stats[str(c)]["sizes"]) == len(members)


def test_sklearn_backend_is_kmeans_lloyd_with_the_explicit_settings_and_deterministic():
    from sklearn.cluster import KMeans

    feats = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
    labels = np.ones((40, 1), np.float32)
    a, _ = cluster_per_class(feats, labels, 4, n_init=3, random_state=7, backend="sklearn")
    b, _ = cluster_per_class(feats, labels, 4, n_init=3, random_state=7, backend="sklearn")
    assert np.array_equal(a, b)
    ref = KMeans(4, n_init=3, random_state=7, max_iter=300, tol=1e-4, algorithm="lloyd").fit(feats)
    assert np.array_equal(a[:, 0], ref.labels_)


def test_sklearn_and_torch_backends_find_the_same_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    from segexp.bench.sccam import planted_mixture
    from segexp.stages.subcategory import kmeans_labels

    x = planted_mixture(300, 16, 5, seed=3)
    sk, sk_inertia = kmeans_labels(x, 5, "sklearn", n_init=3, random_state=0)
    th, th_inertia = kmeans_labels(x, 5, "torch", n_init=3, random_state=0)
    assert adjusted_rand_score(sk, th) == 1.0
    assert th_inertia == pytest.approx(sk_inertia, rel=1e-4)
    assert len(np.unique(sk)) == 5


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        cluster_per_class(np.eye(3, dtype=np.float32), np.ones((3, 1)), 2, backend="faiss")


def test_a_class_with_fewer_images_than_k_gets_one_cluster_per_image():
    feats = np.eye(4, dtype=np.float32)
    labels = np.array([[1], [1], [0], [0]], np.float32)
    clusters, stats = cluster_per_class(feats, labels, 10)
    assert sorted(clusters[:2, 0].tolist()) == [0, 1] and stats["0"]["k"] == 2


# -- the clustering stage on real files ---------------------------------------------------------
class FolderReader:
    """A minimal reader: PNG images in a folder, fixed image-level labels (3 foreground classes)."""

    provides = frozenset({"image", "labels"})
    num_classes = 4

    def __init__(self, root: Path, labels: np.ndarray):
        self.root = root
        self.labels = labels
        self.ids = [f"img{i:02d}" for i in range(len(labels))]
        self.keys = frozenset({"image", "labels"})

    def image_path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image = np.asarray(Image.open(self.image_path(self.ids[index])).convert("RGB"))
        return {"image": image, "labels": self.labels[index], "meta": {"id": self.ids[index]}}


@pytest.fixture(scope="module")
def folder_reader(tmp_path_factory) -> FolderReader:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    labels = np.zeros((16, 3), np.float32)
    labels[:10, 0] = 1
    labels[6:, 1] = 1
    labels[::3, 2] = 1
    for i in range(len(labels)):
        colour = rng.integers(0, 255, 3)
        image = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"img{i:02d}.png")
    return FolderReader(root, labels)


def _cam_method_cfg() -> dict:
    from omegaconf import OmegaConf

    from tests.conftest import compose

    cfg = compose(["+experiment=cam_shapes", "backbone.pretrained=false"])
    return OmegaConf.to_container(cfg.method, resolve=True)


@pytest.fixture(scope="module")
def method_cfg() -> dict:
    return _cam_method_cfg()


def _stage(
    cache: Path, method_cfg: dict, k: int = 3, seed: int = 0, backend: str = "sklearn"
) -> SubCategoryStage:
    features = FeatureStage(
        method_cfg, ckpt_path=None, init_seed=0, cache_dir=cache, device="cpu", progress=False
    )
    return SubCategoryStage(
        features,
        num_subcategories=k,
        n_init=3,
        random_state=seed,
        cache_dir=cache,
        device="cpu",
        backend=backend,
    )


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_clustering_stage_is_deterministic_for_a_seed_and_cached(
    folder_reader, method_cfg, tmp_path, backend
):
    a = _stage(tmp_path / "a", method_cfg, backend=backend)
    b = _stage(tmp_path / "b", method_cfg, backend=backend)
    ra, rb = a.run(folder_reader), b.run(folder_reader)
    assert ra["computed"] == rb["computed"] == 16 and ra["features"]["computed"] == 16
    ta, tb = a.label_table(folder_reader), b.label_table(folder_reader)
    assert np.array_equal(ta, tb)
    assert (ta.reshape(16, 3, 3).sum(-1) == folder_reader.labels).all()
    assert np.array_equal(a.get(folder_reader, 7), ta[7])
    # a second run reuses features and clusters; another seed is another cache entry (features shared)
    again = a.run(folder_reader)
    assert again["computed"] == 0 and again["features"]["computed"] == 0
    other = _stage(tmp_path / "a", method_cfg, seed=1)
    assert other.cache_for(folder_reader).dir != a.cache_for(folder_reader).dir
    assert other.run(folder_reader)["features"]["computed"] == 0
    # the backend is part of the key: the other backend never reads these clusters
    swapped = _stage(tmp_path / "a", method_cfg, backend="torch" if backend == "sklearn" else "sklearn")
    assert swapped.cache_for(folder_reader).dir != a.cache_for(folder_reader).dir


def test_a_changed_image_invalidates_the_whole_clustering(folder_reader, method_cfg, tmp_path):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(folder_reader.root, root)
    reader = FolderReader(root, folder_reader.labels)
    stage = _stage(tmp_path / "c", method_cfg)
    stage.run(reader)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "img03.png")
    stage = _stage(tmp_path / "c", method_cfg)  # a new process would start without the memo
    assert len(stage.missing(reader)) == 16
    report = stage.run(reader)
    assert report["features"]["computed"] == 1 and report["computed"] == 16


def test_ranks_share_the_features_and_rank_0_alone_clusters(folder_reader, method_cfg, tmp_path):
    """The two ranks of a DDP run, called one after the other (the barrier is a no-op here)."""
    stage = _stage(tmp_path / "ddp", method_cfg)
    assert len(stage.missing(folder_reader, rank=1, world_size=2)) == 16  # all-or-nothing, any rank
    rank1 = stage.run(folder_reader, rank=1, world_size=2)
    assert rank1["features"]["computed"] == 8 and rank1["computed"] == 0
    assert len(stage.missing(folder_reader)) == 16  # rank 1 wrote no clusters
    rank0 = stage.run(folder_reader, rank=0, world_size=2)
    assert rank0["features"]["computed"] == 8 and rank0["computed"] == 16
    single = _stage(tmp_path / "one", method_cfg)
    single.run(folder_reader)
    assert np.array_equal(stage.label_table(folder_reader), single.label_table(folder_reader))


def test_wrapper_adds_sub_labels_and_declares_them(folder_reader, method_cfg, tmp_path):
    wrapped = SubCategoryLabels(folder_reader, _stage(tmp_path / "w", method_cfg))
    sample = wrapped[4]
    assert SubCategoryLabels.adds == ("sub_labels",)
    assert sample["sub_labels"].shape == (9,) and sample["sub_labels"].sum() == folder_reader.labels[4].sum()
    from segexp.data.transforms import SampleTransform

    out = SampleTransform()(sample)  # an image-level vector: passed through as float
    assert torch.equal(out["sub_labels"], torch.as_tensor(sample["sub_labels"], dtype=torch.float32))


def test_missing_feature_checkpoint_is_a_clear_error(method_cfg, tmp_path):
    stage = FeatureStage(method_cfg, ckpt_path=tmp_path / "nope.ckpt", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        stage.settings()


# -- loss, heads, merged CAMs -------------------------------------------------------------------
def test_loss_on_a_hand_made_batch():
    parent = torch.tensor([[2.0, -1.0]])
    sub = torch.tensor([[0.0, 1.0, -2.0, 3.0]])
    terms = sccam_losses(
        parent, torch.tensor([[1.0, 0.0]]), sub, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), sub_weight=5.0
    )
    # parent: (softplus(-2) + softplus(-1)) / 2 = (0.126928 + 0.313262) / 2
    assert terms["cls"].item() == pytest.approx(0.220095, abs=1e-5)
    # sub: 5 * (log 2 + softplus(1) + softplus(-2) + softplus(3)) / 4
    assert terms["sub"].item() == pytest.approx(5 * (0.693147 + 1.313262 + 0.126928 + 3.048587) / 4, abs=1e-5)
    with pytest.raises(ValueError, match="num_subcategories"):
        sccam_losses(parent, torch.ones(1, 2), sub, torch.ones(1, 6))


class TinyBackbone(nn.Module):
    out_channels = [8]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return [torch.relu(self.conv(x))]


def _method(k: int = 2, **kw) -> SCCAM:
    torch.manual_seed(0)
    model = SubCategoryCAMNet(TinyBackbone(), num_classes=3, num_subcategories=k)
    return SCCAM(
        model,
        num_subcategories=k,
        num_classes=3,
        class_names=["bg", "a", "b"],
        schedule={},
        inference={**config_inference(), "scales": [1.0], "flip": False},
        **kw,
    )


def test_sub_head_on_the_pooled_feature_equals_the_mean_of_its_map():
    net = _method().model.eval()
    x = torch.randn(2, 3, 12, 10)
    assert torch.allclose(net(x)["sub_logits"], net.sub_cam(x).mean((2, 3)), atol=1e-6)
    assert net.sub_classifier.bias is None and net(x)["sub_logits"].shape == (2, 4)


def test_sub_loss_trains_backbone_and_sub_head_but_not_the_parent_classifier():
    method = _method()
    batch = {
        "image": torch.randn(2, 3, 8, 8),
        "labels": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        "sub_labels": torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]]),
    }
    losses = method.compute_losses(batch)
    assert set(losses) == {"cls", "sub"}
    losses["sub"].backward()
    assert method.model.head.classifier.weight.grad is None
    assert method.model.sub_classifier.weight.grad.abs().sum() > 0
    assert method.model.backbone.conv.weight.grad.abs().sum() > 0


def test_missing_sub_labels_is_a_clear_error():
    with pytest.raises(KeyError, match="SubCategoryLabels"):
        batch_sub_labels({"image": torch.zeros(1, 3, 4, 4), "meta": [{"id": "x"}]})


def test_merged_cam_is_the_max_over_sub_categories_normalised_jointly():
    method = _method(k=3, cam_source="merged").eval()
    x = torch.randn(1, 3, 8, 8)
    labels = torch.tensor([[1.0, 0.0]])
    cams = method.multiscale_cams(x, labels)
    sub = torch.relu(method.model.sub_cam(x)).view(1, 2, 3, 8, 8)
    expect = sub[:, 0].amax(1) / (sub[:, 0].amax() + 1e-5)  # common max of the 3 sub-CAMs of class a
    assert torch.allclose(cams[0, 0], expect[0], atol=1e-6)
    assert cams[0, 1].abs().max() == 0  # absent class


class StrideTwoBackbone(nn.Module):
    """A seeded conv at stride 2, so the CAMs are upsampled to the image as at inference."""

    out_channels = [8]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return [torch.relu(self.conv(x))]


RELEASE_PRESENT = (2, 7, 15)  # 0-based foreground classes of the image (the release's 20 classes)


def release_case() -> tuple[SCCAM, torch.Tensor, torch.Tensor]:
    """SC-CAM with 20 foreground classes (the release's ``infer_utils`` loops over 20) and K = 3, merged
    CAMs over 1.0 x flip, on a seeded 10 x 12 image with classes ``RELEASE_PRESENT``."""
    torch.manual_seed(0)
    model = SubCategoryCAMNet(StrideTwoBackbone(), num_classes=21, num_subcategories=3)
    method = SCCAM(
        model,
        num_subcategories=3,
        num_classes=21,
        class_names=[f"c{i}" for i in range(21)],
        schedule={},
        inference={**config_inference(), "scales": [1.0], "flip": True},
        cam_source="merged",
    ).eval()
    image = torch.randn(1, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(1, 20)
    labels[0, list(RELEASE_PRESENT)] = 1
    return method, image, labels


def test_mismatched_k_between_method_and_model_is_rejected():
    model = SubCategoryCAMNet(TinyBackbone(), num_classes=3, num_subcategories=4)
    with pytest.raises(ValueError, match="num_subcategories=2"):
        SCCAM(model, num_subcategories=2, num_classes=3, class_names=["bg", "a", "b"], schedule={},
              inference=config_inference())


def test_sub_head_learns_cluster_labels_beyond_chance():
    """The sub-category head fits labels that depend on the image (its colour) well above chance."""
    g = torch.Generator().manual_seed(0)
    colours = torch.randn(4, 3, generator=g) * 2
    cluster = torch.arange(64) % 4
    x = colours[cluster][..., None, None] + 0.3 * torch.randn(64, 3, 8, 8, generator=g)
    labels = torch.ones(64, 1)
    sub = torch.nn.functional.one_hot(cluster, 4).float()
    torch.manual_seed(0)
    model = SubCategoryCAMNet(TinyBackbone(), num_classes=2, num_subcategories=4, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        out = model(x)
        loss = sum(sccam_losses(out["cam"].mean((2, 3)), labels, out["sub_logits"], sub).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (model.eval()(x)["sub_logits"].argmax(1) == cluster).float().mean()
    assert acc > 0.9  # chance: 0.25


# -- rounds -------------------------------------------------------------------------------------
ROUNDS_TINY = [
    "data.prepare.num_images=24",
    "data.prepare.size=48",
    "data.image_size=48",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "schedule.epochs=2",
    "method.num_subcategories=2",
    "method.inference.scales=[1.0]",
    "method.inference.flip=false",
    "data.train_wrappers.0.stage.n_init=2",
    "pipeline.cam_network.rounds=1",
    "pipeline.cam_network.checkpoint_epochs=[1]",
    'pipeline.cam_network.round0_overrides=["method=cam","schedule.epochs=1"]',
    "test=false",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=1000",
    "trainer.enable_model_summary=false",
]


class CrashAtEpoch(pl.Callback):
    """A killed process, simulated: raises when epoch ``epoch`` (0-based) starts, i.e. after the
    previous epoch's ``last.ckpt`` was written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated interruption")


def _rounds_settings(**replace: str) -> list[str]:
    """ROUNDS_TINY with some of its keys set to other values."""
    kept = [o for o in ROUNDS_TINY if o.split("=", 1)[0] not in replace]
    return [*kept, *(f"{k}={v}" for k, v in replace.items())]


def test_a_resumed_pipeline_skips_finished_rounds_and_continues_the_interrupted_one(tmp_path, monkeypatch):
    """Round 0 and round 1 finish, round 2 is killed after its first of two epochs; the re-run trains
    only round 2, from its last.ckpt, and leaves the finished rounds and the cached features and
    clusterings untouched."""
    import json

    from omegaconf import OmegaConf

    import segexp.runner
    from segexp.pipeline import run

    settings = _rounds_settings(
        **{
            "pipeline.cam_network.rounds": "2",
            "pipeline.cam_network.checkpoint_epochs": "[1,2]",
            "data.prepare.num_images": "16",
            "data.prepare.size": "32",
            "data.image_size": "32",
        }
    )
    overrides = ["+experiment=sccam_shapes", f"paths.data_dir={tmp_path / 'data'}", *settings]
    out = tmp_path / "pipe"
    real_train, calls, crash = segexp.runner.train, [], {"round": "round2_"}

    def spy(cfg):
        run_dir = Path(cfg.paths.output_dir)
        calls.append((run_dir.name, cfg.get("ckpt_path")))
        if crash and run_dir.name.startswith(crash["round"]):
            crasher = {"_target_": f"{__name__}.CrashAtEpoch", "epoch": 1}
            OmegaConf.update(cfg, "callbacks.crash", crasher, force_add=True)
        return real_train(cfg)

    monkeypatch.setattr(segexp.runner, "train", spy)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(overrides, str(out), stop_after="train")
    names = [name for name, _ in calls]
    assert names[0] == "round0" and names[1].startswith("round1_K2_") and names[2].startswith("round2_K2_")
    round2 = out / names[2]
    last2 = round2 / "checkpoints" / "last.ckpt"
    assert (out / "round0" / "done.json").is_file() and (out / names[1] / "done.json").is_file()
    assert not (round2 / "done.json").exists()
    assert torch.load(last2, map_location="cpu", weights_only=False)["epoch"] == 0  # saved after epoch 0
    last1 = torch.load(out / names[1] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last1["epoch"] == 0  # round 1 stopped after 1 epoch of its 2-epoch poly horizon
    finished = [p for d in ("round0", names[1]) for p in sorted((out / d).glob("checkpoints/*.ckpt"))]
    cached = sorted((tmp_path / "data" / "stage_cache").glob("sccam_*/*/entries/*.npz"))
    assert finished and len(cached) >= 2 * 2 * 8  # features and clusters of rounds 1 and 2
    stamps = {p: p.stat().st_mtime_ns for p in finished + cached}

    crash.clear()
    calls.clear()
    report = run(overrides, str(out), stop_after="cam")
    assert calls == [(round2.name, str(last2))]  # only the interrupted round trains, from its checkpoint
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert torch.load(last2, map_location="cpu", weights_only=False)["epoch"] == 1  # its 2nd epoch ran
    assert json.loads((round2 / "done.json").read_text())["ckpt"].startswith(str(round2))
    rounds = json.loads((out / "rounds_report.json").read_text())
    assert [r["dir"] for r in rounds] == names[:3] and rounds == report["rounds"]
    assert all(r["cam"]["computed"] == 0 for r in rounds[:2])  # CAMs of finished rounds: cached
    for r in rounds:  # per-class F1 >= IoU, so the mean F-score bounds the mIoU from above
        assert 0.0 <= r["cam"]["best_mIoU"] <= r["cam"]["fscore_at_best_threshold"] <= 1.0
    assert report["cam"]["computed"] == 0  # the pipeline's CAM export = round 2's, already cached


def test_round0_keeps_the_overrides_its_method_has_and_drops_sc_cam_only_ones():
    from segexp.pipeline.sccam import round0_argv

    user = ["+experiment=sccam_shapes", "method.num_subcategories=3", "method.bg_threshold=0.1", "seed=3"]
    argv = round0_argv(user, ["method=cam"])
    assert argv == [
        "+experiment=sccam_shapes",
        "method.bg_threshold=0.1",
        "seed=3",
        "method=cam",
        "data.train_wrappers=[]",
    ]


# Release numbers: Juliachang/SC-CAM@191ec486 run on release_case() (its infer_cls.py pass loop - ReLU,
# bilinear upsampling, sub-category label mask, flip back - then tool/infer_utils.cls200_cam_norm,
# cam_npy_to_cam_dict and merge_200_cam_dict; train_cls.py:264-267 for the loss), 2026-12-04, torch 2.14.1.
# Per present class: sum, sum of squares, pixel (3, 4), pixel (9, 0) of the merged CAM.
RELEASE_MERGED = {
    2: (38.29469828866422, 15.938876805914184, 0.3235487639904022, 0.07714851945638657),
    7: (52.05089570581913, 28.34188003113399, 0.528704822063446, 0.09638144820928574),
    15: (62.86111409217119, 38.07690422332348, 0.4715286195278168, 0.07796289771795273),
}
RELEASE_LOSS = {"cls_20": 0.6870713233947754, "cls_200": 0.6902287006378174}  # lambda 5: 4.138215065002441


def test_merged_cams_and_loss_match_the_release_numbers():
    """The merged sub-category CAM (max over K, one max per class block) and Eq. 3 as the release computes
    them; the release's merged CAM equalled segexp's to 0.0 when recorded."""
    method, image, labels = release_case()
    cams = method.multiscale_cams(image, labels)[0].double()
    for c, (total, squares, p34, p90) in RELEASE_MERGED.items():
        assert cams[c].sum().item() == pytest.approx(total, rel=1e-6)
        assert (cams[c] ** 2).sum().item() == pytest.approx(squares, rel=1e-6)
        assert cams[c, 3, 4].item() == pytest.approx(p34, abs=1e-7)
        assert cams[c, 9, 0].item() == pytest.approx(p90, abs=1e-7)
    absent = [c for c in range(20) if c not in RELEASE_MERGED]
    assert cams[absent].abs().max() == 0
    sub = torch.zeros(1, 60)
    for c, k in zip(RELEASE_MERGED, (1, 0, 2)):
        sub[0, c * 3 + k] = 1
    with torch.no_grad():  # eval mode: no dropout, so the release's pool-then-classify equals ours
        terms = method.compute_losses({"image": image, "labels": labels, "sub_labels": sub})
    assert terms["cls"].item() == pytest.approx(RELEASE_LOSS["cls_20"], rel=1e-6)
    assert terms["sub"].item() == pytest.approx(5 * RELEASE_LOSS["cls_200"], rel=1e-6)
