"""CAM export (stage 2 of the image-level pipeline): multi-scale x flip CAMs of a trained CAM network,
cached per image, scored with the background-threshold curve.

``CAMStage`` has the stage interface of :mod:`segexp.pseudo` (``name``, ``run``, ``cache_for``,
``missing``, ``get``), so it is a pseudo-label stage by itself (``argmax([bg_threshold, CAMs])``) and
the input of the CRF / random-walk stages. Each entry stores the normalised foreground CAMs of the
classes in the image label (``cams`` float16, (K_present, H, W) at the original size) and their
class indices (``classes``, 1-based) - SEAM's ``{class: map}`` dict as arrays.

The cache key holds the checkpoint file (path, size, mtime), the method config, scales and flip,
so a retrained network or another setting never reads stale CAMs.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segexp.data.cache import file_key, stable_hash
from segexp.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segexp.methods.loading import load_method
from segexp.postprocess.stage import CachedStage, image_inputs_key, iou_report, reader_root
from segexp.utils.device import resolve_device

log = logging.getLogger(__name__)

__all__ = ["CAMStage", "image_tensor", "reader_root", "image_inputs_key", "iou_report"]


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> normalised float (1, 3, H, W) (ImageNet mean/std, as the DataModule does)."""
    # a copy: readers may hand out read-only arrays (decoded from a cache), which torch warns about
    x = torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std)[None]


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


class CAMStage(CachedStage):
    """Multi-scale x flip CAMs of ``method`` (config) with weights ``ckpt_path``, cached per image.

    Args:
        method: the (resolved) config of the CAM method of stage 1 (``${method}``).
        ckpt_path: its checkpoint.
        scales, flip: inference passes (None = the method's ``inference`` settings).
        bg_threshold: background score of the pseudo labels ``get`` returns (None = the method's).
        thresholds: background thresholds of the mIoU curve in the report.
        device: ``auto`` = cuda when available.
    """

    def __init__(
        self,
        method: Mapping[str, Any],
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
        self.method_cfg = dict(method)
        self.ckpt_path = None if ckpt_path is None else str(ckpt_path)
        self.name = name
        inference = dict(self.method_cfg.get("inference") or {})
        self.scales = tuple(
            float(s)
            for s in (scales if scales is not None else inference.get("scales", (0.5, 1.0, 1.5, 2.0)))
        )
        self.flip = bool(inference.get("flip", True) if flip is None else flip)
        self.bg_threshold = float(
            self.method_cfg.get("bg_threshold", 0.2) if bg_threshold is None else bg_threshold
        )
        self.thresholds = (
            tuple(thresholds) if thresholds is not None else tuple(round(0.01 * i, 2) for i in range(100))
        )
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self.progress = progress
        self.version = int(version)
        self._method = None

    # -- settings / cache ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        if not self.ckpt_path or not Path(self.ckpt_path).is_file():
            raise FileNotFoundError(
                f"{self.name} stage: checkpoint {self.ckpt_path!r} not found (ckpt_path=...)"
            )
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

    @staticmethod
    def stage_reader(reader: Any) -> Any:
        out = copy.copy(reader)
        provides = getattr(reader, "provides", None)
        if provides is not None:
            if "labels" not in provides:
                raise ValueError(f"{type(reader).__name__} provides no image-level labels")
            out.keys = frozenset({"image", "labels", "mask"} & set(provides)) | {"image"}
        return out

    # -- one image -----------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
        method = self.method
        x = image_tensor(sample["image"]).to(self.device)
        labels = torch.as_tensor(np.asarray(sample["labels"], np.float32))[None].to(self.device)
        cams = method.multiscale_cams(x, labels, scales=self.scales, flip=self.flip)[0].float().cpu().numpy()
        classes = np.flatnonzero(np.asarray(sample["labels"]) > 0) + 1
        return {"cams": cams[classes - 1].astype(np.float16), "classes": classes.astype(np.int64)}

    # -- a split -------------------------------------------------------------------------------
    def run(
        self,
        reader: Any,
        evaluate: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
    ) -> dict[str, Any]:
        """Export the missing CAMs of this rank's share (in-process, on ``device``); with ``evaluate``
        score every cached CAM against the GT masks over the background-threshold curve."""
        from segexp.data.cache import shard
        from segexp.metrics.cam import CAMThresholdCurve

        reader = self.stage_reader(reader)
        cache = self.cache_for(reader)
        report = {**self.fill_in_process(reader, cache, rank, world_size), "settings": cache.settings}
        keys = self.keys(reader)
        index = {image_id: i for i, image_id in enumerate(reader.ids)}
        if evaluate:
            num_classes = int(getattr(reader, "num_classes", 0))
            curve = CAMThresholdCurve(num_classes=num_classes, thresholds=self.thresholds)
            scored = 0
            for image_id in shard(list(keys), rank, world_size):
                sample = reader[index[image_id]]
                if "mask" not in sample:
                    continue
                entry = cache.get(image_id, keys[image_id])
                cams = torch.from_numpy(dense_cams(entry, num_classes - 1))[None]
                curve.update(cams, torch.from_numpy(np.asarray(sample["mask"]).astype(np.int64))[None])
                scored += 1
            if scored:
                res = curve.compute()
                at = (
                    curve.at(self.bg_threshold)
                    if any(abs(t - self.bg_threshold) < 1e-9 for t in self.thresholds)
                    else None
                )
                report["scored_images"] = scored
                report["curve"] = {
                    f"{t:.2f}": float(m) for t, m in zip(res["thresholds"].tolist(), res["miou"].tolist())
                }
                report["fscore_curve"] = {
                    f"{t:.2f}": float(f) for t, f in zip(res["thresholds"].tolist(), res["fscore"].tolist())
                }
                report["best_threshold"] = res["best_threshold"]
                report["best_mIoU"] = res["best_mIoU"]
                report["fscore_at_best_threshold"] = res["best_fscore"]
                if at is not None:
                    report["mIoU_at_threshold"] = float(at["mIoU"])
                    report["fscore_at_threshold"] = at["fscore"]
                log.info(
                    "%s: CAM mIoU best %.4f (F-score %.4f) at t=%.2f (t chosen on this split)",
                    self.name,
                    res["best_mIoU"],
                    res["best_fscore"],
                    res["best_threshold"],
                )
        return report

    def load(self, reader: Any, index: int) -> dict[str, np.ndarray] | None:
        """The cached entry (``cams``, ``classes``) of item ``index``, or None if absent/stale."""
        return self.cache_for(reader).get(reader.ids[index], image_inputs_key(reader, index))

    def get(self, reader: Any, index: int, key: str | None = None) -> np.ndarray | None:
        """Pseudo label ``argmax([bg_threshold, CAMs])`` of item ``index`` (None when not cached)."""
        entry = self.load(reader, index)
        if entry is None:
            return None
        return cams_to_label(dense_cams(entry, int(reader.num_classes) - 1), self.bg_threshold)

    def __repr__(self) -> str:
        return (
            f"CAMStage(name={self.name!r}, ckpt={self.ckpt_path!r}, scales={self.scales}, flip={self.flip})"
        )


def describe(stage: CAMStage) -> str:  # pragma: no cover - convenience
    return stable_hash(stage.settings(), 8)
