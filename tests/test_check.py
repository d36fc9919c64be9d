"""segexp.data.check: every problem it claims to detect is planted once and found, with its path."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_formats import VOC_IDS, write_sod_set, write_voc_tree

from segexp.data.check import check_split, format_report, validate_sample
from segexp.data.io import write_palette_png
from segexp.data.readers.base import Reader
from segexp.data.readers.sod import SalientObjects
from segexp.data.readers.voc import VOCSegmentation
from segexp.data.testbed import Testbed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc_tree(root)
    return root


def check_voc(root, split="trainval", **kw):
    return check_split(functools.partial(VOCSegmentation, root), split, name="voc", **kw)


def test_clean_tree_reports_counts_classes_sizes_and_keys(voc):
    report = check_voc(voc)
    assert report.ok and report.num_samples == report.checked == 3
    assert set(report.keys_available) >= {"mask", "instances", "boxes", "labels"}
    assert report.images_per_class[15] == 3 and report.images_per_class[1] == 1  # person everywhere
    assert (min(report.heights), max(report.widths)) == (24, 32)
    text = format_report(report)
    assert "15 person" in text and "problems: 0" in text and "H 24..24, W 32..32" in text


def test_every_planted_problem_is_found_with_its_path(voc):
    a, b, c = VOC_IDS
    (voc / "JPEGImages" / f"{a}.jpg").unlink()  # missing file
    write_palette_png(voc / "SegmentationClass" / f"{b}.png", np.zeros((5, 5), np.uint8))  # size mismatch
    bad = np.zeros((24, 32), np.uint8)
    bad[3, 3] = 40  # outside the 21 classes
    write_palette_png(voc / "SegmentationClass" / f"{c}.png", bad)
    xml = voc / "Annotations" / f"{c}.xml"
    xml.write_bytes(xml.read_bytes()[:40])  # corrupt (truncated) file
    report = check_voc(voc)
    found = {(p.index, p.key): str(p) for p in report.problems}
    assert len(report.problems) == 4, format_report(report)
    assert f"JPEGImages/{a}.jpg" in found[(0, "image")] and "not found" in found[(0, "image")]
    mismatch = found[(1, "labels, mask")]  # one bad mask breaks both keys: reported once
    assert "differs from its image" in mismatch and f"SegmentationClass/{b}.png" in mismatch
    assert "label values 40 outside the class set" in found[(2, "labels, mask")]
    assert "malformed XML" in found[(2, "boxes")] and f"Annotations/{c}.xml" in found[(2, "boxes")]
    assert "problems: 4" in format_report(report)


def test_corrupt_image_is_a_problem(voc):
    jpg = voc / "JPEGImages" / f"{VOC_IDS[1]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:100])
    report = check_voc(voc)
    (problem,) = report.problems
    assert problem.key == "image" and "cannot decode image" in problem.problem and problem.path == str(jpg)


def test_key_missing_everywhere_is_unavailable_not_a_problem(voc):
    for p in (voc / "SegmentationObject").iterdir():
        p.unlink()
    report = check_voc(voc)
    assert report.ok and "instances" in report.keys_unavailable and "instances" not in report.keys_available
    assert "key unavailable in this split: instances" in format_report(report)
    # ...but missing for only some samples, it is a problem for each of them
    write_voc_tree(voc)
    (voc / "SegmentationObject" / f"{VOC_IDS[0]}.png").unlink()
    report = check_voc(voc)
    assert [(p.index, p.key) for p in report.problems] == [(0, "instances")]


def test_missing_split_file_and_limit(voc):
    report = check_voc(voc, "test")
    assert not report.ok and "test.txt" in report.problems[0].path and report.num_samples == 0
    assert check_voc(voc, limit=1).checked == 1


def test_sod_mask_problems(tmp_path):
    truth_root = tmp_path / "ECSSD"
    write_sod_set(truth_root)
    (truth_root / "gt" / "b.png").unlink()
    make = functools.partial(SalientObjects, truth_root, image_dir="images", mask_dir="gt")
    report = check_split(make, "test", name="ecssd")
    assert [(p.index, p.key) for p in report.problems] == [(1, "saliency")]
    assert "no mask named b.*" in report.problems[0].problem
    assert report.images_per_class[1] == 3  # salient pixels in the three readable masks


class BrokenReader(Reader):
    """A reader that violates the sample contract without raising."""

    provides = frozenset({"image", "mask", "instances", "saliency", "box_labels"})
    class_names = ("background", "thing")

    def __init__(self, split="x", keys=None):
        super().__init__(keys)

    def __len__(self):
        return 1

    def load(self, index):
        return {
            "image": np.zeros((4, 5, 3), np.uint8),
            "mask": np.full((4, 5), 7, np.uint8),
            "instances": np.zeros((4, 4), np.int32),
            "saliency": np.full((4, 5), 1.5, np.float32),
            "box_labels": np.array([0]),
            "meta": {"path": "broken.png"},
        }


def test_contract_violations_of_any_reader():
    report = check_split(BrokenReader, "x", name="broken")
    text = " | ".join(str(p) for p in report.problems)
    assert "broken.png: instances shape (4, 4) differs" in text
    assert "mask values [7] outside the class set 0..1" in text
    assert "saliency outside [0, 1]" in text and "box labels [0] outside 1..1" in text
    assert validate_sample({"image": np.zeros((2, 2), np.uint8)}, 2)[0].startswith("image is not uint8 HxWx3")


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "segexp.data.check", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_cli_generates_shapes_then_passes(tmp_path):
    out = run_cli(
        f"paths.data_dir={tmp_path}", "data.prepare.num_images=6", "data.prepare.size=32", cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "== shapes / split 'train'" in out.stdout and "0 problem(s) in 3 split(s)" in out.stdout
    root = f"shapes-n6-px32-seed0-{Testbed().key()}"
    assert (tmp_path / root / ".complete.json").is_file()  # prepare ran first
    assert sorted(p.name for p in tmp_path.iterdir()) == [root]  # no run dir left behind


def test_cli_exits_nonzero_and_names_the_file(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc_tree(root, splits={"train": list(VOC_IDS), "val": list(VOC_IDS[:1])})
    (root / "SegmentationClass" / f"{VOC_IDS[2]}.png").unlink()
    out = run_cli("data=voc", f"paths.data_dir={tmp_path}", "split=train", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"SegmentationClass/{VOC_IDS[2]}.png: file not found" in out.stdout
    assert "== 1 problem(s) in 1 split(s)" in out.stdout


def test_run_check_covers_splits_once_and_every_test_set(tmp_path):
    from fixtures_formats import data_config
    from omegaconf import OmegaConf

    from segexp.data.check import run_check

    write_sod_set(tmp_path / "DUTS" / "DUTS-TR", "DUTS-TR-Image", "DUTS-TR-Mask")
    write_sod_set(tmp_path / "DUTS" / "DUTS-TE", "DUTS-TE-Image", "DUTS-TE-Mask")
    write_sod_set(tmp_path / "HKU-IS", "imgs", "gt")
    cfg = OmegaConf.create(
        {"data": data_config("sod_bench", tmp_path), "split": None, "keys": None, "limit": None}
    )
    reports = {r.name + ":" + r.split: r for r in run_check(cfg)}
    # val and test are both DUTS-TE: checked once; then the six benchmark sets
    assert list(reports)[:2] == ["sod_bench:DUTS-TR", "sod_bench:DUTS-TE"] and len(reports) == 8
    assert reports["sod_bench/DUTS-TE:test"].checked == 4
    # every file is fine, but 4 images are not the official 4,447 (data.expected_sizes): a partial copy
    hku = [p.problem for p in reports["sod_bench/HKU-IS:test"].problems]
    assert hku == ["4 images, the official release 4447 (data.expected_sizes)"]
    missing = reports["sod_bench/ECSSD:test"].problems
    assert len(missing) == 1 and missing[0].path == str(tmp_path / "ECSSD" / "images")
    assert "directory not found" in missing[0].problem
