"""PASCAL VOC 2012 in its official layout (and the SBD-augmented variant via options).

``root`` is the ``VOC2012`` folder::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        palette PNG: class indices, 255 = void band
    SegmentationObject/<id>.png       palette PNG: instance indices 1..K, 255 = void band
    Annotations/<id>.xml              boxes, 1-based inclusive pixel coordinates
    ImageSets/Segmentation/<split>.txt

The SBD-augmented set (``voc_aug``) is the same reader with ``mask_dir="SegmentationClassAug"``
(grayscale index PNGs) and a split list that may use the ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
pair format; :func:`segexp.data.io.read_split_file` accepts both.

With ``sbd_root`` (the SBD ``benchmark_RELEASE/dataset`` folder), ids that VOC2012 lacks a file for
fall back to SBD's MATLAB files: ``inst/<id>.mat`` (``GTinst.Segmentation`` instance map and
``GTinst.Categories`` class per instance) for instances and boxes, ``cls/<id>.mat``
(``GTcls.Segmentation``) for the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.io

from segexp.data.io import (
    DatasetError,
    VOCAnnotation,
    read_image,
    read_label_png,
    read_split_file,
    read_voc_xml,
    rgb_to_index,
    voc_palette,
)
from segexp.data.readers.base import Reader, labels_from_mask
from segexp.data.readers.common import (
    as_class_names,
    boxes_array,
    boxes_from_instances,
    check_label_values,
    check_same_size,
)

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

_PALETTE = voc_palette()


def read_index_png(path: str | Path) -> np.ndarray:
    """Index map of a VOC-style label PNG: palette/gray values as stored, RGB decoded with the VOC palette.

    Some re-distributions store SegmentationClass as RGB colour images; decoding them through
    the palette gives the same indices as the palette PNG would.
    """
    values = read_label_png(path)
    if values.ndim == 3:
        return rgb_to_index(values, _PALETTE, path)
    return values


def resolve_split_file(root: Path, split_dir: str, split: str) -> Path:
    """``split`` is a split name (``<split_dir>/<split>.txt``) or a path to a list file relative to root."""
    if split.endswith(".txt"):
        path = Path(split)
        return path if path.is_absolute() else root / path
    return root / split_dir / f"{split}.txt"


def xml_boxes(
    ann: VOCAnnotation, class_names: Sequence[str], xml_path: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (0-based xyxy, max exclusive), class indices and difficult flags of a VOC annotation.

    VOC stores 1-based inclusive corners, so ``x0 = xmin - 1`` and ``x1 = xmax`` (likewise y).
    """
    lookup = {n: i for i, n in enumerate(class_names)}
    boxes, labels, difficult = [], [], []
    for obj in ann.objects:
        if obj.name not in lookup:
            known = ", ".join(class_names[1:])
            raise DatasetError(xml_path, f"unknown class name {obj.name!r} (known: {known})")
        xmin, ymin, xmax, ymax = obj.box
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
        labels.append(lookup[obj.name])
        difficult.append(obj.difficult)
    return boxes_array(boxes), np.asarray(labels, dtype=np.int64), np.asarray(difficult, dtype=bool)


