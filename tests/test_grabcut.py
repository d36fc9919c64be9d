"""GrabCut stage: recovers objects better than their boxes, overlap rule, cache reuse/invalidation,
the PseudoLabels wrapper and the ``segexp.pseudo`` entry point."""

from __future__ import annotations

import os

import numpy as np
import pytest

from segexp.stages.grabcut import GrabCutStage, fill_boxes, grabcut_box, grabcut_image, paint_order
from tests.conftest import SMALL_SYNTH, compose

# the stage's defaults (their one home), as the functions are called with them
GC = GrabCutStage(progress=False).grabcut_settings()
IMAGE = {"overlap": "smaller", "inside_bg": "background", "mode": "grabcut", **GC, "iterations": 3}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _disc_image(size=96, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    # a plus-shaped object: its box is twice its area
    disc = ((abs(yy - 48) < 8) & (abs(xx - 44) < 30)) | ((abs(xx - 44) < 8) & (abs(yy - 48) < 30))
    image = np.empty((size, size, 3), np.float32)
    image[:] = (40, 120, 200)
    image[disc] = (220, 60, 30)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), disc


def test_grabcut_recovers_the_object_better_than_its_box():
    image, disc = _disc_image()
    ys, xs = np.nonzero(disc)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    fg = grabcut_box(image, box, **GC)
    box_mask = fill_boxes(np.array([box], np.float32), np.array([1]), disc.shape) > 0
    assert not fg[~box_mask].any()  # never outside its box
    assert _iou(fg, disc) > 0.85 and _iou(box_mask, disc) < 0.55


def test_box_covering_the_whole_image_and_degenerate_boxes_do_not_fail():
    image, disc = _disc_image()
    full = grabcut_box(image, (0, 0, 96, 96), **{**GC, "iterations": 3})
    assert full.shape == disc.shape and full.any()
    assert not grabcut_box(image, (10, 10, 10, 30), **GC).any()  # empty box
    tiny = grabcut_box(image, (5, 5, 6, 6), **{**GC, "min_fill": 0.5})  # 1 px: the filled box
    assert tiny.sum() == 1


def test_overlap_rule_smaller_or_larger_box_wins():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 8, 8]], np.float32)
    labels = np.array([1, 2])
    assert list(paint_order(boxes, "smaller")) == [0, 1]
    small = fill_boxes(boxes, labels, (12, 12), "smaller")
    large = fill_boxes(boxes, labels, (12, 12), "larger")
    assert small[6, 6] == 2 and large[6, 6] == 1
    assert small[11, 11] == 0 and small[0, 0] == 1  # outside every box = background
    with pytest.raises(ValueError, match="overlap"):
        paint_order(boxes, "biggest")


def test_grabcut_image_labels_and_inside_background():
    image, disc = _disc_image()
    out = grabcut_image(image, np.array([[10, 14, 78, 82]], np.float32), np.array([3]), **IMAGE)
    assert set(np.unique(out)) <= {0, 3}
    ign = grabcut_image(image, np.array([[10, 14, 78, 82]], np.float32), np.array([3]),
                        **{**IMAGE, "inside_bg": "ignore"})
    assert set(np.unique(ign)) <= {0, 3, 255} and (ign == 255).any() and ign[0, 0] == 0


@pytest.fixture(scope="module")
def small_reader(data_dir):
    from segexp.data.readers.voc import VOCSegmentation
    from segexp.data.synth import CLASS_NAMES, ensure_synthetic

    # the same set SMALL_SYNTH configs generate (shared by the session)
    root = ensure_synthetic(data_dir / "shapes-n48-px64-seed0", num_images=48, size=64, seed=0)
    return VOCSegmentation(root / "VOCdevkit" / "VOC2012", "train", class_names=CLASS_NAMES)


