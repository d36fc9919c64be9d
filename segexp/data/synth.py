"""Synthetic "shapes" dataset: the framework's embedded default data.

Why it exists: every method, reader and metric must be runnable without downloading anything,
and the data must still be hard enough that a colour threshold cannot solve it. Object identity
lives in the *shape* (circle, square, triangle, star, cross); colours and textures of objects and
of the background "stuff" regions come from the same distributions.

Why it writes real formats: the generated set is stored as a VOC2012 tree, COCO instances and
panoptic JSON/PNGs and a SOD (image/mask) tree, so the *real* readers are what the default
configuration exercises. :func:`render_sample` gives the same content in memory, so round-trip
tests can compare what the readers decode with what was drawn.

Styles: ``textured`` (the default, above) and ``plain`` - the same geometry and annotations (image ``i``
of a seed has the same shapes in both) with flat colours for objects and stuff regions.
``plain`` is for short CPU studies of methods that need
a classifier to learn the shapes first (CAM-based WSSS): a from-scratch network separates flat shapes
in minutes, the textured ones take far longer. Identity still lives in the shape only.

Determinism: image ``i`` is drawn from ``np.random.default_rng([seed, i])`` only, so the output
does not depend on how many worker processes generate it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from segexp.data.io import (
    IGNORE_INDEX,
    VOCAnnotation,
    VOCObject,
    id_to_rgb,
    voc_palette,
    write_gray_png,
    write_jpeg,
    write_palette_png,
    write_rgb_png,
    write_voc_xml,
)
from segexp.utils.atomic import write_bytes, write_json, write_text

# Bump whenever the drawn content or the layout changes: an old root then refuses to be reused.
FORMAT_VERSION = 1

CLASS_NAMES = ("background", "circle", "square", "triangle", "star", "cross")
STUFF_NAMES = ("stuff_a", "stuff_b", "stuff_c")
SPLITS = ("train", "val", "test")
OBJECT_TEXTURES = ("flat", "stripes", "checker", "noise")
STYLES = ("textured", "plain")

COMPLETE_MARKER = ".complete.json"
LOCK_FILE = ".lock"
JPEG_QUALITY = 95

MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_EXTENT, MAX_EXTENT = 0.15, 0.45  # object size as a fraction of the image side
MIN_VISIBLE_AREA_AT_128 = 30  # pixels; objects less visible than this are dropped
MIN_COLOUR_DISTANCE = 80.0  # an object's base colour vs the mean colour it covers (RGB, L2)
SUBPIXEL_BITS = 4  # cv2 fixed-point fraction bits, so small shapes keep their geometry
VOC_PALETTE = voc_palette()  # computed once: building it per label PNG costs as much as encoding it


@dataclass
class SynthSample:
    """One drawn image and every annotation derived from it (see the module docstring)."""

    id: str
    image: np.ndarray  # uint8 HxWx3 RGB, before JPEG compression
    semantic: np.ndarray  # uint8 HxW: 0 bg, 1..5 class, 255 void band
    objects: np.ndarray  # uint8 HxW: 0 none, 1..K object index, 255 void band
    instances: np.ndarray  # int32 HxW: 0 none, 1..K object index, no band
    classes: list[int]  # class index (1..5) of object k+1
    boxes: np.ndarray  # float32 Kx4 xyxy, 0-based, xmax/ymax exclusive
    stuff: np.ndarray  # uint8 HxW: stuff region 1..S where no object is, 0 under objects
    stuff_classes: list[int]  # index into STUFF_NAMES of stuff region s+1


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def sample_id(index: int) -> str:
    return f"shapes_{index:06d}"


def band_width(size: int) -> int:
    """Void band half-width in pixels: 1 px at 128 px, scaled so it looks the same at any size."""
    return max(1, round(size / 128))


def min_visible_area(size: int) -> int:
    """Visible-area threshold scaled with the image area, so small renders keep similar objects."""
    return max(8, round(MIN_VISIBLE_AREA_AT_128 * (size / 128) ** 2))


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """The one colour distribution shared by objects and stuff (uniform RGB)."""
    return rng.uniform(0, 255, 3).astype(np.float32)


def _colour_far_from(rng: np.random.Generator, avoid: np.ndarray, tries: int = 8) -> np.ndarray:
    """A random colour that differs from ``avoid``, so an object does not vanish into what it covers.

    Rejection keeps the overall colour distribution symmetric, hence still useless to a threshold.
    """
    colour = _random_colour(rng)
    for _ in range(tries):
        if np.linalg.norm(colour - avoid) >= MIN_COLOUR_DISTANCE:
            break
        colour = _random_colour(rng)
    return colour


def _two_colour_blend(weight: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return first * (1.0 - weight[..., None]) + second * weight[..., None]


def _rotated_coordinates(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = _pixel_grid(size)
    cos, sin = math.cos(angle), math.sin(angle)
    return xs * cos + ys * sin, -xs * sin + ys * cos


def _object_texture(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    """A full-image float RGB texture of one object: flat, hard stripes, checker or noise."""
    kind = OBJECT_TEXTURES[rng.integers(len(OBJECT_TEXTURES))]
    scale = size / 128
    if kind == "flat":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == "noise":
        sigma = rng.uniform(15, 40)
        return base + rng.normal(0, sigma, (size, size, 3)).astype(np.float32)
    other = _random_colour(rng)
    u, v = _rotated_coordinates(size, rng.uniform(0, math.pi))
    if kind == "stripes":
        period = max(2.0, rng.uniform(4, 12) * scale)
        weight = ((u / period) % 1.0 < 0.5).astype(np.float32)
    else:
        cell = max(2.0, rng.uniform(3, 9) * scale)
        weight = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    return _two_colour_blend(weight, base, other)


def _stuff_texture(rng: np.random.Generator, size: int, category: int) -> np.ndarray:
    """A full-image float RGB texture whose *kind* is the stuff category (grain, waves, blotches).

    The category is recognisable from texture, never from colour.
    """
    first, second = _random_colour(rng), _random_colour(rng)
    if STUFF_NAMES[category] == "stuff_a":  # fine grain
        sigma = rng.uniform(8, 25)
        return first + rng.normal(0, sigma, (size, size, 3)).astype(np.float32)
    if STUFF_NAMES[category] == "stuff_b":  # smooth waves
        u, _ = _rotated_coordinates(size, rng.uniform(0, math.pi))
        period = rng.uniform(10, 30) * size / 128
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
        return _two_colour_blend(weight.astype(np.float32), first, second)
    cells = int(rng.integers(3, 7))  # low-frequency blotches
    coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    weight = np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)
    return _two_colour_blend(weight, first, second)


def _renumber_present(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Relabel the non-zero values of ``labels`` to 1..N in increasing order; return the old values."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    for new, old in enumerate(present, 1):
        lut[old] = new
    return lut[labels], present


def _stuff_partition(rng: np.random.Generator, size: int) -> np.ndarray:
    """2-3 background regions, labelled 1..S: a Voronoi split of sites around a random centre,
    bent by a smooth sinusoidal warp so the borders are curves rather than straight lines."""
    count = int(rng.integers(2, 4))
    centre = size * (0.5 + rng.uniform(-0.2, 0.2, 2))
    angles = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(count) / count
    angles = angles + rng.uniform(-0.4, 0.4, count)
    sites = centre + 0.3 * size * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    xs, ys = _pixel_grid(size)
    amplitude = rng.uniform(0.04, 0.12) * size
    freq = rng.uniform(0.5, 2.0, 2) * 2 * math.pi / size
    phase = rng.uniform(0, 2 * math.pi, 2)
    warped_x = xs + amplitude * np.sin(freq[0] * ys + phase[0])
    warped_y = ys + amplitude * np.sin(freq[1] * xs + phase[1])
    dist = (warped_x[None] - sites[:, 0, None, None]) ** 2 + (warped_y[None] - sites[:, 1, None, None]) ** 2
    regions = (np.argmin(dist, axis=0) + 1).astype(np.uint8)
    return _renumber_present(regions)[0]


def _shape_polygon(class_index: int, radius: float, angle: float) -> np.ndarray | None:
    """Vertices (Nx2, centred at 0) of a polygonal class, or None for the circle."""
    name = CLASS_NAMES[class_index]
    if name == "circle":
        return None
    if name == "square":
        thetas = angle + math.pi / 4 + np.arange(4) * math.pi / 2
        radii = np.full(4, radius)
    elif name == "triangle":
        thetas = angle + np.arange(3) * 2 * math.pi / 3
        radii = np.full(3, radius)
    elif name == "star":
        thetas = angle + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    else:  # cross: a plus sign whose arms are 2/3 of the radius wide
        w, r = 0.33 * radius, radius
        corners = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
                   (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]  # fmt: skip
        pts = np.array(corners, dtype=np.float64)
        cos, sin = math.cos(angle), math.sin(angle)
        return pts @ np.array([[cos, sin], [-sin, cos]])
    return np.stack([radii * np.cos(thetas), radii * np.sin(thetas)], axis=1)


def _rasterise_shape(
    size: int, class_index: int, centre: np.ndarray, radius: float, angle: float
) -> np.ndarray:
    """Boolean HxW mask of one shape, drawn with sub-pixel vertex precision and no anti-aliasing."""
    mask = np.zeros((size, size), dtype=np.uint8)
    unit = 1 << SUBPIXEL_BITS
    polygon = _shape_polygon(class_index, radius, angle)
    if polygon is None:
        centre_fixed = tuple(int(round(c * unit)) for c in centre)
        cv2.circle(mask, centre_fixed, int(round(radius * unit)), 1, -1, cv2.LINE_8, SUBPIXEL_BITS)
    else:
        points = np.round((polygon + centre) * unit).astype(np.int32)
        cv2.fillPoly(mask, [points], 1, cv2.LINE_8, SUBPIXEL_BITS)
    return mask.astype(bool)


def _random_shapes(rng: np.random.Generator, size: int) -> list[tuple[int, np.ndarray]]:
    """1-4 (class, mask) pairs in drawing order, random class, scale, rotation and position."""
    shapes = []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        class_index = int(rng.integers(1, len(CLASS_NAMES)))
        radius = rng.uniform(MIN_EXTENT, MAX_EXTENT) * size / 2
        angle = rng.uniform(0, 2 * math.pi)
        centre = rng.uniform(0.1 * size, 0.9 * size, 2)
        shapes.append((class_index, _rasterise_shape(size, class_index, centre, radius, angle)))
    return shapes


def _layer_masks(masks: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Object-index map of masks drawn in order (later ones occlude earlier ones)."""
    index = np.zeros((size, size), dtype=np.int32)
    for k, mask in enumerate(masks, 1):
        index[mask] = k
    return index


