"""The reader interface: one split of one on-disk dataset, yielding raw numpy samples.

Readers do no augmentation and no tensor conversion: the DataModule wraps a reader with an
albumentations pipeline (``segexp.data.transforms``) that turns the raw sample into the tensor
sample of the contract. Keeping readers numpy-only lets ``segexp.data.check`` and the notebooks
inspect files exactly as stored.

Raw sample (keys present only when the dataset has that supervision):

=============  ===================================  ==========================================
key            dtype / shape                        meaning
=============  ===================================  ==========================================
image          uint8 HxWx3 RGB                      the input image
mask           uint8 HxW, 255 = ignore              semantic class map (0 = background)
instances      int32 HxW, 0 = none, 1..K            class-agnostic entity map
saliency       float32 HxW in [0, 1]                salient-object mask
boxes          float32 Nx4, xyxy, 0-based pixels    box supervision (xmax/ymax exclusive)
box_labels     int64 N                              class index of each box (1..C, 0 = bg unused)
box_difficult  bool N                               VOC ``difficult`` flag, kept but flagged
labels         float32 C (foreground classes)       image-level multi-hot
pseudo         uint8 HxW, 255 = ignore              pseudo mask from an earlier stage
meta           dict(id=str, path=str, orig_size=(H, W))
=============  ===================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import Dataset

SAMPLE_KEYS = (
    "image",
    "mask",
    "instances",
    "saliency",
    "boxes",
    "box_labels",
    "labels",
    "pseudo",
)


class Reader(Dataset):
    """Base class of every dataset reader.

    Subclasses set ``provides`` (the sample keys they can yield, a subset of ``SAMPLE_KEYS``),
    ``class_names`` (index 0 = background for semantic datasets) and implement ``__len__`` and
    ``load(i)``. ``keys`` restricts what is loaded, so a box-supervised run never decodes masks.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"image"})
    name: str = "dataset"

    def __init__(self, keys: Sequence[str] | None = None):
        wanted = frozenset(keys) if keys is not None else self.provides
        missing = wanted - self.provides - {"meta"}
        if missing:
            raise KeyError(
                f"{self.name} ({type(self).__name__}) cannot provide {sorted(missing)}; "
                f"it provides {sorted(self.provides)}"
            )
        self.keys = wanted | {"image"}

    class_names: Sequence[str] = ("background",)
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load(index)
        return {k: v for k, v in sample.items() if k in self.keys or k == "meta"}


def labels_from_mask(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Image-level multi-hot over the foreground classes 1..num_classes-1 from a semantic mask."""
    present = np.unique(mask)
    present = present[(present != ignore_index) & (present > 0) & (present < num_classes)]
    out = np.zeros(num_classes - 1, dtype=np.float32)
    out[present.astype(np.int64) - 1] = 1.0
    return out
