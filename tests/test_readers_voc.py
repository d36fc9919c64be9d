"""VOC2012 reader on a tiny tree in the official layout, including the awkward real-file cases."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_formats import VOC_IDS, reader_from_config, write_rgb_mask, write_voc_tree, write_voc_xml_text

from segexp.data.io import DatasetError, VOCObject, write_palette_png
from segexp.data.readers.voc import VOC_CLASSES, VOCSegmentation
from segexp.utils.atomic import write_text


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    return root, write_voc_tree(root)


def test_reads_every_key_exactly(voc):
    root, truth = voc
    reader = VOCSegmentation(root, "trainval")
    assert len(reader) == 3 and reader.num_classes == 21
    for i, image_id in enumerate(VOC_IDS):
        s = reader[i]
        t = truth[image_id]
        assert s["image"].dtype == np.uint8 and s["image"].shape == t["image"].shape
        assert np.abs(s["image"].astype(int) - t["image"]).mean() < 3  # JPEG, so only close
        np.testing.assert_array_equal(s["mask"], t["mask"])  # palette indices incl. the 255 band
        assert s["mask"].dtype == np.uint8
        expected_inst = t["instances"].astype(np.int32)
        expected_inst[expected_inst == 255] = 0
        np.testing.assert_array_equal(s["instances"], expected_inst)
        assert s["instances"].dtype == np.int32 and 255 not in s["instances"]
        np.testing.assert_array_equal(s["boxes"], t["boxes"])
        assert s["boxes"].dtype == np.float32
        np.testing.assert_array_equal(s["box_labels"], t["box_labels"])
        np.testing.assert_array_equal(s["box_difficult"], [False, i == 1])
        expected = np.zeros(20, np.float32)
        expected[[c - 1 for c in t["classes"]]] = 1
        np.testing.assert_array_equal(s["labels"], expected)
        assert s["meta"] == {
            "id": image_id,
            "path": str(root / "JPEGImages" / f"{image_id}.jpg"),
            "orig_size": (24, 32),
        }


def test_box_pixels_match_the_mask(voc):
    """0-based exclusive boxes from 1-based inclusive XML cover exactly the object's pixels."""
    root, _ = voc
    s = VOCSegmentation(root, "train", keys=["boxes", "instances"])[0]
    for box, inst_id in zip(s["boxes"], (1, 2)):
        ys, xs = np.nonzero(s["instances"] == inst_id)
        assert tuple(box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_keys_restrict_decoding(voc):
    root, _ = voc
    (root / "SegmentationObject" / f"{VOC_IDS[0]}.png").unlink()  # not needed, so must not be read
    (root / "Annotations" / f"{VOC_IDS[0]}.xml").unlink()
    s = VOCSegmentation(root, "train", keys=["mask"])[0]
    assert set(s) == {"image", "mask", "meta"}
    s = VOCSegmentation(root, "train", keys=["labels"])[0]
    assert set(s) == {"image", "labels", "meta"}
    with pytest.raises(DatasetError, match="file not found"):
        VOCSegmentation(root, "train", keys=["boxes"])[0]
    with pytest.raises(KeyError, match="saliency"):
        VOCSegmentation(root, "train", keys=["saliency"])


def test_boxes_bring_their_labels_and_flags(voc):
    root, _ = voc
    s = VOCSegmentation(root, "train", keys=["boxes"])[1]
    assert set(s) == {"image", "boxes", "box_labels", "box_difficult", "meta"}


def test_labels_from_xml(voc):
    root, _ = voc
    image_id = VOC_IDS[0]
    # An extra XML object (a dog) that has no pixels in the mask: only xml-labels see it.
    write_voc_xml_text(
        root / "Annotations" / f"{image_id}.xml",
        image_id,
        32,
        24,
        [VOCObject("aeroplane", (6, 5, 13, 9)), VOCObject("dog", (1, 1, 3, 3))],
    )
    from_mask = VOCSegmentation(root, "train", keys=["labels"])[0]["labels"]
    from_xml = VOCSegmentation(root, "train", keys=["labels"], labels_from="xml")[0]["labels"]
    assert np.nonzero(from_mask)[0].tolist() == [0, 14]
    assert np.nonzero(from_xml)[0].tolist() == [0, 11]
    with pytest.raises(ValueError, match="labels_from"):
        VOCSegmentation(root, "train", labels_from="boxes")


def test_rgb_stored_mask_is_decoded_with_the_palette(voc):
    root, truth = voc
    write_rgb_mask(root / "SegmentationClass" / f"{VOC_IDS[0]}.png", truth[VOC_IDS[0]]["mask"])
    write_rgb_mask(root / "SegmentationObject" / f"{VOC_IDS[0]}.png", truth[VOC_IDS[0]]["instances"])
    s = VOCSegmentation(root, "train")[0]
    np.testing.assert_array_equal(s["mask"], truth[VOC_IDS[0]]["mask"])
    assert s["instances"].max() == 2 and 255 not in s["instances"]


def test_aug_pair_format_split_and_gray_masks(voc):
    root, truth = voc
    from segexp.data.io import write_gray_png

    for image_id in VOC_IDS:
        write_gray_png(root / "SegmentationClassAug" / f"{image_id}.png", truth[image_id]["mask"])
    write_text(
        root / "ImageSets" / "SegmentationAug" / "train_aug.txt",
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in VOC_IDS),
    )
    reader = VOCSegmentation(
        root,
        "train_aug",
        mask_dir="SegmentationClassAug",
        split_dir="ImageSets/SegmentationAug",
        keys=["mask"],
    )
    assert reader.ids == list(VOC_IDS)
    np.testing.assert_array_equal(reader[2]["mask"], truth[VOC_IDS[2]]["mask"])


