"""ADE20K: the SceneParsing benchmark (ADEChallengeData2016) and the full dataset's ``_seg.png`` files.

ADEChallengeData2016 layout (``{split}`` is ``training`` or ``validation``)::

    images/{split}/ADE_*.jpg
    annotations/{split}/ADE_*.png              8-bit: 0 = "other" (unlabeled), 1..150 = classes
    annotations_instance/{split}/ADE_*.png     Places-challenge instances: R = category, G = instance id

Label 0 is not a class but unlabeled "other", so by default it becomes ignore (255) and the 150
classes become 0..149 (the benchmark protocol); ``zero_label="background"`` keeps it as class 0.

The full ADE20K release stores one ``<name>_seg.png`` beside each image: class = R / 10 * 256 + G
(over ~3,600 names, more than a uint8 mask holds) and the instance in B; :class:`ADE20KFull` reads
its instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from segexp.data.io import DatasetError, read_image, read_label_png
from segexp.data.readers.base import Reader
from segexp.data.readers.common import as_class_names, check_label_values, check_same_size, index_by_stem

# The 150 SceneParsing classes in label order (label k+1 in the PNGs).
# fmt: off
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)
# fmt: on


def rank_ids(ids: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Instance map 1..K from arbitrary codes: the codes of labelled pixels, ranked in increasing order."""
    out = np.zeros(ids.shape, np.int32)
    codes, inverse = np.unique(ids[labelled], return_inverse=True)
    out[labelled] = inverse.reshape(-1) + 1
    return out


def read_rgb_label(path: Path) -> np.ndarray:
    """An RGB-encoded label PNG as HxWx3 int64 (instance files must keep all three channels)."""
    values = read_label_png(path)
    if values.ndim != 3:
        raise DatasetError(path, "expected an RGB-encoded PNG (category and instance in separate channels)")
    return values.astype(np.int64)


