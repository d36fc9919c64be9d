"""Step 3: every stage named in ``pipeline.refine`` (``pipeline.stages.<name>``: crf, rw, rw_psa)
refines the exported CAMs; pseudo-label mIoU after each. A stage that walks on learned affinities
(``affinity_ckpt: null`` in its config) gets the AffinityNet the ``affinity`` step trains for these
CAMs; IRN's walk (``irn_ckpt: null``) the IRN the ``irn`` step trains (:mod:`segexp.pipeline.irn`)."""

from __future__ import annotations

from typing import Any

import hydra

from segexp.pipeline.affinity import train_affinitynet
from segexp.pipeline.compose import container
from segexp.pipeline.irn import train_irn
from segexp.pipeline.runs import PipelineContext
from segexp.utils.errors import UserError

__all__ = ["stage_config", "refine"]


def stage_config(context: PipelineContext, name: str, cam_cfg: dict[str, Any]) -> dict[str, Any]:
    """The resolved config of refinement stage ``name`` reading the CAMs of ``cam_cfg``."""
    stages = context.cfg.pipeline.stages
    if name not in stages:
        raise UserError(f"pipeline.refine: no stage {name!r} (pipeline.stages has {sorted(stages)})")
    node = container(stages[name])
    if "cam_stage" not in node:
        raise UserError(f"conf/stage/{name}.yaml takes no `cam_stage`: it cannot refine CAMs")
    node["cam_stage"] = cam_cfg
    if "affinity_ckpt" in node and node["affinity_ckpt"] is None:
        node["affinity_ckpt"] = train_affinitynet(context, cam_cfg, name)
    if "irn_ckpt" in node and node["irn_ckpt"] is None:
        node["irn_ckpt"] = train_irn(context, cam_cfg, name)
    return node


def refine(
    context: PipelineContext, cam_cfg: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The config of the last stage (its labels retrain) and each stage's report."""
    reports: dict[str, dict[str, Any]] = {}
    node = cam_cfg
    for name in context.cfg.pipeline.refine:
        node = stage_config(context, name, cam_cfg)
        reports[name] = hydra.utils.instantiate(node, _recursive_=True).run(context.reader, evaluate=True)
    return node, reports
