"""The synthetic shapes generator: determinism, exact round-trip of every written format, content."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from segexp.data import synth
from segexp.data.io import (
    IGNORE_INDEX,
    read_image,
    read_label_png,
    read_split_file,
    read_voc_xml,
    rgb_to_id,
)
from segexp.data.synth import (
    CLASS_NAMES,
    COMPLETE_MARKER,
    LEGACY,
    STUFF_NAMES,
    SynthLayout,
    ensure_synthetic,
    panoptic_annotation,
    render_sample,
    split_assignment,
    void_band,
)

NUM, SIZE, SEED = 12, 64, 0


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return ensure_synthetic(
        tmp_path_factory.mktemp("shapes"), num_images=NUM, size=SIZE, seed=SEED, workers=1
    )


@pytest.fixture(scope="module")
def samples() -> list[synth.SynthSample]:
    return [render_sample(i, SIZE, SEED) for i in range(NUM)]


@pytest.fixture(scope="module")
def many_samples() -> list[synth.SynthSample]:
    return [render_sample(i, SIZE, SEED) for i in range(48)]


def _split_of(index: int) -> str:
    return split_assignment(NUM, (0.6, 0.2, 0.2))[index]


# --- determinism -------------------------------------------------------------------------------


def test_render_sample_is_deterministic_and_depends_on_seed():
    a, b = render_sample(5, SIZE, 3), render_sample(5, SIZE, 3)
    for field in ("image", "semantic", "objects", "instances", "boxes", "stuff"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.classes, a.stuff_classes, a.id) == (b.classes, b.stuff_classes, "shapes_000005")
    assert not np.array_equal(a.image, render_sample(5, SIZE, 4).image)
    assert not np.array_equal(a.image, render_sample(6, SIZE, 3).image)


def test_generation_is_byte_identical_for_any_worker_count(generated, tmp_path):
    again = ensure_synthetic(tmp_path / "again", num_images=NUM, size=SIZE, seed=SEED, workers=2)
    reference, repeated = _all_files(generated), _all_files(again)
    assert reference.keys() == repeated.keys()
    differing = [name for name in reference if reference[name] != repeated[name]]
    assert differing == []


def test_a_different_seed_gives_different_files(generated, tmp_path):
    other = _all_files(
        ensure_synthetic(tmp_path / "other", num_images=NUM, size=SIZE, seed=SEED + 1, workers=1)
    )
    reference = _all_files(generated)
    name = "VOCdevkit/VOC2012/SegmentationClass/shapes_000000.png"
    assert other[name] != reference[name]
    assert (
        other["coco/annotations/instances_train.json"] != reference["coco/annotations/instances_train.json"]
    )


# --- exact round trip of every format ------------------------------------------------------------


def test_voc_label_pngs_round_trip(generated, samples):
    layout = SynthLayout(generated)
    for s in samples:
        np.testing.assert_array_equal(read_label_png(layout.voc_class_png(s.id)), s.semantic)
        np.testing.assert_array_equal(read_label_png(layout.voc_object_png(s.id)), s.objects)


def test_voc_xml_boxes_round_trip(generated, samples):
    layout = SynthLayout(generated)
    for s in samples:
        ann = read_voc_xml(layout.voc_xml(s.id))
        assert (ann.filename, ann.width, ann.height, ann.segmented) == (f"{s.id}.jpg", SIZE, SIZE, True)
        assert [o.name for o in ann.objects] == [CLASS_NAMES[c] for c in s.classes]
        boxes = np.array([o.box for o in ann.objects], dtype=np.float32)
        boxes[:, :2] -= 1  # VOC 1-based inclusive -> 0-based exclusive
        np.testing.assert_array_equal(boxes, s.boxes)
        assert not any(o.difficult or o.truncated for o in ann.objects)


def test_jpegs_are_one_file_copied_and_close_to_the_drawn_image(generated, samples):
    layout = SynthLayout(generated)
    for i, s in enumerate(samples):
        voc_bytes = layout.voc_jpeg(s.id).read_bytes()
        assert layout.coco_jpeg(_split_of(i), s.id).read_bytes() == voc_bytes
        assert layout.sod_image(_split_of(i), s.id).read_bytes() == voc_bytes
        decoded = read_image(layout.voc_jpeg(s.id)).astype(np.int16)
        own_error = np.abs(
            decoded - s.image
        ).mean()  # per-pixel colour noise + 4:2:0 chroma cost a few levels
        other_error = np.abs(decoded - samples[(i + 1) % len(samples)].image).mean()
        assert own_error < 16 and other_error > 3 * own_error


def test_coco_instances_round_trip(generated, samples):
    layout = SynthLayout(generated)
    for split in synth.SPLITS:
        data = json.loads(layout.coco_instances_json(split).read_text())
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5]
        assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
        for image in data["images"]:
            s = samples[image["id"] - 1]
            assert (image["file_name"], image["width"], image["height"]) == (f"{s.id}.jpg", SIZE, SIZE)
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            assert [a["category_id"] for a in anns] == s.classes
            for k, ann in enumerate(anns, 1):
                rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
                np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), s.instances == k)
                x0, y0, x1, y1 = s.boxes[k - 1]
                assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert ann["area"] == int((s.instances == k).sum()) and ann["iscrowd"] == 0


def test_coco_panoptic_round_trip(generated, samples):
    layout = SynthLayout(generated)
    for split in synth.SPLITS:
        data = json.loads(layout.coco_panoptic_json(split).read_text())
        stuff_ids = {c["id"]: c["name"] for c in data["categories"] if not c["isthing"]}
        assert stuff_ids == {6 + i: name for i, name in enumerate(STUFF_NAMES)}
        for ann in data["annotations"]:
            s = samples[ann["image_id"] - 1]
            ids = rgb_to_id(read_label_png(layout.coco_panoptic_png(split, s.id)))
            band = s.objects == IGNORE_INDEX
            assert (ids[band] == 0).all() and (ids[~band] != 0).all()
            segments = ann["segments_info"]
            things = segments[: len(s.classes)]
            assert [seg["category_id"] for seg in things] == s.classes
            for k, seg in enumerate(things, 1):
                np.testing.assert_array_equal(ids == seg["id"], (s.instances == k) & ~band)
            stuff_masks = [((s.stuff == r) & ~band, 6 + c) for r, c in enumerate(s.stuff_classes, 1)]
            stuff_masks = [(m, c) for m, c in stuff_masks if m.any()]
            assert [seg["category_id"] for seg in segments[len(s.classes) :]] == [c for _, c in stuff_masks]
            for seg, (mask, _) in zip(segments[len(s.classes) :], stuff_masks):
                np.testing.assert_array_equal(ids == seg["id"], mask)
            for seg in segments:
                ys, xs = np.nonzero(ids == seg["id"])
                assert seg["area"] == len(xs)
                assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_panoptic_segment_ids_use_all_three_channels(samples):
    for s in samples:
        _, segments = panoptic_annotation(s)
        ids = [seg["id"] for seg in segments]
        assert len(set(ids)) == len(ids)
        for segment_id in ids:
            assert segment_id % 256 and (segment_id // 256) % 256 and segment_id // 65536


def test_sod_masks_are_the_union_of_objects(generated, samples):
    layout = SynthLayout(generated)
    for i, s in enumerate(samples):
        mask = read_label_png(layout.sod_mask(_split_of(i), s.id))
        np.testing.assert_array_equal(mask, (s.instances > 0).astype(np.uint8) * 255)


def test_split_files_list_ids_in_index_order(generated):
    layout = SynthLayout(generated)
    ids = [f"shapes_{i:06d}" for i in range(NUM)]
    train, val, test = (read_split_file(layout.voc_split_file(s)) for s in synth.SPLITS)
    assert (train, val, test) == (ids[:7], ids[7:10], ids[10:])
    assert read_split_file(layout.voc_split_file("trainval")) == train + val
    coco_test = json.loads(layout.coco_instances_json("test").read_text())
    assert [im["id"] for im in coco_test["images"]] == [11, 12]


# --- content ----------------------------------------------------------------------------------------


def test_every_class_appears_and_object_counts_follow_the_count_knob(many_samples):
    seen = {c for s in many_samples for c in s.classes}
    assert seen == set(range(1, len(CLASS_NAMES)))
    counts = [len(s.classes) for s in many_samples]
    assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) == 3
    legacy_counts = [len(render_sample(i, SIZE, SEED, LEGACY).classes) for i in range(48)]
    assert max(legacy_counts) == 4
    assert {len(s.stuff_classes) for s in many_samples} <= {1, 2, 3}
    assert {c for s in many_samples for c in s.stuff_classes} == {0, 1, 2}


def test_labels_are_consistent_with_each_other(many_samples):
    for s in many_samples:
        band = s.semantic == IGNORE_INDEX
        np.testing.assert_array_equal(band, s.objects == IGNORE_INDEX)
        inside = ~band
        np.testing.assert_array_equal(s.objects[inside], s.instances[inside])
        np.testing.assert_array_equal(s.semantic[inside], np.array([0, *s.classes])[s.instances[inside]])
        np.testing.assert_array_equal(s.stuff > 0, s.instances == 0)
        assert set(np.unique(s.instances)) == set(range(len(s.classes) + 1))
        for k in range(1, len(s.classes) + 1):
            assert (s.instances == k).sum() >= synth.min_visible_area(SIZE)
            assert ((s.instances == k) & ~band).any()


def test_void_band_lies_exactly_along_object_boundaries(many_samples):
    for s in many_samples:
        band = s.objects == IGNORE_INDEX
        assert band.any()
        inst = s.instances
        padded = np.pad(inst, 1, mode="edge")
        neighbours = [
            padded[1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
        ]
        on_boundary = np.any([n != inst for n in neighbours], axis=0)
        np.testing.assert_array_equal(band, on_boundary)  # width 1 at 64 px


def test_void_band_marks_both_sides_of_a_label_change():
    labels = np.zeros((9, 9), dtype=np.int32)
    labels[:, 5:] = 2
    band = void_band(labels, 1)
    assert band[:, 4:6].all() and not band[:, :4].any() and not band[:, 6:].any()
    assert void_band(labels, 2)[:, 3:7].all()
    assert not void_band(np.ones((5, 5), dtype=np.int32), 1).any()


def test_boxes_enclose_their_instances_tightly(many_samples):
    for s in many_samples:
        assert s.boxes.dtype == np.float32 and s.boxes.shape == (len(s.classes), 4)
        for k, (x0, y0, x1, y1) in enumerate(s.boxes.astype(int), 1):
            ys, xs = np.nonzero(s.instances == k)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def _best_threshold_balanced_accuracy(values: np.ndarray, is_fg: np.ndarray) -> float:
    """Best balanced accuracy of 'fg iff value > t' (or its opposite) over all thresholds t."""
    fg_hist = np.bincount(values[is_fg], minlength=256) / is_fg.sum()
    bg_hist = np.bincount(values[~is_fg], minlength=256) / (~is_fg).sum()
    true_pos = fg_hist[::-1].cumsum()[::-1]
    true_neg = np.concatenate([[0.0], bg_hist.cumsum()[:-1]])
    balanced = (true_pos + true_neg) / 2
    return float(np.maximum(balanced, 1 - balanced).max())


def _best_channel_threshold(samples) -> tuple[float, float]:
    pixels = np.concatenate([s.image.reshape(-1, 3) for s in samples])
    is_fg = np.concatenate([(s.instances > 0).ravel() for s in samples])
    gap = float(np.abs(pixels[is_fg].mean(0) - pixels[~is_fg].mean(0)).max())
    return gap, max(_best_threshold_balanced_accuracy(pixels[:, c], is_fg) for c in range(3))


def test_legacy_colour_does_not_separate_objects_from_background():
    gap, best = _best_channel_threshold([render_sample(i, SIZE, SEED, LEGACY) for i in range(48)])
    assert gap < 25 and best < 0.65  # chance is 0.5; a single-channel threshold barely beats it


def test_bright_contrast_separates_figure_from_ground_but_not_the_classes(many_samples):
    gap, best = _best_channel_threshold(many_samples)
    assert gap > 60 and best > 0.8  # the learnability knob (dark outline pixels are figure too)
    # ... while class identity stays in the shape: per-class object colours (inside the outline) are alike
    def fill(pixels):
        return np.median(pixels[(pixels != synth.OUTLINE_COLOUR).any(axis=1)], axis=0)

    rendered = [render_sample(i, SIZE, SEED) for i in range(120)]
    objects = [(c, fill(s.image[s.instances == k + 1])) for s in rendered for k, c in enumerate(s.classes)]
    means = [np.mean([m for c, m in objects if c == cls], axis=0) for cls in range(1, len(CLASS_NAMES))]
    assert np.ptp(np.array(means), axis=0).max() < 25


# --- completion marker, errors, concurrency, CLI -------------------------------------------------------


def test_second_call_returns_at_once_and_changes_nothing(generated):
    before = {p: p.stat().st_mtime_ns for p in generated.rglob("*") if p.is_file()}
    start = time.perf_counter()
    assert ensure_synthetic(generated, num_images=NUM, size=SIZE, seed=SEED) == generated
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in generated.rglob("*") if p.is_file()} == before


def test_different_params_raise_naming_the_marker_and_the_params(generated):
    with pytest.raises(ValueError, match=COMPLETE_MARKER) as info:
        ensure_synthetic(generated, num_images=NUM + 1, size=SIZE, seed=SEED)
    assert "num_images" in str(info.value) and "size" not in str(info.value)
    with pytest.raises(ValueError, match="split_fractions"):
        ensure_synthetic(generated, num_images=NUM, size=SIZE, seed=SEED, split_fractions=(0.5, 0.25, 0.25))


def test_invalid_params_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="split_fractions"):
        ensure_synthetic(tmp_path, num_images=4, size=SIZE, split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="size"):
        ensure_synthetic(tmp_path, num_images=4, size=16)
    assert not (tmp_path / COMPLETE_MARKER).exists()


def test_an_interrupted_root_is_overwritten(tmp_path, samples):
    layout = SynthLayout(tmp_path)
    layout.voc_class_png(samples[0].id).parent.mkdir(parents=True)
    layout.voc_class_png(samples[0].id).write_bytes(b"truncated")
    ensure_synthetic(tmp_path, num_images=2, size=SIZE, seed=SEED, workers=1)
    np.testing.assert_array_equal(read_label_png(layout.voc_class_png(samples[0].id)), samples[0].semantic)
    assert json.loads(layout.complete_marker.read_text())["split_sizes"] == {"train": 1, "val": 1, "test": 0}


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
    real_generate, calls = synth._generate, []

    def slow_generate(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # both callers are surely waiting by now
        real_generate(*args, **kwargs)

    monkeypatch.setattr(synth, "_generate", slow_generate)
    barrier, errors = threading.Barrier(2), []

    def call():
        barrier.wait()
        try:
            ensure_synthetic(tmp_path, num_images=3, size=SIZE, seed=SEED, workers=1)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1
    assert (tmp_path / COMPLETE_MARKER).is_file()


def test_cli_generates_and_reports(tmp_path, capsys):
    assert (
        synth.main([str(tmp_path / "cli"), "--num-images", "3", "--size", str(SIZE), "--workers", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert str(tmp_path / "cli") in out and " s)" in out
    assert json.loads((tmp_path / "cli" / COMPLETE_MARKER).read_text())["num_images"] == 3
    assert synth.main([str(tmp_path / "cli"), "--num-images", "4", "--size", str(SIZE)]) == 2
    assert "num_images" in capsys.readouterr().err


def test_cli_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "segexp.data.synth", "--help"], capture_output=True, text=True, check=True
    )
    assert "--num-images" in result.stdout and "--workers" in result.stdout


def test_plain_style_keeps_geometry_and_annotations_and_flattens_colours(tmp_path):
    textured, plain = (
        render_sample(3, 64, 0, LEGACY),
        render_sample(3, 64, 0, {**LEGACY.to_dict(), "style": "plain"}),
    )
    assert np.array_equal(textured.semantic, plain.semantic) and textured.classes == plain.classes
    assert np.array_equal(textured.boxes, plain.boxes)
    for k in range(1, len(plain.classes) + 1):  # every object and stuff region is one flat colour
        inside = plain.image[plain.instances == k]
        assert np.ptp(inside.astype(int), axis=0).max() <= 1
    assert not np.array_equal(textured.image, plain.image)
    # a root remembers its testbed: another one is refused, the same one reused
    root = ensure_synthetic(tmp_path / "p", num_images=6, size=48, testbed={"style": "textured"}, workers=1)
    assert ensure_synthetic(root, num_images=6, size=48, testbed={"style": "textured"}, workers=1) == root
    with pytest.raises(ValueError, match="testbed=.*'style': 'textured'"):
        ensure_synthetic(root, num_images=6, size=48, workers=1)
    with pytest.raises(ValueError, match="testbed.style must be one of"):
        render_sample(0, 64, 0, {"style": "fancy"})
