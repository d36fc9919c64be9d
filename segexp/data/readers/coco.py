"""COCO instances (2014/2017 and any COCO-format JSON) and COCO panoptic readers.

Layout (folders are options; ``{split}`` is replaced by the split name, e.g. ``train2017``)::

    <root>/<split>/*.jpg
    <root>/annotations/instances_<split>.json
    <root>/annotations/panoptic_<split>.json + panoptic_<split>/*.png   (RGB-encoded segment ids)

COCO category ids are sparse (1..90 for 80 things, up to 200 with stuff); readers map them to
contiguous class indices 1..N in increasing id order, or through a configured ``category_map``
(categories left out of the map are dropped, which selects a subset of classes).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pycocotools import mask as coco_mask

from segexp.data.io import DatasetError, read_image, read_label_png, rgb_to_id
from segexp.data.readers.base import Reader
from segexp.data.readers.common import as_class_names, boxes_array, check_same_size
from segexp.data.readers.voc import multi_hot


def load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(path, "annotation file not found")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"malformed JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(path, f"no '{key}' list (not a COCO annotation file)")
    return data


def contiguous_categories(
    categories: Sequence[Mapping[str, Any]],
    category_map: Mapping[Any, Any] | None,
    json_path: Path,
) -> tuple[dict[int, int], tuple[str, ...]]:
    """COCO category id -> class index 1..N, and the class names ("background" first)."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    if category_map is None:
        mapping = {cid: i for i, cid in enumerate(sorted(names), 1)}
    else:
        mapping = {int(k): int(v) for k, v in category_map.items()}
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise DatasetError(
                json_path, f"category_map names category ids {unknown} that are not in 'categories'"
            )
    num = max(mapping.values(), default=0)
    by_index = {v: names[k] for k, v in sorted(mapping.items(), reverse=True)}
    return mapping, ("background", *(by_index.get(i, f"class_{i}") for i in range(1, num + 1)))


def resolve_class_names(
    configured: Sequence[str] | None, derived: tuple[str, ...], json_path: Path
) -> tuple[str, ...]:
    """The configured names, if their count matches the category mapping; else the JSON's names."""
    if configured is None:
        return derived
    names = as_class_names(configured)
    if len(names) != len(derived):
        raise DatasetError(
            json_path,
            f"{len(names)} class names are configured but the categories map to {len(derived) - 1} classes "
            f"(+ background): {', '.join(derived[1:6])}...",
        )
    return names


def decode_segmentation(
    segmentation: Any, height: int, width: int, where: str, json_path: Path
) -> np.ndarray:
    """Binary HxW uint8 mask of a COCO segmentation: polygons, uncompressed RLE or compressed RLE."""
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points has no area
            if not polygons:
                return np.zeros((height, width), np.uint8)
            rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            size = [int(s) for s in segmentation.get("size", ())]
            if size != [height, width]:
                raise DatasetError(
                    json_path, f"{where}: RLE size {size} differs from the image's [{height}, {width}]"
                )
            if isinstance(segmentation["counts"], list):
                rle = coco_mask.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
        else:
            raise DatasetError(json_path, f"{where}: segmentation is neither polygons nor RLE")
        return coco_mask.decode(rle)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(json_path, f"{where}: cannot decode segmentation ({exc})") from exc


