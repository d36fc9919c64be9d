"""COCO instances and panoptic readers on tiny files in the official layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_formats import reader_from_config, write_coco_instances, write_coco_panoptic

from segexp.data.io import DatasetError
from segexp.data.readers.coco import COCOInstances, COCOPanoptic


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    return root, write_coco_instances(root)


def test_instances_decode_polygons_rle_and_crowd(coco):
    root, truth = coco
    reader = COCOInstances(root, "val2017")
    assert len(reader) == 3
    assert reader.class_names == ("background", "person", "car", "toothbrush")
    for i, image_id in enumerate((1, 2, 42)):
        s, t = reader[i], truth[image_id]
        np.testing.assert_array_equal(s["mask"], t["mask"])
        np.testing.assert_array_equal(s["instances"], t["instances"])
        assert s["instances"].dtype == np.int32 and s["mask"].dtype == np.uint8
        np.testing.assert_array_equal(s["boxes"], t["boxes"])
        np.testing.assert_array_equal(s["box_labels"], t["box_labels"])
        np.testing.assert_array_equal(s["labels"], t["labels"])
        assert s["meta"]["id"] == str(image_id) and s["meta"]["orig_size"] == (20, 30)


def test_crowd_is_ignore_but_not_over_objects(coco):
    root, _ = coco
    mask = COCOInstances(root, "val2017", keys=["mask"])[0]["mask"]
    assert mask[15, 25] == 255  # crowd only
    assert mask[10, 18] == 2  # the car lies on the crowd region and keeps its class


def test_category_map_selects_and_renumbers(coco):
    root, _ = coco
    reader = COCOInstances(root, "val2017", category_map={90: 1}, class_names=["background", "toothbrush"])
    s = reader[2]
    assert set(np.unique(s["mask"]).tolist()) == {0, 1}
    assert reader[0]["box_labels"].size == 0  # person and car are not mapped: dropped
    with pytest.raises(DatasetError, match="category ids \\[77\\]"):
        COCOInstances(root, "val2017", category_map={77: 1})


def test_class_name_count_must_match(coco):
    root, _ = coco
    with pytest.raises(DatasetError, match="2 class names are configured but the categories map to 3"):
        COCOInstances(root, "val2017", class_names=["background", "person"])


def test_skip_empty(coco):
    root, _ = coco
    assert [im["id"] for im in COCOInstances(root, "val2017", skip_empty=True).images] == [1, 42]


def test_boxes_do_not_decode_masks(coco):
    root, _ = coco
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentation"] = {"size": [1, 1], "counts": "garbage"}
    path.write_text(json.dumps(data))
    s = COCOInstances(root, "val2017", keys=["boxes"])[0]
    assert set(s) == {"image", "boxes", "box_labels", "box_difficult", "meta"}
    with pytest.raises(DatasetError, match="annotation id 5: RLE size \\[1, 1\\]"):
        COCOInstances(root, "val2017", keys=["mask"])[0]


def test_unknown_category_and_missing_files(coco):
    root, _ = coco
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 55
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="annotation id 0 .* category_id 55"):
        COCOInstances(root, "val2017")[0]
    (root / "val2017" / "000000000002.jpg").unlink()
    with pytest.raises(DatasetError, match="000000000002.jpg.*not found"):
        COCOInstances(root, "val2017")[1]
    with pytest.raises(DatasetError, match="instances_train2017.json: annotation file not found"):
        COCOInstances(root, "train2017")


def test_recorded_size_must_match_image(coco):
    root, _ = coco
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["images"][1]["width"] = 31
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="size 30x20 .* differs from 31x20"):
        COCOInstances(root, "val2017")[1]


def test_panoptic_entities_and_classes(tmp_path):
    root = tmp_path / "coco"
    truth = write_coco_panoptic(root)
    reader = COCOPanoptic(root, "val2017")
    assert reader.class_names == ("background", "person", "car", "tree-merged", "sky-other-merged")
    for i, image_id in enumerate((3, 11)):
        s = reader[i]
        np.testing.assert_array_equal(s["instances"], truth[image_id]["instances"])
        np.testing.assert_array_equal(s["mask"], truth[image_id]["mask"])
        np.testing.assert_array_equal(s["labels"], [1, 1, 1, 1])
    # crowd segments can be left out of the entities
    no_crowd = COCOPanoptic(root, "val2017", crowd_as_entity=False)[1]["instances"]
    expected = truth[11]["instances"].copy()
    expected[expected == 2] = 0
    assert set(np.unique(no_crowd).tolist()) == {0, 1, 2, 3}  # renumbered consecutively
    np.testing.assert_array_equal(no_crowd == 0, expected == 0)


def test_panoptic_stuff_as_background(tmp_path):
    root = tmp_path / "coco"
    truth = write_coco_panoptic(root)
    reader = COCOPanoptic(root, "val2017", stuff_as_background=True, keys=["mask"])
    assert reader.class_names == ("background", "person", "car")
    mask = reader[0]["mask"]
    expected = truth[3]["mask"].copy()
    expected[(expected == 3) | (expected == 4)] = 0
    np.testing.assert_array_equal(mask, expected)


def test_panoptic_missing_file_names_the_image_then_the_png_only_when_a_key_needs_it(tmp_path):
    root = tmp_path / "coco"
    write_coco_panoptic(root)
    reader, images_only = COCOPanoptic(root, "val2017"), COCOPanoptic(root, "val2017", keys=["image"])
    assert reader.ids == ["3", "11"] and reader.missing_file("3") is None
    png = root / "annotations" / "panoptic_val2017" / "000000000003.png"
    png.unlink()
    assert reader.missing_file("3") == png and images_only.missing_file("3") is None
    (root / "val2017" / "000000000003.jpg").unlink()
    assert reader.missing_file("3") == root / "val2017" / "000000000003.jpg"


def test_panoptic_errors(tmp_path):
    root = tmp_path / "coco"
    write_coco_panoptic(root)
    path = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"] = data["annotations"][0]["segments_info"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(
        DatasetError, match=r"000000000003.png: segment ids \[458755\] are not in the segments_info"
    ):
        COCOPanoptic(root, "val2017")[0]
    from segexp.data.io import write_gray_png

    write_gray_png(
        root / "annotations" / "panoptic_val2017" / "000000000011.png", np.zeros((16, 24), np.uint8)
    )
    with pytest.raises(DatasetError, match="expected an RGB panoptic PNG"):
        COCOPanoptic(root, "val2017")[1]


def test_coco_configs(tmp_path):
    write_coco_instances(tmp_path / "coco", split="val2017")
    with pytest.raises(DatasetError, match="81 class names are configured but the categories map to 3"):
        reader_from_config("coco", tmp_path, "val")
    write_coco_panoptic(tmp_path / "coco", split="val2017")
    with pytest.raises(DatasetError, match="134 class names"):
        reader_from_config("coco_panoptic", tmp_path, "test", keys=["instances"])


def test_coco_config_with_a_category_map(tmp_path):
    write_coco_instances(tmp_path / "coco", split="train2017")
    overrides = {
        "class_names": ["background", "person", "car", "toothbrush"],
        "num_classes": 4,
        "reader.category_map": {1: 1, 3: 2, 90: 3},
    }
    reader = reader_from_config("coco", tmp_path, "train", keys=["mask"], overrides=overrides)
    assert isinstance(reader, COCOInstances) and len(reader) == 3
    assert set(np.unique(reader[2]["mask"]).tolist()) == {0, 3}


def test_ids_and_image_paths_follow_the_stage_protocol(coco):
    """Stages (CAM export, CRF, ...) key caches by ``reader.ids`` and hash ``image_path(id)``."""
    from segexp.stages.base import image_inputs_key

    root, _ = coco
    reader = COCOInstances(root, "val2017")
    assert reader.ids == ["1", "2", "42"] == [reader[i]["meta"]["id"] for i in range(3)]
    assert all(reader.image_path(i).is_file() for i in reader.ids)
    assert image_inputs_key(reader, 0) != image_inputs_key(reader, 1)
