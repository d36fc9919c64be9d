"""What every cached per-image stage (GrabCut, CAM export, CRF, ...) shares.

A stage's cache directory is keyed by its settings and the dataset root; each item by the files it
is computed from. ``missing`` lists this rank's share of items whose entry is absent or stale, so
DDP ranks and parallel workers fill disjoint parts and an interrupted run redoes only the rest.
A stage sets ``name``, ``cache_dir`` and ``version`` and implements ``settings()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segexp.data.cache import StageCache, file_key
from segexp.utils.progress import Progress

log = logging.getLogger(__name__)


def reader_root(reader: Any) -> str:
    root = getattr(reader, "root", None)
    return str(Path(root).resolve()) if root is not None else type(reader).__name__


def image_inputs_key(reader: Any, index: int) -> str:
    """Key of the files an item depends on: the image and, where the reader has one, the GT mask."""
    image_id = reader.ids[index]
    files = [reader.image_path(image_id)]
    mask_path = getattr(reader, "mask_path", None)
    if mask_path is not None and Path(mask_path(image_id)).is_file():
        files.append(mask_path(image_id))
    return file_key(*files)


def confusion(pred: np.ndarray, gt: np.ndarray, n: int) -> np.ndarray:
    """n x n counts (row = GT) of one label map; GT values >= n (255 = ignore) are skipped."""
    valid = gt < n
    return np.bincount(
        gt[valid].astype(np.int64) * n + pred[valid].astype(np.int64), minlength=n * n
    ).reshape(n, n)


def iou_report(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON-friendly mIoU / pixel accuracy / per-class IoU of a stage's pseudo labels (VOC protocol:
    classes with neither GT nor prediction are left out)."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    return {
        "mIoU": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / max(cm.sum(), 1)),
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
    }


class CachedStage:
    name: str
    cache_dir: Any
    version: int = 1

    def settings(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inputs_key(self, reader: Any, index: int) -> str:
        return image_inputs_key(reader, index)

    def cache_for(self, reader: Any) -> StageCache:
        """The cache of this stage's settings for the dataset ``reader`` reads (its root is hashed in)."""
        settings = {**self.settings(), "dataset": reader_root(reader)}
        return StageCache(self.cache_dir, self.name, settings, version=self.version)

    def keys(self, reader: Any) -> dict[str, str]:
        return {reader.ids[i]: self.inputs_key(reader, i) for i in range(len(reader))}

    def fill_in_process(
        self, reader: Any, cache: StageCache, rank: int = 0, world_size: int = 1, **put: Any
    ) -> dict[str, Any]:
        """Compute this rank's missing entries one by one in this process (stages that run a network
        keep it here) with ``self.compute(sample)``; returns the report fields every stage shares."""
        keys = self.keys(reader)
        todo = cache.missing(keys, keys, rank=rank, world_size=world_size)
        index = {image_id: i for i, image_id in enumerate(reader.ids)}
        t0 = time.perf_counter()
        progress = Progress(f"{self.name}: computing", len(todo), enabled=getattr(self, "progress", False))
        for image_id in todo:
            cache.put(image_id, keys[image_id], self.compute(reader[index[image_id]]), **put)
            progress.advance()
        progress.close()
        seconds = time.perf_counter() - t0
        return {
            "stage": self.name,
            "split": getattr(reader, "split", None),
            "images": len(keys),
            "computed": len(todo),
            "reused": len(keys) - len(todo),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
            "processes": 1,
            "cache_dir": str(cache.dir),
        }

    def missing(self, reader: Any, rank: int = 0, world_size: int = 1) -> list[str]:
        keys = self.keys(reader)
        return self.cache_for(reader).missing(keys, keys, rank=rank, world_size=world_size)
