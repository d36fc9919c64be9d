"""Salient-object reader: stems across extensions, every mask encoding, list files, errors."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_formats import reader_from_config, write_sod_set

from segexp.data.datamodule import check_listed_images
from segexp.data.io import DatasetError
from segexp.data.readers.sod import SalientObjects, saliency_from_values
from segexp.utils.atomic import write_text


@pytest.fixture
def ecssd(tmp_path):
    root = tmp_path / "ECSSD"
    return root, write_sod_set(root, "images", "ground_truth_mask")


def test_every_mask_encoding_reads_as_unit_float(ecssd):
    root, truth = ecssd
    reader = SalientObjects(root, image_dir="images", mask_dir="ground_truth_mask")
    assert [reader[i]["meta"]["id"] for i in range(len(reader))] == ["a", "b", "c", "d"]
    for i, stem in enumerate("abcd"):
        s = reader[i]
        assert s["saliency"].dtype == np.float32 and s["image"].shape == (18, 26, 3)
        np.testing.assert_allclose(s["saliency"], truth[stem], atol=1e-6)
    assert 0.49 < reader[1]["saliency"][0, 0] < 0.51  # 16-bit soft value, not clipped to 1


def test_value_scaling_rules():
    assert saliency_from_values(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    assert saliency_from_values(np.array([[0, 1]], np.uint8)).tolist() == [[0.0, 1.0]]  # 0/1 masks
    assert saliency_from_values(np.array([[0, 65535]], np.int64)).tolist() == [[0.0, 1.0]]
    red_on_black = np.zeros((1, 2, 3), np.uint8)
    red_on_black[0, 1] = (255, 0, 0)
    assert saliency_from_values(red_on_black).tolist() == [[0.0, 1.0]]


def test_image_without_mask_is_named(ecssd):
    root, _ = ecssd
    (root / "ground_truth_mask" / "c.bmp").unlink()
    reader = SalientObjects(root, image_dir="images", mask_dir="ground_truth_mask")
    reader[0]
    with pytest.raises(DatasetError, match=r"images/c\.jpg: no mask named c\.\*") as err:
        reader[2]
    assert err.value.path.endswith("c.jpg")
    # found when the split opens, with the count of the others
    next((root / "ground_truth_mask").glob("a.*")).unlink()
    reader = SalientObjects(root, image_dir="images", mask_dir="ground_truth_mask")
    missing = r"ground_truth_mask/a\.\*: not found, nor the files of 1 more of the 4"
    with pytest.raises(DatasetError, match=missing):
        check_listed_images(reader, "test")
    check_listed_images(SalientObjects(root, image_dir="images", mask_dir="missing", keys=["image"]), "test")
    # an image-only run does not need masks at all
    assert set(SalientObjects(root, image_dir="images", mask_dir="missing", keys=["image"])[2]) == {
        "image",
        "meta",
    }


def test_list_file_and_missing_listed_image(ecssd):
    root, _ = ecssd
    write_text(root / "test.txt", "d.jpg\nb\n")
    reader = SalientObjects(
        root, "test", image_dir="images", mask_dir="ground_truth_mask", list_file="{split}.txt"
    )
    assert reader.stems == ["d", "b"] and len(reader) == 2
    write_text(root / "test.txt", "d\nzz\n")
    listed = SalientObjects(
        root, "test", image_dir="images", mask_dir="ground_truth_mask", list_file="{split}.txt"
    )
    with pytest.raises(DatasetError, match=r"images/zz\.\*: not found, nor the files of 0 more of the 2"):
        check_listed_images(listed, "test")
    write_text(root / "test.txt", "zz\n")
    with pytest.raises(DatasetError, match="image listed in .*test.txt not found"):
        SalientObjects(root, "test", image_dir="images", mask_dir="ground_truth_mask", list_file="test.txt")[
            0
        ]


def test_size_mismatch_and_ambiguous_stems(ecssd):
    from PIL import Image

    root, _ = ecssd
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "ground_truth_mask" / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png: size 5x5 .*images/a\.jpg of size 26x18"):
        SalientObjects(root, image_dir="images", mask_dir="ground_truth_mask")[0]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "ground_truth_mask" / "a.bmp")
    with pytest.raises(DatasetError, match="two files with stem 'a'"):
        SalientObjects(root, image_dir="images", mask_dir="ground_truth_mask")
    with pytest.raises(DatasetError, match="nowhere: directory not found"):
        SalientObjects(root, image_dir="nowhere")


def test_duts_and_bench_configs(tmp_path):
    truth = write_sod_set(tmp_path / "DUTS" / "DUTS-TR", "DUTS-TR-Image", "DUTS-TR-Mask")
    write_sod_set(tmp_path / "DUTS" / "DUTS-TE", "DUTS-TE-Image", "DUTS-TE-Mask")
    train = reader_from_config("duts", tmp_path, "train")
    test = reader_from_config("duts", tmp_path, "test")
    assert train.image_dir.name == "DUTS-TR-Image" and test.image_dir.name == "DUTS-TE-Image"
    np.testing.assert_allclose(train[3]["saliency"], truth["d"])
    write_sod_set(tmp_path / "HKU-IS", "imgs", "gt")
    hku = reader_from_config("sod_bench", tmp_path, "test", node="test_sets.HKU-IS")
    assert len(hku) == 4 and hku.name == "HKU-IS"
    from fixtures_formats import data_config

    bench = data_config("sod_bench", tmp_path)
    assert list(bench.test_sets) == ["DUTS-TE", "ECSSD", "HKU-IS", "PASCAL-S", "DUT-OMRON", "SOD"]
