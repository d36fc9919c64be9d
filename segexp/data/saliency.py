"""Train wrappers that add a float ``saliency`` map in [0, 1] to every sample (EPS/PPC's second cue).

Two sources, both configured as a ``data.train_wrappers`` entry (``saliency`` is a float map of the
sample contract, so augmentation carries it like the mask and pads it with 0):

* :class:`SaliencyFolder` - a folder of 8-bit PNGs named after the image files, ``<image stem>.png``
  (VOC: ``<image id>.png``), the layout EPS and PPC use for VOC (``VOCdevkit/VOC2012/SALImages``,
  maps of an off-the-shelf SOD model) and COCO (``SALImages/<COCO file stem>.png``). Every
  map must exist and have its image's size; problems name the file. ``oracle_from_masks: true``
  first writes the missing maps from the ground-truth masks (object = not background): an *oracle*
  saliency, only for the synthetic shapes experiments.
* :class:`SaliencyFromStage` - the maps of a cached stage, e.g. a trained segexp SOD model run over
  the training images (:class:`~segexp.stages.saliency.SODSaliencyStage`, ``conf/stage/
  saliency_sod.yaml``); missing maps are computed on first use, as :class:`PseudoLabels` does.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from segexp.data.io import DatasetError, read_label_png
from segexp.data.pseudo_labels import PseudoLabels, ReaderWrapper
from segexp.data.readers.common import check_same_size
from segexp.data.readers.sod import saliency_from_values
from segexp.utils.atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "SaliencyFolder",
    "SaliencyFromStage",
    "saliency_wrapper",
    "write_oracle_saliency",
    "oracle_saliency",
]


def oracle_saliency(mask: np.ndarray) -> np.ndarray:
    """uint8 0/255 map: every object pixel (and VOC's void band around objects) is salient."""
    return np.where(mask != 0, 255, 0).astype(np.uint8)


def map_name(reader: Any, image_id: str) -> str:
    """File name of an image's saliency map: its image file's stem + ``.png`` (the id without one)."""
    image_path = getattr(reader, "image_path", None)
    return f"{Path(image_path(image_id)).stem if image_path else image_id}.png"


def write_oracle_saliency(reader: Any, directory: str | os.PathLike) -> int:
    """Write the missing maps of ``reader``'s images into ``directory`` from their GT masks
    (:func:`oracle_saliency`); atomic per file. Returns the number of maps written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    todo = [
        i for i, image_id in enumerate(reader.ids) if not (directory / map_name(reader, image_id)).is_file()
    ]
    if not todo:
        return 0
    with_masks = copy.copy(reader)
    with_masks.keys = frozenset(getattr(reader, "keys", ()) or ()) | {"image", "mask"}
    for i in todo:
        sample = with_masks[i]
        if "mask" not in sample:
            raise DatasetError(
                directory, f"oracle saliency needs GT masks, {type(reader).__name__} gave none"
            )
        path = directory / map_name(reader, reader.ids[i])
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(oracle_saliency(np.asarray(sample["mask"]))).save(tmp, format="PNG")
    log.warning("wrote %d ORACLE saliency maps (from GT masks) to %s", len(todo), directory)
    return len(todo)


class SaliencyFolder(ReaderWrapper):
    """``reader`` + ``saliency`` read from ``<dir>/<image stem>.png`` (8-bit; 0/1-valued masks and
    16-bit maps are understood too, as by the SOD reader)."""

    adds: ClassVar[tuple[str, ...]] = ("saliency",)

    def __init__(self, reader: Any, dir: str | os.PathLike, oracle_from_masks: bool = False):
        self.reader = reader
        self.dir = Path(dir)
        if oracle_from_masks:
            write_oracle_saliency(reader, self.dir)
        if not self.dir.is_dir():
            raise DatasetError(self.dir, "saliency folder not found (data.train_wrappers: dir)")
        missing = [i for i in reader.ids if not self.path(i).is_file()]
        if missing:
            raise DatasetError(
                self.path(missing[0]),
                f"saliency map missing ({len(missing)} of {len(reader.ids)} images have none in {self.dir})",
            )

    def path(self, image_id: str) -> Path:
        return self.dir / map_name(self.reader, image_id)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.reader[index]
        image_id = self.reader.ids[index]
        path = self.path(image_id)
        saliency = saliency_from_values(read_label_png(path))
        image_path = getattr(self.reader, "image_path", lambda i: image_id)(image_id)
        check_same_size(sample["image"], saliency, image_path, path)
        sample["saliency"] = saliency
        return sample


class SaliencyFromStage(PseudoLabels):
    """``reader`` + ``saliency`` from a cached stage whose ``get`` returns float maps in [0, 1];
    missing maps are computed when the wrapper is built (see :class:`PseudoLabels`)."""

    adds: ClassVar[tuple[str, ...]] = ("saliency",)
    dtype: ClassVar[type] = np.float32

    def __init__(self, reader: Any, stage: Any, **kwargs: Any):
        super().__init__(reader, stage, key="saliency", **kwargs)


def saliency_wrapper(
    reader: Any, dir: str | os.PathLike | None = None, stage: Any = None, oracle_from_masks: bool = False
) -> ReaderWrapper:
    """The experiments' ``saliency:`` block as one wrapper: the cached ``stage`` when given (e.g. a
    SOD model), else the PNG folder ``dir``."""
    if stage is not None:
        return SaliencyFromStage(reader, stage)
    if dir is None:
        raise ValueError(
            "saliency: set `dir` (a folder of <id>.png maps) or `stage` (e.g. stage=saliency_sod)"
        )
    return SaliencyFolder(reader, dir, oracle_from_masks=oracle_from_masks)


saliency_wrapper.adds = ("saliency",)  # read by the DataModule's key check
