"""Reader wrapper that adds ``pseudo`` (a mask made by an earlier stage) to every sample.

Configured as a ``train_wrappers`` entry of the data config (see ``conf/experiment/box2seg_*.yaml``)::

    data:
      train_wrappers:
        - _target_: segexp.data.pseudo_labels.PseudoLabels
          _partial_: true
          stage: ${stage}          # e.g. conf/stage/grabcut.yaml

On construction (the DataModule's ``setup``) it makes sure the stage's cache holds an up-to-date
mask for every image of the split: missing or stale ones are computed now (the first training
run does the GrabCut pre-processing by itself; later runs reuse it), the rest is not touched.
Under DDP every rank computes its own disjoint share, waits for the others, then checks that
nothing is missing. ``__getitem__`` only reads the cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """``dist.barrier()`` under DDP, nothing in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class ReaderWrapper(Dataset):
    """Base of the train wrappers: a ``reader`` (``self.reader``) seen through, so that length, ids
    and the reader's attributes (class_names, split, image_path, ...) stay those of the wrapped reader."""

    reader: Any

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def ids(self) -> list[str]:
        return self.reader.ids

    def __getattr__(self, name: str) -> Any:  # class_names, split, ... of the wrapped reader
        if name == "reader":
            raise AttributeError(name)
        return getattr(self.reader, name)


class PseudoLabels(ReaderWrapper):
    """``reader`` with a ``pseudo`` key read from ``stage``'s cache (computed here when missing)."""

    adds: ClassVar[tuple[str, ...]] = ("pseudo",)

    def __init__(self, reader: Any, stage: Any, key: str = "pseudo", compute_missing: bool = True,
                 wait_timeout_s: float = 3600.0):
        self.reader = reader
        self.stage = stage
        self.key = key
        self.cache = stage.cache_for(reader)
        rank, world = _dist_info()
        if compute_missing:
            todo = stage.missing(reader, rank=rank, world_size=world)
            if todo:
                log.info("%s: computing %d missing %s masks (rank %d/%d)", type(self).__name__, len(todo),
                         stage.name, rank, world)
                report = stage.run(reader, evaluate=False, rank=rank, world_size=world)
                log.info("%s stage: %s", stage.name, {k: report[k] for k in ("computed", "seconds")})
            barrier()
        missing = stage.missing(reader)
        deadline = time.monotonic() + wait_timeout_s
        while missing and not compute_missing and time.monotonic() < deadline:
            time.sleep(5.0)  # another process is filling the cache
            missing = stage.missing(reader)
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(reader)} {stage.name} masks are missing from {self.cache.dir} "
                f"(first: {missing[:3]}); run `python -m segexp.pseudo` for this data and stage"
            )

    #: dtype of the cached map in the sample (class indices here; float maps in subclasses)
    dtype: ClassVar[type] = np.uint8

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.reader[index]
        image_id = self.reader.ids[index]
        value = self.stage.get(self.reader, index)
        if value is None:
            raise RuntimeError(
                f"{self.stage.name} {self.key} of {image_id!r} is missing or stale in {self.cache.dir}"
            )
        if value.shape != sample["image"].shape[:2]:
            raise RuntimeError(
                f"{self.stage.name} {self.key} of {image_id!r} has shape {value.shape}, "
                f"image {sample['image'].shape[:2]}"
            )
        sample[self.key] = np.asarray(value, dtype=self.dtype)
        return sample
