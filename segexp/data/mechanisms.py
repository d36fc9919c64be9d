"""Drawing primitives of the testbed's mechanisms (see :mod:`segexp.data.testbed` for what each is for).

Each function takes its own random generator: a mechanism draws from a stream of its own
(``default_rng([seed, index, STREAM])``), so switching it on never changes the geometry and colours
that the base stream draws, and a with/without comparison sees the same scenes.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from segexp.data.testbed import Clutter, SodNoise

# Separate random streams per mechanism (the base drawing uses default_rng([seed, index])).
COOC_STREAM, CLUTTER_STREAM, SOD_NOISE_STREAM = 2, 3, 4

# Fixed-appearance stuff: (hue in degrees, wave axis, wave period range in px at 64 px).
_FIXED_STUFF_LOOK = {"water": (210.0, "horizontal", (6.0, 10.0)), "grass": (110.0, "vertical", (3.0, 5.0))}
_HUE_JITTER = 12.0


def fixed_stuff_texture(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Full-image float RGB of a fixed-appearance stuff: one hue (+-12 deg) and waves along one axis.

    Its identity is the hue and the wave orientation, so a classifier can tie it to a class.
    """
    hue, axis, (low, high) = _FIXED_STUFF_LOOK[kind]
    h = ((hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 360) / 360
    rgb = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.55, 0.8), rng.uniform(0.6, 0.85)), np.float32) * 255
    period = rng.uniform(low, high) * size / 64
    coord = np.arange(size, dtype=np.float32)
    wave = 0.8 + 0.2 * np.sin(2 * math.pi * coord / period + rng.uniform(0, 2 * math.pi))
    shade = wave[:, None] if axis == "horizontal" else wave[None, :]
    return np.broadcast_to(shade, (size, size))[..., None] * rgb