def test_stage_caches_resumes_and_invalidates(small_reader, tmp_path):
    stage = GrabCutStage(cache_dir=tmp_path, iterations=2, progress=False)
    n = len(small_reader)
    first = stage.run(small_reader, evaluate=True, workers=1)
    assert first["computed"] == n and first["scored_images"] == n
    assert first["pseudo"]["mIoU"] > first["box_rect"]["mIoU"]  # GrabCut beats the filled boxes
    again = stage.run(small_reader, workers=1)
    assert again["computed"] == 0 and again["reused"] == n  # reused
    scored = stage.run(small_reader, evaluate=True, workers=2)  # all cached: scored in this process,
    assert scored["processes"] == 1 and scored["scored_images"] == n  # no pool to start for nothing

    cache = stage.cache_for(small_reader)
    victims = sorted(small_reader.ids)[:2]
    for v in victims:
        cache.path(v).unlink()  # an interrupted run: resume does only these
    assert sorted(stage.missing(small_reader)) == victims
    assert stage.run(small_reader, workers=2)["computed"] == 2

    xml = small_reader.xml_path(small_reader.ids[3])  # an edited annotation: only that image is stale
    st = xml.stat()
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stage.missing(small_reader) == [small_reader.ids[3]]
    assert stage.run(small_reader, workers=1)["computed"] == 1

    other = GrabCutStage(cache_dir=tmp_path, iterations=3, progress=False)  # another setting: new dir
    assert other.cache_for(small_reader).dir != cache.dir
    assert len(other.missing(small_reader)) == n
    rect = GrabCutStage(name="box_rect", mode="rect", cache_dir=tmp_path, progress=False)
    report = rect.run(small_reader, evaluate=True, workers=1)
    assert report["pseudo"]["mIoU"] == pytest.approx(report["box_rect"]["mIoU"])


def test_pseudo_label_wrapper_computes_missing_then_reads(small_reader, tmp_path):
    from segexp.data.pseudo_labels import PseudoLabels

    stage = GrabCutStage(cache_dir=tmp_path, iterations=2, progress=False, workers=1)
    wrapped = PseudoLabels(small_reader, stage)
    assert stage.missing(small_reader) == []
    sample = wrapped[0]
    assert sample["pseudo"].shape == sample["image"].shape[:2] and sample["pseudo"].dtype == np.uint8
    assert len(wrapped) == len(small_reader) and PseudoLabels.adds == ("pseudo",)
    stage.cache_for(small_reader).path(small_reader.ids[0]).unlink()
    with pytest.raises(RuntimeError, match="missing"):
        PseudoLabels(small_reader, stage, compute_missing=False, wait_timeout_s=0)


def test_pseudo_override_normalisation():
    from segexp.pseudo import normalize_pseudo_overrides as norm

    assert norm(["data=voc_boxes"]) == ["data=voc_boxes", "+stage=grabcut"]
    assert norm(["stage=box_rect"]) == ["+stage=box_rect"]
    with_experiment = norm(["+experiment=box2seg_shapes", "stage=box_rect"])
    assert with_experiment == ["experiment=box2seg_shapes", "stage=box_rect"]


def test_pseudo_entry_point_scores_grabcut_against_gt(data_dir, tmp_path):
    from segexp.pseudo import normalize_pseudo_overrides, run

    overrides = normalize_pseudo_overrides(
        ["stage=grabcut", *SMALL_SYNTH, f"paths.data_dir={data_dir}", "stage.iterations=2", "workers=2"]
    )
    cfg = compose(overrides, config_name="pseudo", out_dir=tmp_path)
    (report,) = run(cfg)
    assert report["computed"] + report["reused"] == report["images"] > 0
    assert report["pseudo"]["mIoU"] > report["box_rect"]["mIoU"]
    assert (tmp_path / "pseudo_report.json").is_file()
    overrides = normalize_pseudo_overrides(["+experiment=box2seg_shapes", *SMALL_SYNTH])
    cfg = compose(overrides, config_name="pseudo")
    assert cfg.stage.name == "grabcut" and cfg.data.name == "shapes"