def paint_annotations(
    shape: tuple[int, int],
    masks: Sequence[np.ndarray],
    classes: Sequence[int],
    crowd: Sequence[bool],
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Semantic map and instance map from per-annotation binary masks.

    Larger objects are painted first so small ones lying on top of them stay visible. Crowd
    regions are ``ignore_index`` in the semantic map wherever no single object covers them and
    are no instance (0). Instance ids are 1..K in annotation order of the non-crowd objects.
    """
    semantic = np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.int32)
    crowd_pixels = np.zeros(shape, bool)
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    instance_id = np.cumsum([not c for c in crowd])  # the k-th non-crowd annotation gets id k
    for i in order:
        region = masks[i].astype(bool)
        if crowd[i]:
            crowd_pixels |= region
            continue
        semantic[region] = classes[i]
        instances[region] = instance_id[i]
    semantic[crowd_pixels & (instances == 0)] = ignore_index
    return semantic, instances


class CocoIndex:
    """The parts of a COCO JSON a reader needs: images in file order and annotations per image."""

    def __init__(self, json_path: Path):
        self.json_path = json_path
        data = load_json(json_path)
        self.images: list[dict[str, Any]] = list(data["images"])
        self.categories: list[dict[str, Any]] = list(data["categories"])
        self.category_ids = {int(c["id"]) for c in self.categories}
        self.annotations: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in data["annotations"]:  # annotation ids may be 0; they are never used as keys
            self.annotations[int(ann["image_id"])].append(ann)


class COCOInstances(Reader):
    """COCO-format instance annotations (polygons or RLE) as semantic mask, instances, boxes, labels.

    ``iscrowd`` annotations become ignore (255) in the semantic mask and no instance, box or label.
    ``skip_empty`` drops images without any (non-crowd) annotation, as instance trainers often do.
    """

    provides: ClassVar[frozenset[str]] = frozenset(
        {"image", "mask", "instances", "boxes", "box_labels", "box_difficult", "labels"}
    )
    name = "coco"

    def __init__(
        self,
        root: str | Path,
        split: str,
        keys: Sequence[str] | None = None,
        annotation_file: str = "annotations/instances_{split}.json",
        image_dir: str = "{split}",
        class_names: Sequence[str] | None = None,
        category_map: Mapping[Any, Any] | None = None,
        skip_empty: bool = False,
        name: str | None = None,
    ):
        super().__init__(keys)
        if "boxes" in self.keys:
            self.keys = self.keys | {"box_labels", "box_difficult"}
        if name is not None:
            self.name = name
        self.root = Path(root)
        self.split = split
        self.json_path = self.root / annotation_file.format(split=split)
        self.image_dir = self.root / image_dir.format(split=split)
        self.index = CocoIndex(self.json_path)
        self.category_to_class, derived = contiguous_categories(
            self.index.categories, category_map, self.json_path
        )
        self.class_names = resolve_class_names(class_names, derived, self.json_path)
        self.images = self.index.images
        if skip_empty:
            self.images = [im for im in self.images if self._has_objects(im)]
        # image ids (as in meta["id"]): what stages key their caches by, as with VOC's ids
        self.ids = [str(im["id"]) for im in self.images]
        self._info_by_id = dict(zip(self.ids, self.images))

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, image: str | Mapping[str, Any]) -> Path:
        """Path of an image given by id (``self.ids``) or by its JSON record."""
        info = image if isinstance(image, Mapping) else self._info_by_id[image]
        return self.image_dir / str(info["file_name"])

    def _objects(self, info: Mapping[str, Any]) -> list[tuple[dict[str, Any], int]]:
        """(annotation, class index) of the image's annotations whose category is mapped."""
        out = []
        for ann in self.index.annotations.get(int(info["id"]), []):
            cid = int(ann["category_id"])
            if cid not in self.index.category_ids:
                raise DatasetError(
                    self.json_path,
                    f"annotation id {ann.get('id')} of image {info['file_name']} has category_id {cid}, "
                    "which is not in 'categories'",
                )
            if cid in self.category_to_class:
                out.append((ann, self.category_to_class[cid]))
        return out

    def _has_objects(self, info: Mapping[str, Any]) -> bool:
        """Whether the image has a non-crowd annotation of a mapped category (for ``skip_empty``)."""
        return any(
            int(ann["category_id"]) in self.category_to_class and not ann.get("iscrowd", 0)
            for ann in self.index.annotations.get(int(info["id"]), [])
        )

    def _boxes(self, objects: list[tuple[dict[str, Any], int]]) -> tuple[np.ndarray, np.ndarray]:
        """xyxy boxes of the non-crowd objects; COCO's [x, y, w, h] is already 0-based and continuous."""
        boxes, labels = [], []
        for ann, cls in objects:
            if ann.get("iscrowd", 0) or "bbox" not in ann:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w > 0 and h > 0:  # degenerate boxes exist in COCO and break box augmentation
                boxes.append((x, y, x + w, y + h))
                labels.append(cls)
        return boxes_array(boxes), np.asarray(labels, dtype=np.int64)

    def load(self, index: int) -> dict[str, Any]:
        info = self.images[index]
        path = self.image_path(info)
        if not path.is_file():
            raise DatasetError(path, f"image {info['file_name']} listed in {self.json_path} not found")
        image = read_image(path)
        h, w = image.shape[:2]
        if (int(info.get("height", h)), int(info.get("width", w))) != (h, w):
            raise DatasetError(
                path,
                f"size {w}x{h} (WxH) differs from {info['width']}x{info['height']}"
                f" recorded in {self.json_path}",
            )
        objects = self._objects(info)
        sample: dict[str, Any] = {"image": image}
        if {"mask", "instances"} & self.keys:
            masks = [
                decode_segmentation(
                    ann.get("segmentation", []), h, w, f"annotation id {ann.get('id')}", self.json_path
                )
                for ann, _ in objects
            ]
            crowd = [bool(ann.get("iscrowd", 0)) for ann, _ in objects]
            sample["mask"], sample["instances"] = paint_annotations(
                (h, w), masks, [c for _, c in objects], crowd, self.ignore_index
            )
        if {"boxes", "box_labels"} & self.keys:
            sample["boxes"], sample["box_labels"] = self._boxes(objects)
            sample["box_difficult"] = np.zeros(len(sample["boxes"]), dtype=bool)
        if "labels" in self.keys:
            classes = np.asarray([c for ann, c in objects if not ann.get("iscrowd", 0)], dtype=np.int64)
            sample["labels"] = multi_hot(classes, self.num_classes)
        sample["meta"] = {"id": str(info["id"]), "path": str(path), "orig_size": (h, w)}
        return sample


class COCOPanoptic(Reader):
    """COCO panoptic PNG + JSON: every segment (thing or stuff) is an entity; 0 = unlabeled.

    ``mask`` is the semantic map of the segments' categories, unlabeled pixels = 255. With
    ``stuff_as_background`` only thing categories get classes 1..T and stuff pixels are
    background 0 (the class-agnostic "objects vs. stuff" view). ``crowd_as_entity=False`` makes
    crowd segments no entity (0) in ``instances``.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"image", "instances", "mask", "labels"})
    name = "coco_panoptic"

    def __init__(
        self,
        root: str | Path,
        split: str,
        keys: Sequence[str] | None = None,
        annotation_file: str = "annotations/panoptic_{split}.json",
        png_dir: str = "annotations/panoptic_{split}",
        image_dir: str = "{split}",
        class_names: Sequence[str] | None = None,
        category_map: Mapping[Any, Any] | None = None,
        stuff_as_background: bool = False,
        crowd_as_entity: bool = True,
        name: str | None = None,
    ):
        super().__init__(keys)
        if name is not None:
            self.name = name
        self.root = Path(root)
        self.split = split
        self.json_path = self.root / annotation_file.format(split=split)
        self.png_dir = self.root / png_dir.format(split=split)
        self.image_dir = self.root / image_dir.format(split=split)
        data = load_json(self.json_path)
        categories = data["categories"]
        self.thing_ids = {int(c["id"]) for c in categories if c.get("isthing", 1)}
        if stuff_as_background and category_map is None:
            categories = [c for c in categories if int(c["id"]) in self.thing_ids]
        self.category_ids = {int(c["id"]) for c in data["categories"]}
        self.category_to_class, derived = contiguous_categories(categories, category_map, self.json_path)
        self.class_names = resolve_class_names(class_names, derived, self.json_path)
        self.stuff_as_background = stuff_as_background
        self.crowd_as_entity = crowd_as_entity
        by_image = {int(im["id"]): im for im in data["images"]}
        self.entries = []
        for ann in data["annotations"]:
            info = by_image.get(int(ann["image_id"]))
            if info is None:
                raise DatasetError(
                    self.json_path,
                    f"panoptic annotation {ann.get('file_name')} has an image_id "
                    f"{ann['image_id']} that is not in 'images'",
                )
            self.entries.append((info, ann))
        self._entry_of = {str(info["id"]): (info, ann) for info, ann in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str]:
        """The JSON's image ids in reading order (what the listed-files check walks)."""
        return [str(info["id"]) for info, _ in self.entries]

    def missing_file(self, image_id: str) -> Path | None:
        """The first file ``load`` reads for ``image_id`` that the disk lacks: the image, then the
        panoptic PNG when a key other than ``image`` is asked for; None when both are there."""
        info, ann = self._entry_of[image_id]
        paths = [self.image_dir / str(info["file_name"])]
        if set(self.keys) - {"image"}:
            paths.append(self.png_dir / str(ann["file_name"]))
        return next((path for path in paths if not path.is_file()), None)

    def segment_class(self, segment: Mapping[str, Any], png: Path) -> int:
        cid = int(segment["category_id"])
        if cid not in self.category_ids:
            raise DatasetError(
                png,
                f"segment {segment['id']} has category_id {cid}, not in the categories of {self.json_path}",
            )
        if cid not in self.category_to_class:
            return 0 if (self.stuff_as_background and cid not in self.thing_ids) else self.ignore_index
        return self.category_to_class[cid]

    def load(self, index: int) -> dict[str, Any]:
        info, ann = self.entries[index]
        path = self.image_dir / str(info["file_name"])
        if not path.is_file():
            raise DatasetError(path, f"image {info['file_name']} listed in {self.json_path} not found")
        image = read_image(path)
        png = self.png_dir / str(ann["file_name"])
        stored = read_label_png(png)
        if stored.ndim != 3:
            raise DatasetError(png, "expected an RGB panoptic PNG (segment id = R + 256 G + 256^2 B)")
        check_same_size(image, stored, path, png)
        ids = rgb_to_id(stored)
        uniq, inverse = np.unique(ids, return_inverse=True)
        segments = {int(s["id"]): s for s in ann.get("segments_info", [])}
        unknown = [int(u) for u in uniq if u != 0 and int(u) not in segments]
        if unknown:
            raise DatasetError(
                png, f"segment ids {unknown[:8]} are not in the segments_info of {self.json_path}"
            )
        # Entities are numbered 1..K in segments_info order, counting only segments with pixels.
        present = set(uniq.tolist())
        entity = {}
        for sid, seg in segments.items():
            if sid in present and (self.crowd_as_entity or not seg.get("iscrowd", 0)):
                entity[sid] = len(entity) + 1
        entity_lut = np.array([entity.get(int(u), 0) for u in uniq], dtype=np.int32)
        class_lut = np.array(
            [self.ignore_index if u == 0 else self.segment_class(segments[int(u)], png) for u in uniq],
            dtype=np.uint8,
        )
        sample: dict[str, Any] = {"image": image}
        inverse = inverse.reshape(ids.shape)
        if "instances" in self.keys:
            sample["instances"] = entity_lut[inverse]
        if "mask" in self.keys:
            sample["mask"] = class_lut[inverse]
        if "labels" in self.keys:
            sample["labels"] = multi_hot(
                class_lut[class_lut != self.ignore_index].astype(np.int64), self.num_classes
            )
        h, w = image.shape[:2]
        sample["meta"] = {"id": str(info["id"]), "path": str(path), "orig_size": (h, w)}
        return sample