# Half-disc body: its straight edge's midpoint sits HALF_OFFSET R behind the centre and its radius is
# HALF_RADIUS R, so every point stays within R of the centre (sqrt(0.3^2 + 0.95^2) < 1), as for all bodies.
HALF_RADIUS, HALF_OFFSET = 0.95, 0.3
PLATE_HALF_SIDE = 0.7  # x R: the square's corners stay within R of the centre


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def body_mask(size: int, body: str, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Boolean mask of a body, all within ``radius`` of ``centre``: disc (radius R), bar (2R x R,
    rounded), ring (R, hole R/2), plate (square of side 1.4R) or half (half-disc of radius 0.95R)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    c = (float(centre[0]), float(centre[1]))
    if body == "disc":
        cv2.ellipse(mask, (c, (2 * radius, 2 * radius), 0.0), 1, -1)
    elif body == "ring":
        cv2.ellipse(mask, (c, (2 * radius, 2 * radius), 0.0), 1, -1)
        cv2.ellipse(mask, (c, (radius, radius), 0.0), 0, -1)
    elif body == "plate":
        side = 2 * PLATE_HALF_SIDE * radius
        corners = cv2.boxPoints((c, (side, side), math.degrees(angle)))
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    elif body == "half":  # the half of a disc on the side `angle` points to
        base = centre - HALF_OFFSET * radius * _unit(angle)
        arc = np.linspace(angle - math.pi / 2, angle + math.pi / 2, 48)
        points = base + HALF_RADIUS * radius * np.stack([np.cos(arc), np.sin(arc)], axis=1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    else:  # bar: a rounded rectangle of half-length R and half-width R/2
        half = radius / 2
        direction = _unit(angle)
        ends = [centre + (radius - half) * direction, centre - (radius - half) * direction]
        for end in ends:
            cv2.ellipse(mask, ((float(end[0]), float(end[1])), (2 * half, 2 * half), 0.0), 1, -1)
        box = cv2.boxPoints((c, (2 * (radius - half), 2 * half), math.degrees(angle)))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    return mask.astype(bool)


def badge_centre(rng: np.random.Generator, body: str, centre: np.ndarray, radius: float, badge: float,
                 angle: float) -> np.ndarray:  # fmt: skip
    """Where a badge of radius ``badge`` sits so that it stays inside its body's outline (as far as the
    body's inscribed circle allows)."""
    if body == "ring":
        return centre  # in the hole: the ring band is too thin for it
    if body == "bar":  # along the axis: the half-round ends (radius R/2 >= badge) still enclose it
        room = 0.6 * radius / 2
        return centre + rng.uniform(-room, room) * _unit(angle)
    if body == "half":  # around the half-disc's inscribed circle (radius 0.475 R)
        inner = HALF_RADIUS * radius / 2
        centre = centre + (inner - HALF_OFFSET * radius) * _unit(angle)
        room = max(0.0, inner - badge) * 0.6
    else:  # disc, plate
        room = max(0.0, (PLATE_HALF_SIDE if body == "plate" else 1.0) * radius - badge) * 0.6
    theta = rng.uniform(0, 2 * math.pi)  # drawn before the distance, as the first part sets were
    return centre + rng.uniform(0, room) * _unit(theta)


def clutter_blobs(
    rng: np.random.Generator,
    spec: Clutter,
    instances: np.ndarray,
    boxes: np.ndarray,
    radii: list[float],
) -> list[tuple[int, np.ndarray]]:
    """(object index k, blob mask) pairs: ellipses centred on object k's outer edge, cut to its box and
    to background pixels, so every blob lies inside the box and touches the object."""
    size = instances.shape[0]
    background = instances == 0
    blobs = []
    for k in range(1, len(radii) + 1):
        if rng.uniform() >= spec.p:
            continue
        mask = instances == k
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        ys, xs = np.nonzero(edge)
        x0, y0, x1, y1 = (int(v) for v in boxes[k - 1])
        in_box = np.zeros_like(mask)
        in_box[y0:y1, x0:x1] = True
        for _ in range(int(rng.integers(spec.blobs[0], spec.blobs[1] + 1))):
            pick = int(rng.integers(len(xs)))
            axes = rng.uniform(*spec.blob_scale, 2) * radii[k - 1]
            ellipse = np.zeros((size, size), np.uint8)
            centre = (float(xs[pick]), float(ys[pick]))
            cv2.ellipse(ellipse, (centre, (2 * axes[0], 2 * axes[1]), rng.uniform(0, 180)), 1, -1)
            blob = ellipse.astype(bool) & in_box & background
            if blob.any():
                blobs.append((k, blob))
    return blobs


def near_colour(rng: np.random.Generator, colour: np.ndarray, distance: float) -> np.ndarray:
    """A colour within ``distance`` (RGB L2) of ``colour``: what makes a blob look like the object."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    return np.clip(colour + direction * rng.uniform(0, distance), 0, 255).astype(np.float32)


def corrupt_saliency(
    rng: np.random.Generator, spec: SodNoise, instances: np.ndarray, stuff: np.ndarray
) -> tuple[np.ndarray, str | None]:
    """The training SOD mask (uint8 0/255) of one image, corrupted with probability ``spec.rate``.

    Returns the mask and the kind of error written (None when the image stays clean).
    """
    clean = instances > 0
    mask = clean.copy()
    if rng.uniform() >= spec.rate:
        return mask.astype(np.uint8) * 255, None
    kind = spec.kinds[int(rng.integers(len(spec.kinds)))]
    count = int(instances.max())
    if kind == "fp_stuff" and stuff.max() > 0:
        mask = mask | (stuff == int(rng.integers(1, int(stuff.max()) + 1)))
    elif kind == "fn_part":  # erase the part of one object beyond a random line through its centre
        k = int(rng.integers(1, count + 1))
        ys, xs = np.nonzero(instances == k)
        theta = rng.uniform(0, 2 * math.pi)
        side = (xs - xs.mean()) * math.cos(theta) + (ys - ys.mean()) * math.sin(theta) > 0
        mask[ys[side], xs[side]] = False
    elif kind == "dilate":
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * spec.radius + 1,) * 2)
        op = cv2.dilate if rng.uniform() < 0.5 else cv2.erode
        mask = op(mask.astype(np.uint8), kernel).astype(bool)
    elif kind == "drop_object":
        mask = mask & (instances != int(rng.integers(1, count + 1)))
    return mask.astype(np.uint8) * 255, (kind if (mask != clean).any() else None)