def void_band(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` px of a change of object label, as VOC's 255 outline.

    A pixel is in the band iff its (2w+1)^2 neighbourhood holds more than one label, i.e. the
    morphological gradient is non-zero. The image border is not a boundary. Labels must fit
    in 0..255 (cv2 morphology has no int32 support); a synthetic image has at most 4 objects.
    """
    labels = instances.astype(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), dtype=np.uint8)
    return cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)


def _too_small_layers(index: np.ndarray, count: int, min_area: int, width: int) -> set[int]:
    """Layers whose visible area is below ``min_area`` or lies entirely in the void band."""
    band = void_band(index, width)
    small = set()
    for k in range(1, count + 1):
        visible = index == k
        if visible.sum() < min_area or not (visible & ~band).any():
            small.add(k)
    return small


def _visible_shapes(shapes: list[tuple[int, np.ndarray]], size: int) -> list[tuple[int, np.ndarray]]:
    """Drop shapes that are (almost) hidden, until none is: dropping one only uncovers others."""
    kept = list(shapes)
    while kept:
        index = _layer_masks([mask for _, mask in kept], size)
        small = _too_small_layers(index, len(kept), min_visible_area(size), band_width(size))
        if not small:
            break
        kept = [shape for k, shape in enumerate(kept, 1) if k not in small]
    return kept


def _draw_background(
    rng: np.random.Generator, regions: np.ndarray, size: int, style: str = "textured"
) -> tuple[np.ndarray, list[int]]:
    """Paint each stuff region with the texture of a distinct random stuff category (plain: its mean
    colour)."""
    count = int(regions.max())
    categories = [int(c) for c in rng.permutation(len(STUFF_NAMES))[:count]]
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    for region, category in enumerate(categories, 1):
        inside = regions == region
        texture = _stuff_texture(rng, size, category)[inside]  # drawn in both styles: same random stream
        canvas[inside] = texture.mean(axis=0) if style == "plain" else texture
    return canvas, categories


def _draw_objects(
    rng: np.random.Generator, canvas: np.ndarray, masks: Sequence[np.ndarray], style: str = "textured"
) -> None:
    """Paint each object, in order, with a texture (plain: a flat colour) whose base colour differs
    from what it covers."""
    size = canvas.shape[0]
    for mask in masks:
        base = _colour_far_from(rng, canvas[mask].mean(axis=0))
        texture = _object_texture(rng, size, base)[mask]  # drawn in both styles: same geometry after
        canvas[mask] = base if style == "plain" else texture


def tight_boxes(instances: np.ndarray, count: int) -> np.ndarray:
    """Kx4 float32 xyxy boxes (0-based, max exclusive) of the visible pixels of objects 1..K."""
    boxes = np.zeros((count, 4), dtype=np.float32)
    for k in range(1, count + 1):
        ys, xs = np.nonzero(instances == k)
        boxes[k - 1] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


def render_sample(index: int, size: int = 128, seed: int = 0, style: str = "textured") -> SynthSample:
    """Draw image ``index`` of the set generated with ``seed``, with all its annotations."""
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels so the shapes stay recognisable, got {size}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = np.random.default_rng([seed, index])
    regions = _stuff_partition(rng, size)
    canvas, region_categories = _draw_background(rng, regions, size, style)
    kept: list[tuple[int, np.ndarray]] = []
    while not kept:  # the last drawn shape is rarely hidden; redraw the set in that rare case
        kept = _visible_shapes(_random_shapes(rng, size), size)
    masks = [mask for _, mask in kept]
    _draw_objects(rng, canvas, masks, style)

    instances = _layer_masks(masks, size)
    classes = [class_index for class_index, _ in kept]
    band = void_band(instances, band_width(size))
    class_lut = np.array([0, *classes], dtype=np.uint8)
    semantic = class_lut[instances]
    objects = instances.astype(np.uint8)
    semantic[band] = IGNORE_INDEX
    objects[band] = IGNORE_INDEX
    stuff, present = _renumber_present(np.where(instances == 0, regions, 0).astype(np.uint8))
    return SynthSample(
        id=sample_id(index),
        image=np.clip(np.round(canvas), 0, 255).astype(np.uint8),
        semantic=semantic,
        objects=objects,
        instances=instances,
        classes=classes,
        boxes=tight_boxes(instances, len(classes)),
        stuff=stuff,
        stuff_classes=[region_categories[old - 1] for old in present],
    )


# ---------------------------------------------------------------------------------------------
# Annotation formats derived from a sample
# ---------------------------------------------------------------------------------------------


def stuff_category_id(stuff_class: int) -> int:
    """COCO panoptic category id of a stuff category: after the thing ids 1..5."""
    return len(CLASS_NAMES) + stuff_class


def _segment_ids(key: str, count: int) -> list[int]:
    """``count`` distinct panoptic segment ids for ``key``, each with all three RGB bytes non-zero.

    Hash-derived rather than 1..N, so a reader that decodes only the R channel fails loudly.
    """
    ids: list[int] = []
    attempt = 0
    while len(ids) < count:
        digest = hashlib.blake2b(f"{key}/{attempt}".encode(), digest_size=3).digest()
        attempt += 1
        if 0 in digest:
            continue
        segment = digest[0] + 256 * digest[1] + 65536 * digest[2]
        if segment not in ids:
            ids.append(segment)
    return ids


def _xywh(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def panoptic_annotation(sample: SynthSample) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """COCO panoptic segment-id map (int64 HxW, 0 = unlabeled) and its ``segments_info``.

    Things first (object order), then stuff regions. Void-band pixels are unlabeled, so a stuff
    region whose visible pixels all lie in the band (a rare sliver) has no segment.
    """
    band = sample.objects == IGNORE_INDEX
    labelled = [(sample.instances == k) & ~band for k in range(1, len(sample.classes) + 1)]
    categories = list(sample.classes)
    for s, stuff_class in enumerate(sample.stuff_classes, 1):
        labelled.append((sample.stuff == s) & ~band)
        categories.append(stuff_category_id(stuff_class))
    present = [(mask, category) for mask, category in zip(labelled, categories) if mask.any()]
    ids = _segment_ids(sample.id, len(present))
    id_map = np.zeros(sample.instances.shape, dtype=np.int64)
    segments = []
    for segment_id, (mask, category) in zip(ids, present):
        id_map[mask] = segment_id
        segments.append(
            {
                "id": segment_id,
                "category_id": category,
                "area": int(mask.sum()),
                "bbox": _xywh(mask),
                "iscrowd": 0,
            }
        )
    return id_map, segments


def coco_instance_annotations(sample: SynthSample, image_id: int) -> list[dict[str, Any]]:
    """COCO instance annotations (without ``id``) of the full visible masks, RLE-encoded."""
    annotations = []
    for k, (class_index, box) in enumerate(zip(sample.classes, sample.boxes), 1):
        rle = coco_mask.encode(np.asfortranarray((sample.instances == k).astype(np.uint8)))
        x0, y0, x1, y1 = (int(v) for v in box)
        annotations.append(
            {
                "image_id": image_id,
                "category_id": class_index,
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
                "area": int((sample.instances == k).sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
            }
        )
    return annotations


def voc_annotation(sample: SynthSample) -> VOCAnnotation:
    """VOC XML content: 1-based inclusive pixel boxes from the 0-based exclusive ones."""
    height, width = sample.instances.shape
    objects = [
        VOCObject(name=CLASS_NAMES[c], box=(float(x0 + 1), float(y0 + 1), float(x1), float(y1)))
        for c, (x0, y0, x1, y1) in zip(sample.classes, sample.boxes.tolist())
    ]
    return VOCAnnotation(
        filename=f"{sample.id}.jpg", width=width, height=height, objects=objects, segmented=True
    )


# ---------------------------------------------------------------------------------------------
# On-disk layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthLayout:
    """Where every file of a generated root lives (the contract the readers are written against)."""

    root: Path

    @property
    def voc(self) -> Path:
        return self.root / "VOCdevkit" / "VOC2012"

    @property
    def coco(self) -> Path:
        return self.root / "coco"

    @property
    def complete_marker(self) -> Path:
        return self.root / COMPLETE_MARKER

    def voc_jpeg(self, sid: str) -> Path:
        return self.voc / "JPEGImages" / f"{sid}.jpg"

    def voc_class_png(self, sid: str) -> Path:
        return self.voc / "SegmentationClass" / f"{sid}.png"

    def voc_object_png(self, sid: str) -> Path:
        return self.voc / "SegmentationObject" / f"{sid}.png"

    def voc_xml(self, sid: str) -> Path:
        return self.voc / "Annotations" / f"{sid}.xml"

    def voc_split_file(self, split: str) -> Path:
        return self.voc / "ImageSets" / "Segmentation" / f"{split}.txt"

    def coco_jpeg(self, split: str, sid: str) -> Path:
        return self.coco / split / f"{sid}.jpg"

    def coco_instances_json(self, split: str) -> Path:
        return self.coco / "annotations" / f"instances_{split}.json"

    def coco_panoptic_json(self, split: str) -> Path:
        return self.coco / "annotations" / f"panoptic_{split}.json"

    def coco_panoptic_dir(self, split: str) -> Path:
        return self.coco / "annotations" / f"panoptic_{split}"

    def coco_panoptic_png(self, split: str, sid: str) -> Path:
        return self.coco_panoptic_dir(split) / f"{sid}.png"

    def sod_image(self, split: str, sid: str) -> Path:
        return self.root / "SOD" / split / "Image" / f"{sid}.jpg"

    def sod_mask(self, split: str, sid: str) -> Path:
        return self.root / "SOD" / split / "Mask" / f"{sid}.png"


def split_assignment(num_images: int, split_fractions: Sequence[float]) -> list[str]:
    """Split name of each index: ids in index order, the first fraction train, then val, then test."""
    train_end = math.floor(num_images * split_fractions[0] + 0.5)
    val_end = math.floor(num_images * (split_fractions[0] + split_fractions[1]) + 0.5)
    return [
        SPLITS[0] if i < train_end else SPLITS[1] if i < val_end else SPLITS[2] for i in range(num_images)
    ]


def _write_image_files(job: tuple[str, int, int, int, str, str]) -> dict[str, Any]:
    """Render one image, write all its per-image files, return its entries for the COCO JSONs.

    Runs in a worker process, so it takes plain picklable arguments.
    """
    root, index, size, seed, split, style = job
    layout = SynthLayout(Path(root))
    sample = render_sample(index, size, seed, style)
    sid = sample.id
    write_jpeg(layout.voc_jpeg(sid), sample.image, quality=JPEG_QUALITY)
    jpeg_bytes = layout.voc_jpeg(sid).read_bytes()
    write_bytes(layout.coco_jpeg(split, sid), jpeg_bytes)
    write_bytes(layout.sod_image(split, sid), jpeg_bytes)
    write_palette_png(layout.voc_class_png(sid), sample.semantic, VOC_PALETTE)
    write_palette_png(layout.voc_object_png(sid), sample.objects, VOC_PALETTE)
    write_voc_xml(layout.voc_xml(sid), voc_annotation(sample))
    write_gray_png(layout.sod_mask(split, sid), np.where(sample.instances > 0, 255, 0).astype(np.uint8))
    id_map, segments = panoptic_annotation(sample)
    write_rgb_png(layout.coco_panoptic_png(split, sid), id_to_rgb(id_map))

    image_id = index + 1
    height, width = sample.instances.shape
    return {
        "split": split,
        "image": {"id": image_id, "file_name": f"{sid}.jpg", "width": width, "height": height},
        "instances": coco_instance_annotations(sample, image_id),
        "panoptic": {"image_id": image_id, "file_name": f"{sid}.png", "segments_info": segments},
    }


def _thing_categories() -> list[dict[str, Any]]:
    return [{"id": c, "name": CLASS_NAMES[c], "supercategory": "shape"} for c in range(1, len(CLASS_NAMES))]


def _panoptic_categories() -> list[dict[str, Any]]:
    things = [{**category, "isthing": 1} for category in _thing_categories()]
    stuff = [
        {"id": stuff_category_id(s), "name": name, "supercategory": "stuff", "isthing": 0}
        for s, name in enumerate(STUFF_NAMES)
    ]
    return things + stuff


def _write_split_jsons(layout: SynthLayout, split: str, records: list[dict[str, Any]]) -> None:
    """COCO instances and panoptic JSONs of one split; annotation ids count from 1 in index order."""
    images = [r["image"] for r in records]
    instances = [ann for r in records for ann in r["instances"]]
    instances = [{"id": n, **ann} for n, ann in enumerate(instances, 1)]
    instances_json = {"images": images, "annotations": instances, "categories": _thing_categories()}
    panoptic_json = {
        "images": images,
        "annotations": [r["panoptic"] for r in records],
        "categories": _panoptic_categories(),
    }
    write_json(layout.coco_instances_json(split), instances_json, indent=None)
    write_json(layout.coco_panoptic_json(split), panoptic_json, indent=None)
    layout.coco_panoptic_dir(split).mkdir(parents=True, exist_ok=True)  # exists even for an empty split


def _write_split_files(layout: SynthLayout, split_ids: dict[str, list[str]]) -> None:
    lists = {**split_ids, "trainval": split_ids["train"] + split_ids["val"]}
    for name, ids in lists.items():
        write_text(layout.voc_split_file(name), "".join(f"{sid}\n" for sid in ids))


def _render_all(jobs: list[tuple[str, int, int, int, str, str]], workers: int) -> list[dict[str, Any]]:
    """Run the per-image jobs, in a process pool when ``workers > 1``; results keep index order.

    The pool uses 'spawn' so a parent with live threads (Lightning, torch, loggers) cannot deadlock it.
    """
    if workers <= 1:
        return [_write_image_files(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    chunk = max(1, len(jobs) // (workers * 8))
    with context.Pool(workers, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        return list(pool.imap(_write_image_files, jobs, chunksize=chunk))


def _generate(layout: SynthLayout, params: dict[str, Any], workers: int) -> None:
    """Write every file of the set, then the completion marker last."""
    splits = split_assignment(params["num_images"], params["split_fractions"])
    jobs = [
        (str(layout.root), index, params["size"], params["seed"], split, params.get("style", "textured"))
        for index, split in enumerate(splits)
    ]
    records = _render_all(jobs, workers)
    split_ids: dict[str, list[str]] = {}
    for split in SPLITS:
        split_records = [r for r in records if r["split"] == split]
        split_ids[split] = [Path(r["image"]["file_name"]).stem for r in split_records]
        _write_split_jsons(layout, split, split_records)
    _write_split_files(layout, split_ids)
    marker = {
        **params,
        "class_names": list(CLASS_NAMES),
        "stuff_names": list(STUFF_NAMES),
        "split_sizes": {split: len(ids) for split, ids in split_ids.items()},
    }
    write_json(layout.complete_marker, marker)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _requested_params(
    num_images: int, size: int, seed: int, split_fractions: Sequence[float], style: str = "textured"
) -> dict[str, Any]:
    """Validated generation parameters, in the form recorded in the completion marker (``style``
    only when not the default, so roots written before styles existed stay valid)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}"
        )
    return {
        "format_version": FORMAT_VERSION,
        "num_images": int(num_images),
        "size": int(size),
        "seed": int(seed),
        "split_fractions": fractions,
        **({"style": style} if style != "textured" else {}),
    }


def _is_complete(marker: Path, params: dict[str, Any]) -> bool:
    """True if ``marker`` records exactly ``params``; an existing marker that differs is an error."""
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{marker}: unreadable completion marker ({exc}); choose another root") from exc
    recorded = {"style": "textured", **recorded}  # markers omit the default style
    differing = [
        f"{key}={recorded.get(key)!r} (requested {value!r})"
        for key, value in {"style": "textured", **params}.items()
        if recorded.get(key) != value
    ]
    if differing:
        raise ValueError(
            f"{marker}: this root holds a synthetic set generated with other parameters: "
            f"{', '.join(differing)}. Choose another root (or delete this one)."
        )
    return True


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` so concurrent generators of one root take turns."""
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def ensure_synthetic(
    root: str | os.PathLike,
    num_images: int = 500,
    size: int = 128,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    workers: int | None = None,
    style: str = "textured",
) -> Path:
    """Generate the synthetic set under ``root`` unless it is already complete; return ``root``.

    A complete root with the same parameters returns at once; one with other parameters raises
    ``ValueError`` (stale data is never served). An interrupted generation is overwritten.
    ``workers`` only changes speed, never the output.
    """
    root = Path(root)
    layout = SynthLayout(root)
    params = _requested_params(num_images, size, seed, split_fractions, style)
    if _is_complete(layout.complete_marker, params):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / LOCK_FILE):
        if not _is_complete(layout.complete_marker, params):  # another process may have just finished
            _generate(layout, params, default_workers() if workers is None else workers)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segexp.data.synth",
        description="Generate the synthetic shapes dataset (VOC, COCO instances/panoptic and SOD layouts).",
    )
    parser.add_argument("root", type=Path, help="output directory (reused if already complete)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar="F")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cpu count))")
    parser.add_argument("--style", choices=STYLES, default="textured", help="plain = flat colours")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = ensure_synthetic(
            args.root, args.num_images, args.size, args.seed, args.split_fractions, args.workers, args.style
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{root} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
