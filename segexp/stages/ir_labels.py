"""Inter-pixel relation labels of IRN (``conf/stage/ir_labels.yaml``; ``jiwoon-ahn/irn :
step/cam_to_ir_label.py``, the same in ``gaviotas/AMN``, ``amn_cam_to_ir_label.py``).

Per image, from the CAMs of the image's classes (max-normalised, full size):

1. ``fg = argmax([conf_fg, CAMs])`` and ``bg = argmax([conf_bg, CAMs])`` (ties to the background), each
   refined by a dense CRF whose unary is the hard label map (:func:`crf_label`: ``gt_prob`` 0.7 on the
   label, the rest shared by the other labels; Gaussian sxy 3 / compat 3, bilateral sxy 50 / srgb 5 /
   compat 10, 10 iterations: ``misc/imutils.py : crf_inference_label``);
2. label = the CRF'd ``fg`` class, 255 (uncertain) where it says background, 0 where *both* say
   background (:func:`combine_ir_labels`). AffinityNet's rule (:func:`segexp.losses.affinity.affinity_labels`)
   sets 0 wherever the second map says background: it differs where the CRF of the low threshold
   keeps a class that the CRF of the high one drops.

IRN's thresholds are 0.30 / 0.05 (``run_sample.py``); AMN's second round uses 0.45 / 0.15. The report gives
the share of confident pixels and their mIoU against GT (as the AffinityNet labels).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segexp.inference.crf import crf_inference
from segexp.stages.affinity_labels import AffinityLabelStage
from segexp.stages.base import Stage
from segexp.stages.cam import cams_to_label
from segexp.stages.cam import stage_config as cam_stage_config
from segexp.stages.crf import class_lut

__all__ = ["IRLabelStage", "crf_label", "combine_ir_labels", "IR_CRF"]

#: ``misc/imutils.py : crf_inference_label``'s kernels (psa's bilateral kernel is sxy 80 / srgb 13)
IR_CRF = {"iterations": 10, "gauss_sxy": 3, "gauss_compat": 3, "bi_sxy": 50, "bi_srgb": 5, "bi_compat": 10}


def crf_label(
    image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7, **kernels: Any
) -> np.ndarray:
    """Dense-CRF argmax of a hard label map (H, W) with values < ``n_labels``: the unary puts ``gt_prob``
    on the given label and ``(1 - gt_prob) / (n_labels - 1)`` on each other one (pydensecrf's
    ``unary_from_labels`` with ``zero_unsure=False``); ``kernels`` as in
    :func:`segexp.inference.crf.crf_inference`."""
    if n_labels < 2:
        return np.zeros(labels.shape, np.int64)
    probs = np.full((n_labels, *labels.shape), (1.0 - gt_prob) / (n_labels - 1), np.float32)
    np.put_along_axis(probs, labels[None].astype(np.int64), np.float32(gt_prob), axis=0)
    return crf_inference(image, probs, **kernels).argmax(0)


def combine_ir_labels(fg: np.ndarray, bg: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """The ``fg`` class, ``ignore_index`` where ``fg`` is background, 0 where ``fg`` and ``bg`` both are."""
    out = fg.astype(np.uint8).copy()
    out[fg == 0] = ignore_index
    out[(fg == 0) & (bg == 0)] = 0
    return out


class IRLabelStage(Stage):
    """CAMs of ``cam_stage`` -> IR label maps (uint8: class ids, 0 = background, 255 = uncertain), cached.

    Args:
        cam_stage: the CAM stage (the pipeline passes its own).
        conf_fg, conf_bg: background scores of the confident-foreground / confident-background maps.
        gt_prob: CRF unary confidence of the hard labels.
        crf: CRF kernels (:class:`segexp.inference.crf.CRFKernels` fields) replacing those of :data:`IR_CRF`.
        ignore_index: the uncertain label.
    """

    reads = frozenset({"image"})
    # scored as AffinityNet's labels: confident-pixel mIoU and the share of confident pixels
    score = AffinityLabelStage.score
    summary = AffinityLabelStage.summary

    def __init__(
        self,
        cam_stage: Stage,
        name: str = "ir_labels",
        conf_fg: float = 0.30,
        conf_bg: float = 0.05,
        gt_prob: float = 0.7,
        crf: Mapping[str, Any] | None = None,
        ignore_index: int = 255,
        cache_dir: str | os.PathLike = "stage_cache",
        workers: int | None = None,
        progress: bool = True,
        version: int = 1,
    ):
        if not conf_bg < conf_fg:
            raise ValueError(f"{name}: conf_bg ({conf_bg}) must be smaller than conf_fg ({conf_fg})")
        self.cam_stage = cam_stage
        self.name = name
        self.conf_fg = float(conf_fg)
        self.conf_bg = float(conf_bg)
        self.gt_prob = float(gt_prob)
        self.crf = {**IR_CRF, **dict(crf or {})}
        self.ignore_index = int(ignore_index)
        self.cache_dir = Path(cache_dir)
        self.workers = workers
        self.progress = progress
        self.version = int(version)

    def settings(self) -> dict[str, Any]:
        return {
            "cams": self.cam_stage.settings(),
            "conf_fg": self.conf_fg,
            "conf_bg": self.conf_bg,
            "gt_prob": self.gt_prob,
            "crf": self.crf,
            "ignore_index": self.ignore_index,
        }

    def upstream(self) -> dict[str, Stage]:
        return {"cams": self.cam_stage}

    def compute(self, sample: Mapping[str, Any], cams: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = cams["cams"].astype(np.float32)
        image = np.asarray(sample["image"], np.uint8)
        lut = class_lut(cams["classes"])
        fg, bg = (
            lut[crf_label(image, cams_to_label(scores, t), len(lut), self.gt_prob, **self.crf)]
            for t in (self.conf_fg, self.conf_bg)
        )
        return {"pseudo": combine_ir_labels(fg, bg, self.ignore_index)}

    def config(self) -> dict[str, Any]:
        """An instantiable config of this stage (the IRN run's ``PseudoLabels`` wrapper builds it)."""
        return {
            "_target_": f"{__name__}.IRLabelStage",
            "cam_stage": cam_stage_config(self.cam_stage),
            "name": self.name,
            "conf_fg": self.conf_fg,
            "conf_bg": self.conf_bg,
            "gt_prob": self.gt_prob,
            "crf": dict(self.crf),
            "ignore_index": self.ignore_index,
            "cache_dir": str(self.cache_dir),
            "workers": self.workers,
            "progress": self.progress,
            "version": self.version,
        }