def read_sbd_struct(path: Path, struct: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
    """Fields of the MATLAB struct ``struct`` (``GTcls``/``GTinst``) of an SBD .mat file."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (scipy.io.matlab.MatReadError, ValueError, OSError, TypeError) as exc:
        raise DatasetError(path, f"cannot read MATLAB file ({exc})") from exc
    if struct not in mat:
        raise DatasetError(
            path, f"no '{struct}' struct (found: {sorted(k for k in mat if not k.startswith('__'))})"
        )
    out = {}
    for name in fields:
        if not hasattr(mat[struct], name):
            raise DatasetError(path, f"'{struct}' has no field '{name}'")
        out[name] = np.asarray(getattr(mat[struct], name))
    return out


def read_sbd_instances(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SBD instance map (int32, 0 = none) and the class index of instance k at position k-1."""
    fields = read_sbd_struct(path, "GTinst", ("Segmentation", "Categories"))
    seg = fields["Segmentation"].astype(np.int32)
    categories = np.atleast_1d(fields["Categories"]).astype(np.int64).reshape(-1)
    if seg.ndim != 2:
        raise DatasetError(path, f"GTinst.Segmentation is not a 2-D map (shape {seg.shape})")
    if seg.max(initial=0) > categories.size:
        raise DatasetError(path, f"instance id {seg.max()} but only {categories.size} GTinst.Categories")
    return seg, categories


def multi_hot(class_indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Image-level labels over the foreground classes 1..C-1 from a list of class indices."""
    out = np.zeros(num_classes - 1, dtype=np.float32)
    fg = class_indices[(class_indices > 0) & (class_indices < num_classes)]
    out[fg.astype(np.int64) - 1] = 1.0
    return out


class VOCSegmentation(Reader):
    """One split of a VOC2012-layout tree: masks, instances, XML boxes and image-level labels.

    ``labels_from`` picks the source of the image-level labels: ``"mask"`` (classes present in
    the segmentation) or ``"xml"`` (object names: what the WSSS releases' ``cls_labels.npy`` hold, and
    ``voc_aug``'s setting; ids without an XML fall back to SBD's instance classes). Only the files
    that ``keys`` needs are decoded.
    """

    provides: ClassVar[frozenset[str]] = frozenset(
        {"image", "mask", "instances", "boxes", "box_labels", "box_difficult", "labels"}
    )
    name = "voc"

    def __init__(
        self,
        root: str | Path,
        split: str,
        keys: Sequence[str] | None = None,
        class_names: Sequence[str] = VOC_CLASSES,
        mask_dir: str = "SegmentationClass",
        object_dir: str = "SegmentationObject",
        split_dir: str = "ImageSets/Segmentation",
        labels_from: str = "mask",
        image_ext: str = ".jpg",
        image_dir: str = "JPEGImages",
        xml_dir: str = "Annotations",
        sbd_root: str | Path | None = None,
    ):
        super().__init__(keys)
        if labels_from not in ("mask", "xml"):
            raise ValueError(f"labels_from must be 'mask' or 'xml', got {labels_from!r}")
        if "boxes" in self.keys:  # boxes are useless without their classes; keep the flags alongside
            self.keys = self.keys | {"box_labels", "box_difficult"}
        self.root = Path(root)
        self.split = split
        self.class_names = as_class_names(class_names)
        self.mask_dir, self.object_dir = mask_dir, object_dir
        self.image_dir, self.xml_dir = image_dir, xml_dir
        self.labels_from = labels_from
        self.image_ext = image_ext
        self.sbd_root = Path(sbd_root) if sbd_root is not None else None
        self.split_file = resolve_split_file(self.root, split_dir, split)
        self.ids = read_split_file(self.split_file)

    def __len__(self) -> int:
        return len(self.ids)

    # Paths -----------------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        return self.root / self.image_dir / f"{image_id}{self.image_ext}"

    def mask_path(self, image_id: str) -> Path:
        return self.root / self.mask_dir / f"{image_id}.png"

    def object_path(self, image_id: str) -> Path:
        return self.root / self.object_dir / f"{image_id}.png"

    def xml_path(self, image_id: str) -> Path:
        return self.root / self.xml_dir / f"{image_id}.xml"

    def sbd_path(self, kind: str, image_id: str) -> Path | None:
        """``<sbd_root>/<kind>/<id>.mat`` if SBD is configured and has the file, else None."""
        if self.sbd_root is None:
            return None
        path = self.sbd_root / kind / f"{image_id}.mat"
        return path if path.is_file() else None

    def _annotations_needed(self) -> tuple[bool, bool]:
        """(mask, xml): whether ``keys`` makes ``load`` read the class mask and the XML."""
        want = self.keys
        need_mask = "mask" in want or ("labels" in want and self.labels_from == "mask")
        need_xml = bool({"boxes", "box_labels", "box_difficult"} & want) or (
            "labels" in want and self.labels_from == "xml"
        )
        return need_mask, need_xml

    def missing_file(self, image_id: str) -> Path | None:
        """The first file ``load`` would read for ``image_id`` that the disk has in none of the forms it
        accepts (PNG / XML, or SBD's .mat), else None: so an incomplete copy stops when the split opens."""
        need_mask, need_xml = self._annotations_needed()
        wanted = [(self.image_path(image_id), None)]
        if need_mask:
            wanted.append((self.mask_path(image_id), "cls"))
        if "instances" in self.keys:
            wanted.append((self.object_path(image_id), "inst"))
        if need_xml:
            wanted.append((self.xml_path(image_id), "inst"))
        for path, sbd_kind in wanted:
            if not path.is_file() and (sbd_kind is None or self.sbd_path(sbd_kind, image_id) is None):
                return path
        return None

    # Decoding --------------------------------------------------------------------------------
    def read_image(self, image_id: str) -> np.ndarray:
        path = self.image_path(image_id)
        if not path.is_file():
            raise DatasetError(path, f"image {image_id!r} listed in {self.split_file} not found")
        return read_image(path)

    def read_mask(self, image_id: str, image: np.ndarray) -> np.ndarray:
        path = self.mask_path(image_id)
        sbd = self.sbd_path("cls", image_id) if not path.is_file() else None
        if sbd is not None:
            path, mask = sbd, read_sbd_struct(sbd, "GTcls", ("Segmentation",))["Segmentation"]
        else:
            mask = read_index_png(path)
        check_same_size(image, mask, self.image_path(image_id), path)
        return check_label_values(mask, self.num_classes, path, self.ignore_index)

    def read_instances(self, image_id: str, image: np.ndarray) -> np.ndarray:
        """Instance ids 1..K; the 255 void band around objects becomes 0 (no instance)."""
        path = self.object_path(image_id)
        sbd = self.sbd_path("inst", image_id) if not path.is_file() else None
        if sbd is not None:
            path, inst = sbd, read_sbd_instances(sbd)[0]
        else:
            inst = read_index_png(path).astype(np.int32)
        check_same_size(image, inst, self.image_path(image_id), path)
        inst[inst == 255] = 0
        return inst

    def read_boxes(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """XML boxes; for ids without XML, tight boxes of SBD's instance masks (never difficult)."""
        path = self.xml_path(image_id)
        sbd = self.sbd_path("inst", image_id) if not path.is_file() else None
        if sbd is None:
            return xml_boxes(read_voc_xml(path), self.class_names, path)
        seg, categories = read_sbd_instances(sbd)
        boxes, ids = boxes_from_instances(seg)
        labels = categories[ids - 1]
        bad = labels[(labels <= 0) | (labels >= self.num_classes)]
        if bad.size:
            raise DatasetError(
                sbd, f"GTinst.Categories {bad.tolist()} outside the classes 1..{self.num_classes - 1}"
            )
        return boxes, labels, np.zeros(len(boxes), dtype=bool)

    def load(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = self.read_image(image_id)
        sample: dict[str, Any] = {"image": image}
        want = self.keys
        need_mask, need_xml = self._annotations_needed()
        if need_mask:
            sample["mask"] = self.read_mask(image_id, image)
        if "instances" in want:
            sample["instances"] = self.read_instances(image_id, image)
        if need_xml:
            sample["boxes"], sample["box_labels"], sample["box_difficult"] = self.read_boxes(image_id)
        if "labels" in want:
            if self.labels_from == "mask":
                sample["labels"] = labels_from_mask(sample["mask"], self.num_classes, self.ignore_index)
            else:
                sample["labels"] = multi_hot(sample["box_labels"], self.num_classes)
        sample["meta"] = {
            "id": image_id,
            "path": str(self.image_path(image_id)),
            "orig_size": tuple(image.shape[:2]),
        }
        return sample


class VOCBoxes(VOCSegmentation):
    """Box-supervised VOC: boxes, their classes and image labels for training, masks for evaluation.

    The same files as :class:`VOCSegmentation`, but image labels come from the boxes by default
    and instances are not offered (most train_aug ids have no instance annotation). Boxes come
    from the VOC2012 XML, or from SBD instance masks where the XML is missing (``sbd_root``).
    """

    provides: ClassVar[frozenset[str]] = frozenset(
        {"image", "boxes", "box_labels", "box_difficult", "labels", "mask"}
    )
    name = "voc_boxes"

    def __init__(self, root: str | Path, split: str, keys: Sequence[str] | None = None, **options: Any):
        options.setdefault("labels_from", "xml")
        super().__init__(root, split, keys, **options)
