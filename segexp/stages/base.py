"""The one template every cached per-image stage runs on (GrabCut, CAM export, CRF, random walk, ...).

A stage turns each image of a split into a cached product (a mask, CAMs, a saliency map, a feature)
and, where the dataset has GT masks, scores it. Everything around the per-image work is done here,
once: which items are missing or stale (:mod:`segexp.stages.cache`), the rank's share under DDP,
upstream stages filled first, a worker pool (or the calling process, for stages that run a
network), progress, scoring and the report. A stage implements only:

* ``settings()``: what changes its product (hashed into its cache directory);
* ``compute(sample, **upstream_entries) -> dict of arrays``: one image's cache entry;
* optionally ``upstream()`` (the stages whose entries ``compute`` reads, by argument name),
  ``score(sample, entry)`` / ``summary(totals)`` (per-image sums -> report fields), ``value(entry)``
  (what :meth:`Stage.get` returns), ``reads`` / ``requires`` (reader keys), ``in_process``.

Stages never train and never import the pipeline: a stage that needs a trained network is given
its checkpoint.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from segexp.stages.cache import StageCache, shard
from segexp.utils.hashing import file_key
from segexp.utils.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["Stage", "LabelStage", "reader_root", "image_inputs_key", "confusion", "iou_report", "all_cores"]


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


def all_cores(world_size: int = 1) -> int:
    """All cores this process may use, shared among the ranks of one node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, world_size))


# -- the per-image job, in this process or in a worker ------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(stage: Stage, reader: Any, cache: StageCache, upstream: dict[str, StageCache]) -> None:
    stage.worker_init()
    _WORKER.update(stage=stage, reader=reader, cache=cache, upstream=upstream)


def _process(job: tuple[int, str, bool, bool]) -> dict[str, Any]:
    """Read (or compute and store) one item's entry; with ``evaluate`` score it against its GT."""
    index, key, compute, evaluate = job
    stage, reader, cache = _WORKER["stage"], _WORKER["reader"], _WORKER["cache"]
    image_id = reader.ids[index]
    out: dict[str, Any] = {"computed": False}
    entry = None if compute else cache.get(image_id, key)
    sample = None
    if entry is None:
        sample = reader[index]
        inputs = {}
        for name, up_cache in _WORKER["upstream"].items():
            inputs[name] = up_cache.get(image_id, key)
            if inputs[name] is None:
                raise RuntimeError(f"{stage.name}: {name} of {image_id!r} is missing from {up_cache.dir}")
        entry = stage.compute(sample, **inputs)
        cache.put(image_id, key, entry, compress=stage.compress)
        out["computed"] = True
    if evaluate:
        sample = sample if sample is not None else reader[index]
        if "mask" in sample:
            scores = stage.score(sample, entry, reader)
            if scores:
                out["scores"] = scores
    return out


