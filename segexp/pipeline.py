"""The image-level WSSS pipeline, stages 1-4 in order: ``python -m segexp.pipeline +experiment=seam_shapes``.

1. ``train``   - the CAM network: ``pipeline.cam_network`` (default :func:`train_cam_network`, the
                 experiment's method; SC-CAM plugs in its clustering rounds here).
2. ``cam``     - multi-scale x flip CAM export of the train split (``conf/stage/cam.yaml``), CAM mIoU
                 over the background-threshold curve.
3. refinement  - every stage named in ``pipeline.refine`` (``conf/stage/<name>.yaml``: ``crf``, ``rw``),
                 each given the exported CAMs; pseudo-label mIoU after each. A stage that needs a
                 trained network of its own (AffinityNet for ``rw``) has a ``prepare(context)`` hook
                 that trains it through :meth:`PipelineContext.train`.
4. ``retrain`` - ``method=supervised`` on the ``pseudo`` masks of the last refinement stage (a
                 ``PseudoLabels`` train wrapper), final val/test mIoU.

Settings live in ``conf/pipeline/wsss.yaml`` (experiments add ``- /pipeline: wsss``); a stage's own
settings are ``pipeline.stages.<name>.*`` on the command line (the pipeline composes
``conf/stage/<name>.yaml`` there, so ``segexp.pseudo stage=<name>`` and the pipeline read one file).

Resumable: every training stage writes ``<dir>/<stage>/done.json`` with the hash of what it depends
on and is skipped when that hash is current, and resumes from its ``last.ckpt`` when interrupted;
stages 2-3 fill per-image caches (only missing or stale images are computed). ``--dir`` sets the
pipeline directory (default ``${paths.log_dir}/pipeline/${run_name}``); ``--stop-after NAME`` stops
after a stage. A report of every stage goes to ``<dir>/pipeline_report.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segexp.data.cache import file_key, stable_hash
from segexp.utils.atomic import write_json
from segexp.utils.cli import check_config_choices
from segexp.utils.errors import user_errors

log = logging.getLogger(__name__)

STAGES = ("train", "cam", "refine", "retrain")


def compose(overrides: list[str]) -> DictConfig:
    """The train config of ``overrides`` (``+experiment=`` and friends normalised as on the CLI)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import segexp.utils.resolvers  # noqa: F401
    from segexp.utils.cli import normalize_overrides

    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=normalize_overrides(list(overrides)))


def container(node: Any) -> Any:
    """Plain resolved Python data of a config node (anything else unchanged)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _done(path: Path, key: str) -> dict[str, Any] | None:
    import json

    try:
        record = json.loads((path / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint a training run kept (``epoch_*.ckpt``), else its ``last.ckpt``."""
    ckpts = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpts:
        return ckpts[-1]
    if last.is_file():
        return last
    raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")


def method_override_key(arg: str) -> bool:
    """Whether a command-line override sets the method (``method=...``, ``method.x=...``, ``+method.y``)."""
    key = arg.split("=", 1)[0].lstrip("+~")
    return key == "method" or key.startswith("method.")


def without_method(overrides: list[str]) -> list[str]:
    """The overrides of a pipeline minus those of its stage-1 method (another method trains next)."""
    return [a for a in overrides if not method_override_key(a)]


def method_config(name: str, overrides: list[str] = ()) -> DictConfig:
    """``conf/method/<name>.yaml`` as composed without any experiment (interpolations unresolved,
    so they resolve against the config the node is put into)."""
    return compose([f"method={name}", *overrides]).method


def train_stage(
    overrides: list[str],
    run_dir: Path,
    key: str,
    patch: dict[str, Any] | None = None,
    method: str | None = None,
    method_overrides: list[str] = (),
) -> dict[str, Any]:
    """Run, resume or skip one training run in ``run_dir``; returns ``{key, ckpt, metrics}``.

    ``key`` hashes everything the run depends on: a current ``done.json`` skips it, a ``last.ckpt``
    written under the same key resumes it. ``patch`` sets config values that cannot be spelled as
    overrides (e.g. a train wrapper holding a stage config). ``method`` trains another method than
    the experiment's (AffinityNet, the stage-2 network): its config is composed on its own, with
    ``method_overrides``, and replaces the experiment's ``method`` node, because an experiment's own
    ``method:`` block (weights of SEAM, FBR, ...) would not fit another method's arguments.
    """
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
    if method is not None:
        overrides = without_method(overrides)
    cfg = compose(overrides + extra)
    if method is not None:
        cfg.method = method_config(method, list(method_overrides))
    for dotted, value in (patch or {}).items():
        OmegaConf.update(cfg, dotted, value, force_add=True)
    metrics = train(cfg)
    record = {"key": key, "ckpt": str(best_checkpoint(run_dir)), "metrics": metrics}
    write_json(run_dir / "done.json", record)
    return record


