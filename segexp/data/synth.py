"""Synthetic "shapes" dataset: the framework's embedded default data and its mechanism testbed.

Why it exists: every method, reader and metric must be runnable without downloading anything, and a
from-scratch network on 2 CPU cores must *learn* it in minutes, so that each paper's mechanism can be
seen at work. Object identity lives in the *shape* (circle, square, triangle, star, cross); what else
is drawn - outlines, contrast, object count and size, occlusion, and one switchable mechanism per
paper (co-occurring background, discriminative badge, box clutter, wrong saliency labels) - is a
:class:`segexp.data.testbed.Testbed`. ``testbed.LEGACY`` is the format-1 rendering, where colour and
texture of objects and stuff come from one distribution.

Why it writes real formats: the generated set is stored as a VOC2012 tree, COCO instances and
panoptic JSON/PNGs and a SOD (image/mask) tree, so the *real* readers are what the default
configuration exercises. :func:`render_sample` gives the same content in memory, so round-trip
tests can compare what the readers decode with what was drawn.

Determinism: image ``i`` is drawn from ``np.random.default_rng([seed, i])`` (each mechanism from a
stream of its own, ``[seed, i, stream]``), so the output does not depend on how many worker
processes generate it, and switching a mechanism on keeps the base scene.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from segexp.data import mechanisms
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
from segexp.data.testbed import FIXED_STUFF, LEGACY, MECHANISMS, SHAPE_CLASSES, STYLES, Testbed
from segexp.utils.atomic import write_bytes, write_json, write_text

_logger = logging.getLogger(__name__)

# Bump whenever the drawn content or the layout changes: an old root then refuses to be reused.
# 2: testbed knobs and mechanisms; the default rendering is the learnable one.
FORMAT_VERSION = 2

CLASS_NAMES = ("background", *SHAPE_CLASSES)  # identity lives in the shape
RANDOM_STUFF = ("stuff_a", "stuff_b", "stuff_c")  # random colours; the kind is the texture
STUFF_NAMES = RANDOM_STUFF + FIXED_STUFF
SPLITS = ("train", "val", "test")
OBJECT_TEXTURES = ("flat", "stripes", "checker", "noise")
__all__ = [
    "CLASS_NAMES",
    "STUFF_NAMES",
    "STYLES",
    "SynthSample",
    "Testbed",
    "ensure_synthetic",
    "render_sample",
]

COMPLETE_MARKER = ".complete.json"
SOD_NOISE_RECORD = "noise.json"  # SOD/train/noise.json: which training masks were corrupted, and how
LOCK_FILE = ".lock"
JPEG_QUALITY = 95

MIN_VISIBLE_AREA_AT_128 = 30  # pixels; objects less visible than this are dropped
SUBPIXEL_BITS = 4  # cv2 fixed-point fraction bits, so small shapes keep their geometry
PLACEMENT_TRIES = 30  # redraws of a shape that would hide too much of an earlier one
OUTLINE_COLOUR = 16.0  # the dark contour of the `outline_px` knob
BRIGHT_OBJECT, DARK_STUFF = (140.0, 255.0), 0.45  # `figure_contrast: bright`
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
    bodies: list[str] = field(default_factory=list)  # parts: body sub-type of object k+1
    badges: np.ndarray | None = None  # parts: int32 HxW, k where object k's badge is visible
    counterfactual: str | None = None  # cooc: "class_without_stuff" | "stuff_without_class"


@dataclass
class _Shape:
    """One object's drawing parameters (the mask is rasterised from them)."""

    class_index: int
    centre: np.ndarray
    radius: float
    angle: float
    mask: np.ndarray
    body: str | None = None
    badge: np.ndarray | None = None  # bool HxW, parts only


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


