"""Round trips against the synthetic generator: the real readers give back what was drawn, bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_formats import data_config, reader_from_config

from segexp.data.readers.coco import COCOInstances, COCOPanoptic
from segexp.data.readers.sod import SalientObjects
from segexp.data.readers.voc import VOCSegmentation
from segexp.data.synth import (
    CLASS_NAMES,
    SPLITS,
    panoptic_annotation,
    render_sample,
    sod_mask_of,
    split_assignment,
)
from segexp.data.testbed import Testbed

NUM, SIZE, SEED = 10, 64, 3
OVERRIDES = {"prepare.num_images": NUM, "prepare.size": SIZE, "prepare.seed": SEED}
# Every mechanism's set goes through every reader (sod_noise at rate 0.7: its 6 train masks hold errors).
MECHANISMS = {"none": {}, "cooc": {}, "parts": {}, "clutter": {}, "sod_noise": {"rate": 0.7}}


@pytest.fixture(scope="module", params=list(MECHANISMS))
def mechanism(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def testbed(mechanism) -> Testbed:
    return Testbed() if mechanism == "none" else Testbed(**{mechanism: MECHANISMS[mechanism]})


@pytest.fixture(scope="module")
def overrides(mechanism) -> dict:
    extra = {} if mechanism == "none" else {f"prepare.testbed.{mechanism}": MECHANISMS[mechanism]}
    return {**OVERRIDES, **extra}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, overrides):
    """Generated through each config's own `prepare` block, as the DataModule would."""
    from hydra.utils import instantiate

    data_dir = tmp_path_factory.mktemp("data")
    roots = set()
    for name in ("shapes", "shapes_sod", "shapes_entities"):
        prepare = instantiate(data_config(name, data_dir, overrides).prepare, workers=1)
        roots.add(prepare())
    assert len(roots) == 1  # one tree, generated once, read through three views
    return data_dir


def _split(index: int) -> str:
    return split_assignment(NUM, (0.6, 0.2, 0.2))[index]


def all_samples(reader, testbed):
    """(reader sample, rendered sample) pairs, matched by the synthetic id in the file name."""
    for i in range(len(reader)):
        s = reader[i]
        index = int(s["meta"]["path"].rsplit("_", 1)[1].split(".")[0])
        yield s, render_sample(index, SIZE, SEED, testbed, _split(index))


def test_voc_tree_round_trip(data_dir, overrides, testbed):
    reader = reader_from_config(
        "shapes", data_dir, "val", overrides=overrides, keys=["mask", "instances", "boxes", "labels"]
    )
    assert isinstance(reader, VOCSegmentation) and len(reader) == 2
    count = 0
    for split_key in ("train", "val", "test"):
        reader = reader_from_config(
            "shapes", data_dir, split_key, overrides=overrides, keys=["mask", "instances", "boxes", "labels"]
        )
        for s, r in all_samples(reader, testbed):
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


def test_coco_panoptic_round_trip(data_dir, overrides, testbed):
    for split_key in ("train", "val", "test"):
        reader = reader_from_config(
            "shapes_entities", data_dir, split_key, overrides=overrides, keys=["instances", "mask"]
        )
        assert isinstance(reader, COCOPanoptic)
        for s, r in all_samples(reader, testbed):
            id_map, segments = panoptic_annotation(r)
            expected = np.zeros_like(id_map, dtype=np.int32)
            for k, seg in enumerate(segments, 1):
                expected[id_map == seg["id"]] = k
            np.testing.assert_array_equal(s["instances"], expected)
            np.testing.assert_array_equal(s["mask"], r.semantic)  # stuff = background, band = 255


def test_coco_instances_round_trip(data_dir, overrides, testbed):
    root = data_config("shapes", data_dir, overrides).prepare.root
    reader = COCOInstances(f"{root}/coco", "train", class_names=CLASS_NAMES)
    for s, r in all_samples(reader, testbed):
        np.testing.assert_array_equal(s["instances"], r.instances)
        np.testing.assert_array_equal(s["mask"], np.array([0, *r.classes], np.uint8)[r.instances])
        np.testing.assert_array_equal(s["boxes"], r.boxes)


def test_sod_tree_round_trip(data_dir, overrides, testbed):
    seen, corrupted = 0, set()
    for split_key in ("train", "val", "test"):
        reader = reader_from_config("shapes_sod", data_dir, split_key, overrides=overrides)
        assert isinstance(reader, SalientObjects)
        for s, r in all_samples(reader, testbed):
            index = int(r.id.rsplit("_", 1)[1])
            written, error = sod_mask_of(r, testbed, SEED, index, _split(index))
            np.testing.assert_array_equal(s["saliency"], written / 255.0)
            clean = (r.instances > 0).astype(np.float32)
            if error is None:
                np.testing.assert_array_equal(s["saliency"], clean)
            else:
                assert _split(index) == SPLITS[0] and (s["saliency"] != clean).any()
                corrupted.add(error)
            seen += 1
    assert seen == NUM
    assert bool(corrupted) == (testbed.sod_noise is not None)
