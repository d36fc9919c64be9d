"""Step 4: ``method=supervised`` (``pipeline.retrain``) trained on the labels of the last refinement
stage, read through a ``PseudoLabels`` train wrapper; final val/test mIoU."""

from __future__ import annotations

from typing import Any

from segexp.pipeline.compose import container, method_override_key, without_method
from segexp.pipeline.runs import PipelineContext

__all__ = ["retrain"]


def retrain(context: PipelineContext, network: dict[str, Any], stage_cfg: dict[str, Any]) -> dict[str, Any]:
    """``{key, ckpt, metrics}`` of the stage-2 network in ``<dir>/retrain``."""
    pipeline = context.cfg.pipeline
    settings = container(pipeline.retrain)
    extra = list(pipeline.retrain_overrides)
    overrides = [
        *context.overrides,
        *settings["overrides"],
        f"schedule.epochs={pipeline.retrain_epochs}",
        f"run_name={context.cfg.run_name}_retrain",
        *without_method(extra),
    ]
    method_overrides = [*settings["method_overrides"], *[a for a in extra if method_override_key(a)]]
    wrapper = {**settings["wrapper"], "stage": stage_cfg}
    depends = {"stage1": network["key"], "ckpt": network["ckpt"], "stage": stage_cfg, "retrain": overrides}
    return context.train(
        "retrain",
        overrides,
        depends,
        patch={"data.train_wrappers": [wrapper]},
        method=settings["method"],
        method_overrides=method_overrides,
    )