@dataclass
class PipelineContext:
    """What a pipeline stage may use: the composed config, the user's overrides, the pipeline
    directory, the train-split reader and the report so far."""

    cfg: DictConfig
    overrides: list[str]
    root: Path
    reader: Any = None
    report: dict[str, Any] = field(default_factory=dict)

    def train(
        self,
        name: str,
        overrides: list[str],
        depends_on: Any,
        patch: dict[str, Any] | None = None,
        method: str | None = None,
        method_overrides: list[str] = (),
    ) -> dict[str, Any]:
        """A training run in ``<dir>/<name>`` keyed by ``depends_on`` (see :func:`train_stage`)."""
        key = run_key({"on": depends_on, "method": method, "method_overrides": list(method_overrides)})
        return train_stage(list(overrides), self.root / name, key, patch, method, list(method_overrides))


#: settings that change where or how fast a run computes, not what it learns (``device`` only changes
#: results numerically, e.g. CPU vs CUDA kernels; moving a pipeline to another machine reuses its runs)
RUNTIME_SETTINGS = frozenset({"num_workers", "eval_batch_size", "cache_dir", "device", "progress"})


def without_runtime_settings(node: Any) -> Any:
    """``node`` without :data:`RUNTIME_SETTINGS` at any depth."""
    if isinstance(node, dict):
        return {k: without_runtime_settings(v) for k, v in node.items() if k not in RUNTIME_SETTINGS}
    if isinstance(node, (list, tuple)):
        return [without_runtime_settings(v) for v in node]
    return node


def run_key(depends: Any, length: int = 16) -> str:
    """Hash of what a run depends on: more workers, another cache folder or the device never retrain
    a finished stage, while any setting that changes the result does."""
    return stable_hash(without_runtime_settings(depends), length)


def cam_network_key(cfg: DictConfig) -> dict[str, Any]:
    """What the stage-1 network depends on, including the local weights file behind
    ``backbone.pretrained`` (path, size and mtime): a retrained file at the same path retrains."""
    key = {k: container(cfg.get(k)) for k in ("method", "backbone", "data", "schedule", "seed")}
    pretrained = OmegaConf.select(cfg, "backbone.pretrained", default=None)
    if isinstance(pretrained, str) and Path(pretrained).expanduser().is_file():
        key["pretrained_file"] = file_key(Path(pretrained).expanduser())
    return key


def train_cam_network(context: PipelineContext) -> dict[str, Any]:
    """Stage 1 (default): train the experiment's CAM method as configured."""
    return context.train("train", context.overrides, cam_network_key(context.cfg))


def train_reader(cfg: DictConfig, role: str = "train") -> Any:
    """The reader of ``data.splits[role]`` with every key the dataset provides (prepared first)."""
    import hydra

    if cfg.data.get("prepare") is not None:
        hydra.utils.instantiate(cfg.data.prepare)()
    return hydra.utils.instantiate(cfg.data.reader)(split=cfg.data.splits[role], keys=None)


def _stage_overrides(names: list[str]) -> list[str]:
    """Compose ``conf/stage/<name>.yaml`` at ``pipeline.stages.<name>`` for the CAM stage and each refiner."""
    return [f"+stage@pipeline.stages.{n}={n}" for n in ["cam", *names]]


def is_stage_setting(arg: str) -> bool:
    """``pipeline.stages.<name>.<key>=...``: a setting of a stage config the pipeline composes itself
    (training runs never see these)."""
    return arg.split("=", 1)[0].lstrip("+~").startswith("pipeline.stages.")


