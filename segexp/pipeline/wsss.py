"""The image-level WSSS pipeline, step by step (the list :func:`run_pipeline` reads top to bottom).

1. train    - the CAM network (``pipeline.cam_network``: :func:`~segexp.pipeline.train_cam.train_cam_network`,
              or SC-CAM's rounds :func:`~segexp.pipeline.sccam.train_rounds`);
2. cam      - CAM export of the train split, CAM mIoU over the background-threshold curve;
3. refine   - each stage of ``pipeline.refine`` (crf, rw, ...; AffinityNet trained first for rw);
4. retrain  - ``method=supervised`` on the last stage's pseudo labels, val/test mIoU.

Each step's product is on disk and scored before the next starts; ``pipeline_report.json`` holds
every score so far (rewritten after each step). Steps found current are skipped, so a rerun in
the same directory resumes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from segexp.pipeline.compose import compose, is_stage_setting, train_reader
from segexp.pipeline.export_cams import export_cams
from segexp.pipeline.refine import refine
from segexp.pipeline.retrain import retrain
from segexp.pipeline.runs import PipelineContext
from segexp.utils.atomic import write_json
from segexp.utils.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["run_pipeline", "run", "STEPS"]

STEPS = ("train", "cam", "refine", "retrain")


def run_pipeline(
    cfg: DictConfig, overrides: list[str], root: Path, stop_after: str | None = None
) -> dict[str, Any]:
    """The four steps in ``root`` for the composed ``cfg`` of the user's ``overrides``."""
    if cfg.get("pipeline") is None:
        raise UserError(
            "this experiment has no pipeline settings: add `- /pipeline: wsss` to its defaults list "
            "(see conf/pipeline/wsss.yaml)"
        )
    if stop_after is not None and stop_after not in STEPS:
        raise UserError(f"stop_after={stop_after!r}: choose one of {', '.join(STEPS)}")
    root.mkdir(parents=True, exist_ok=True)
    context = PipelineContext(cfg=cfg, overrides=[a for a in overrides if not is_stage_setting(a)], root=root)
    report = context.report
    report.update(dir=str(root), overrides=list(overrides))  # what `segexp.report` groups pipeline runs by
    started = time.monotonic()

    def finished(step: str) -> bool:  # the report so far is on disk after every step
        report["wall_s"] = time.monotonic() - started  # this call's time: steps found current count ~0
        write_json(root / "pipeline_report.json", report)
        return step == stop_after

    network = hydra.utils.instantiate(cfg.pipeline.cam_network)(context)  # 1. train
    report["train"] = network["metrics"]
    if finished("train"):
        return report

    context.reader = train_reader(cfg)  # 2. cam
    cam_cfg, cam_report = export_cams(context, network)
    report["cam"] = summary(cam_report)
    if finished("cam"):
        return report

    stage_cfg, stage_reports = refine(context, cam_cfg)  # 3. refine
    report.update({name: summary(r) for name, r in stage_reports.items()})
    if finished("refine"):
        return report

    report["retrain"] = retrain(context, network, stage_cfg)["metrics"]  # 4. retrain
    finished("retrain")
    return report


def run(
    overrides: list[str], directory: str | Path | None = None, stop_after: str | None = None
) -> dict[str, Any]:
    """The pipeline of ``overrides`` without Hydra's launcher (tests, notebooks): ``directory``
    defaults to ``${paths.log_dir}/pipeline/${run_name}``."""
    cfg = compose(list(overrides))
    root = Path(directory) if directory else Path(cfg.paths.log_dir) / "pipeline" / cfg.run_name
    return run_pipeline(cfg, list(overrides), root, stop_after)


SUMMARY_KEYS = (
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
    "confident_fraction",
)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The fields of a stage report the pipeline report keeps (curves and per-class tables stay out)."""
    out = {k: report[k] for k in SUMMARY_KEYS if k in report}
    if "pseudo" in report:
        out["pseudo_mIoU"] = report["pseudo"]["mIoU"]
    return out
