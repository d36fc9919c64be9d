"""Low-fidelity training labels (LFD, CAS paper): swap foreground and background on a fraction of the
training images, reproducibly.

The CAS poster defines LFD as training data whose "class labels are either not available or
incorrect"; the construction is not in the sources we have (``shared/methods/cas.md`` section 2,
[RECON]). The corruption consistent with a *class-agnostic* loss is inverting the mask (FG <-> BG)
on a random subset of the training images; we use 50% by default. Both the fraction and the seed
are config (``data.train_wrappers``); the wrapper is only ever applied to the training reader
(``SegDataModule`` applies ``train_wrappers`` to the train split only), so validation and test
labels are never corrupted.

Which images are swapped depends only on (seed, image id): every id gets a hash
``u = sha256(seed, id)`` read as a number in [0, 1).

* ``selection: rank`` (default): the ``round(fraction * N)`` ids with the smallest ``u`` are swapped -
  exactly that many images, the same ones in every process and run;
* ``selection: bernoulli``: an id is swapped iff ``u < fraction`` - independent of the other ids.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = ["LabelNoise", "id_uniform"]

SELECTIONS = ("rank", "bernoulli")


def id_uniform(seed: int, item_id: str) -> float:
    """A number in [0, 1) fixed by (seed, id)."""
    digest = hashlib.sha256(f"{int(seed)}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class LabelNoise(Dataset):
    """Wrap a reader whose samples have ``key`` (float saliency in [0, 1] or a binary 0/1 map) and
    return ``1 - label`` on the selected images. Ids come from ``reader.stems`` when the reader
    has them (no file is read to select), otherwise from each sample's ``meta["id"]``."""

    adds: tuple[str, ...] = ()

    def __init__(
        self,
        reader: Dataset,
        fraction: float = 0.5,
        seed: int = 0,
        key: str = "saliency",
        selection: str = "rank",
    ):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"label noise fraction must be in [0, 1], got {fraction}")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")
        self.reader = reader
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.key = key
        self.selection = selection
        ids = self._ids()
        u = {i: id_uniform(self.seed, i) for i in ids}
        if selection == "rank":
            k = int(round(self.fraction * len(ids)))
            self.swapped = frozenset(sorted(ids, key=lambda i: (u[i], i))[:k])
        else:
            self.swapped = frozenset(i for i in ids if u[i] < self.fraction)

    def _ids(self) -> list[str]:
        stems = getattr(self.reader, "stems", None)
        if stems is not None:
            return [str(s) for s in stems]
        return [str(self.reader[i]["meta"]["id"]) for i in range(len(self.reader))]

    def __len__(self) -> int:
        return len(self.reader)

    def __getattr__(self, name: str) -> Any:  # class_names, name, ... of the wrapped reader
        if name == "reader":
            raise AttributeError(name)
        return getattr(self.reader, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.reader[index]
        if self.key in sample and str(sample["meta"]["id"]) in self.swapped:
            label = sample[self.key]
            sample = dict(sample)
            if np.issubdtype(np.asarray(label).dtype, np.floating):
                sample[self.key] = (1.0 - label).astype(label.dtype)
            else:
                sample[self.key] = (1 - (label > 0)).astype(label.dtype)
            sample["meta"] = {**sample["meta"], "label_swapped": True}
        return sample
