"""Bad input reaching the training path fails with the file's name and the problem."""

from __future__ import annotations

import shutil

import pytest

from segexp.data.io import DatasetError
from tests.conftest import compose


@pytest.fixture()
def broken_tree(tmp_path):
    from segexp.data.synth import ensure_synthetic
    from segexp.data.testbed import Testbed

    src = ensure_synthetic(tmp_path / "src", num_images=10, size=64, seed=1)
    root = tmp_path / "data" / f"shapes-n10-px64-seed1-{Testbed().key()}"
    shutil.copytree(src, root)
    return tmp_path / "data", root / "VOCdevkit" / "VOC2012"


def _datamodule(data_dir, tmp_path):
    from segexp.runner import build_datamodule

    cfg = compose(
        ["+experiment=supervised_shapes", f"paths.data_dir={data_dir}", "data.prepare.num_images=10",
         "data.prepare.size=64", "data.prepare.seed=1", "data.image_size=64"],
        out_dir=tmp_path,
    )
    dm = build_datamodule(cfg)
    dm.prepare_data()
    return dm


def test_corrupt_jpeg_names_the_file(broken_tree, tmp_path):
    data_dir, voc = broken_tree
    first = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    jpg = voc / "JPEGImages" / f"{first}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated mid-scan
    dm = _datamodule(data_dir, tmp_path)
    dm.setup("fit")
    with pytest.raises(DatasetError, match=f"{jpg}: cannot decode image"):
        dm.datasets["train"][0]


def test_missing_split_file_names_it(broken_tree, tmp_path):
    data_dir, voc = broken_tree
    split = voc / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    dm = _datamodule(data_dir, tmp_path)
    with pytest.raises(DatasetError, match=f"{split}: split file not found"):
        dm.setup("fit")


def test_mask_of_another_size_names_both_files(broken_tree, tmp_path):
    import numpy as np

    from segexp.data.io import write_palette_png

    data_dir, voc = broken_tree
    first = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    png = voc / "SegmentationClass" / f"{first}.png"
    write_palette_png(png, np.zeros((32, 48), np.uint8))
    dm = _datamodule(data_dir, tmp_path)
    dm.setup("fit")
    with pytest.raises(DatasetError, match=str(png)) as err:
        dm.datasets["train"][0]
    assert "48" in str(err.value) and "64" in str(err.value)
