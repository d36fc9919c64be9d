"""Dense-CRF refinement of exported CAMs (``conf/stage/crf.yaml``): CAMs -> label map per image.

The CRF itself (kernels, background score, sources) is :mod:`segexp.inference.crf`; this stage reads
the CAM stage's entries and caches the label maps (uint8, 0 = background), scored like every
label stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from segexp.inference.crf import CRFKernels, cam_crf_scores, crf_inference
from segexp.stages.base import LabelStage, Stage

__all__ = ["CRFStage", "class_lut"]


def class_lut(classes: np.ndarray) -> np.ndarray:
    """Index -> class id of a [background, the image's classes] score stack."""
    return np.concatenate([[0], np.asarray(classes, np.int64)]).astype(np.uint8)


class CRFStage(LabelStage):
    """CAMs of ``cam_stage`` -> dense-CRF label maps. ``kernels``: the :class:`CRFKernels` fields
    (iterations, gauss_sxy, ...), defaults there."""

    def __init__(
        self,
        cam_stage: Stage,
        name: str = "crf",
        bg_mode: str = "power",
        alpha: float = 4.0,
        bg_threshold: float = 0.26,
        cache_dir: str | os.PathLike = "stage_cache",
        workers: int | None = None,
        progress: bool = True,
        version: int = 1,
        **kernels: Any,
    ):
        self.cam_stage = cam_stage
        self.name = name
        self.bg_mode = bg_mode
        self.alpha = float(alpha)
        self.bg_threshold = float(bg_threshold)
        self.crf = asdict(CRFKernels(**kernels))
        self.cache_dir = Path(cache_dir)
        self.workers = workers
        self.progress = progress
        self.version = int(version)

    def settings(self) -> dict[str, Any]:
        return {
            "cams": self.cam_stage.settings(),
            "bg_mode": self.bg_mode,
            "alpha": self.alpha,
            "bg_threshold": self.bg_threshold,
            **self.crf,
        }

    def upstream(self) -> dict[str, Stage]:
        return {"cams": self.cam_stage}

    def compute(self, sample: Mapping[str, Any], cams: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = cam_crf_scores(cams["cams"].astype(np.float32), self.bg_mode, self.alpha, self.bg_threshold)
        q = crf_inference(np.asarray(sample["image"], np.uint8), scores, **self.crf)
        return {"pseudo": class_lut(cams["classes"])[q.argmax(0)]}
