"""Entity training sets made of several datasets, and stuff regions as entities.

The bottom-up paper trains on COCO panoptic + ADE20K (+ CIHP) + generated shapes at once, with
"every annotated segment is an entity". Two small readers give that without touching the
DataModule (it still sees one reader partial called with ``split`` and ``keys``):

* :class:`MixedReader`: the concatenation of several readers. Each source maps the DataModule's
  split name (train/val/test) to its own split, or to ``null`` to sit that split out. Sample ids
  are prefixed with the source name so dumps of different sources never collide. A source's
  ``expected_sizes`` (its split -> the official count) refuses a partial copy, as
  ``data.expected_sizes`` does for a single data set, and a listed image (or annotation) that the disk
  lacks stops the run when the split opens, as for a single data set.
* :class:`StuffEntities`: a reader wrapper for datasets whose ``instances`` cover things only
  (ADEChallengeData2016's instance PNGs): every labelled pixel outside an instance becomes part
  of one entity per semantic class ("wall", "sky", ...), as in a panoptic map. It needs the
  semantic ``mask`` and asks the wrapped reader to load it; the output keeps the requested keys.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from segexp.data.datamodule import check_listed_images, check_split_size
from segexp.data.readers.base import Reader

__all__ = ["MixedReader", "StuffEntities"]


class MixedReader(Reader):
    provides: ClassVar[frozenset[str]] = frozenset({"image", "instances"})
    name = "mixed"

    def __init__(
        self, sources: Mapping[str, Mapping[str, Any]], split: str, keys=None, name: str | None = None
    ):
        super().__init__(keys)
        if name is not None:
            self.name = name
        if not sources:
            raise ValueError(f"data '{self.name}': reader.sources is empty")
        self.readers: list[tuple[str, Reader]] = []
        for source, spec in sources.items():
            for field in ("reader", "splits"):
                if field not in spec:
                    raise KeyError(f"data '{self.name}': reader.sources.{source} needs '{field}'")
            if split not in spec["splits"]:
                raise KeyError(
                    f"data '{self.name}': reader.sources.{source}.splits has no entry for "
                    f"split '{split}' (give the source's split name, or null to skip it)"
                )
            own = spec["splits"][split]
            if own is None:
                continue
            reader = spec["reader"](split=own, keys=sorted(self.keys))
            expected = (spec.get("expected_sizes") or {}).get(own)
            check_split_size(reader, own, expected, f"data.reader.sources.{source}.expected_sizes")
            check_listed_images(reader, own)
            for wrap in spec.get("wrappers") or ():
                reader = wrap(reader)
            self.readers.append((source, reader))
        self.offsets = np.cumsum([0] + [len(r) for _, r in self.readers]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def load(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        k = bisect.bisect_right(self.offsets, index) - 1
        source, reader = self.readers[k]
        sample = dict(reader[index - self.offsets[k]])
        meta = dict(sample.get("meta") or {})
        meta["id"] = f"{source}/{meta.get('id', index - self.offsets[k])}"
        meta["source"] = source
        sample["meta"] = meta
        return sample


class StuffEntities:
    """Reader wrapper: ``instances`` += one entity per semantic class on labelled non-instance pixels."""

    adds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, reader: Reader, ignore_index: int | None = None):
        if "mask" not in reader.provides or "instances" not in reader.provides:
            raise ValueError(
                f"StuffEntities needs a reader with 'mask' and 'instances'; "
                f"{reader.name} provides {sorted(reader.provides)}"
            )
        self.reader = reader
        self.requested = frozenset(reader.keys)
        reader.keys = reader.keys | {"mask", "instances"}
        self.ignore_index = reader.ignore_index if ignore_index is None else ignore_index
        self.name = reader.name

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.reader[index]
        inst = sample["instances"].astype(np.int32)
        mask = sample["mask"]
        stuff = (inst == 0) & (mask != self.ignore_index)
        offset = int(inst.max()) + 1
        inst = np.where(stuff, offset + mask.astype(np.int32), inst)
        _, dense = np.unique(inst, return_inverse=True)  # ids stay 0 (if present) .. K, contiguous
        sample["instances"] = (dense.reshape(inst.shape) + (0 if (inst == 0).any() else 1)).astype(np.int32)
        return {k: v for k, v in sample.items() if k in self.requested or k == "meta"}
