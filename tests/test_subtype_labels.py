"""The oracle sub-category labels of the part set (segexp/stages/subtype_labels.py)."""

import numpy as np
import pytest

from segexp.data.readers.voc import VOCSegmentation
from segexp.data.synth import CLASS_NAMES, body_subtypes, ensure_synthetic
from segexp.data.testbed import Testbed
from segexp.stages.subtype_labels import BodySubtypeLabels, SubtypeLabelsError

BODIES = ["disc", "bar", "ring"]


@pytest.fixture(scope="module")
def part_root(tmp_path_factory):
    testbed = Testbed.from_dict({"parts": {"bodies": BODIES}})
    return ensure_synthetic(tmp_path_factory.mktemp("parts"), num_images=16, size=64, seed=3, testbed=testbed,
                            workers=1)  # fmt: skip


def _reader(root):
    voc = root / "VOCdevkit" / "VOC2012"
    return VOCSegmentation(voc, "train", keys=["image", "labels"], class_names=CLASS_NAMES)


def test_each_present_class_gets_the_bit_of_its_true_body(part_root):
    """Bit c * K + k is set iff class c is in the image and its (largest) object's body is bodies[k]."""
    reader = _reader(part_root)
    wrapped = BodySubtypeLabels(reader, part_root, "train", BODIES, num_subcategories=4)
    table = body_subtypes(part_root, "train")
    seen = set()
    for index, image_id in enumerate(reader.ids):
        sample = wrapped[index]
        bits = sample["sub_labels"].reshape(len(CLASS_NAMES) - 1, 4)
        labels = np.asarray(sample["labels"]) > 0
        assert labels.any()
        for c, present in enumerate(labels):
            expected = np.zeros(4)
            if present:
                expected[BODIES.index(table[image_id][c])] = 1
                seen.add(table[image_id][c])
            np.testing.assert_array_equal(bits[c], expected)
        assert bits[:, 3].sum() == 0  # K larger than the bodies: the spare sub-category is never a label
    assert len(seen) >= 2  # the set mixes bodies, so a constant label would have failed above


def test_the_shuffled_control_keeps_each_class_counts_but_not_the_bodies(part_root):
    """The control deals each class's sub-types to its images in a random order: the parent labels and the
    per-class sub-type counts are those of the true labels, the image-by-image sub-types are not."""
    reader = _reader(part_root)
    k = 3

    def sub_labels(**shuffle):
        wrapped = BodySubtypeLabels(reader, part_root, "train", BODIES, num_subcategories=k, **shuffle)
        return np.stack([wrapped[i]["sub_labels"] for i in range(len(reader))])

    a, b = sub_labels(), sub_labels(shuffle=True, seed=1)
    np.testing.assert_array_equal(a.reshape(len(a), -1, k).sum(2), b.reshape(len(b), -1, k).sum(2))
    np.testing.assert_array_equal(a.sum(0), b.sum(0))  # each (class, sub-type) as often
    assert (a != b).any(axis=1).sum() >= 2  # yet some images' sub-types moved
    np.testing.assert_array_equal(b, sub_labels(shuffle=True, seed=1))


def test_class_specific_bodies_number_each_class_sub_types_within_its_window(tmp_path):
    """With class_bodies 2, class c's sub-type k is the k-th body of its window, so K = 2 suffices and the
    same body is sub-type 0 of one class and sub-type 1 of the previous one."""
    names = ["disc", "bar", "ring", "plate", "half"]
    testbed = Testbed.from_dict({"parts": {"bodies": names, "class_bodies": 2}, "count": [1, 1]})
    root = ensure_synthetic(tmp_path / "cb", num_images=30, size=64, seed=1, testbed=testbed, workers=1)
    reader = _reader(root)
    wrapped = BodySubtypeLabels(reader, root, "train", names, num_subcategories=2, class_bodies=2)
    table = body_subtypes(root, "train")
    for index, image_id in enumerate(reader.ids):
        c = int(np.flatnonzero(np.asarray(wrapped[index]["labels"]))[0])
        bits = wrapped[index]["sub_labels"].reshape(len(CLASS_NAMES) - 1, 2)
        assert bits.sum() == 1 and bits[c].sum() == 1
        assert [names[c], names[(c + 1) % 5]].index(table[image_id][c]) == int(np.argmax(bits[c]))
    with pytest.raises(SubtypeLabelsError, match="set it to 2"):
        BodySubtypeLabels(reader, root, "train", names, num_subcategories=1, class_bodies=2)
    with pytest.raises(SubtypeLabelsError, match="not one of its sub-types"):  # read as 3 neutral bodies
        BodySubtypeLabels(reader, root, "train", names[:3], num_subcategories=3)


def test_too_few_subcategories_or_no_part_set_is_refused(part_root, tmp_path):
    reader = _reader(part_root)
    with pytest.raises(SubtypeLabelsError, match="method.num_subcategories=2; set it to 3"):
        BodySubtypeLabels(reader, part_root, "train", BODIES, num_subcategories=2)
    with pytest.raises(SubtypeLabelsError, match=r"body 'ring', not one of its sub-types \['disc', 'bar'\]"):
        BodySubtypeLabels(reader, part_root, "train", ["disc", "bar"], num_subcategories=3)
    plain = ensure_synthetic(tmp_path / "plain", num_images=8, size=64, seed=0, workers=1)
    with pytest.raises(SubtypeLabelsError, match="needs a part set"):
        BodySubtypeLabels(_reader(plain), plain, "train", BODIES, num_subcategories=3)
