"""Round trips against the synthetic generator: the real readers give back what was drawn, bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_formats import data_config, reader_from_config

from segexp.data.readers.coco import COCOInstances, COCOPanoptic
from segexp.data.readers.sod import SalientObjects
from segexp.data.readers.voc import VOCSegmentation
from segexp.data.synth import CLASS_NAMES, panoptic_annotation, render_sample

NUM, SIZE, SEED = 10, 64, 3
OVERRIDES = {"prepare.num_images": NUM, "prepare.size": SIZE, "prepare.seed": SEED}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Generated through each config's own `prepare` block, as the DataModule would."""
    from hydra.utils import instantiate

    data_dir = tmp_path_factory.mktemp("data")
    roots = set()
    for name in ("shapes", "shapes_sod", "shapes_entities"):
        prepare = instantiate(data_config(name, data_dir, OVERRIDES).prepare, workers=1)
        roots.add(prepare())
    assert len(roots) == 1  # one tree, generated once, read through three views
    return data_dir


def all_samples(reader):
    """(reader sample, rendered sample) pairs, matched by the synthetic id in the file name."""
    for i in range(len(reader)):
        s = reader[i]
        index = int(s["meta"]["path"].rsplit("_", 1)[1].split(".")[0])
        yield s, render_sample(index, SIZE, SEED)


def test_voc_tree_round_trip(data_dir):
    reader = reader_from_config(
        "shapes", data_dir, "val", overrides=OVERRIDES, keys=["mask", "instances", "boxes", "labels"]
    )
    assert isinstance(reader, VOCSegmentation) and len(reader) == 2
    count = 0
    for split_key in ("train", "val", "test"):
        reader = reader_from_config(
            "shapes", data_dir, split_key, overrides=OVERRIDES, keys=["mask", "instances", "boxes", "labels"]
        )
        for s, r in all_samples(reader):
            np.testing.assert_array_equal(s["mask"], r.semantic)
            np.testing.assert_array_equal(s["instances"], np.where(r.objects == 255, 0, r.objects))
            np.testing.assert_array_equal(s["boxes"], r.boxes)
            np.testing.assert_array_equal(s["box_labels"], r.classes)
            expected = np.zeros(len(CLASS_NAMES) - 1, np.float32)
            expected[np.array(r.classes) - 1] = 1
            np.testing.assert_array_equal(s["labels"], expected)
            assert np.abs(s["image"].astype(int) - r.image).mean() < 20  # JPEG of noisy textures
            count += 1
    assert count == NUM


def test_coco_panoptic_round_trip(data_dir):
    for split_key in ("train", "val", "test"):
        reader = reader_from_config(
            "shapes_entities", data_dir, split_key, overrides=OVERRIDES, keys=["instances", "mask"]
        )
        assert isinstance(reader, COCOPanoptic)
        for s, r in all_samples(reader):
            id_map, segments = panoptic_annotation(r)
            expected = np.zeros_like(id_map, dtype=np.int32)
            for k, seg in enumerate(segments, 1):
                expected[id_map == seg["id"]] = k
            np.testing.assert_array_equal(s["instances"], expected)
            np.testing.assert_array_equal(s["mask"], r.semantic)  # stuff = background, band = 255


def test_coco_instances_round_trip(data_dir):
    root = data_config("shapes", data_dir, OVERRIDES).prepare.root
    reader = COCOInstances(f"{root}/coco", "train", class_names=CLASS_NAMES)
    for s, r in all_samples(reader):
        np.testing.assert_array_equal(s["instances"], r.instances)
        np.testing.assert_array_equal(s["mask"], np.array([0, *r.classes], np.uint8)[r.instances])
        np.testing.assert_array_equal(s["boxes"], r.boxes)


def test_sod_tree_round_trip(data_dir):
    seen = 0
    for split_key in ("train", "val", "test"):
        reader = reader_from_config("shapes_sod", data_dir, split_key, overrides=OVERRIDES)
        assert isinstance(reader, SalientObjects)
        for s, r in all_samples(reader):
            np.testing.assert_array_equal(s["saliency"], (r.instances > 0).astype(np.float32))
            seen += 1
    assert seen == NUM
