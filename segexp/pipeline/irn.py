"""IRN for the ``irn`` stage (``pipeline.irn``, ``conf/pipeline/irn/default.yaml``): the IR labels of the
exported CAMs (:class:`~segexp.stages.ir_labels.IRLabelStage`), then ``method=irn`` trained on them.

IRN is trained the way AffinityNet is (a label stage of the CAMs, read by a ``PseudoLabels`` wrapper,
one training run keyed by the labels' settings, skipped when current, ``last`` or ``best`` weights),
so this step hands its settings to :func:`segexp.pipeline.affinity.train_affinitynet`: the run sits in
``<dir>/<stage>_affinity`` and its metrics under that name in the report.

``backbone_init``: ``experiment`` trains on the experiment's backbone as configured (the release:
ImageNet ResNet-50, frozen); ``cam`` starts from the trained CAM network's backbone (for backbones
without ImageNet weights, e.g. small_cnn on shapes: a frozen random backbone gives IRN nothing to read).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from omegaconf import OmegaConf

from segexp.pipeline.affinity import train_affinitynet
from segexp.pipeline.compose import container
from segexp.pipeline.runs import PipelineContext
from segexp.utils.errors import UserError

__all__ = ["train_irn", "BACKBONE_INITS"]

BACKBONE_INITS = ("experiment", "cam")


def irn_settings(context: PipelineContext, cam_cfg: dict[str, Any]) -> dict[str, Any]:
    """``pipeline.irn`` as the affinity step reads its settings (backbone overrides added)."""
    node = OmegaConf.select(context.cfg, "pipeline.irn")
    if node is None:
        raise UserError(
            "pipeline.irn is not set: add `- irn: default` to the defaults of conf/pipeline/wsss.yaml "
            "(or `+pipeline/irn@pipeline.irn=default`)"
        )
    settings = container(node)
    init = settings.pop("backbone_init")
    if init not in BACKBONE_INITS:
        raise UserError(f"pipeline.irn.backbone_init must be one of {BACKBONE_INITS}, got {init!r}")
    if init == "cam":
        settings["overrides"] = [
            *settings["overrides"],
            f"backbone.pretrained={cam_cfg['ckpt_path']}",
            f"backbone.weights_prefix={settings.pop('cam_backbone_prefix')}",
        ]
    settings.pop("cam_backbone_prefix", None)
    return settings


def train_irn(context: PipelineContext, cam_cfg: dict[str, Any], name: str) -> str:
    """The IRN checkpoint for the CAMs of ``cam_cfg``, for the stage ``name`` (module docstring)."""
    cfg = copy.deepcopy(context.cfg)
    OmegaConf.update(cfg, "pipeline.affinity", irn_settings(context, cam_cfg), merge=False, force_add=True)
    return train_affinitynet(replace(context, cfg=cfg), cam_cfg, name)
