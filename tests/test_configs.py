"""Every experiment composes and builds its method (its fast_dev_run: slow); precedence; clear failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segexp.utils.cli import normalize_overrides
from tests.conftest import CONF_DIR, SMALL_SYNTH, compose

# Multirun experiments (study_*, *_ablation_shapes) are a base experiment plus a sweep: each swept
# value is composed and resolved below instead of training the base a second time.
_FILES = sorted((CONF_DIR / "experiment").glob("*.yaml"))
SWEEPS = [p.stem for p in _FILES if "mode: MULTIRUN" in p.read_text()]
EXPERIMENTS = [p.stem for p in _FILES if p.stem not in SWEEPS]
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


def test_an_experiment_sets_stop_after_and_the_command_line_still_wins():
    # pipeline.yaml's own keys come after the experiment: a stop_after declared there silently
    # replaced the experiment's value (study_sccam ran every step past the rounds)
    assert compose(["+experiment=study_sccam"], config_name="pipeline").stop_after == "train"
    assert compose(["+experiment=study_sccam", "stop_after=cam"], config_name="pipeline").stop_after == "cam"
    plain = compose(["+experiment=cam_shapes"], config_name="pipeline")
    assert plain.stop_after is None and plain.task_name == "pipeline"


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
        # XML object names -> the VOC class of the same index as in the masks (for data=voc_boxes)
        from segexp.data.readers.voc import VOC_CLASSES
        from segexp.data.synth import CLASS_NAMES

        for xml in (voc / "Annotations").glob("*.xml"):
            text = xml.read_text()
            for i, name in enumerate(CLASS_NAMES[1:], 1):
                text = text.replace(f"<name>{name}</name>", f"<name>{VOC_CLASSES[i]}</name>")
            xml.write_text(text)
        _write_saliency_from_masks(voc / "SegmentationClass", voc / "SALImages")
    return dst


def _write_saliency_from_masks(mask_dir: Path, out_dir: Path) -> None:
    """EPS/PPC-style saliency PNGs (255 = salient) from class masks: object = not background."""
    import numpy as np
    from PIL import Image

    from segexp.data.saliency import oracle_saliency

    out_dir.mkdir()
    for mask in mask_dir.glob("*.png"):
        Image.fromarray(oracle_saliency(np.asarray(Image.open(mask)))).save(out_dir / mask.name)


def _duts_fixture_from_synthetic(data_dir: Path) -> Path:
    """A DUTS tree (DUTS-TR / DUTS-TE, official folder names) from the generator's SOD output."""
    from segexp.data.synth import ensure_synthetic

    synth = ensure_synthetic(data_dir / "voc_src", num_images=12, size=64, seed=3)
    dst = data_dir / "dutsfix"
    if not dst.exists():
        for split, name in (("train", "DUTS-TR"), ("val", "DUTS-TE")):
            shutil.copytree(synth / "SOD" / split / "Image", dst / "DUTS" / name / f"{name}-Image")
            shutil.copytree(synth / "SOD" / split / "Mask", dst / "DUTS" / name / f"{name}-Mask")
    return dst


def _coco_fixture_from_synthetic(data_dir: Path) -> Path:
    """A COCO 2017 tree (train2017/, val2017/, annotations/instances_*2017.json) from the
    generator's COCO output, with COCO's 80 categories (ids 1..90 with the official gaps); the
    generator's category ids 1..5 then stand for the first five COCO classes."""
    import json

    from PIL import Image

    from segexp.data.synth import ensure_synthetic

    coco_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    names = compose(["data=coco"]).data.class_names[1:]

    synth = ensure_synthetic(data_dir / "voc_src", num_images=12, size=64, seed=3)
    dst = data_dir / "cocofix"
    coco = dst / "coco"
    if not coco.exists():
        for split in ("train", "val"):
            shutil.copytree(synth / "coco" / split, coco / f"{split}2017")
            (coco / "annotations").mkdir(parents=True, exist_ok=True)
            ann = json.loads((synth / "coco" / "annotations" / f"instances_{split}.json").read_text())
            ann["categories"] = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(coco_ids, names)]
            (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(ann))
        (coco / "SALImages").mkdir()  # saliency for FBR's I+S setting: all-background maps will do here
        for image in (coco / "train2017").iterdir():
            Image.new("L", Image.open(image).size).save(coco / "SALImages" / f"{image.stem}.png")
    return dst


def _coarse_checkpoint(name: str, overrides: list[str], tmp_path: Path) -> list[str]:
    """`*_fine` experiments (LDF second stage) need a coarse checkpoint: an untrained one will do."""
    import hydra
    import torch

    cfg = compose(overrides + ["coarse_ckpt=unused"], out_dir=tmp_path)
    ckpt = tmp_path / "coarse.ckpt"
    torch.save({"state_dict": hydra.utils.instantiate(cfg.method).state_dict()}, ckpt)
    return [f"coarse_ckpt={ckpt}"]


