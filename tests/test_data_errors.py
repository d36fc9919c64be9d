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


def test_a_synthetic_set_still_being_written_is_waited_for_not_read(tmp_path):
    """Two jobs of a sweep on one new root: the second once listed the SOD folders while the first was
    writing them and trained on 533 of 1,200 images. A root without its completion marker is reported
    missing and generated (or waited for) before any split is read."""
    from segexp.data.synth import COMPLETE_MARKER
    from segexp.runner import build_datamodule, check_data

    cfg = compose(
        ["+experiment=cas_shapes_sod", f"paths.data_dir={tmp_path / 'data'}", "data.prepare.num_images=20",
         "data.prepare.size=64", "data.image_size=64", "data.num_workers=0"],
        out_dir=tmp_path,
    )
    dm = build_datamodule(cfg)
    check_data(cfg, dm, "fit")  # generates the root
    complete = len(dm.datasets["train"])
    root = dm.generated_root()
    (root / COMPLETE_MARKER).unlink()  # as while another job is writing it
    images = sorted((root / "SOD").rglob("train/Image/*"))
    for path in images[: len(images) // 2]:
        path.unlink()

    partial = build_datamodule(cfg)
    with pytest.raises(DatasetError, match=f"{root / COMPLETE_MARKER}: not written"):
        partial.setup("fit")
    check_data(cfg, partial, "fit")
    assert len(partial.datasets["train"]) == complete == len(images)


def test_a_partly_copied_folder_data_set_stops_the_run_unless_a_subset_is_accepted(tmp_path):
    """SOD / ADE20K readers list folders: a DUTS-TR holding 3 of its 10,553 images is refused by count,
    naming the folder and the key; data.expected_sizes=null (or the split's entry) accepts a subset."""
    import hydra
    import numpy as np

    from segexp.data.io import write_gray_png, write_jpeg

    tr = tmp_path / "DUTS" / "DUTS-TR"
    for k in range(3):
        write_jpeg(tr / "DUTS-TR-Image" / f"im{k}.jpg", np.full((20, 24, 3), 90, np.uint8))
        write_gray_png(tr / "DUTS-TR-Mask" / f"im{k}.png", np.full((20, 24), 255, np.uint8))
    base = ["data=duts", f"paths.data_dir={tmp_path}", "data.num_workers=0"]
    keys = {"train_keys": ["image", "saliency"], "eval_keys": ["image", "saliency"]}
    dm = hydra.utils.instantiate(compose(base, out_dir=tmp_path).data, **keys)
    refused = r"DUTS-TR-Image: split 'DUTS-TR' has 3 images, the official release 10553 \(data.expected_sizes"
    with pytest.raises(DatasetError, match=refused):
        dm.build_dataset("train")
    for accept in ("data.expected_sizes=null", "data.expected_sizes.DUTS-TR=null"):
        dm = hydra.utils.instantiate(compose([*base, accept], out_dir=tmp_path).data, **keys)
        assert len(dm.build_dataset("train")) == 3


def test_images_a_split_file_lists_but_the_disk_lacks_stop_the_run_before_training(broken_tree, tmp_path):
    """VOC lists its images in split files: two deleted JPEGs are reported when the split is opened, the
    first by name with the count of the others, not at the first missing one mid-epoch."""
    data_dir, voc = broken_tree
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for image_id in ids[1:3]:
        (voc / "JPEGImages" / f"{image_id}.jpg").unlink()
    dm = _datamodule(data_dir, tmp_path)
    first = voc / "JPEGImages" / f"{ids[1]}.jpg"
    message = f"{first}: not found, nor the files of 1 more of the {len(ids)} images split 'train' lists"
    with pytest.raises(DatasetError, match=message):
        dm.setup("fit")


def test_a_listed_image_without_its_mask_stops_the_run_before_training(broken_tree, tmp_path):
    """A mask missing from SegmentationClass is found when the split opens, not when its sample is read."""
    data_dir, voc = broken_tree
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    mask = voc / "SegmentationClass" / f"{ids[-1]}.png"
    mask.unlink()
    dm = _datamodule(data_dir, tmp_path)
    with pytest.raises(DatasetError, match=f"{mask}: not found, nor the files of 0 more"):
        dm.setup("fit")
