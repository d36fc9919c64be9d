"""Affinity labels for AffinityNet (``conf/stage/aff_labels.yaml``): two dense-CRF maps of the CAMs,
combined per image by :func:`segexp.losses.affinity.affinity_labels`.

* low-alpha map: background score ``(1 - max CAM)^la_alpha`` (4) - a *large* background score, so
  what it still calls foreground is confident foreground;
* high-alpha map: ``(1 - max CAM)^ha_alpha`` (SEAM 24, psa 32) - a *small* background score, so
  what it still calls background is confident background;
* label = low-alpha class, 0 where the high-alpha map says background, 255 (uncertain) where the
  low-alpha map says background but the high-alpha one does not.

Both CRF maps are :class:`~segexp.stages.crf.CRFStage` caches (stage name ``crf``: the low-alpha
one is the plain ``crf`` stage at alpha 4, so a pipeline that already ran it reuses it). The report
gives the share of confident pixels and the mIoU of the confident pixels against GT (how clean the
supervision of AffinityNet is).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segexp.losses.affinity import affinity_labels
from segexp.stages.base import Stage, confusion, iou_report
from segexp.stages.cam import stage_config as cam_stage_config
from segexp.stages.crf import CRFStage

__all__ = ["AffinityLabelStage"]


class AffinityLabelStage(Stage):
    """CAMs of ``cam_stage`` -> affinity label maps (uint8: class ids, 0 = background, 255 = uncertain)."""

    def __init__(
        self,
        cam_stage: Stage,
        name: str = "aff_labels",
        la_alpha: float = 4.0,
        ha_alpha: float = 24.0,
        crf: Mapping[str, Any] | None = None,
        ignore_index: int = 255,
        cache_dir: str | os.PathLike = "stage_cache",
        workers: int | None = None,
        progress: bool = True,
        version: int = 1,
    ):
        if not la_alpha < ha_alpha:
            raise ValueError(f"{name}: la_alpha ({la_alpha}) must be smaller than ha_alpha ({ha_alpha})")
        self.name = name
        self.la_alpha = float(la_alpha)
        self.ha_alpha = float(ha_alpha)
        self.crf = dict(crf or {})
        bad = {"bg_mode", "alpha", "cam_stage", "name"} & set(self.crf)
        if bad:
            raise ValueError(f"{name}: crf settings {sorted(bad)} are set by the stage itself")
        self.ignore_index = int(ignore_index)
        self.cache_dir = Path(cache_dir)
        self.workers = workers
        self.progress = progress
        self.version = int(version)
        self.bind(cam_stage)

    def bind(self, cam_stage: Stage) -> AffinityLabelStage:
        """Use the CAMs of ``cam_stage`` (the pipeline hands over its own CAM stage)."""
        self.cam_stage = cam_stage
        common = dict(bg_mode="power", cache_dir=self.cache_dir, workers=self.workers, progress=self.progress)
        self.la = CRFStage(cam_stage, name="crf", alpha=self.la_alpha, **common, **self.crf)
        self.ha = CRFStage(cam_stage, name="crf", alpha=self.ha_alpha, **common, **self.crf)
        return self

    def settings(self) -> dict[str, Any]:
        return {"la": self.la.settings(), "ha": self.ha.settings(), "ignore_index": self.ignore_index}

    def config(self) -> dict[str, Any]:
        """An instantiable config of this stage (the AffinityNet run's ``PseudoLabels`` wrapper builds it)."""
        return {
            "_target_": f"{__name__}.AffinityLabelStage",
            "cam_stage": cam_stage_config(self.cam_stage),
            "name": self.name,
            "la_alpha": self.la_alpha,
            "ha_alpha": self.ha_alpha,
            "crf": dict(self.crf),
            "ignore_index": self.ignore_index,
            "cache_dir": str(self.cache_dir),
            "workers": self.workers,
            "progress": self.progress,
            "version": self.version,
        }

    def upstream(self) -> dict[str, Stage]:
        return {"la": self.la, "ha": self.ha}

    def compute(
        self, sample, la: Mapping[str, np.ndarray], ha: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        return {"pseudo": affinity_labels(la["pseudo"], ha["pseudo"], self.ignore_index).astype(np.uint8)}

    def score(self, sample, entry, reader) -> dict[str, np.ndarray]:
        """Confusion of the confident pixels (255 left out) and the confident / total pixel counts."""
        label, gt = entry["pseudo"], np.asarray(sample["mask"])
        sure = label != self.ignore_index
        counts = np.array([sure.sum(), label.size], np.int64)
        return {"cm": confusion(label[sure], gt[sure], int(reader.num_classes)), "pixels": counts}

    def summary(self, totals, reader) -> dict[str, Any]:
        return {
            "confident_fraction": float(totals["pixels"][0] / max(totals["pixels"][1], 1)),
            "pseudo": iou_report(totals["cm"], getattr(reader, "class_names", None)),
        }
