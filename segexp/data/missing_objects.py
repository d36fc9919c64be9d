"""Ground truth that misses objects the boxes still cover (Box2Seg's fully supervised case).

The Box2Seg authors report that roughly 10 % of VOC's segmentation masks leave out foreground that
the (exhaustive) boxes cover, and that the attention-weighted loss gains 1.5 mIoU over plain CE on
such masks (``shared/seeds/001_...``, last paragraphs). This train wrapper makes that defect
measurable on any VOC-layout set: it erases whole objects from the training ``mask`` - their pixels
and the part of the 255 void band that belongs to them become background, as an object nobody
annotated would be - and leaves the boxes, the image and every other key alone.

Which objects go depends only on (seed, image id, object index): object k of image ``id`` is erased
iff ``id_uniform(seed, f"{id}/{k}") < rate`` - the same objects in every process, run and split
order. The wrapper is only ever given the training reader (``data.train_wrappers``), so validation
and test masks stay complete.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from segexp.data.label_noise import id_uniform
from segexp.data.pseudo_labels import ReaderWrapper
from segexp.utils.errors import UserError

__all__ = ["MissingObjects", "MissingObjectsError", "erase_objects"]


class MissingObjectsError(UserError, ValueError):
    """A misconfigured ``MissingObjects`` entry of ``data.train_wrappers`` (printed in one line)."""


def erase_objects(
    mask: np.ndarray, instances: np.ndarray, erase: list[int], ignore_index: int = 255
) -> np.ndarray:
    """``mask`` with the objects ``erase`` (ids in ``instances``) turned into background.

    A void pixel goes with the object nearest to it (Euclidean, over instance pixels): the band
    between an erased object and the background becomes background; the half of a band shared with
    a kept object that is nearer to the kept one stays void.
    """
    out = mask.copy()
    if not erase or not (instances > 0).any():
        return out
    gone = np.isin(instances, erase)
    out[gone] = 0
    void = mask == ignore_index
    if void.any():
        _, (iy, ix) = ndimage.distance_transform_edt(instances == 0, return_indices=True)
        nearest = instances[iy, ix]
        out[void & np.isin(nearest, erase)] = 0
    return out


class MissingObjects(ReaderWrapper):
    """``reader`` whose ``key`` mask lacks each object with probability ``rate`` (see the module).

    The reader must offer ``read_instances(image_id, image)`` (the VOC readers: SegmentationObject
    PNGs or SBD's ``inst/*.mat``); ``sample["meta"]["erased_objects"]`` lists what was erased.
    """

    adds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, reader: Any, rate: float = 0.1, seed: int = 0, key: str = "mask",
                 ignore_index: int = 255):  # fmt: skip
        if not 0.0 <= rate <= 1.0:
            raise MissingObjectsError(
                f"data.train_wrappers: MissingObjects rate={rate} (missing_rate in study_box2seg_fullsup) "
                "is a probability per object; set it in [0, 1]"
            )
        if not hasattr(reader, "read_instances"):
            raise MissingObjectsError(
                f"data.train_wrappers: MissingObjects needs instance masks, but {type(reader).__name__} has "
                "no read_instances; use a VOC-layout dataset (data=shapes, voc, voc_boxes)"
            )
        self.reader = reader
        self.rate = float(rate)
        self.seed = int(seed)
        self.key = key
        self.ignore_index = ignore_index

    def erased(self, image_id: str, object_ids: np.ndarray) -> list[int]:
        """The object ids of ``image_id`` this wrapper erases."""
        return [int(k) for k in object_ids if id_uniform(self.seed, f"{image_id}/{int(k)}") < self.rate]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.reader[index]
        if self.key not in sample or self.rate == 0.0:
            return sample
        image_id = str(sample["meta"]["id"])
        instances = sample.get("instances")
        if instances is None:
            instances = self.reader.read_instances(image_id, sample["image"])
        erase = self.erased(image_id, np.unique(instances[instances > 0]))
        sample = dict(sample)
        sample[self.key] = erase_objects(sample[self.key], instances, erase, self.ignore_index)
        sample["meta"] = {**sample["meta"], "erased_objects": erase}
        return sample
