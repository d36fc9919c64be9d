"""CAM export (stage 2 of the image-level pipeline): multi-scale x flip CAMs of a trained CAM network,
cached per image, scored with the background-threshold curve.

``CAMStage`` is a stage (:mod:`segexp.stages.base`) and so a pseudo-label stage by itself
(``get`` = ``argmax([bg_threshold, CAMs])``) and the input of the CRF / random-walk stages. Each
entry stores the normalised foreground CAMs of the
classes in the image label (``cams`` float16, (K_present, H, W) at the original size) and their
class indices (``classes``, 1-based) - SEAM's ``{class: map}`` dict as arrays.

The cache key holds the checkpoint file (path, size, mtime), the method config, scales and flip,
so a retrained network or another setting never reads stale CAMs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segexp.data.transforms import image_tensor
from segexp.metrics.cam import cam_confusion_curve, curve_scores
from segexp.stages.base import Stage
from segexp.utils.checkpoints import load_method, method_config_of
from segexp.utils.device import resolve_device
from segexp.utils.errors import UserError
from segexp.utils.hashing import file_key

log = logging.getLogger(__name__)

__all__ = ["CAMStage", "dense_cams", "cams_to_label", "stage_config"]


def dense_cams(entry: Mapping[str, np.ndarray], num_fg: int) -> np.ndarray:
    """(num_fg, H, W) float32 CAMs from a cache entry (absent classes are zero)."""
    cams = entry["cams"].astype(np.float32)
    out = np.zeros((num_fg, *cams.shape[1:]), np.float32)
    for k, c in enumerate(entry["classes"].tolist()):
        out[c - 1] = cams[k]
    return out


def cams_to_label(cams: np.ndarray, threshold: float) -> np.ndarray:
    """argmax([t, cams]) (ties to background) as a uint8 class map; cams (K, H, W) dense."""
    scores = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams], 0)
    return scores.argmax(0).astype(np.uint8)



def _required(node: Mapping[str, Any], key: str, where: str = "method.inference") -> Any:
    """A CAM method's inference setting; its one home is the method's YAML (no fallback here)."""
    if node.get(key) is None:
        raise UserError(
            f"{where}.{key} is not set: the CAM export reads it from the method config "
            f"(conf/method/<name>.yaml) - set it there or pass the stage's `{key}`."
        )
    return node[key]

class CAMStage(Stage):
    """Multi-scale x flip CAMs of ``method`` (config) with weights ``ckpt_path``, cached per image.

    Args:
        method: the (resolved) config of the CAM method of stage 1 (``${method}``); None = the
            config the checkpoint records.
        ckpt_path: its checkpoint.
        scales, flip: inference passes (None = the method's ``inference`` settings).
        bg_threshold: background score of the pseudo labels ``get`` returns (None = the method's).
        thresholds: background thresholds of the mIoU curve in the report.
        device: ``auto`` = cuda when available.
    """

    reads = frozenset({"image", "labels"})
    requires = "labels"
    in_process = True  # one network, on ``device``

    def __init__(
        self,
        method: Mapping[str, Any] | None,
        ckpt_path: str | os.PathLike | None,
        name: str = "cam",
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
        bg_threshold: float | None = None,
        thresholds: Sequence[float] | None = None,
        cache_dir: str | os.PathLike = "stage_cache",
        device: str = "auto",
        progress: bool = True,
        workers: int | None = None,
        version: int = 1,
    ):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(method, DictConfig):
            method = OmegaConf.to_container(method, resolve=True)
        self.ckpt_path = None if ckpt_path is None else str(ckpt_path)
        self.method_cfg = dict(method) if method is not None else self._recorded_method()
        self.name = name
        inference = dict(self.method_cfg.get("inference") or {})
        scales = _required(inference, "scales") if scales is None else scales
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(_required(inference, "flip") if flip is None else flip)
        self.bg_threshold = float(
            _required(self.method_cfg, "bg_threshold", "method") if bg_threshold is None else bg_threshold
        )
        self.thresholds = (
            tuple(thresholds) if thresholds is not None else tuple(round(0.01 * i, 2) for i in range(100))
        )
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self.progress = progress
        self.workers = workers
        self.version = int(version)
        self._method = None

    def _recorded_method(self) -> dict[str, Any]:
        self._check_ckpt()
        return method_config_of(self.ckpt_path)

    def _check_ckpt(self) -> None:
        if not self.ckpt_path or not Path(self.ckpt_path).is_file():
            raise FileNotFoundError(
                f"{getattr(self, 'name', 'cam')} stage: checkpoint {self.ckpt_path!r} not found "
                "(ckpt_path=...)"
            )

    def settings(self) -> dict[str, Any]:
        self._check_ckpt()
        method = {k: v for k, v in self.method_cfg.items() if k not in ("panels", "schedule", "bg_threshold")}
        return {
            "ckpt": file_key(self.ckpt_path),
            "method": method,
            "scales": list(self.scales),
            "flip": self.flip,
        }

    @property
    def method(self):
        if self._method is None:
            self._method = load_method(self.ckpt_path, self.method_cfg, self.device)
        return self._method

    @torch.no_grad()
    def compute(self, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
        x = image_tensor(sample["image"]).to(self.device)
        labels = torch.as_tensor(np.asarray(sample["labels"], np.float32))[None].to(self.device)
        cams = (
            self.method.multiscale_cams(x, labels, scales=self.scales, flip=self.flip)[0]
            .float()
            .cpu()
            .numpy()
        )
        classes = np.flatnonzero(np.asarray(sample["labels"]) > 0) + 1
        return {"cams": cams[classes - 1].astype(np.float16), "classes": classes.astype(np.int64)}

    # -- scoring: the background-threshold curve, summed over images ------------------------------
    def score(self, sample, entry, reader) -> dict[str, np.ndarray]:
        cams = torch.from_numpy(dense_cams(entry, int(reader.num_classes) - 1))[None]
        mask = torch.from_numpy(np.asarray(sample["mask"]).astype(np.int64))[None]
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64)
        return {"curve": cam_confusion_curve(cams, mask, thresholds).numpy()}

    def summary(self, totals, reader) -> dict[str, Any]:
        res = curve_scores(torch.from_numpy(totals["curve"]), self.thresholds)
        thresholds = res["thresholds"].tolist()
        report: dict[str, Any] = {
            "curve": {f"{t:.2f}": float(m) for t, m in zip(thresholds, res["miou"].tolist())},
            "fscore_curve": {f"{t:.2f}": float(f) for t, f in zip(thresholds, res["fscore"].tolist())},
            "best_threshold": res["best_threshold"],
            "best_mIoU": res["best_mIoU"],
            "fscore_at_best_threshold": res["best_fscore"],
        }
        at = [i for i, t in enumerate(self.thresholds) if abs(t - self.bg_threshold) < 1e-9]
        if at:
            report["mIoU_at_threshold"] = float(res["miou"][at[0]])
            report["fscore_at_threshold"] = float(res["fscore"][at[0]])
        log.info(
            "%s: CAM mIoU best %.4f (F-score %.4f) at t=%.2f (t chosen on this split)",
            self.name,
            res["best_mIoU"],
            res["best_fscore"],
            res["best_threshold"],
        )
        return report

    def value(self, entry, reader, index) -> np.ndarray:
        """Pseudo label ``argmax([bg_threshold, CAMs])``."""
        return cams_to_label(dense_cams(entry, int(reader.num_classes) - 1), self.bg_threshold)

    def __repr__(self) -> str:
        return (
            f"CAMStage(name={self.name!r}, ckpt={self.ckpt_path!r}, scales={self.scales}, flip={self.flip})"
        )


def stage_config(cam: CAMStage) -> dict[str, Any]:
    """An instantiable config of ``cam`` (for a stage rebuilt elsewhere, e.g. a training run's wrapper)."""
    return {
        "_target_": f"{__name__}.CAMStage",
        "_recursive_": False,
        "method": cam.method_cfg,
        "ckpt_path": cam.ckpt_path,
        "name": cam.name,
        "scales": list(cam.scales),
        "flip": cam.flip,
        "bg_threshold": cam.bg_threshold,
        "thresholds": list(cam.thresholds),
        "cache_dir": str(cam.cache_dir),
        "device": cam.device,
        "progress": cam.progress,
        "version": cam.version,
    }
