"""EVICAN reader: COCO-format cells and nuclei, difficulty levels as splits."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_formats import reader_from_config, write_evican

from segexp.data.io import DatasetError
from segexp.data.readers.evican import EVICAN, parse_split


@pytest.fixture
def evican(tmp_path):
    root = tmp_path / "EVICAN"
    return root, write_evican(root)


def test_train_nuclei_stay_on_top_of_cells(evican):
    root, truth = evican
    s = EVICAN(root, "train")[0]
    assert s["image"].shape == (20, 24, 3)  # grayscale JPEG -> RGB
    np.testing.assert_array_equal(s["instances"], truth["train"][0])
    np.testing.assert_array_equal(s["mask"], truth["train"][1])
    np.testing.assert_array_equal(s["labels"], [1, 1])


def test_difficulty_levels_as_splits_or_option(evican):
    root, truth = evican
    by_split = EVICAN(root, "eval_easy")
    by_option = EVICAN(root, "eval", difficulty="easy")
    assert by_split.json_path == by_option.json_path == root / "annotations" / "instances_eval2019_easy.json"
    np.testing.assert_array_equal(by_split[0]["instances"], truth["eval_easy"][0])
    np.testing.assert_array_equal(by_option[0]["mask"], truth["eval_easy"][1])
    assert EVICAN(root, "eval_difficult")[0]["instances"].max() == 3


def test_split_names_are_validated():
    assert parse_split("eval_medium", None) == ("eval", "medium")
    assert parse_split("eval_easy", "difficult") == ("eval", "easy")  # the split name wins
    assert parse_split("train", None) == ("train", None)
    with pytest.raises(ValueError, match="needs a difficulty"):
        parse_split("eval", None)
    with pytest.raises(ValueError, match="only the eval split"):
        parse_split("train_easy", None)
    with pytest.raises(ValueError, match="train, val, eval"):
        parse_split("test", None)


def test_evican_config(evican, tmp_path):
    root, truth = evican
    test = reader_from_config("evican", tmp_path, "test", keys=["instances", "mask"])
    assert isinstance(test, EVICAN) and test.difficulty == "medium"
    assert test[0]["instances"].max() == 2
    with pytest.raises(DatasetError, match="instances_val2019.json: annotation file not found"):
        reader_from_config("evican", tmp_path, "val")
    with pytest.raises(KeyError, match="boxes"):
        EVICAN(root, "train", keys=["boxes"])


def test_16_bit_grayscale_images_keep_their_range(tmp_path):
    """A 16-bit microscopy image is scaled to 8 bits, not clipped at 255 (nearly all white)."""
    import numpy as np
    from PIL import Image

    from segexp.data.io import read_image

    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "cells.png")
    img = read_image(tmp_path / "cells.png")
    assert img.shape == (32, 64, 3) and img.dtype == np.uint8
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255
    assert abs(int(img[16, 0, 0]) - round(ramp[16, 0] / 257)) <= 1  # proportional, mid-range
    assert (img[..., 0] == 255).mean() < 0.01
