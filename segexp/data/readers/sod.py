"""Salient-object datasets stored as an image folder plus a mask folder.

Every SOD benchmark (DUTS-TR/TE, ECSSD, HKU-IS, PASCAL-S, DUT-OMRON, THUR15K, SOD) is distributed
as "images here, masks there", with different folder names and extensions (``.jpg`` images with
``.png``/``.bmp`` masks) and different mask encodings (8-bit, 16-bit, 1-bit, RGB). One reader
covers them: folders are options (``{split}`` is replaced by the split name), files are matched
by stem, and every encoding is turned into a float saliency map in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from segexp.data.io import DatasetError, read_image, read_label_png
from segexp.data.readers.base import Reader
from segexp.data.readers.common import IMAGE_EXTS, as_class_names, check_same_size, index_by_stem

SOD_CLASSES = ("background", "salient")


def saliency_from_values(values: np.ndarray) -> np.ndarray:
    """Float32 HxW in [0, 1] from the stored values of a mask file.

    * 16-bit gray (returned as int64 by :func:`read_label_png`) is scaled by 65535;
    * RGB masks take the brightest channel (white, or a coloured object on black);
    * 8-bit gray is scaled by 255, except masks whose values are only 0/1 (1-bit PNGs and
      masks saved as class indices), which are already in [0, 1].
    """
    if values.ndim == 3:
        values = values.max(axis=-1)
    if values.dtype == np.uint8:
        scale = 1.0 if values.max() <= 1 else 255.0
    else:
        scale = 65535.0
    return (values.astype(np.float32) / scale).clip(0.0, 1.0)


def read_saliency(path: str | Path) -> np.ndarray:
    return saliency_from_values(read_label_png(path))


def read_list_file(path: Path) -> list[str]:
    """Stems listed one per line (bare names or file names with any extension)."""
    if not path.is_file():
        raise DatasetError(path, "list file not found")
    stems = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not stems:
        raise DatasetError(path, "list file names no images")
    return stems


class SalientObjects(Reader):
    """One salient-object set: ``<root>/<image_dir>`` images and ``<root>/<mask_dir>`` masks.

    ``image_dir``, ``mask_dir`` and ``list_file`` may contain ``{split}``, so one config serves
    every split of a set (``DUTS/{split}/{split}-Image`` with splits DUTS-TR and DUTS-TE).
    Without a list file, every image in ``image_dir`` is a sample, in sorted stem order.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"image", "saliency"})
    name = "sod"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        keys: Sequence[str] | None = None,
        image_dir: str = "{split}/Image",
        mask_dir: str = "{split}/Mask",
        list_file: str | None = None,
        image_exts: Sequence[str] = IMAGE_EXTS,
        mask_exts: Sequence[str] = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"),
        class_names: Sequence[str] = SOD_CLASSES,
        name: str | None = None,
    ):
        super().__init__(keys)
        self.root = Path(root)
        self.split = split
        self.class_names = as_class_names(class_names)
        if name is not None:
            self.name = name
        self.image_dir = self.root / image_dir.format(split=split)
        self.mask_dir = self.root / mask_dir.format(split=split)
        self.images = index_by_stem(self.image_dir, image_exts)
        # Masks are only indexed when they are read, so an image-only run works without them.
        self.masks = index_by_stem(self.mask_dir, mask_exts) if "saliency" in self.keys else {}
        if list_file is not None:
            self.list_file: Path | None = self.root / list_file.format(split=split)
            self.stems = read_list_file(self.list_file)
        else:
            self.list_file = None
            self.stems = sorted(self.images)
            if not self.stems:
                raise DatasetError(self.image_dir, "no images found")

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def ids(self) -> list[str]:
        """Sample ids as the other readers name them (stages and caches key images by ``ids``)."""
        return self.stems

    def missing_file(self, stem: str) -> Path | None:
        """The image, then (when ``saliency`` is read) the mask, that ``load`` would read for ``stem`` and
        the disk lacks (``<stem>.*``: any accepted extension), else None: an incomplete copy then stops when
        the split opens, not at the first epoch that reaches the image."""
        if stem not in self.images:
            return self.image_dir / f"{stem}.*"
        if "saliency" in self.keys and stem not in self.masks:
            return self.mask_dir / f"{stem}.*"
        return None

    def image_path(self, stem: str) -> Path:
        if stem not in self.images:
            source = self.list_file if self.list_file is not None else self.image_dir
            raise DatasetError(self.image_dir / stem, f"image listed in {source} not found (any extension)")
        return self.images[stem]

    def mask_path(self, stem: str) -> Path:
        if stem not in self.masks:
            raise DatasetError(
                self.images.get(stem, self.image_dir / stem), f"no mask named {stem}.* in {self.mask_dir}"
            )
        return self.masks[stem]

    def load(self, index: int) -> dict[str, Any]:
        stem = self.stems[index]
        image_path = self.image_path(stem)
        image = read_image(image_path)
        sample: dict[str, Any] = {"image": image}
        if "saliency" in self.keys:
            mask_path = self.mask_path(stem)
            saliency = read_saliency(mask_path)
            check_same_size(image, saliency, image_path, mask_path)
            sample["saliency"] = saliency
        sample["meta"] = {"id": stem, "path": str(image_path), "orig_size": tuple(image.shape[:2])}
        return sample
