"""The mechanism testbed: every knob deterministic, every mechanism's property on generated data."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from segexp.data import mechanisms, synth
from segexp.data.io import read_label_png
from segexp.data.synth import CLASS_NAMES, STUFF_NAMES, SynthLayout, ensure_synthetic, render_sample
from segexp.data.testbed import LEGACY, Testbed

SIZE, SEED = 64, 0
KNOB_SETTINGS = {
    "default": {},
    "legacy": LEGACY.to_dict(),
    "textured_bright_outline2": {"style": "textured", "outline_px": 2},
    "many_small": {"count": [4, 6], "extent": [0.15, 0.25], "max_occlusion": 0.5, "inside_frame": False},
    "cooc": {"cooc": {}},
    "parts": {"parts": {}},
    "clutter": {"clutter": {}},
    "sod_noise": {"sod_noise": {}},
}


@pytest.mark.parametrize("name", list(KNOB_SETTINGS))
def test_every_setting_is_deterministic_and_seeded(name):
    testbed = Testbed.from_dict(KNOB_SETTINGS[name])
    for split in ("train", "test"):
        a, b = render_sample(4, SIZE, SEED, testbed, split), render_sample(4, SIZE, SEED, testbed, split)
        for key in ("image", "semantic", "instances", "stuff", "boxes"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        assert (a.classes, a.bodies, a.counterfactual) == (b.classes, b.bodies, b.counterfactual)
    assert not np.array_equal(render_sample(4, SIZE, SEED + 1, testbed).image, a.image)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_with_every_mechanism_is_byte_identical_for_any_worker_count(tmp_path):
    testbeds = [{"cooc": {}, "sod_noise": {"rate": 0.5}}, {"parts": {}}, {"clutter": {}}]
    for k, testbed in enumerate(testbeds):
        one = ensure_synthetic(tmp_path / f"a{k}", num_images=10, size=48, workers=1, testbed=testbed)
        two = ensure_synthetic(tmp_path / f"b{k}", num_images=10, size=48, workers=2, testbed=testbed)
        a, b = _files(one), _files(two)
        a.pop(".lock", None), b.pop(".lock", None)
        assert a.keys() == b.keys() and all(a[n] == b[n] for n in a)


def test_the_root_key_and_the_marker_record_the_whole_spec(tmp_path):
    assert Testbed().key() == Testbed.from_dict({"style": "plain"}).key()  # defaults filled in
    assert Testbed(cooc={}).key() != Testbed(cooc={"p": 0.8}).key()
    root = ensure_synthetic(tmp_path / "r", num_images=3, size=48, workers=1, testbed={"parts": {}})
    marker = json.loads((root / synth.COMPLETE_MARKER).read_text())
    assert marker["format_version"] == synth.FORMAT_VERSION == 2
    assert Testbed.from_dict(marker["testbed"]) == Testbed(parts={})
    with pytest.raises(ValueError, match="testbed="):
        ensure_synthetic(
            root, num_images=3, size=48, workers=1, testbed={"parts": {"badge_scale": [0.2, 0.3]}}
        )


def test_invalid_settings_name_the_key():
    for bad, key in [
        ({"count": [3, 1]}, "testbed.count"),
        ({"cooc": {"pairs": {"circle": "lava"}}}, "testbed.cooc.pairs"),
        ({"sod_noise": {"kinds": ["swap"]}}, "testbed.sod_noise.kinds"),
        ({"colour": "red"}, "unknown key"),
        ({"parts": {}, "clutter": {}}, "cannot be combined"),
    ]:
        with pytest.raises(ValueError, match=key):
            Testbed.from_dict(bad)


def test_config_defaults_equal_the_generator_defaults():
    conf = OmegaConf.load("conf/data/synth/default.yaml")
    assert Testbed.from_dict(OmegaConf.to_container(conf.testbed)) == Testbed()


# --- learnability knobs ---------------------------------------------------------------------------


def test_occlusion_is_bounded_and_objects_stay_inside_the_frame():
    testbed = Testbed()
    for index in range(40):
        rng = np.random.default_rng([SEED, index])
        synth._stuff_partition(rng, SIZE)
        shapes = synth._random_shapes(rng, SIZE, testbed)
        for k, shape in enumerate(shapes):
            later = np.any([s.mask for s in shapes[k + 1 :]], axis=0) if k + 1 < len(shapes) else False
            assert (shape.mask & later).sum() <= 0.2 * shape.mask.sum() + 1e-9
        s = render_sample(index, SIZE, SEED, testbed)
        border = np.concatenate([s.instances[0], s.instances[-1], s.instances[:, 0], s.instances[:, -1]])
        assert not border.any()
    clipped = [render_sample(i, SIZE, SEED, LEGACY).instances for i in range(40)]
    assert any(np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]]).any() for m in clipped)


def test_outline_darkens_the_inner_contour_of_every_object():
    for index in range(10):
        s = render_sample(index, SIZE, SEED, Testbed(outline_px=1))
        for k in range(1, len(s.classes) + 1):
            inside = (s.instances == k).astype(np.uint8)
            contour = (inside > 0) & (cv2.erode(inside, np.ones((3, 3), np.uint8)) == 0)
            assert (s.image[contour] == synth.OUTLINE_COLOUR).all()
        plain = render_sample(index, SIZE, SEED, Testbed(outline_px=0))
        assert not (plain.image == synth.OUTLINE_COLOUR).all(axis=-1).any()


def test_extent_sets_the_object_size():
    small = [render_sample(i, SIZE, SEED, Testbed(extent=(0.2, 0.25))) for i in range(20)]
    large = [render_sample(i, SIZE, SEED, Testbed(extent=(0.45, 0.5))) for i in range(20)]
    side = [max(b[2] - b[0], b[3] - b[1]) / SIZE for s in small for b in s.boxes]
    assert max(side) <= 0.3  # 0.25 of the side (a cross reaches 1.05x), plus rasterisation
    assert np.median([max(b[2] - b[0], b[3] - b[1]) / SIZE for s in large for b in s.boxes]) > 0.35


# --- mechanisms -----------------------------------------------------------------------------------------


def test_cooc_rates_and_counterfactual_split():
    testbed = Testbed(cooc={"pairs": {"circle": "water"}, "p": 0.9, "q": 0.05})
    water = STUFF_NAMES.index("water")
    circle = CLASS_NAMES.index("circle")
    train = [render_sample(i, 48, SEED, testbed, "train") for i in range(600)]
    with_circle = [water in s.stuff_classes for s in train if circle in s.classes]
    without = [water in s.stuff_classes for s in train if circle not in s.classes]
    assert abs(np.mean(with_circle) - 0.9) < 0.05 and abs(np.mean(without) - 0.05) < 0.03
    test = [render_sample(i, 48, SEED, testbed, "test") for i in range(200)]
    kinds = [s.counterfactual for s in test]
    assert 0.4 < kinds.count("class_without_stuff") / len(test) < 0.6
    for s in test:  # every test image breaks the pairing one way
        has_circle, has_water = circle in s.classes, water in s.stuff_classes
        assert (has_circle, has_water) == (
            (True, False) if s.counterfactual == "class_without_stuff" else (False, True)
        )
    # water is drawn only by the mechanism
    assert not any(water in s.stuff_classes for s in (render_sample(i, 48, SEED) for i in range(100)))


def test_parts_badge_lies_on_its_body_and_gt_is_body_plus_badge(tmp_path):
    testbed = Testbed(parts={})
    bodies = set()
    ratios = []
    for index in range(40):
        s = render_sample(index, 96, SEED, testbed)
        for k, body in enumerate(s.bodies, 1):
            bodies.add(body)
            badge, whole = s.badges == k, s.instances == k
            assert badge.any() and (badge <= whole).all()  # badge visible, inside the object
            assert (s.semantic[whole & (s.semantic != 255)] == s.classes[k - 1]).all()  # GT = body + badge
            ratios.append(badge.sum() / whole.sum())
            x0, y0, x1, y1 = s.boxes[k - 1].astype(int)
            assert (badge[y0:y1, x0:x1].sum() == badge.sum()) and (whole & ~badge).sum() > badge.sum()
    assert bodies == {"disc", "bar", "ring"}  # the default: three class-neutral bodies
    assert 0.05 < np.median(ratios) < 0.35  # a CAM on the badge covers a small part of the object
    root = ensure_synthetic(tmp_path / "p", num_images=5, size=64, workers=1, testbed=testbed)
    ann = json.loads(SynthLayout(root).coco_instances_json("train").read_text())["annotations"]
    assert {a["attributes"]["body"] for a in ann} <= {"disc", "bar", "ring"} and all(
        "badge" in a["attributes"] for a in ann
    )


def test_class_specific_bodies_come_from_each_class_window_and_stay_within_the_object_radius():
    """class_bodies 2 over five bodies: class c draws only bodies[c], bodies[c+1] (cyclic), so each body is
    shared by exactly two classes; every body lies within its radius (as inside_frame's margin assumes)."""
    names = ["disc", "bar", "ring", "plate", "half"]
    testbed = Testbed(parts={"bodies": names, "class_bodies": 2}, count=(1, 1))
    seen = {}
    for index in range(120):
        s = render_sample(index, 96, SEED, testbed)
        seen.setdefault(s.classes[0], set()).add(s.bodies[0])
        badge, whole = s.badges == 1, s.instances == 1
        assert badge.any() and (whole & ~badge).sum() > badge.sum()
    assert seen == {c: {names[c - 1], names[c % 5]} for c in range(1, 6)}
    for body in names:
        centre, radius = np.array([48.0, 48.0]), 30.0
        ys, xs = np.nonzero(mechanisms.body_mask(96, body, centre, radius, 0.7))
        assert np.hypot(xs - 48, ys - 48).max() <= radius + 1.5
        badge_at = mechanisms.badge_centre(np.random.default_rng(0), body, centre, radius, 0.4 * radius, 0.7)
        filled = "disc" if body == "ring" else body  # a ring's badge sits in its hole
        outline = mechanisms.body_mask(96, filled, centre, radius, 0.7)
        assert outline[int(badge_at[1]), int(badge_at[0])]
    with pytest.raises(ValueError, match=r"class_bodies must lie in \[0, 3\]"):
        Testbed(parts={"class_bodies": 4})


def test_clutter_blobs_lie_inside_the_box_touch_the_object_and_are_background():
    base, cluttered = Testbed(), Testbed(clutter={"p": 1.0})
    for index in range(20):
        clean, s = render_sample(index, SIZE, SEED, base), render_sample(index, SIZE, SEED, cluttered)
        np.testing.assert_array_equal(clean.semantic, s.semantic)  # blobs are background in the GT
        changed = (np.abs(clean.image.astype(int) - s.image.astype(int)).sum(-1) > 0) & (s.instances == 0)
        changed &= ~(s.image == synth.OUTLINE_COLOUR).all(-1)
        assert changed.any()
        in_a_box = np.zeros_like(changed)
        for x0, y0, x1, y1 in s.boxes.astype(int):
            in_a_box[y0:y1, x0:x1] = True
        assert (changed <= in_a_box).all()
        count, labels = cv2.connectedComponents(changed.astype(np.uint8))
        grown_objects = cv2.dilate((s.instances > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        for blob in range(1, count):
            assert (grown_objects & (labels == blob)).any()


def test_sod_noise_only_in_train_at_the_configured_rate(tmp_path):
    root = ensure_synthetic(
        tmp_path / "n", num_images=100, size=48, workers=1, testbed={"sod_noise": {"rate": 0.4}}
    )
    layout = SynthLayout(root)
    record = json.loads(layout.sod_noise_record.read_text())
    split_of = synth.split_assignment(100, (0.6, 0.2, 0.2))
    corrupted = 0
    for index, split in enumerate(split_of):
        sid = synth.sample_id(index)
        clean = (read_label_png(layout.voc_class_png(sid)) != 0).astype(np.uint8)  # 255 band counts as object
        sod = read_label_png(layout.sod_mask(split, sid)) > 0
        instances = render_sample(index, 48, SEED, Testbed(sod_noise={"rate": 0.4}), split).instances
        if split != "train":
            np.testing.assert_array_equal(sod, instances > 0)
            assert sid not in record
        else:
            corrupted += record[sid] is not None
            assert (record[sid] is None) == np.array_equal(sod, instances > 0)
        assert clean.any()
    assert 0.25 < corrupted / split_of.count("train") < 0.55
    assert set(record.values()) - {None} <= {"fp_stuff", "fn_part", "dilate", "drop_object"}
