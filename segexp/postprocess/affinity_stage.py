"""Affinity labels for AffinityNet (``conf/stage/aff_labels.yaml``): two dense-CRF maps of the CAMs,
combined per image by :func:`segexp.postprocess.affinity.affinity_labels`.

* low-alpha map: background score ``(1 - max CAM)^la_alpha`` (4) - a *large* background score, so
  what it still calls foreground is confident foreground;
* high-alpha map: ``(1 - max CAM)^ha_alpha`` (SEAM 24, psa 32) - a *small* background score, so
  what it still calls background is confident background;
* label = low-alpha class, 0 where the high-alpha map says background, 255 (uncertain) where the
  low-alpha map says background but the high-alpha one does not.

Both CRF maps are :class:`~segexp.postprocess.crf.CRFStage` caches (stage name ``crf``: the low-alpha
one is the plain ``crf`` stage at alpha 4, so a pipeline that already ran it reuses it). The combined
maps are cached per image, and :meth:`run` reports the share of confident pixels and the mIoU of
the confident pixels against GT (how clean the supervision of AffinityNet is).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segexp.postprocess.affinity import affinity_labels
from segexp.postprocess.cam_export import CAMStage
from segexp.postprocess.crf import CRFStage
from segexp.postprocess.stage import CachedStage, confusion, image_inputs_key, iou_report

__all__ = ["AffinityLabelStage", "cam_stage_config"]


def cam_stage_config(cam: CAMStage) -> dict[str, Any]:
    """An instantiable config of ``cam`` (for a stage rebuilt elsewhere, e.g. a training run's wrapper)."""
    return {
        "_target_": "segexp.postprocess.cam_export.CAMStage",
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


class AffinityLabelStage(CachedStage):
    """CAMs of ``cam_stage`` -> affinity label maps (uint8: class ids, 0 = background, 255 = uncertain)."""

    def __init__(
        self,
        cam_stage: CAMStage,
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

    def bind(self, cam_stage: CAMStage) -> AffinityLabelStage:
        """Use the CAMs of ``cam_stage`` (the rw stage hands over the pipeline's CAM stage)."""
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

    def combine(self, reader: Any, index: int, key: str) -> np.ndarray:
        la, ha = self.la.get(reader, index, key), self.ha.get(reader, index, key)
        if la is None or ha is None:
            raise RuntimeError(
                f"{self.name}: CRF map of {reader.ids[index]!r} missing after the CRF stages ran"
            )
        return affinity_labels(la, ha, self.ignore_index).astype(np.uint8)

    def run(
        self,
        reader: Any,
        evaluate: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
    ) -> dict[str, Any]:
        """Fill the low/high-alpha CRF caches, then the combined labels of this rank's share; with
        ``evaluate`` score the confident pixels of every image of the share that has a GT mask."""
        from segexp.data.cache import shard

        crf_reports = {
            part: stage.run(reader, evaluate=False, rank=rank, world_size=world_size, workers=workers)
            for part, stage in (("la", self.la), ("ha", self.ha))
        }
        reader = CAMStage.stage_reader(reader)
        cache = self.cache_for(reader)
        keys = self.keys(reader)
        todo = cache.missing(keys, keys, rank=rank, world_size=world_size)
        index = {image_id: n for n, image_id in enumerate(reader.ids)}
        t0 = time.perf_counter()
        for image_id in todo:
            cache.put(
                image_id, keys[image_id], {"pseudo": self.combine(reader, index[image_id], keys[image_id])}
            )
        report: dict[str, Any] = {
            "stage": self.name,
            "split": getattr(reader, "split", None),
            "images": len(keys),
            "computed": len(todo),
            "reused": len(keys) - len(todo),
            "seconds": round(time.perf_counter() - t0 + sum(r["seconds"] for r in crf_reports.values()), 3),
            "images_per_s": None,
            "processes": max(r["processes"] for r in crf_reports.values()),
            "cache_dir": str(cache.dir),
            "crf": {
                p: {k: r[k] for k in ("computed", "seconds", "cache_dir")} for p, r in crf_reports.items()
            },
        }
        if evaluate:
            report.update(self.score(reader, cache, keys, shard(list(keys), rank, world_size), index))
        return report

    def score(self, reader, cache, keys, ids, index) -> dict[str, Any]:
        """Confident-pixel share and the mIoU of the confident pixels (255 left out) against GT."""
        n = int(reader.num_classes)
        cm = np.zeros((n, n), np.int64)
        confident = total = scored = 0
        for image_id in ids:
            sample = reader[index[image_id]]
            if "mask" not in sample:
                continue
            label = cache.get(image_id, keys[image_id])["pseudo"]
            gt = np.asarray(sample["mask"])
            sure = label != self.ignore_index
            cm += confusion(label[sure], gt[sure], n)
            confident += int(sure.sum())
            total += label.size
            scored += 1
        if not scored:
            return {}
        return {
            "scored_images": scored,
            "confident_fraction": confident / max(total, 1),
            "pseudo": iou_report(cm, getattr(reader, "class_names", None)),
        }

    def get(self, reader: Any, index: int, key: str | None = None) -> np.ndarray | None:
        entry = self.cache_for(reader).get(reader.ids[index], key or image_inputs_key(reader, index))
        return None if entry is None else entry["pseudo"]
