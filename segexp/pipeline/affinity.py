"""AffinityNet for the random-walk stages (``pipeline.affinity``, ``conf/pipeline/affinity/``): the
affinity labels of the exported CAMs (:class:`~segexp.stages.affinity_labels.AffinityLabelStage`),
then ``method=affinitynet`` trained on them in ``<dir>/<stage>_affinity`` (skipped when current).

SEAM's settings are ``conf/pipeline/affinity/seam.yaml`` (high CRF alpha 24, lr 0.01), psa's
``psa.yaml`` (alpha 32, lr 0.1); both use ``train_aff.py``'s augmentation (ColorJitter, random crop
with zero padding, flip, no rescale), written out in the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra

from segexp.pipeline.compose import container
from segexp.pipeline.runs import PipelineContext

__all__ = ["train_affinitynet"]

WEIGHTS = ("last", "best")


def train_affinitynet(context: PipelineContext, cam_cfg: dict[str, Any], name: str) -> str:
    """The AffinityNet checkpoint for the CAMs of ``cam_cfg``, for the stage ``name``."""
    settings = container(context.cfg.pipeline.affinity)
    if settings["weights"] not in WEIGHTS:
        raise ValueError(f"pipeline.affinity.weights must be one of {WEIGHTS}, got {settings['weights']!r}")
    labels = hydra.utils.instantiate({**settings["labels"], "cam_stage": cam_cfg}, _recursive_=True)
    report = labels.run(context.reader, evaluate=True)
    summary = {
        k: report[k]
        for k in ("images", "computed", "seconds", "cache_dir", "confident_fraction")
        if k in report
    }
    if "pseudo" in report:
        summary["confident_mIoU"] = report["pseudo"]["mIoU"]
    context.report[labels.name] = summary

    overrides = [
        *context.overrides,
        f"schedule={settings['schedule']}",
        f"run_name={context.cfg.run_name}_affinity",
        *settings["overrides"],
    ]
    wrapper = {**settings["wrapper"], "stage": labels.config()}
    patch: dict[str, Any] = {"data.train_wrappers": [wrapper]}
    if settings.get("transforms") is not None:
        patch["data.transforms.train"] = settings["transforms"]
    depends = {"labels": labels.settings(), "overrides": overrides, "patch": patch}
    record = context.train(
        f"{name}_affinity", overrides, depends, patch, settings["method"], list(settings["method_overrides"])
    )
    context.report[f"{name}_affinity"] = record["metrics"]
    last = Path(record["ckpt"]).parent / "last.ckpt"
    return str(last) if settings["weights"] == "last" and last.is_file() else record["ckpt"]
