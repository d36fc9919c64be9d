"""fbr_voc (FBR on PPC, image labels + saliency) end to end on a VOC-layout fixture: it fails naming
the saliency folder until ``VOC2012/SALImages/<id>.png`` exists, then runs fast_dev_run."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import compose
from tests.test_configs import TINY, _voc_fixture_from_synthetic, _write_saliency_from_masks


def test_fbr_voc_needs_salimages_then_runs(tmp_path_factory, tmp_path):
    from segexp.runner import train

    root = _voc_fixture_from_synthetic(tmp_path_factory.mktemp("ppcvoc"))
    voc = root / "VOCdevkit" / "VOC2012"
    shutil.rmtree(voc / "SALImages", ignore_errors=True)  # the shared fixture writes one
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    overrides = ["+experiment=fbr_voc", "debug=fdr", *TINY, f"paths.data_dir={root}", "data.image_size=64"]
    with pytest.raises(Exception, match=r"SALImages: saliency folder not found"):
        train(compose(overrides, out_dir=tmp_path / "a"))

    _write_saliency_from_masks(voc / "SegmentationClassAug", voc / "SALImages")
    metrics = train(compose(overrides, out_dir=tmp_path / "b"))
    assert "val/cam_best_mIoU" in metrics and "test/mIoU" in metrics