def _cam_checkpoint(overrides: list[str], tmp_path: Path) -> list[str]:
    """AMN experiments learn from the IR labels of a CAM network's CAMs: an untrained CAM network of
    the matching CAM experiment on the same data, recording its method config as every training run's
    checkpoint does, will do. ``overrides[0]`` is the AMN experiment."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    cam = "+experiment=cam_shapes" if "_shapes" in overrides[0] else "+experiment=cam_voc"
    cfg = compose([cam, *overrides[1:]], out_dir=tmp_path)
    method = hydra.utils.instantiate(cfg.method)
    config = OmegaConf.to_container(cfg.method, resolve=True)
    method.record_provenance({"method": "cam", "method_config": config})
    ckpt = tmp_path / "cam.ckpt"
    torch.save({"state_dict": method.state_dict(), "hyper_parameters": dict(method.hparams)}, ckpt)
    return [f"cam_ckpt={ckpt}"]


@pytest.mark.parametrize("name", [s for s in SWEEPS if not s.startswith("study_")])  # studies: test_studies
def test_every_swept_value_of_a_multirun_experiment_composes(name, tmp_path):
    from omegaconf import OmegaConf

    from tests.test_studies import sweep_params

    for key, values in sweep_params(name).items():
        for value in values:
            cfg = compose([f"+experiment={name}", "hydra.mode=RUN", f"{key}={value}"], out_dir=tmp_path)
            OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_its_method_predicts_at_the_input_size(name, tmp_path):
    """Every experiment, in the default suite: the config resolves, the method (network, loss, heads)
    is built from it and predicts one image at its own size (the fast_dev_runs are `slow`)."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    from segexp.methods.base import SegMethod

    overrides = [f"+experiment={name}", *TINY] + (["coarse_ckpt=unused"] if name.endswith("_fine") else [])
    overrides += ["cam_ckpt=unused"] if "amn" in name else []
    cfg = compose(overrides, out_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    assert ("loss" in cfg) == ("loss" in cfg.method)  # a `loss` node only where the method reads it
    torch.manual_seed(0)
    method = hydra.utils.instantiate(cfg.method).eval()
    assert isinstance(method, SegMethod)
    if method.predicts_classes:
        with torch.no_grad():
            scores = method.predict(torch.rand(1, 3, 32, 48))
        assert scores.shape[0] == 1 and tuple(scores.shape[-2:]) == (32, 48), tuple(scores.shape)
        assert torch.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_fast_dev_run(name, data_dir, tmp_path):
    from segexp.runner import train

    overrides = [f"+experiment={name}", "debug=fdr", *TINY, f"paths.data_dir={data_dir}"]
    if "_shapes" in name:
        overrides += SMALL_SYNTH
    elif name in ("bottomup_ade", "bottomup_evican", "bottomup_coco_ade"):  # entity-set fixtures
        from tests.test_bottomup_method import entity_fixture

        root, extra = entity_fixture(data_dir)
        overrides += [f"paths.data_dir={root}", "data.image_size=64", *extra.get(name, [])]
    elif "duts" in name:  # salient-object experiments: a DUTS-layout fixture
        duts = _duts_fixture_from_synthetic(data_dir)  # not the official counts
        overrides += [f"paths.data_dir={duts}", "data.image_size=64", "data.expected_sizes=null"]
    elif "coco" in name:
        overrides += [f"paths.data_dir={_coco_fixture_from_synthetic(data_dir)}", "data.image_size=64"]
    else:
        overrides += [f"paths.data_dir={_voc_fixture_from_synthetic(data_dir)}", "data.image_size=64"]
    if name.endswith("_fine"):
        overrides += _coarse_checkpoint(name, overrides, tmp_path)
    if "amn" in name:
        overrides += _cam_checkpoint(overrides, tmp_path)
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


def test_slurm_and_local_submitit_launchers_compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        slurm = hydra_compose(
            config_name="train",
            overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    assert "SlurmLauncher" in slurm.hydra.launcher._target_
    assert slurm.hydra.launcher.partition == "gpu"


def test_resume_in_place_targets_the_checkpoints_run_dir(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.touch()
    out = normalize_overrides([f"ckpt_path={ckpt}"], resume_in_place=True)
    assert out == [f"ckpt_path={ckpt}", f"hydra.run.dir={run}"]
    # an explicit run dir, a multirun, or evaluation never get redirected
    explicit = normalize_overrides([f"ckpt_path={ckpt}", "hydra.run.dir=x"], resume_in_place=True)
    assert explicit[-1] == "hydra.run.dir=x"
    assert not any("hydra.run.dir" in a for a in normalize_overrides(["-m", f"ckpt_path={ckpt}"], True))
    assert normalize_overrides([f"ckpt_path={ckpt}"]) == [f"ckpt_path={ckpt}"]


def test_sod_bench_gives_one_test_loader_per_benchmark_set(tmp_path):
    """data=sod_bench: one evaluation over several SOD test sets, each its own dataloader."""
    import hydra
    import numpy as np

    from segexp.data.io import write_gray_png, write_jpeg

    cfg = compose(["data=sod_bench", f"paths.data_dir={tmp_path}", "data.num_workers=0",
                   "data.eval_batch_size=2", "data.expected_sizes=null"], out_dir=tmp_path)  # 2-image sets
    for name, node in cfg.data.test_sets.items():
        for k in range(3 if name == "SOD" else 2):
            write_jpeg(Path(node.root) / node.image_dir / f"im{k}.jpg", np.full((20, 24, 3), 90, np.uint8))
            write_gray_png(Path(node.root) / node.mask_dir / f"im{k}.png", np.full((20, 24), 255, np.uint8))
    dm = hydra.utils.instantiate(cfg.data, train_keys=["image", "saliency"], eval_keys=["image", "saliency"])
    loaders = dm.test_dataloader()
    assert dm.test_set_names == list(cfg.data.test_sets)
    assert len(loaders) == 6
    assert [len(loader.dataset) for loader in loaders] == [3 if n == "SOD" else 2 for n in dm.test_set_names]
    assert next(iter(loaders[0]))["saliency"].shape == (2, 20, 24)
