"""Dense CRF refinement of CAMs (pydensecrf2), settings of SEAM/psa as config (``conf/stage/crf.yaml``).

``crf_inference`` = ``YudeWang/SEAM : tool/imutils.py:220-237``: unary ``-log`` of the *un-normalised*
stacked scores (``unary_from_softmax``), Gaussian kernel (sxy 3, compat 3), bilateral kernel
(sxy 80, srgb 13, compat 10), 10 mean-field iterations. The background score is
``(1 - max_c cam_c) ** alpha`` (SEAM: alpha 4 / 24 for the AffinityNet labels; psa 4 / 32) or, with
``bg_mode: constant``, the constant ``bg_threshold`` of the CAM protocol.

``CRFStage`` reads the CAM stage's cache (computing missing CAMs first), refines in parallel
processes and caches the label maps; its interface is that of every pseudo-label stage.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segexp.data.cache import StageCache
from segexp.postprocess.cam_export import CAMStage
from segexp.postprocess.stage import CachedStage, confusion, image_inputs_key, iou_report

log = logging.getLogger(__name__)

__all__ = ["CRFKernels", "crf_inference", "cam_crf_scores", "CRFStage"]


@dataclass(frozen=True)
class CRFKernels:
    """Dense-CRF kernels and iterations of psa / SEAM ``imutils.crf_inference`` (common.md): the one
    place their defaults live (``conf/stage/crf.yaml`` repeats them as config)."""

    iterations: int = 10
    gauss_sxy: float = 3
    gauss_compat: float = 3
    bi_sxy: float = 80
    bi_srgb: float = 13
    bi_compat: float = 10


def crf_inference(
    image: np.ndarray, probs: np.ndarray, scale_factor: float = 1.0, **kernels: Any
) -> np.ndarray:
    """Mean-field dense CRF. ``image`` uint8 HxWx3, ``probs`` (C, H, W) scores; returns Q (C, H, W).
    ``kernels``: fields of :class:`CRFKernels` (an unknown name is a TypeError naming it)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    k = CRFKernels(**kernels)
    d.addPairwiseGaussian(sxy=k.gauss_sxy / scale_factor, compat=k.gauss_compat)
    d.addPairwiseBilateral(
        sxy=k.bi_sxy / scale_factor, srgb=k.bi_srgb, rgbim=np.ascontiguousarray(image), compat=k.bi_compat
    )
    return np.asarray(d.inference(int(k.iterations)), dtype=np.float32).reshape(c, h, w)


def cam_crf_scores(
    cams: np.ndarray, bg_mode: str = "power", alpha: float = 4.0, bg_threshold: float = 0.26
) -> np.ndarray:
    """Stacked [background, cams] scores (K+1, H, W) for the CRF (see the module docstring)."""
    if bg_mode == "power":
        bg = np.power(1.0 - cams.max(0, keepdims=True), alpha) if len(cams) else np.ones((1, *cams.shape[1:]))
    elif bg_mode == "constant":
        bg = np.full((1, *cams.shape[1:]), bg_threshold, np.float32)
    else:
        raise ValueError(f"bg_mode must be 'power' or 'constant', got {bg_mode!r}")
    return np.concatenate([bg.astype(np.float32), cams.astype(np.float32)], 0)


_WORKER: dict[str, Any] = {}


def _init(stage: CRFStage, reader: Any, cache: StageCache, cam_cache: StageCache) -> None:
    _WORKER.update(stage=stage, reader=reader, cache=cache, cam_cache=cam_cache)


def _process(job: tuple[int, str, bool, bool]) -> dict[str, Any]:
    index, key, compute, evaluate = job
    stage, reader, cache = _WORKER["stage"], _WORKER["reader"], _WORKER["cache"]
    image_id = reader.ids[index]
    out: dict[str, Any] = {"computed": False}
    label = None
    sample = None
    if not compute:
        entry = cache.get(image_id, key)
        label = None if entry is None else entry["pseudo"]
    if label is None:
        sample = reader[index]
        cam_entry = _WORKER["cam_cache"].get(image_id, key)
        if cam_entry is None:
            raise RuntimeError(f"CAM of {image_id!r} missing from {_WORKER['cam_cache'].dir}")
        label = stage.refine(sample["image"], cam_entry)
        cache.put(image_id, key, {"pseudo": label})
        out["computed"] = True
    if evaluate:
        sample = sample if sample is not None else reader[index]
        if "mask" in sample:
            out["cm"] = confusion(label, np.asarray(sample["mask"]), int(reader.num_classes))
    return out