def test_missing_split_file(voc):
    root, _ = voc
    with pytest.raises(DatasetError, match=r"test\.txt.*split file not found"):
        VOCSegmentation(root, "test")


def test_missing_image_names_it(voc):
    root, _ = voc
    (root / "JPEGImages" / f"{VOC_IDS[1]}.jpg").unlink()
    with pytest.raises(DatasetError, match=f"{VOC_IDS[1]}.jpg.*not found") as err:
        VOCSegmentation(root, "train")[1]
    assert err.value.path.endswith(f"{VOC_IDS[1]}.jpg")


def test_size_mismatch_names_both_files_and_sizes(voc):
    root, _ = voc
    write_palette_png(root / "SegmentationClass" / f"{VOC_IDS[0]}.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DatasetError) as err:
        VOCSegmentation(root, "train", keys=["mask"])[0]
    msg = str(err.value)
    assert f"SegmentationClass/{VOC_IDS[0]}.png" in msg and f"JPEGImages/{VOC_IDS[0]}.jpg" in msg
    assert "30x20" in msg and "32x24" in msg


def test_label_values_outside_class_set(voc):
    root, _ = voc
    bad = np.zeros((24, 32), np.uint8)
    bad[0, 0] = 21
    bad[0, 1] = 255  # the void value is fine
    write_palette_png(root / "SegmentationClass" / f"{VOC_IDS[0]}.png", bad)
    with pytest.raises(DatasetError, match=r"label values 21 outside the class set 0\.\.20"):
        VOCSegmentation(root, "train", keys=["mask"])[0]
    # with fewer classes configured, a valid VOC mask is out of range too
    with pytest.raises(DatasetError, match="outside the class set 0..5"):
        VOCSegmentation(root, "val", keys=["mask"], class_names=VOC_CLASSES[:6])[0]


def test_unknown_xml_class_names_file_and_name(voc):
    root, _ = voc
    xml = root / "Annotations" / f"{VOC_IDS[0]}.xml"
    write_voc_xml_text(xml, VOC_IDS[0], 32, 24, [VOCObject("unicorn", (1, 1, 5, 5))])
    with pytest.raises(DatasetError, match="unknown class name 'unicorn'") as err:
        VOCSegmentation(root, "train", keys=["boxes"])[0]
    assert err.value.path == str(xml)


def test_image_without_objects_gives_empty_boxes(voc):
    root, _ = voc
    write_voc_xml_text(root / "Annotations" / f"{VOC_IDS[0]}.xml", VOC_IDS[0], 32, 24, [])
    s = VOCSegmentation(root, "train", keys=["boxes"])[0]
    assert s["boxes"].shape == (0, 4) and s["box_labels"].shape == (0,)


def test_voc_config_reads_the_tree(voc, tmp_path):
    root, truth = voc
    for split_key, expected in (("train", VOC_IDS[:2]), ("val", VOC_IDS[2:]), ("test", VOC_IDS[2:])):
        reader = reader_from_config("voc", tmp_path, split_key, keys=["mask", "labels"])
        assert isinstance(reader, VOCSegmentation) and reader.ids == list(expected)
        assert reader.class_names == VOC_CLASSES
    np.testing.assert_array_equal(reader[0]["mask"], truth[VOC_IDS[2]]["mask"])


@pytest.fixture
def voc_aug(tmp_path):
    from fixtures_formats import write_voc_aug

    root = tmp_path / "VOCdevkit" / "VOC2012"
    truth = write_voc_tree(root)
    sbd = write_voc_aug(root, tmp_path / "SBD" / "benchmark_RELEASE" / "dataset", truth)
    return root, truth, sbd


def test_sbd_fallback_for_ids_missing_from_voc2012(voc_aug, tmp_path):
    from fixtures_formats import SBD_ID

    root, _, sbd = voc_aug
    reader = VOCSegmentation(
        root,
        "train_aug",
        split_dir="ImageSets/SegmentationAug",
        sbd_root=tmp_path / "SBD" / "benchmark_RELEASE" / "dataset",
    )
    assert reader.ids[2] == SBD_ID
    s = reader[2]
    np.testing.assert_array_equal(s["instances"], sbd["instances"])
    np.testing.assert_array_equal(s["mask"], sbd["mask"])  # from cls/<id>.mat
    np.testing.assert_array_equal(s["boxes"], sbd["boxes"])
    np.testing.assert_array_equal(s["box_labels"], sbd["box_labels"])
    assert not s["box_difficult"].any()
    # without SBD the missing XML is reported with its path
    with pytest.raises(DatasetError, match=f"Annotations/{SBD_ID}.xml: file not found"):
        VOCSegmentation(root, "train_aug", split_dir="ImageSets/SegmentationAug", keys=["boxes"])[2]


def test_missing_file_accepts_either_form_of_an_annotation(voc_aug, tmp_path):
    """What the datamodule checks before training: a file counts as present in any form ``load`` reads
    (VOC's PNG / XML or SBD's .mat), and only the files the keys need are asked for."""
    from fixtures_formats import SBD_ID

    root, _, _ = voc_aug
    sbd_root = tmp_path / "SBD" / "benchmark_RELEASE" / "dataset"
    aug = {"split_dir": "ImageSets/SegmentationAug"}
    every = ["mask", "instances", "boxes"]
    with_sbd = VOCSegmentation(root, "train_aug", keys=every, sbd_root=sbd_root, **aug)
    assert [with_sbd.missing_file(i) for i in with_sbd.ids] == [None, None, None]
    for keys, missing in (
        (["boxes"], f"Annotations/{SBD_ID}.xml"),
        (["instances"], f"SegmentationObject/{SBD_ID}.png"),
        (["mask"], f"SegmentationClass/{SBD_ID}.png"),
    ):
        reader = VOCSegmentation(root, "train_aug", keys=keys, **aug)
        assert reader.missing_file(reader.ids[0]) is None
        assert reader.missing_file(SBD_ID) == root / missing
    image_only = VOCSegmentation(root, "train_aug", keys=["image"], **aug)
    assert image_only.missing_file(SBD_ID) is None  # no annotation asked for
    (sbd_root / "cls" / f"{SBD_ID}.mat").unlink()
    assert with_sbd.missing_file(SBD_ID) == root / "SegmentationClass" / f"{SBD_ID}.png"


def test_malformed_sbd_mat(voc_aug, tmp_path):
    from fixtures_formats import SBD_ID
    from scipy.io import savemat

    sbd_root = tmp_path / "SBD" / "benchmark_RELEASE" / "dataset"
    savemat(sbd_root / "inst" / f"{SBD_ID}.mat", {"GTinst": {"Segmentation": np.ones((24, 32), np.uint8)}})
    reader = VOCSegmentation(
        voc_aug[0], "train_aug", split_dir="ImageSets/SegmentationAug", sbd_root=sbd_root, keys=["boxes"]
    )
    with pytest.raises(DatasetError, match="'GTinst' has no field 'Categories'"):
        reader[2]
    (sbd_root / "inst" / f"{SBD_ID}.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="cannot read MATLAB file"):
        reader[2]


def test_voc_aug_config(voc_aug, tmp_path):
    root, truth, sbd = voc_aug
    train = reader_from_config("voc_aug", tmp_path, "train", keys=["mask", "labels"])
    assert len(train) == 3 and train.mask_dir == "SegmentationClassAug"
    assert train.labels_from == "xml"  # the releases' cls_labels.npy come from the XML object names
    assert np.nonzero(train[2]["labels"])[0].tolist() == [7, 11]  # an SBD-only id: SBD's cat, dog
    np.testing.assert_array_equal(train[2]["mask"], sbd["mask"])  # gray SegmentationClassAug PNG
    np.testing.assert_array_equal(train[0]["mask"], truth[VOC_IDS[0]]["mask"])
    val = reader_from_config("voc_aug", tmp_path, "val", keys=["mask", "instances"])
    assert val.ids == [VOC_IDS[2]]


def test_voc_boxes_config(voc_aug, tmp_path):
    from segexp.data.readers.voc import VOCBoxes

    root, truth, sbd = voc_aug
    train = reader_from_config("voc_boxes", tmp_path, "train", keys=["boxes", "labels"])
    assert isinstance(train, VOCBoxes) and len(train) == 3
    s = train[2]
    np.testing.assert_array_equal(s["boxes"], sbd["boxes"])
    assert np.nonzero(s["labels"])[0].tolist() == [7, 11]  # cat, dog: labels from the boxes
    np.testing.assert_array_equal(train[0]["boxes"], truth[VOC_IDS[0]]["boxes"])
    val = reader_from_config("voc_boxes", tmp_path, "val", keys=["mask"])
    np.testing.assert_array_equal(val[0]["mask"], truth[VOC_IDS[2]]["mask"])
    with pytest.raises(KeyError, match="instances"):
        reader_from_config("voc_boxes", tmp_path, "train", keys=["instances"])
