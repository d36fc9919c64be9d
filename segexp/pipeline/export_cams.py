"""Step 2: multi-scale x flip CAMs of the trained network on the train split (``pipeline.stages.cam``,
``conf/stage/cam.yaml``), scored over the background-threshold curve as in the papers."""

from __future__ import annotations

from typing import Any

import hydra

from segexp.pipeline.compose import container
from segexp.pipeline.runs import PipelineContext

__all__ = ["export_cams"]


def export_cams(context: PipelineContext, network: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CAM stage config of ``network`` (``{ckpt[, method]}`` of step 1) and its report."""
    cam_cfg = container(context.cfg.pipeline.stages.cam)
    cam_cfg["ckpt_path"] = network["ckpt"]
    if "method" in network:  # a step 1 whose final network differs from cfg.method (SC-CAM rounds)
        cam_cfg["method"] = network["method"]
    report = hydra.utils.instantiate(cam_cfg).run(context.reader, evaluate=True)
    return cam_cfg, report