class ADE20K(Reader):
    """ADEChallengeData2016 semantic masks (150 classes) and, where present, instance masks."""

    provides: ClassVar[frozenset[str]] = frozenset({"image", "mask", "instances"})
    name = "ade20k"

    def __init__(
        self,
        root: str | Path,
        split: str,
        keys: Sequence[str] | None = None,
        zero_label: str = "ignore",
        class_names: Sequence[str] | None = None,
        image_dir: str = "images/{split}",
        mask_dir: str = "annotations/{split}",
        instance_dir: str = "annotations_instance/{split}",
        name: str | None = None,
    ):
        super().__init__(keys)
        if zero_label not in ("ignore", "background"):
            raise ValueError(f"zero_label must be 'ignore' or 'background', got {zero_label!r}")
        if name is not None:
            self.name = name
        self.root = Path(root)
        self.split = split
        self.zero_label = zero_label
        default = ADE20K_CLASSES if zero_label == "ignore" else ("background", *ADE20K_CLASSES)
        self.class_names = as_class_names(class_names if class_names is not None else default)
        if len(self.class_names) != len(default):
            raise ValueError(
                f"ADE20K with zero_label={zero_label!r} has {len(default)} classes, "
                f"but {len(self.class_names)} class names are given"
            )
        self.image_dir = self.root / image_dir.format(split=split)
        self.mask_dir = self.root / mask_dir.format(split=split)
        self.instance_dir = self.root / instance_dir.format(split=split)
        self.images = index_by_stem(self.image_dir, (".jpg", ".jpeg", ".png"))
        self.ids = sorted(self.images)
        if not self.ids:
            raise DatasetError(self.image_dir, "no images found")

    def __len__(self) -> int:
        return len(self.ids)

    def missing_file(self, image_id: str) -> Path | None:
        """The annotation ``load`` would read for ``image_id`` that the disk lacks (the class PNG, then the
        instance PNG, as ``keys`` need them), else None; the images are listed from disk, so they exist.
        An incomplete copy then stops when the split opens, not at the first epoch that reaches it."""
        wanted = [(self.mask_dir, "mask"), (self.instance_dir, "instances")]
        for folder, key in wanted:
            path = folder / f"{image_id}.png"
            if key in self.keys and not path.is_file():
                return path
        return None

    def read_mask(self, image_id: str, image: np.ndarray) -> np.ndarray:
        path = self.mask_dir / f"{image_id}.png"
        raw = read_label_png(path)
        if raw.ndim != 2:
            raise DatasetError(path, "expected a single-channel class-index PNG")
        check_same_size(image, raw, self.images[image_id], path)
        raw = check_label_values(raw, len(ADE20K_CLASSES) + 1, path, ignore_index=self.ignore_index)
        if self.zero_label == "background":
            return raw
        return np.where(raw == 0, self.ignore_index, raw - 1).astype(np.uint8)

    def read_instances(self, image_id: str, image: np.ndarray) -> np.ndarray:
        """Instances 1..K from the G channel of pixels that have a category (R > 0)."""
        path = self.instance_dir / f"{image_id}.png"
        rgb = read_rgb_label(path)
        check_same_size(image, rgb, self.images[image_id], path)
        return rank_ids(rgb[..., 1], (rgb[..., 0] > 0) & (rgb[..., 1] > 0))

    def load(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = read_image(self.images[image_id])
        sample: dict[str, Any] = {"image": image}
        if "mask" in self.keys:
            sample["mask"] = self.read_mask(image_id, image)
        if "instances" in self.keys:
            sample["instances"] = self.read_instances(image_id, image)
        sample["meta"] = {
            "id": image_id,
            "path": str(self.images[image_id]),
            "orig_size": tuple(image.shape[:2]),
        }
        return sample


class ADE20KFull(Reader):
    """The full ADE20K release: ``images/ADE/{split}/<scene>/<name>.jpg`` with ``<name>_seg.png`` beside it.

    Yields the instance map (every annotated object an entity, from the B channel). Its class
    codes (R / 10 * 256 + G) exceed a uint8 mask, so no semantic mask is offered.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"image", "instances"})
    name = "ade20k_full"
    class_names = ("background", "object")

    def __init__(
        self,
        root: str | Path,
        split: str,
        keys: Sequence[str] | None = None,
        image_dir: str = "images/ADE/{split}",
        name: str | None = None,
    ):
        super().__init__(keys)
        if name is not None:
            self.name = name
        self.root = Path(root)
        self.split = split
        self.image_dir = self.root / image_dir.format(split=split)
        if not self.image_dir.is_dir():
            raise DatasetError(self.image_dir, "directory not found")
        self.images = sorted(p for p in self.image_dir.rglob("*.jpg") if not p.name.startswith("."))
        if not self.images:
            raise DatasetError(self.image_dir, "no .jpg images found (searched recursively)")
        self.ids = [str(p.relative_to(self.image_dir).with_suffix("")) for p in self.images]
        self._paths = dict(zip(self.ids, self.images))

    def __len__(self) -> int:
        return len(self.images)

    def missing_file(self, image_id: str) -> Path | None:
        """The ``_seg.png`` beside the image when ``instances`` are read and the disk lacks it, else None."""
        seg = self.seg_path(self._paths[image_id])
        return seg if "instances" in self.keys and not seg.is_file() else None

    @staticmethod
    def seg_path(image_path: Path) -> Path:
        return image_path.with_name(f"{image_path.stem}_seg.png")

    @staticmethod
    def decode_seg(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class code map, instance map 1..K) of a full-ADE ``_seg.png``; class 0 = unlabeled."""
        classes = rgb[..., 0] // 10 * 256 + rgb[..., 1]
        return classes, rank_ids(rgb[..., 2], classes > 0)

    def load(self, index: int) -> dict[str, Any]:
        path = self.images[index]
        image = read_image(path)
        sample: dict[str, Any] = {"image": image}
        if "instances" in self.keys:
            seg = self.seg_path(path)
            rgb = read_rgb_label(seg)
            check_same_size(image, rgb, path, seg)
            sample["instances"] = self.decode_seg(rgb)[1]
        sample["meta"] = {"id": self.ids[index], "path": str(path), "orig_size": tuple(image.shape[:2])}
        return sample
