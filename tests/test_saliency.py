"""Saliency train wrappers: the PNG folder (round trip, the three error cases, the shapes oracle),
augmentation carrying the map, and the SOD-checkpoint stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segexp.data.io import DatasetError
from segexp.data.saliency import SaliencyFolder, oracle_saliency, saliency_wrapper, write_oracle_saliency


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    from segexp.data.synth import ensure_synthetic

    synth = ensure_synthetic(tmp_path_factory.mktemp("sal") / "src", num_images=12, size=64, seed=3)
    return synth / "VOCdevkit" / "VOC2012"


def _reader(voc_root: Path, keys=("image", "labels")):
    from segexp.data.readers.voc import VOCSegmentation
    from segexp.data.synth import CLASS_NAMES

    return VOCSegmentation(voc_root, split="train", keys=list(keys), class_names=CLASS_NAMES)


def _write_maps(reader, folder: Path) -> dict[str, np.ndarray]:
    """8-bit maps with a per-image gradient, as an off-the-shelf SOD model would store them."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = {}
    for i, image_id in enumerate(reader.ids):
        h, w = reader[i]["image"].shape[:2]
        m = ((np.arange(w)[None, :] * 255 // max(w - 1, 1) + i) % 256).astype(np.uint8).repeat(h, 0)
        Image.fromarray(m, mode="L").save(folder / f"{image_id}.png")
        maps[image_id] = m
    return maps


def test_folder_round_trip_gives_float_maps_in_unit_range(voc_root, tmp_path):
    reader = _reader(voc_root)
    maps = _write_maps(reader, tmp_path / "SALImages")
    wrapped = SaliencyFolder(reader, tmp_path / "SALImages")
    assert wrapped.ids == reader.ids and len(wrapped) == len(reader)
    for i, image_id in enumerate(reader.ids[:4]):
        sample = wrapped[i]
        assert sample["saliency"].dtype == np.float32
        np.testing.assert_allclose(sample["saliency"], maps[image_id] / 255.0, atol=1e-6)
        assert set(sample) >= {"image", "labels", "saliency"}


def test_missing_map_names_the_file(voc_root, tmp_path):
    reader = _reader(voc_root)
    _write_maps(reader, tmp_path / "sal")
    gone = tmp_path / "sal" / f"{reader.ids[3]}.png"
    gone.unlink()
    with pytest.raises(DatasetError, match=rf"{gone}.*saliency map missing \(1 of"):
        SaliencyFolder(reader, tmp_path / "sal")
    with pytest.raises(DatasetError, match="saliency folder not found"):
        SaliencyFolder(reader, tmp_path / "nowhere")


def test_unreadable_png_names_the_file(voc_root, tmp_path):
    reader = _reader(voc_root)
    _write_maps(reader, tmp_path / "sal")
    bad = tmp_path / "sal" / f"{reader.ids[0]}.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    wrapped = SaliencyFolder(reader, tmp_path / "sal")
    with pytest.raises(DatasetError, match=rf"{bad}: cannot decode"):
        wrapped[0]


def test_size_mismatch_names_both_files(voc_root, tmp_path):
    reader = _reader(voc_root)
    _write_maps(reader, tmp_path / "sal")
    small = tmp_path / "sal" / f"{reader.ids[1]}.png"
    Image.fromarray(np.zeros((10, 7), np.uint8)).save(small)
    wrapped = SaliencyFolder(reader, tmp_path / "sal")
    with pytest.raises(
        DatasetError, match=rf"{small}: size 7x10 \(WxH\) differs from its image .*{reader.ids[1]}"
    ):
        wrapped[1]


def test_oracle_is_the_object_mask_and_only_fills_missing_maps(voc_root, tmp_path):
    mask = np.array([[0, 1, 255], [3, 0, 0]], np.uint8)
    assert oracle_saliency(mask).tolist() == [[0, 255, 255], [255, 0, 0]]
    reader = _reader(voc_root)
    folder = tmp_path / "oracle"
    assert write_oracle_saliency(reader, folder) == len(reader)
    gt = _reader(voc_root, keys=("image", "mask"))[2]["mask"]
    stored = np.asarray(Image.open(folder / f"{reader.ids[2]}.png"))
    assert np.array_equal(stored > 0, gt != 0)
    assert write_oracle_saliency(reader, folder) == 0  # nothing missing: nothing rewritten
    wrapped = saliency_wrapper(reader, dir=folder, oracle_from_masks=True)
    assert set(np.unique(wrapped[2]["saliency"]).tolist()) <= {0.0, 1.0}


def test_augmentation_carries_the_saliency_with_the_image(voc_root, tmp_path):
    import albumentations as A

    from segexp.data.transforms import SampleTransform

    reader = _reader(voc_root)
    _write_maps(reader, tmp_path / "sal")
    sample = SaliencyFolder(reader, tmp_path / "sal")[0]
    out = SampleTransform(
        [A.HorizontalFlip(p=1.0), A.PadIfNeeded(80, 80, position="top_left", border_mode=0)]
    )(sample)
    h, w = sample["saliency"].shape
    assert out["saliency"].dtype.is_floating_point
    np.testing.assert_allclose(out["saliency"][:h, :w].numpy(), sample["saliency"][:, ::-1], atol=1e-6)
    assert float(out["saliency"][h:].abs().sum()) == 0.0  # padding is 0, never "salient"


def test_sod_checkpoint_stage_fills_the_cache_and_the_wrapper_reads_it(voc_root, tmp_path):
    import hydra
    import torch
    from omegaconf import OmegaConf

    from segexp.data.saliency import SaliencyFromStage
    from segexp.stages.saliency import SODSaliencyStage
    from tests.conftest import compose

    cfg = compose(
        ["method=cas", "loss=cas", "data=shapes_sod", "backbone=resnet18", "backbone.pretrained=false"]
    )
    method = hydra.utils.instantiate(cfg.method)
    run = tmp_path / "sod_run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": method.state_dict()}, run / "checkpoints" / "last.ckpt")
    OmegaConf.save(cfg, run / "config.yaml")  # what every training run writes next to checkpoints/

    stage = SODSaliencyStage(run / "checkpoints" / "last.ckpt", cache_dir=tmp_path / "cache", device="cpu")
    reader = _reader(voc_root)
    wrapped = SaliencyFromStage(reader, stage)  # computes the missing maps
    assert stage.missing(reader) == []
    sample = wrapped[0]
    assert sample["saliency"].shape == sample["image"].shape[:2]
    assert 0.0 <= sample["saliency"].min() and sample["saliency"].max() <= 1.0
    method.eval()
    with torch.no_grad():
        from segexp.data.transforms import image_tensor

        direct = method.saliency(image_tensor(sample["image"]))[0, 0].numpy()
    np.testing.assert_allclose(sample["saliency"], direct, atol=1 / 255 + 1e-6)  # uint8 storage
    from segexp.utils.errors import UserError

    with pytest.raises(UserError, match="records no method config"):  # no record and no run config beside it
        shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "lonely.ckpt")
        SODSaliencyStage(tmp_path / "lonely.ckpt", cache_dir=tmp_path / "cache")
