"""Step 1 (default): train the experiment's CAM network as configured (``pipeline.cam_network``)."""

from __future__ import annotations

from typing import Any

from segexp.pipeline.runs import PipelineContext, cam_network_key

__all__ = ["train_cam_network"]


def train_cam_network(context: PipelineContext) -> dict[str, Any]:
    """``{key, ckpt, metrics}`` of the CAM network in ``<dir>/train``."""
    return context.train("train", context.overrides, cam_network_key(context.cfg))