class CRFStage(CachedStage):
    """CAMs of ``cam_stage`` -> dense-CRF label maps (uint8, 0 = background), cached and scored."""

    def __init__(
        self,
        cam_stage: CAMStage,
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
        """``kernels``: the :class:`CRFKernels` fields (iterations, gauss_sxy, ...), defaults there."""
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

    def refine(self, image: np.ndarray, cam_entry: Mapping[str, np.ndarray]) -> np.ndarray:
        cams = cam_entry["cams"].astype(np.float32)
        classes = np.asarray(cam_entry["classes"], np.int64)
        scores = cam_crf_scores(cams, self.bg_mode, self.alpha, self.bg_threshold)
        q = crf_inference(np.asarray(image, np.uint8), scores, **self.crf)
        lut = np.concatenate([[0], classes]).astype(np.uint8)
        return lut[q.argmax(0)]

    def run(
        self,
        reader: Any,
        evaluate: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
    ) -> dict[str, Any]:
        from segexp.data.cache import shard

        cam_report = None
        if self.cam_stage.missing(reader, rank=rank, world_size=world_size):
            cam_report = self.cam_stage.run(reader, evaluate=False, rank=rank, world_size=world_size)
        reader = CAMStage.stage_reader(reader)
        cache, cam_cache = self.cache_for(reader), self.cam_stage.cache_for(reader)
        keys = self.keys(reader)
        todo = set(cache.missing(keys, keys, rank=rank, world_size=world_size))
        mine = set(shard(list(keys), rank, world_size)) if evaluate else todo
        index = {i: n for n, i in enumerate(reader.ids)}
        jobs = [(index[i], keys[i], i in todo, evaluate) for i in sorted(mine)]
        # nothing to compute (only cached maps to score): no pool, whose start-up would be all its cost
        n_workers = max(1, min(workers or self.workers or 1, len(todo)))
        t0 = time.perf_counter()
        if n_workers == 1:
            _init(self, reader, cache, cam_cache)
            results = [_process(j) for j in jobs]
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(n_workers, initializer=_init, initargs=(self, reader, cache, cam_cache)) as pool:
                results = list(
                    pool.imap_unordered(_process, jobs, chunksize=max(1, len(jobs) // (8 * n_workers)))
                )
        seconds = time.perf_counter() - t0
        computed = sum(r["computed"] for r in results)
        report: dict[str, Any] = {
            "stage": self.name,
            "split": getattr(reader, "split", None),
            "images": len(keys),
            "computed": computed,
            "reused": len(keys) - len(todo),
            "seconds": round(seconds, 3),
            "images_per_s": round(computed / seconds, 3) if computed and seconds > 0 else None,
            "processes": n_workers,
            "cache_dir": str(cache.dir),
        }
        if cam_report is not None:
            report["cam_export"] = {k: cam_report[k] for k in ("computed", "seconds", "images_per_s")}
        cms = [r["cm"] for r in results if "cm" in r]
        if cms:
            report["scored_images"] = len(cms)
            report["pseudo"] = iou_report(sum(cms), getattr(reader, "class_names", None))
            log.info(
                "%s: pseudo-label mIoU %.4f over %d images", self.name, report["pseudo"]["mIoU"], len(cms)
            )
        return report

    def get(self, reader: Any, index: int, key: str | None = None) -> np.ndarray | None:
        entry = self.cache_for(reader).get(reader.ids[index], key or image_inputs_key(reader, index))
        return None if entry is None else entry["pseudo"]

    def __getstate__(self) -> dict[str, Any]:  # the CAM network is not sent to CRF workers
        state = copy.copy(self.__dict__)
        cam = copy.copy(self.cam_stage)
        cam._method = None
        state["cam_stage"] = cam
        return state
