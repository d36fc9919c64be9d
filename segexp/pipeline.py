"""The image-level WSSS pipeline, stages 1-4 in order: ``python -m segexp.pipeline +experiment=seam_shapes``.

1. ``train``   - the CAM network (the experiment's method: ``cam``, ``seam``, ...),
                 :func:`segexp.runner.train`.
2. ``cam``     - multi-scale x flip CAM export of the train split
                 (:class:`~segexp.postprocess.cam_export.CAMStage`),
                 CAM mIoU over the background-threshold curve.
3. refinement  - the stages in ``pipeline.refine`` (``crf``: :class:`~segexp.postprocess.crf.CRFStage`),
                 pseudo-label mIoU after each.
4. ``retrain`` - ``method=supervised`` on the ``pseudo`` masks of the last stage (a ``PseudoLabels``
                 train wrapper), final val/test mIoU.

Resumable: every stage writes ``<dir>/<stage>/done.json`` with the hash of what it depends on and is
skipped when that hash is current; stage 1/4 resume from their ``last.ckpt`` when interrupted; stages 2-3
fill per-image caches (only missing or stale images are computed). ``--dir`` sets the pipeline
directory (default ``${paths.log_dir}/pipeline/${run_name}``); ``--stop-after NAME`` stops after a stage.
A report of every stage goes to ``<dir>/pipeline_report.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segexp.data.cache import stable_hash
from segexp.utils.atomic import write_json

log = logging.getLogger(__name__)

STAGES = ("train", "cam", "refine", "retrain")


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import segexp.utils.resolvers  # noqa: F401
    from segexp.utils.cli import normalize_overrides

    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=normalize_overrides(list(overrides)))


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _done(path: Path, key: str) -> dict[str, Any] | None:
    import json

    try:
        record = json.loads((path / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def _pipeline_settings(cfg: DictConfig) -> dict[str, Any]:
    p = _container(cfg.get("pipeline")) or {}
    return {
        "refine": list(p.get("refine", ["crf"])),
        "retrain_epochs": int(p.get("retrain_epochs", 6)),
        "crf": dict(p.get("crf", {})),
        "retrain_overrides": list(p.get("retrain_overrides", [])),
    }


def _best_ckpt(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpts:
        return ckpts[-1]
    if last.is_file():
        return last
    raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")


def _train(
    overrides: list[str], run_dir: Path, key: str, patch: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run (or resume, or skip) one training stage in ``run_dir``."""
    from segexp.runner import train

    record = _done(run_dir, key)
    if record is not None:
        log.info("stage %s is current: skipped", run_dir.name)
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = [f"paths.output_dir={run_dir}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    key_file = run_dir / "key.txt"
    if last.is_file() and key_file.is_file() and key_file.read_text() == key:
        log.info("stage %s: resuming from %s", run_dir.name, last)
        extra.append(f"ckpt_path={last}")
    key_file.write_text(key)
    cfg = compose(overrides + extra)
    for dotted, value in (patch or {}).items():
        OmegaConf.update(cfg, dotted, value, force_add=True)
    metrics = train(cfg)
    record = {"key": key, "ckpt": str(_best_ckpt(run_dir)), "metrics": metrics}
    write_json(run_dir / "done.json", record)
    return record


def _reader(cfg: DictConfig, role: str = "train") -> Any:
    import hydra

    if cfg.data.get("prepare") is not None:
        hydra.utils.instantiate(cfg.data.prepare)()
    return hydra.utils.instantiate(cfg.data.reader)(split=cfg.data.splits[role], keys=None)


def cam_stage_config(cfg: DictConfig, ckpt: str, cache_dir: str) -> dict[str, Any]:
    return {
        "_target_": "segexp.postprocess.cam_export.CAMStage",
        "_recursive_": False,
        "method": _container(cfg.method),
        "ckpt_path": ckpt,
        "cache_dir": cache_dir,
    }


def refine_stage_config(
    name: str, cam_cfg: dict[str, Any], settings: dict[str, Any], cache_dir: str
) -> dict[str, Any]:
    if name == "crf":
        return {
            "_target_": "segexp.postprocess.crf.CRFStage",
            "cam_stage": cam_cfg,
            "cache_dir": cache_dir,
            **settings.get("crf", {}),
        }
    raise ValueError(f"unknown refinement stage {name!r} (available: crf)")


def run(overrides: list[str], directory: str | None = None, stop_after: str | None = None) -> dict[str, Any]:
    import hydra

    cfg = compose(overrides)
    root = Path(directory) if directory else Path(cfg.paths.log_dir) / "pipeline" / cfg.run_name
    root.mkdir(parents=True, exist_ok=True)
    settings = _pipeline_settings(cfg)
    cache_dir = str(Path(cfg.paths.data_dir) / "stage_cache")
    report: dict[str, Any] = {"dir": str(root)}

    # 1. CAM network
    key1 = stable_hash(
        {k: _container(cfg.get(k)) for k in ("method", "backbone", "data", "schedule", "seed")}
    )
    stage1 = _train(list(overrides), root / "train", key1)
    report["train"] = stage1["metrics"]
    if stop_after == "train":
        return report

    # 2. CAM export + CAM mIoU curve (train split, as in the papers)
    reader = _reader(cfg)
    cam_cfg = cam_stage_config(cfg, stage1["ckpt"], cache_dir)
    cam_stage = hydra.utils.instantiate(cam_cfg)
    report["cam"] = _summary(cam_stage.run(reader, evaluate=True))
    if stop_after == "cam":
        return report

    # 3. refinement
    stage_cfg: dict[str, Any] = cam_cfg
    for name in settings["refine"]:
        stage_cfg = refine_stage_config(name, cam_cfg, settings, cache_dir)
        stage = hydra.utils.instantiate(stage_cfg, _recursive_=True)
        report[name] = _summary(stage.run(reader, evaluate=True, workers=settings["crf"].get("workers")))
    if stop_after == "refine":
        return report

    # 4. retraining on the pseudo labels of the last stage
    wrapper = {"_target_": "segexp.data.pseudo_labels.PseudoLabels", "_partial_": True, "stage": stage_cfg}
    key4 = stable_hash({"stage1": key1, "ckpt": stage1["ckpt"], "stage": stage_cfg, "settings": settings})
    retrain = [
        *overrides,
        "method=supervised",
        "loss=ce",
        "schedule=sgd_poly",
        "method.target_key=pseudo",
        "method.train_keys=[image,pseudo]",
        f"schedule.epochs={settings['retrain_epochs']}",
        "optimized_metric=val/mIoU",
        f"run_name={cfg.run_name}_retrain",
        *settings["retrain_overrides"],
    ]
    stage4 = _train(retrain, root / "retrain", key4, patch={"data.train_wrappers": [wrapper]})
    report["retrain"] = stage4["metrics"]
    write_json(root / "pipeline_report.json", report)
    return report


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "stage",
        "images",
        "computed",
        "reused",
        "seconds",
        "images_per_s",
        "processes",
        "best_threshold",
        "best_mIoU",
        "mIoU_at_threshold",
        "scored_images",
        "cache_dir",
    )
    out = {k: report[k] for k in keep if k in report}
    if "pseudo" in report:
        out["pseudo_mIoU"] = report["pseudo"]["mIoU"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="pipeline directory (stages and their markers)")
    parser.add_argument("--stop-after", choices=STAGES, default=None)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    report = run(overrides, args.dir, args.stop_after)
    print(report)
    return report


if __name__ == "__main__":
    main()
