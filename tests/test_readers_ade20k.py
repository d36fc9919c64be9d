"""ADE20K SceneParsing and full-release readers on tiny files in their layouts."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_formats import reader_from_config, write_ade_challenge, write_ade_full

from segexp.data.datamodule import check_listed_images
from segexp.data.io import DatasetError, write_gray_png
from segexp.data.readers.ade20k import ADE20K, ADE20K_CLASSES, ADE20KFull


@pytest.fixture
def ade(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    return root, write_ade_challenge(root)


def test_zero_label_is_ignore_and_classes_shift(ade):
    root, truth = ade
    reader = ADE20K(root, "validation")
    assert len(reader) == 2 and reader.num_classes == 150
    for i, (stem, t) in enumerate(sorted(truth.items())):
        s = reader[i]
        assert s["meta"]["id"] == stem
        expected = np.where(t["raw"] == 0, 255, t["raw"].astype(int) - 1)
        np.testing.assert_array_equal(s["mask"], expected)
        np.testing.assert_array_equal(s["instances"], t["instances"])
    assert ADE20K_CLASSES[s["mask"][0, 0]] == "sky"  # PNG label 3 = class index 2
    assert ADE20K_CLASSES[s["mask"][-1, 0]] == "flag"


def test_zero_label_as_background(ade):
    root, truth = ade
    reader = ADE20K(root, "validation", zero_label="background", keys=["mask"])
    assert reader.num_classes == 151 and reader.class_names[0] == "background"
    np.testing.assert_array_equal(reader[0]["mask"], truth[sorted(truth)[0]]["raw"])
    with pytest.raises(ValueError, match="151 classes, but 150 class names"):
        ADE20K(root, "validation", zero_label="background", class_names=ADE20K_CLASSES)
    with pytest.raises(ValueError, match="zero_label"):
        ADE20K(root, "validation", zero_label="drop")


def test_values_above_150_and_missing_instances(ade):
    root, truth = ade
    stem = sorted(truth)[0]
    bad = truth[stem]["raw"].copy()
    bad[0, 0] = 151
    write_gray_png(root / "annotations" / "validation" / f"{stem}.png", bad)
    with pytest.raises(DatasetError, match="label values 151 outside the class set 0..150"):
        ADE20K(root, "validation", keys=["mask"])[0]
    (root / "annotations_instance" / "validation" / f"{stem}.png").unlink()
    assert "mask" not in ADE20K(root, "validation", keys=["instances"])[1]
    with pytest.raises(DatasetError, match=f"annotations_instance/validation/{stem}.png: file not found"):
        ADE20K(root, "validation", keys=["instances"])[0]


def test_ade20k_config(ade, tmp_path):
    root, truth = ade
    reader = reader_from_config("ade20k", tmp_path, "val", keys=["mask"])
    assert isinstance(reader, ADE20K) and reader.class_names == ADE20K_CLASSES and len(reader) == 2
    with pytest.raises(DatasetError, match="training: directory not found"):
        reader_from_config("ade20k", tmp_path, "train")


def test_full_release_seg_png(tmp_path):
    truth = write_ade_full(tmp_path / "ADE20K_2021_17_01")
    reader = ADE20KFull(tmp_path / "ADE20K_2021_17_01", "training")
    s = reader[0]
    assert s["meta"]["id"] == truth["id"]
    np.testing.assert_array_equal(s["instances"], truth["instances"])
    from segexp.data.io import read_label_png

    seg = read_label_png(
        tmp_path / "ADE20K_2021_17_01" / "images" / "ADE" / "training" / (truth["id"] + "_seg.png")
    )
    classes, _ = ADE20KFull.decode_seg(seg.astype(np.int64))
    np.testing.assert_array_equal(classes, truth["classes"])
    with pytest.raises(KeyError, match="mask"):
        ADE20KFull(tmp_path / "ADE20K_2021_17_01", "training", keys=["mask"])


def test_a_missing_annotation_stops_the_split_when_it_opens(ade, tmp_path):
    """Images are listed from disk, annotations are not: a missing PNG is named before training starts,
    and only when ``keys`` read it."""
    root, truth = ade
    stem = sorted(truth)[1]
    (root / "annotations_instance" / "validation" / f"{stem}.png").unlink()
    check_listed_images(ADE20K(root, "validation", keys=["mask"]), "validation")
    with pytest.raises(DatasetError, match=f"annotations_instance/validation/{stem}.png: not found, nor the "
                       "files of 0 more of the 2 images"):  # fmt: skip
        check_listed_images(ADE20K(root, "validation"), "validation")
    (root / "annotations" / "validation" / f"{stem}.png").unlink()
    with pytest.raises(DatasetError, match=f"annotations/validation/{stem}.png"):
        check_listed_images(ADE20K(root, "validation", keys=["mask"]), "validation")

    full_root = tmp_path / "ADE20K_2021_17_01"
    image_id = write_ade_full(full_root)["id"]
    full = ADE20KFull(full_root, "training")
    assert full.ids == [image_id] and full.missing_file(image_id) is None
    seg = full_root / "images" / "ADE" / "training" / f"{image_id}_seg.png"
    seg.unlink()
    check_listed_images(ADE20KFull(full_root, "training", keys=["image"]), "training")
    with pytest.raises(DatasetError, match=f"{image_id}_seg.png: not found"):
        check_listed_images(ADE20KFull(full_root, "training"), "training")
