"""Ground truth with missing objects (Box2Seg's fully supervised case), on a real VOC-layout tree."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_formats import write_voc_tree

from segexp.data.label_noise import id_uniform
from segexp.data.missing_objects import MissingObjects, erase_objects
from segexp.data.readers.voc import VOCSegmentation


@pytest.fixture()
def voc(tmp_path):
    root = tmp_path / "VOC2012"
    return root, write_voc_tree(root)


def test_erasing_an_object_takes_its_void_band_and_nothing_else(voc):
    root, truth = voc
    reader = VOCSegmentation(root, "trainval", keys=["image", "mask"])
    s = reader[0]
    inst = reader.read_instances(s["meta"]["id"], s["image"])
    mask = truth[s["meta"]["id"]]["mask"]
    first = erase_objects(s["mask"], inst, [1])  # the object with a 255 band around it
    expected = mask.copy()
    expected[3:10, 4:14] = 0
    np.testing.assert_array_equal(first, expected)
    second = erase_objects(s["mask"], inst, [2])  # the band of the kept object stays void
    expected = mask.copy()
    expected[12:20, 18:30] = 0
    np.testing.assert_array_equal(second, expected)
    np.testing.assert_array_equal(erase_objects(s["mask"], inst, []), mask)


def test_a_band_shared_with_a_kept_object_is_split_by_distance():
    inst = np.zeros((5, 9), np.int32)
    inst[:, :3], inst[:, 6:] = 1, 2
    mask = np.where(inst == 1, 3, np.where(inst == 2, 4, 0)).astype(np.uint8)
    mask[:, 3:6] = 255  # a 3-px void band between the two objects
    out = erase_objects(mask, inst, [1])
    assert (out[:, :3] == 0).all() and (out[:, 6:] == 4).all()
    assert (out[:, 3] == 0).all()  # nearer to the erased object
    assert (out[:, 5] == 255).all()  # nearer to the kept one


def test_selection_is_per_object_and_fixed_by_seed_id_and_index(voc):
    root, truth = voc
    reader = VOCSegmentation(root, "trainval", keys=["image", "mask", "boxes", "box_labels"])
    for seed in range(6):
        wrapped = MissingObjects(reader, rate=0.5, seed=seed)
        for i in range(len(reader)):
            image_id = reader.ids[i]
            s = wrapped[i]
            expected = [k for k in (1, 2) if id_uniform(seed, f"{image_id}/{k}") < 0.5]
            assert s["meta"]["erased_objects"] == expected
            assert (
                s["meta"]["erased_objects"]
                == MissingObjects(reader, rate=0.5, seed=seed)[i]["meta"]["erased_objects"]
            )
            np.testing.assert_array_equal(s["boxes"], truth[image_id]["boxes"])  # boxes stay complete
            np.testing.assert_array_equal(s["image"], reader[i]["image"])


def test_rate_zero_is_the_reader_and_rate_one_leaves_no_foreground(voc):
    root, truth = voc
    reader = VOCSegmentation(root, "trainval", keys=["image", "mask"])
    for i, image_id in enumerate(reader.ids):
        np.testing.assert_array_equal(MissingObjects(reader, rate=0.0)[i]["mask"], truth[image_id]["mask"])
        emptied = MissingObjects(reader, rate=1.0)[i]["mask"]
        assert not emptied.any()  # objects and their bands gone: all background
    with pytest.raises(ValueError, match="rate"):
        MissingObjects(reader, rate=1.5)


def test_a_reader_without_instances_is_refused():
    class NoInstances:
        ids = ["a"]

    with pytest.raises(ValueError, match="read_instances"):
        MissingObjects(NoInstances(), rate=0.1)


def test_the_study_erases_training_objects_only(data_dir, tmp_path):
    """study_box2seg_fullsup at rate 1: every training mask is background only, the val masks keep their
    objects, and the boxes of every training image are still there (the attention loss needs them)."""
    import hydra

    from tests.conftest import SMALL_SYNTH, compose

    cfg = compose(["+experiment=study_box2seg_fullsup", "hydra.mode=RUN", "missing_rate=1.0", *SMALL_SYNTH,
                   f"paths.data_dir={data_dir}", "data.num_workers=0"], out_dir=tmp_path)  # fmt: skip
    keys = list(cfg.method.train_keys)
    dm = hydra.utils.instantiate(cfg.data, train_keys=keys, eval_keys=["image", "mask"])
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.datasets["train"].reader, dm.datasets["val"].reader
    assert isinstance(train, MissingObjects) and not isinstance(val, MissingObjects)
    for i in range(len(train)):
        s = train[i]
        assert not ((s["mask"] > 0) & (s["mask"] < 255)).any() and len(s["boxes"]) > 0
    assert any(((val[i]["mask"] > 0) & (val[i]["mask"] < 255)).any() for i in range(len(val)))