class Stage:
    """Template of a cached per-image stage (module docstring). Subclasses set ``name``,
    ``cache_dir``, ``version``, ``workers`` and ``progress`` in their constructor."""

    name: str
    cache_dir: Path
    version: int = 1
    workers: int | None = None
    progress: bool = True
    #: reader keys ``compute`` needs (``mask`` is added when scoring)
    reads: ClassVar[frozenset[str]] = frozenset({"image"})
    #: a key the dataset must provide, else the stage cannot run on it
    requires: ClassVar[str | None] = None
    #: runs a network: computed in this process (GPU, one model), never in a worker pool
    in_process: ClassVar[bool] = False
    compress: ClassVar[bool] = True
    #: attributes never sent to workers (networks are loaded where they run)
    transient: ClassVar[tuple[str, ...]] = ("_method", "_network")

    # -- what a stage implements ------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(
        self, sample: Mapping[str, Any], **upstream: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError  # pragma: no cover - abstract

    def upstream(self) -> dict[str, Stage]:
        """Stages whose entries ``compute`` reads, by argument name (filled before this one)."""
        return {}

    def score(
        self, sample: Mapping[str, Any], entry: Mapping[str, np.ndarray], reader: Any
    ) -> dict[str, np.ndarray]:
        """Per-image arrays that add up over the split (e.g. a confusion matrix); none by default."""
        return {}

    def summary(self, totals: Mapping[str, np.ndarray], reader: Any) -> dict[str, Any]:
        """Report fields from the summed scores."""
        return {}

    def value(self, entry: Mapping[str, np.ndarray], reader: Any, index: int) -> np.ndarray:
        """What :meth:`get` returns of an entry."""
        return entry["pseudo"]

    def worker_init(self) -> None:
        """Run once in each worker process (e.g. one OpenCV thread per process)."""

    def default_workers(self, world_size: int) -> int:
        return 1

    # -- keys and cache -----------------------------------------------------------------------------
    def inputs_key(self, reader: Any, index: int) -> str:
        return image_inputs_key(reader, index)

    def stage_reader(self, reader: Any) -> Any:
        """A shallow copy of ``reader`` loading only what the stage reads (and the GT mask)."""
        out = copy.copy(reader)
        provides = getattr(reader, "provides", None)
        if provides is not None:
            if self.requires is not None and self.requires not in provides:
                raise ValueError(
                    f"{self.name} stage: {type(reader).__name__} provides no {self.requires!r} "
                    f"(it provides {sorted(provides)})"
                )
            out.keys = frozenset((self.reads | {"mask"}) & set(provides)) | {"image"}
        return out

    def cache_for(self, reader: Any) -> StageCache:
        """The cache of this stage's settings for the dataset ``reader`` reads (its root is hashed in)."""
        settings = {**self.settings(), "dataset": reader_root(reader)}
        return StageCache(self.cache_dir, self.name, settings, version=self.version)

    def keys(self, reader: Any) -> dict[str, str]:
        return {reader.ids[i]: self.inputs_key(reader, i) for i in range(len(reader))}

    def missing(self, reader: Any, rank: int = 0, world_size: int = 1) -> list[str]:
        keys = self.keys(reader)
        return self.cache_for(reader).missing(keys, keys, rank=rank, world_size=world_size)

    def load(self, reader: Any, index: int, key: str | None = None) -> dict[str, np.ndarray] | None:
        """The cached entry of item ``index`` (None when absent or stale)."""
        return self.cache_for(reader).get(reader.ids[index], key or self.inputs_key(reader, index))

    def get(self, reader: Any, index: int, key: str | None = None) -> np.ndarray | None:
        """The product of item ``index`` (None when absent or stale): what train wrappers read."""
        entry = self.load(reader, index, key)
        return None if entry is None else self.value(entry, reader, index)

    # -- a split ------------------------------------------------------------------------------------
    def run(
        self,
        reader: Any,
        evaluate: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
    ) -> dict[str, Any]:
        """Fill this rank's missing entries of ``reader``'s split (upstream stages first); with
        ``evaluate`` visit every item of the share and score it. Returns the report."""
        upstream = self.upstream()
        upstream_reports = {
            name: stage.run(reader, evaluate=False, rank=rank, world_size=world_size, workers=workers)
            for name, stage in upstream.items()
            if stage.missing(reader, rank=rank, world_size=world_size)
        }
        reader = self.stage_reader(reader)
        cache = self.cache_for(reader)
        keys = self.keys(reader)
        todo = set(cache.missing(keys, keys, rank=rank, world_size=world_size))
        mine = set(shard(list(keys), rank, world_size)) if evaluate else todo
        index = {image_id: n for n, image_id in enumerate(reader.ids)}
        jobs = [(index[i], keys[i], i in todo, evaluate) for i in sorted(mine)]
        n_workers = 1 if self.in_process else workers or self.workers or self.default_workers(world_size)
        n_workers = max(1, min(n_workers, len(todo)))  # nothing to compute: no pool to start
        up_caches = {name: stage.cache_for(reader) for name, stage in upstream.items()}
        for name, stage in upstream.items():  # an upstream entry is looked up under this stage's key
            if len(reader) and stage.inputs_key(reader, 0) != keys[reader.ids[0]]:
                raise ValueError(f"{self.name} stage: upstream {name!r} keys its items by other inputs")
        desc = f"{self.name} [{getattr(reader, 'split', '?')}]"
        log.info(
            "%s: %d images, %d to compute, cache %s, %d processes",
            desc,
            len(keys),
            len(todo),
            cache.dir,
            n_workers,
        )
        t0 = time.perf_counter()
        results = self._map(jobs, reader, cache, up_caches, n_workers, desc)
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
            "settings": cache.settings,
        }
        if upstream_reports:
            report["upstream"] = {
                name: {k: r[k] for k in ("stage", "computed", "seconds", "images_per_s")}
                for name, r in upstream_reports.items()
            }
        scored = [r["scores"] for r in results if "scores" in r]
        if scored:
            totals = {k: sum(s[k] for s in scored) for k in scored[0]}
            report["scored_images"] = len(scored)
            report.update(self.summary(totals, reader))
        return report

    def _map(self, jobs, reader, cache, up_caches, n_workers, desc) -> list[dict[str, Any]]:
        progress = Progress(f"{desc}: computing", sum(j[2] for j in jobs), enabled=self.progress)
        results = []
        try:
            if n_workers == 1:
                _init_worker(self, reader, cache, up_caches)
                for job in jobs:
                    results.append(_process(job))
                    progress.advance(int(results[-1]["computed"]))
                return results
            ctx = multiprocessing.get_context("spawn")  # no fork after torch/OpenMP threads started
            # ~32 chunks per worker: the last chunk leaves the other workers idle, so with 8 per worker
            # (as before) a 120-image GrabCut run idled one core for ~6 % of it; IPC per chunk is small.
            chunk = max(1, min(16, len(jobs) // (32 * n_workers)))
            with ctx.Pool(
                n_workers, initializer=_init_worker, initargs=(self, reader, cache, up_caches)
            ) as pool:
                for result in pool.imap_unordered(_process, jobs, chunksize=chunk):
                    results.append(result)
                    progress.advance(int(result["computed"]))
            return results
        finally:
            _WORKER.clear()
            progress.close()

    def __getstate__(self) -> dict[str, Any]:
        return {k: (None if k in self.transient else v) for k, v in self.__dict__.items()}


class LabelStage(Stage):
    """A stage whose product is a label map ``pseudo`` (uint8, 0 = background), scored as mIoU."""

    def score(self, sample, entry, reader) -> dict[str, np.ndarray]:
        return {"cm": confusion(entry["pseudo"], np.asarray(sample["mask"]), int(reader.num_classes))}

    def summary(self, totals, reader) -> dict[str, Any]:
        report = iou_report(totals["cm"], getattr(reader, "class_names", None))
        log.info("%s: pseudo-label mIoU %.4f", self.name, report["mIoU"])
        return {"pseudo": report}