def _compose_pipeline(overrides: list[str]) -> DictConfig:
    cfg = compose([a for a in overrides if not is_stage_setting(a)])
    if cfg.get("pipeline") is None:
        raise ValueError(
            "this experiment has no pipeline settings: add `- /pipeline: wsss` to its defaults list "
            "(see conf/pipeline/wsss.yaml)"
        )
    refine = list(cfg.pipeline.get("refine") or [])
    return compose(list(overrides) + _stage_overrides(refine))


def stage_config(cfg: DictConfig, name: str, cam_cfg: dict[str, Any]) -> dict[str, Any]:
    """The resolved config of refinement stage ``name`` reading the CAMs of ``cam_cfg``."""
    node = container(cfg.pipeline.stages[name])
    if "cam_stage" not in node:
        raise ValueError(f"conf/stage/{name}.yaml takes no `cam_stage`: it cannot refine CAMs")
    node["cam_stage"] = cam_cfg
    return node


def run(overrides: list[str], directory: str | None = None, stop_after: str | None = None) -> dict[str, Any]:
    import hydra

    cfg = _compose_pipeline(overrides)
    root = Path(directory) if directory else Path(cfg.paths.log_dir) / "pipeline" / cfg.run_name
    root.mkdir(parents=True, exist_ok=True)
    context = PipelineContext(cfg=cfg, overrides=[a for a in overrides if not is_stage_setting(a)], root=root)
    report = context.report
    report["dir"] = str(root)
    report["overrides"] = list(overrides)  # what `segexp.report` groups pipeline runs by
    started = time.monotonic()

    # 1. CAM network
    stage1 = hydra.utils.instantiate(cfg.pipeline.cam_network)(context)
    report["train"] = stage1["metrics"]
    if stop_after == "train":
        return report

    # 2. CAM export + CAM mIoU curve (train split, as in the papers)
    context.reader = train_reader(cfg)
    cam_cfg = container(cfg.pipeline.stages.cam)
    cam_cfg["ckpt_path"] = stage1["ckpt"]
    if "method" in stage1:  # a stage 1 whose final network differs from cfg.method (SC-CAM rounds)
        cam_cfg["method"] = stage1["method"]
    cam_stage = hydra.utils.instantiate(cam_cfg)
    report["cam"] = _summary(cam_stage.run(context.reader, evaluate=True))
    if stop_after == "cam":
        return report

    # 3. refinement: each stage refines the exported CAMs
    stage_cfg: dict[str, Any] = cam_cfg
    for name in cfg.pipeline.refine:
        stage_cfg = stage_config(cfg, name, cam_cfg)
        stage = hydra.utils.instantiate(stage_cfg, _recursive_=True)
        if hasattr(stage, "prepare"):
            stage.prepare(context)
        report[name] = _summary(stage.run(context.reader, evaluate=True))
    if stop_after == "refine":
        return report

    # 4. retraining on the pseudo labels of the last stage
    wrapper = {"_target_": "segexp.data.pseudo_labels.PseudoLabels", "_partial_": True, "stage": stage_cfg}
    extra = list(cfg.pipeline.retrain_overrides)
    retrain = [
        *context.overrides,
        "loss=ce",
        "schedule=sgd_poly",
        f"schedule.epochs={cfg.pipeline.retrain_epochs}",
        "optimized_metric=val/mIoU",
        f"run_name={cfg.run_name}_retrain",
        *without_method(extra),
    ]
    method_overrides = [
        "method.target_key=pseudo",
        "method.train_keys=[image,pseudo]",
        *[a for a in extra if method_override_key(a)],
    ]
    depends = {"stage1": stage1["key"], "ckpt": stage1["ckpt"], "stage": stage_cfg, "retrain": retrain}
    stage4 = context.train(
        "retrain",
        retrain,
        depends,
        patch={"data.train_wrappers": [wrapper]},
        method="supervised",
        method_overrides=method_overrides,
    )
    report["retrain"] = stage4["metrics"]
    report["wall_s"] = time.monotonic() - started  # this call's time: stages found current count ~0
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
        "fscore_at_best_threshold",
        "fscore_at_threshold",
        "scored_images",
        "cache_dir",
        "seconds_per_image",
        "peak_memory_MB",
        "confident_fraction",
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
    with user_errors():
        check_config_choices(overrides)
        report = run(overrides, args.dir, args.stop_after)
    print(report)
    return report


if __name__ == "__main__":
    main()
