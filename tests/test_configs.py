"""Every experiment composes and runs fast_dev_run; override precedence; early, clear failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segexp.utils.cli import normalize_overrides
from tests.conftest import CONF_DIR, SMALL_SYNTH, compose

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
TINY = ["data.batch_size=2", "data.eval_batch_size=2", "data.num_workers=0", "backbone.pretrained=false"]


def test_plus_and_plain_experiment_forms_compose_the_same():
    a = compose(["+experiment=supervised_shapes"])
    b = compose(["experiment=supervised_shapes"])
    assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)
    assert a.run_name == "supervised_shapes"


def test_normalize_only_touches_defaults_groups():
    assert normalize_overrides(["+experiment=x", "++debug=fdr", "+foo=1", "a=2"]) == [
        "experiment=x",
        "debug=fdr",
        "+foo=1",
        "a=2",
    ]


def test_debug_preset_and_command_line_win_over_the_experiment():
    cfg = compose(["+experiment=supervised_shapes", "debug=fdr", "data.batch_size=3"])
    assert cfg.trainer.fast_dev_run is True
    assert cfg.data.num_workers == 0  # experiment keeps 2; the debug preset wins
    assert cfg.data.batch_size == 3  # experiment sets 8; the command line wins


def test_unknown_key_is_rejected_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="data.batchsize"):
        compose(["data.batchsize=4"])


def test_method_needing_keys_the_dataset_lacks_fails_before_training(data_dir):
    import hydra
    from hydra.errors import InstantiationException

    cfg = compose(["+experiment=supervised_shapes", f"paths.data_dir={data_dir}"], out_dir=data_dir)
    with pytest.raises(InstantiationException, match=r"needs \['saliency'\].*dataset 'shapes'"):
        hydra.utils.instantiate(cfg.data, train_keys=["image", "saliency"], eval_keys=["image", "mask"])


def _voc_fixture_from_synthetic(data_dir: Path) -> Path:
    """A VOCdevkit tree (with SegmentationClassAug and train_aug) built from the generator's VOC
    output, so the real-data experiments run on files in their real layout."""
    from segexp.data.synth import ensure_synthetic

    synth = ensure_synthetic(data_dir / "voc_src", num_images=12, size=64, seed=3)
    dst = data_dir / "vocfix"
    voc = dst / "VOCdevkit" / "VOC2012"
    if not voc.exists():
        shutil.copytree(synth / "VOCdevkit" / "VOC2012", voc)
        shutil.copytree(voc / "SegmentationClass", voc / "SegmentationClassAug")
        aug_sets = voc / "ImageSets" / "SegmentationAug"
        aug_sets.mkdir()
        for split in ("train", "val"):
            shutil.copy(voc / "ImageSets" / "Segmentation" / f"{split}.txt", aug_sets / f"{split}.txt")
        shutil.copy(aug_sets / "train.txt", aug_sets / "train_aug.txt")
    return dst


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_fast_dev_run(name, data_dir, tmp_path):
    from segexp.runner import train

    overrides = [f"+experiment={name}", "debug=fdr", *TINY, f"paths.data_dir={data_dir}"]
    if name.endswith("_shapes"):
        overrides += SMALL_SYNTH
    else:
        overrides += [f"paths.data_dir={_voc_fixture_from_synthetic(data_dir)}", "data.image_size=64"]
    cfg = compose(overrides, out_dir=tmp_path)
    metrics = train(cfg)
    assert "test/mIoU" in metrics and "val/mIoU" in metrics
    assert (tmp_path / "metrics.json").is_file()


def test_bf16_mixed_precision_runs_on_cpu(data_dir, tmp_path):
    from segexp.runner import train

    cfg = compose(
        [
            "+experiment=supervised_shapes",
            "debug=fdr",
            "trainer.precision=bf16-mixed",
            *TINY,
            *SMALL_SYNTH,
            f"paths.data_dir={data_dir}",
        ],
        out_dir=tmp_path,
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/mIoU"] <= 1.0