def _object_colour(
    rng: np.random.Generator, testbed: Testbed, avoid: np.ndarray, tries: int = 8
) -> np.ndarray:
    """An object colour that differs from ``avoid`` (what it covers), so it does not vanish into it.

    ``figure_contrast: none``: uniform RGB with rejection, symmetric with the stuff colours and so
    useless to a threshold. ``bright``: every channel in [140, 255] over stuff darkened x0.45.
    """
    bright = testbed.figure_contrast == "bright"
    for _ in range(tries + 1):
        colour = rng.uniform(*BRIGHT_OBJECT, 3).astype(np.float32) if bright else _random_colour(rng)
        if np.linalg.norm(colour - avoid) >= testbed.min_contrast:
            break
    return colour


def _two_colour_blend(weight: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return first * (1.0 - weight[..., None]) + second * weight[..., None]


def _rotated_coordinates(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = _pixel_grid(size)
    cos, sin = math.cos(angle), math.sin(angle)
    return xs * cos + ys * sin, -xs * sin + ys * cos


def _object_texture(rng: np.random.Generator, size: int, base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """A full-image float RGB texture of one object: flat, hard stripes, checker or noise."""
    kind = OBJECT_TEXTURES[rng.integers(len(OBJECT_TEXTURES))]
    scale = size / 128
    if kind == "flat":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == "noise":
        sigma = rng.uniform(15, 40)
        return base + rng.normal(0, sigma, (size, size, 3)).astype(np.float32)
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


def _draw_shape(rng: np.random.Generator, size: int, testbed: Testbed, class_index: int) -> _Shape:
    """Random scale, rotation and position of one object of ``class_index`` (parts: body + badge)."""
    radius = rng.uniform(*testbed.extent) * size / 2
    angle = rng.uniform(0, 2 * math.pi)
    margin = 1.06 * radius + 1 if testbed.inside_frame else 0.1 * size  # a cross reaches 1.053 radii
    centre = rng.uniform(margin, size - margin, 2) if margin < size / 2 else np.full(2, size / 2)
    if testbed.parts is None:
        return _Shape(
            class_index, centre, radius, angle, _rasterise_shape(size, class_index, centre, radius, angle)
        )
    bodies = testbed.parts.bodies_of(class_index)
    body = bodies[int(rng.integers(len(bodies)))]
    badge_radius = rng.uniform(*testbed.parts.badge_scale) * radius
    where = mechanisms.badge_centre(rng, body, centre, radius, badge_radius, angle)
    badge = _rasterise_shape(size, class_index, where, badge_radius, rng.uniform(0, 2 * math.pi))
    mask = mechanisms.body_mask(size, body, centre, radius, angle) | badge
    return _Shape(class_index, centre, radius, angle, mask, body, badge)


def _hides_too_much(new: _Shape, earlier: list[_Shape], covered: list[np.ndarray], testbed: Testbed) -> bool:
    """Would ``new`` hide more than ``max_occlusion`` of an earlier object, or any of its badge?"""
    for shape, cover in zip(earlier, covered):
        hidden = (cover | new.mask) & shape.mask
        if hidden.sum() > testbed.max_occlusion * shape.mask.sum():
            return True
        if shape.badge is not None and (new.mask & shape.badge).any():
            return True
    return False


def _random_shapes(
    rng: np.random.Generator, size: int, testbed: Testbed, pick_class: Any = None
) -> list[_Shape]:
    """count objects in drawing order; a later one may hide at most ``max_occlusion`` of earlier ones
    (a shape that cannot be placed after a few tries is left out). ``pick_class(k, drawn)`` may change
    the class drawn for object k (the co-occurrence mechanism's counterfactuals)."""
    shapes: list[_Shape] = []
    covered: list[np.ndarray] = []
    for k in range(int(rng.integers(testbed.count[0], testbed.count[1] + 1))):
        class_index = int(rng.integers(1, len(CLASS_NAMES)))
        if pick_class is not None:
            class_index = pick_class(k, class_index)
        shape = _draw_shape(rng, size, testbed, class_index)
        if testbed.max_occlusion < 1.0:
            tries = 1
            while _hides_too_much(shape, shapes, covered, testbed) and tries < PLACEMENT_TRIES:
                shape, tries = _draw_shape(rng, size, testbed, class_index), tries + 1
            if tries == PLACEMENT_TRIES and _hides_too_much(shape, shapes, covered, testbed):
                continue
        covered = [cover | shape.mask for cover in covered] + [np.zeros_like(shape.mask)]
        shapes.append(shape)
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
    in 0..255 (cv2 morphology has no int32 support); a synthetic image has at most 8 objects.
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


def _visible_shapes(shapes: list[_Shape], size: int) -> list[_Shape]:
    """Drop shapes that are (almost) hidden, until none is: dropping one only uncovers others."""
    kept = list(shapes)
    while kept:
        index = _layer_masks([shape.mask for shape in kept], size)
        small = _too_small_layers(index, len(kept), min_visible_area(size), band_width(size))
        if not small:
            break
        kept = [shape for k, shape in enumerate(kept, 1) if k not in small]
    return kept


def _draw_background(
    rng: np.random.Generator, regions: np.ndarray, size: int, testbed: Testbed
) -> tuple[np.ndarray, list[int]]:
    """Paint each stuff region with the texture of a distinct random stuff category (plain: its mean
    colour)."""
    count = int(regions.max())
    categories = [int(c) for c in rng.permutation(len(RANDOM_STUFF))[:count]]
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    for region, category in enumerate(categories, 1):
        inside = regions == region
        texture = _stuff_texture(rng, size, category)[inside]  # drawn in both styles: same random stream
        canvas[inside] = texture.mean(axis=0) if testbed.style == "plain" else texture
    return canvas, categories


def _paint_fixed_stuff(
    rng: np.random.Generator, regions: np.ndarray, kinds: list[str]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Background made of the fixed-appearance stuffs ``kinds`` (one: all of it; two: alternate regions).

    Returns the canvas, the (possibly merged) regions and their stuff categories."""
    size = regions.shape[0]
    merged = ((regions.astype(np.int32) - 1) % len(kinds) + 1).astype(np.uint8)
    merged, present = _renumber_present(merged)
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    categories = []
    for region, old in enumerate(present, 1):
        kind = kinds[old - 1]
        canvas[merged == region] = mechanisms.fixed_stuff_texture(rng, size, kind)[merged == region]
        categories.append(STUFF_NAMES.index(kind))
    return canvas, merged, categories


def _draw_objects(
    rng: np.random.Generator, canvas: np.ndarray, shapes: Sequence[_Shape], testbed: Testbed
) -> list[np.ndarray]:
    """Paint each object, in order, with a texture (plain: a flat colour) whose base colour differs
    from what it covers; a parts object's badge gets a colour of its own. Returns the base colours."""
    size = canvas.shape[0]
    bases = []
    for shape in shapes:
        base = _object_colour(rng, testbed, canvas[shape.mask].mean(axis=0))
        other = (
            _object_colour(rng, testbed, base) if testbed.figure_contrast == "bright" else _random_colour(rng)
        )
        texture = _object_texture(rng, size, base, other)[shape.mask]  # drawn in both styles: same stream
        canvas[shape.mask] = base if testbed.style == "plain" else texture
        if shape.badge is not None:
            canvas[shape.badge] = _object_colour(rng, testbed, base)
        bases.append(base)
    return bases


def _draw_outlines(canvas: np.ndarray, instances: np.ndarray, badges: np.ndarray | None, width: int) -> None:
    """Darken a ``width``-px contour inside every visible object (and badge): a shape cue that needs no
    colour invariance."""
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    for labels in (instances, badges) if badges is not None else (instances,):
        for k in range(1, int(labels.max()) + 1):
            inside = (labels == k).astype(np.uint8)
            canvas[(inside > 0) & (cv2.erode(inside, kernel, borderValue=0) == 0)] = OUTLINE_COLOUR


def tight_boxes(instances: np.ndarray, count: int) -> np.ndarray:
    """Kx4 float32 xyxy boxes (0-based, max exclusive) of the visible pixels of objects 1..K."""
    boxes = np.zeros((count, 4), dtype=np.float32)
    for k in range(1, count + 1):
        ys, xs = np.nonzero(instances == k)
        boxes[k - 1] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


class _CoocPlan:
    """Co-occurrence decisions of one image, from the mechanism's own stream."""

    def __init__(self, testbed: Testbed, seed: int, index: int, split: str):
        spec = testbed.cooc
        self.rng = np.random.default_rng([seed, index, mechanisms.COOC_STREAM])
        self.pairs = {CLASS_NAMES.index(c): s for c, s in spec.pairs.items()}
        self.spec = spec
        self.counterfactual = None
        if split == spec.counterfactual_split:
            self.counterfactual = "class_without_stuff" if self.rng.uniform() < 0.5 else "stuff_without_class"
        self.unpaired = [c for c in range(1, len(CLASS_NAMES)) if c not in self.pairs]

    def pick_class(self, k: int, drawn: int) -> int:
        if self.counterfactual == "class_without_stuff" and k == 0:
            return sorted(self.pairs)[int(self.rng.integers(len(self.pairs)))]
        if self.counterfactual == "stuff_without_class" and drawn in self.pairs:
            return self.unpaired[int(self.rng.integers(len(self.unpaired)))]
        return drawn

    def stuffs(self, classes: list[int]) -> list[str]:
        """The fixed stuffs this image's background is made of (empty: the random stuffs)."""
        if self.counterfactual == "class_without_stuff":
            return []
        stuffs = sorted(set(self.pairs.values()))
        if self.counterfactual == "stuff_without_class":
            return [stuffs[int(self.rng.integers(len(stuffs)))]]
        on = []
        for stuff in stuffs:
            has_class = any(self.pairs.get(c) == stuff for c in classes)
            if self.rng.uniform() < (self.spec.p if has_class else self.spec.q):
                on.append(stuff)
        return on


def render_sample(
    index: int,
    size: int = 64,
    seed: int = 0,
    testbed: Testbed | Mapping[str, Any] | None = None,
    split: str = "train",
) -> SynthSample:
    """Draw image ``index`` of the set generated with ``seed``, with all its annotations.

    ``split`` matters only to mechanisms that treat one split apart (cooc's counterfactual split).
    """
    testbed = Testbed.from_dict(testbed)
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels so the shapes stay recognisable, got {size}")
    rng = np.random.default_rng([seed, index])
    regions = _stuff_partition(rng, size)
    canvas, region_categories = _draw_background(rng, regions, size, testbed)
    cooc = _CoocPlan(testbed, seed, index, split) if testbed.cooc is not None else None
    kept: list[_Shape] = []
    while not kept:  # the last drawn shape is rarely hidden; redraw the set in that rare case
        kept = _visible_shapes(_random_shapes(rng, size, testbed, cooc and cooc.pick_class), size)
    classes = [shape.class_index for shape in kept]
    fixed = cooc.stuffs(classes) if cooc is not None else []
    if fixed:
        canvas, regions, region_categories = _paint_fixed_stuff(cooc.rng, regions, fixed)
    if testbed.figure_contrast == "bright":
        canvas *= DARK_STUFF
    bases = _draw_objects(rng, canvas, kept, testbed)

    instances = _layer_masks([shape.mask for shape in kept], size)
    boxes = tight_boxes(instances, len(classes))
    if testbed.clutter is not None:
        clutter_rng = np.random.default_rng([seed, index, mechanisms.CLUTTER_STREAM])
        radii = [shape.radius for shape in kept]
        for k, blob in mechanisms.clutter_blobs(clutter_rng, testbed.clutter, instances, boxes, radii):
            canvas[blob] = mechanisms.near_colour(clutter_rng, bases[k - 1], testbed.clutter.colour_distance)
    badges = None
    if testbed.parts is not None:
        badges = np.zeros((size, size), dtype=np.int32)
        for k, shape in enumerate(kept, 1):
            badges[shape.badge & (instances == k)] = k
    if testbed.outline_px:
        _draw_outlines(canvas, instances, badges, testbed.outline_px)

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
        boxes=boxes,
        stuff=stuff,
        stuff_classes=[region_categories[old - 1] for old in present],
        bodies=[shape.body for shape in kept] if testbed.parts is not None else [],
        badges=badges,
        counterfactual=cooc.counterfactual if cooc is not None else None,
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


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_instance_annotations(sample: SynthSample, image_id: int) -> list[dict[str, Any]]:
    """COCO instance annotations (without ``id``) of the full visible masks, RLE-encoded.

    Parts sets add ``attributes: {body, badge}`` (LVIS/Open Images style extra fields that COCO
    tools ignore): the body sub-type, for SC-CAM's cluster purity, and the visible badge's RLE.
    """
    annotations = []
    for k, (class_index, box) in enumerate(zip(sample.classes, sample.boxes), 1):
        x0, y0, x1, y1 = (int(v) for v in box)
        annotation = {
            "image_id": image_id,
            "category_id": class_index,
            "segmentation": _rle(sample.instances == k),
            "area": int((sample.instances == k).sum()),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": 0,
        }
        if sample.badges is not None:
            annotation["attributes"] = {"body": sample.bodies[k - 1], "badge": _rle(sample.badges == k)}
        annotations.append(annotation)
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

    @property
    def sod_noise_record(self) -> Path:
        return self.root / "SOD" / SPLITS[0] / SOD_NOISE_RECORD


def split_assignment(num_images: int, split_fractions: Sequence[float]) -> list[str]:
    """Split name of each index: ids in index order, the first fraction train, then val, then test."""
    train_end = math.floor(num_images * split_fractions[0] + 0.5)
    val_end = math.floor(num_images * (split_fractions[0] + split_fractions[1]) + 0.5)
    return [
        SPLITS[0] if i < train_end else SPLITS[1] if i < val_end else SPLITS[2] for i in range(num_images)
    ]


def _write_image_files(job: tuple[str, int, int, int, str, dict[str, Any]]) -> dict[str, Any]:
    """Render one image, write all its per-image files, return its entries for the COCO JSONs.

    Runs in a worker process, so it takes plain picklable arguments.
    """
    root, index, size, seed, split, testbed_dict = job
    layout = SynthLayout(Path(root))
    testbed = Testbed.from_dict(testbed_dict)
    sample = render_sample(index, size, seed, testbed, split)
    sid = sample.id
    write_jpeg(layout.voc_jpeg(sid), sample.image, quality=JPEG_QUALITY)
    jpeg_bytes = layout.voc_jpeg(sid).read_bytes()
    write_bytes(layout.coco_jpeg(split, sid), jpeg_bytes)
    write_bytes(layout.sod_image(split, sid), jpeg_bytes)
    write_palette_png(layout.voc_class_png(sid), sample.semantic, VOC_PALETTE)
    write_palette_png(layout.voc_object_png(sid), sample.objects, VOC_PALETTE)
    write_voc_xml(layout.voc_xml(sid), voc_annotation(sample))
    sod_mask, noise = sod_mask_of(sample, testbed, seed, index, split)
    write_gray_png(layout.sod_mask(split, sid), sod_mask)
    id_map, segments = panoptic_annotation(sample)
    write_rgb_png(layout.coco_panoptic_png(split, sid), id_to_rgb(id_map))

    image_id = index + 1
    height, width = sample.instances.shape
    return {
        "split": split,
        "image": {"id": image_id, "file_name": f"{sid}.jpg", "width": width, "height": height},
        "instances": coco_instance_annotations(sample, image_id),
        "panoptic": {"image_id": image_id, "file_name": f"{sid}.png", "segments_info": segments},
        "sod_noise": noise,
        "counterfactual": sample.counterfactual,
    }


def body_subtypes(root: str | os.PathLike, split: str) -> dict[str, list[str]]:
    """Per image of a part-set ``split``: each thing class's body sub-type ('' where absent), read from
    the root's COCO instances (``attributes.body``); where a class appears twice, its largest object's.

    SC-CAM's clusters are scored against these (:func:`segexp.metrics.testbed.subtype_purity`).
    """
    layout = SynthLayout(Path(root))
    instances = json.loads(layout.coco_instances_json(split).read_text())
    names = {im["id"]: Path(im["file_name"]).stem for im in instances["images"]}
    table = {name: [""] * (len(CLASS_NAMES) - 1) for name in names.values()}
    for ann in sorted(instances["annotations"], key=lambda a: a["area"]):  # the largest object last
        body = (ann.get("attributes") or {}).get("body")
        if body is None:
            raise ValueError(f"{layout.coco_instances_json(split)}: no body sub-types (not a part set)")
        table[names[ann["image_id"]]][ann["category_id"] - 1] = body
    return table


def sod_mask_of(
    sample: SynthSample, testbed: Testbed, seed: int, index: int, split: str
) -> tuple[np.ndarray, str | None]:
    """The SOD mask written for a sample (0/255) and the saliency error in it (train split only)."""
    if testbed.sod_noise is None or split != SPLITS[0]:
        return np.where(sample.instances > 0, 255, 0).astype(np.uint8), None
    rng = np.random.default_rng([seed, index, mechanisms.SOD_NOISE_STREAM])
    return mechanisms.corrupt_saliency(rng, testbed.sod_noise, sample.instances, sample.stuff)


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


def _render_all(
    jobs: list[tuple[str, int, int, int, str, dict[str, Any]]], workers: int
) -> list[dict[str, Any]]:
    """Run the per-image jobs, in a process pool when ``workers > 1``; results keep index order.

    Logs progress every few seconds (a large set takes minutes). The pool uses 'spawn' so a parent
    with live threads (Lightning, torch, loggers) cannot deadlock it.
    """
    if workers <= 1:
        return _with_progress(map(_write_image_files, jobs), len(jobs))
    context = multiprocessing.get_context("spawn")
    chunk = max(1, min(16, len(jobs) // (workers * 8)))
    with context.Pool(workers, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        return _with_progress(pool.imap(_write_image_files, jobs, chunksize=chunk), len(jobs))


def _with_progress(
    results: Iterator[dict[str, Any]], total: int, every_s: float = 5.0
) -> list[dict[str, Any]]:
    start = last = time.perf_counter()
    done = []
    for result in results:
        done.append(result)
        now = time.perf_counter()
        if now - last >= every_s and len(done) < total:
            rate = len(done) / (now - start)
            _logger.info(
                "synthetic set: %d/%d images (%.0f/s, ~%.0f s left)",
                len(done),
                total,
                rate,
                (total - len(done)) / rate,
            )
            last = now
    return done


def _generate(layout: SynthLayout, params: dict[str, Any], workers: int) -> None:
    """Write every file of the set, then the completion marker last."""
    splits = split_assignment(params["num_images"], params["split_fractions"])
    jobs = [
        (str(layout.root), index, params["size"], params["seed"], split, params["testbed"])
        for index, split in enumerate(splits)
    ]
    start = time.perf_counter()
    _logger.info("generating %d synthetic images under %s (%d processes)", len(jobs), layout.root, workers)
    records = _render_all(jobs, workers)
    split_ids: dict[str, list[str]] = {}
    for split in SPLITS:
        split_records = [r for r in records if r["split"] == split]
        split_ids[split] = [Path(r["image"]["file_name"]).stem for r in split_records]
        _write_split_jsons(layout, split, split_records)
    _write_split_files(layout, split_ids)
    if params["testbed"]["sod_noise"] is not None:
        noise = {
            Path(r["image"]["file_name"]).stem: r["sod_noise"] for r in records if r["split"] == SPLITS[0]
        }
        write_json(layout.sod_noise_record, noise)
    marker = {
        **params,
        "class_names": list(CLASS_NAMES),
        "stuff_names": list(STUFF_NAMES),
        "split_sizes": {split: len(ids) for split, ids in split_ids.items()},
        "counterfactuals": {
            kind: sum(r["counterfactual"] == kind for r in records)
            for kind in ("class_without_stuff", "stuff_without_class")
        },
    }
    write_json(layout.complete_marker, marker)
    _logger.info("synthetic set written in %.1f s", time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _requested_params(
    num_images: int,
    size: int,
    seed: int,
    split_fractions: Sequence[float],
    testbed: Testbed | Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Validated generation parameters, in the form recorded in the completion marker."""
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
        "testbed": Testbed.from_dict(testbed).to_dict(),
    }


def _is_complete(marker: Path, params: dict[str, Any]) -> bool:
    """True if ``marker`` records exactly ``params``; an existing marker that differs is an error."""
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{marker}: unreadable completion marker ({exc}); choose another root") from exc
    differing = [
        f"{key}={recorded.get(key)!r} (requested {value!r})"
        for key, value in params.items()
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
    size: int = 64,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    workers: int | None = None,
    testbed: Testbed | Mapping[str, Any] | None = None,
) -> Path:
    """Generate the synthetic set under ``root`` unless it is already complete; return ``root``.

    ``testbed``: a :class:`Testbed` or a (partial) mapping of its fields; None = the defaults.
    A complete root with the same parameters returns at once; one with other parameters raises
    ``ValueError`` (stale data is never served). An interrupted generation is overwritten.
    ``workers`` only changes speed, never the output.
    """
    root = Path(root)
    layout = SynthLayout(root)
    params = _requested_params(num_images, size, seed, split_fractions, testbed)
    if _is_complete(layout.complete_marker, params):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / LOCK_FILE):
        if not _is_complete(layout.complete_marker, params):  # another process may have just finished
            _generate(layout, params, default_workers() if workers is None else workers)
    return root


def _testbed_from_args(args: argparse.Namespace) -> Testbed:
    values: dict[str, Any] = {
        "style": args.style,
        "outline_px": args.outline_px,
        "figure_contrast": args.figure_contrast,
        "count": args.count,
        "extent": args.extent,
        "max_occlusion": args.max_occlusion,
        "inside_frame": args.inside_frame,
        "min_contrast": args.min_contrast,
    }
    values = {k: v for k, v in values.items() if v is not None}
    values.update({name: {} for name in args.mechanism})
    for name, overrides in json.loads(args.mechanism_json).items():
        values[name] = {**values.get(name, {}), **overrides}
    base = LEGACY.to_dict() if args.legacy else {}
    return Testbed.from_dict({**base, **values})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segexp.data.synth",
        description="Generate the synthetic shapes dataset / mechanism testbed (VOC, COCO instances/panoptic "
        "and SOD layouts). Knobs left out keep segexp.data.testbed.Testbed's defaults.",
    )
    parser.add_argument("root", type=Path, help="output directory (reused if already complete)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar="F")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cpu count))")
    knobs = parser.add_argument_group("learnability knobs")
    knobs.add_argument("--legacy", action="store_true", help="start from the format-1 rendering (textured, "
                       "colour-neutral, 1-4 objects) instead of the learnable defaults")  # fmt: skip
    knobs.add_argument("--style", choices=STYLES, help="plain = flat colours")
    knobs.add_argument("--outline-px", type=int, help="dark contour width inside each object (0 = none)")
    knobs.add_argument("--figure-contrast", choices=("none", "bright"))
    knobs.add_argument("--count", type=int, nargs=2, metavar=("MIN", "MAX"), help="objects per image")
    knobs.add_argument(
        "--extent", type=float, nargs=2, metavar=("MIN", "MAX"), help="object size / image side"
    )
    knobs.add_argument("--max-occlusion", type=float, help="largest hidden fraction of an object (1 = any)")
    knobs.add_argument("--inside-frame", action=argparse.BooleanOptionalAction, default=None)
    knobs.add_argument("--min-contrast", type=float, help="RGB distance of an object from what it covers")
    mech = parser.add_argument_group("mechanisms")
    mech.add_argument("--mechanism", action="append", default=[], choices=MECHANISMS,
                      help="switch a mechanism on with its defaults (repeatable)")  # fmt: skip
    mech.add_argument("--mechanism-json", default="{}", metavar="JSON",
                      help='mechanism settings, e.g. {"cooc": {"p": 0.8}} (switches them on)')  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        testbed = _testbed_from_args(args)
        root = ensure_synthetic(
            args.root, args.num_images, args.size, args.seed, args.split_fractions, args.workers, testbed
        )
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{root} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
