"""LDF label decoupling: saliency mask -> body map + detail map (+ edge map for the ablation).

``split_map_code`` is what the released code computes (``weijun88/LDF : utils.py : split_map``,
``shared/methods/ldf.md`` section 2)::

    body = cv2.blur(mask, (5, 5))                              # uint8 0/255 mask
    body = cv2.distanceTransform(body, cv2.DIST_L2, 5)
    body = body ** 0.5
    body[body > 0] = floor(body / max(body) * 255)
    detail = mask - body  -> written with cv2.imwrite, i.e. saturated to [0, 255] uint8

so the body has a ~2 px halo *outside* the mask (from the blur) where the detail is negative and
clipped to 0. ``split_map_paper`` is the paper's form: Euclidean distance of each foreground pixel
to the nearest background pixel, normalised to [0, 255] (no blur, no square root), detail = mask -
body. Both return uint8 maps (the loaders divide by 255).

Soft masks (``soft_masks``; DUTS-TR masks carry anti-aliased grey levels on their boundaries):

* ``threshold`` (default; the paper's binary ground truth I): the mask is cut at 0.5 (uint8
  ``> 127``) first, so the maps depend on the partition only;
* ``raw`` (the release): ``split_map`` reads the PNG with ``cv2.imread(.., 0)`` and decouples it as
  it is - every non-zero grey pixel of the blurred mask counts as foreground for the distance
  transform, and the detail is ``mask - body`` on the grey levels. Float masks in [0, 1] are taken
  back to 0..255 by rounding ``mask * 255`` (exact for maps read as ``uint8 / 255``). The LDF loader
  (``train-*/dataset.py``) does not binarise either: it divides mask, body and detail by 255.

``edge_map`` (for the Body+Edge / Sal+Edge rows of the supervision table) is not specified in the
sources; we take the mask's morphological gradient (dilation - erosion) with a 3x3 square kernel, i.e. the
pixels within one pixel of the boundary on either side, 0/255 (the method computes the same band
with max-pooling on the augmented mask).

``segexp.stages.ldf_maps.LDFLabels`` is the ``data.train_wrappers`` entry that adds the maps to
training samples, computed once per image and stored in the stage cache. Coarse-to-fine: with
``source: coarse`` the body/detail maps are the coarse model's predictions on the training images
themselves (sigmoid of the second-iteration branch outputs, x255, rounded; the released README's
second stage), computed once per (checkpoint, image) and cached the same way.

Transport: the wrapper declares ``body`` and ``detail`` as float maps (``map_kinds``); the data
module passes them to ``SampleTransform(extra_maps=...)``, so they move with the image through the
augmentation (nearest interpolation, 0 outside the image) and reach the method as [0, 1] tensors.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "split_map_code", "split_map_paper", "edge_map", "decouple", "as_uint8_mask", "as_uint8_levels",
    "SOURCES", "MAP_KEYS", "SOFT_MASKS",
]

SOURCES = ("code", "paper", "coarse")
MAP_KEYS = ("body", "detail")
SOFT_MASKS = ("threshold", "raw")


def as_uint8_mask(mask: np.ndarray) -> np.ndarray:
    """float [0,1] / bool / uint8 -> uint8 0/255, binarised at 0.5 (uint8 ``> 127``): the paper's
    binary mask (``soft_masks: threshold``; the released code does not binarise, see the module doc)."""
    m = np.asarray(mask)
    if m.dtype == np.uint8 and m.max() > 1:
        return np.where(m > 127, 255, 0).astype(np.uint8)
    return np.where(m.astype(np.float32) > 0.5, 255, 0).astype(np.uint8)


def as_uint8_levels(mask: np.ndarray) -> np.ndarray:
    """float [0,1] / bool / uint8 -> uint8 grey levels 0..255 kept as they are (``soft_masks: raw``):
    uint8 unchanged (a 0/1 mask becomes 0/255), bool -> 0/255, float -> ``round(mask * 255)``."""
    m = np.asarray(mask)
    if m.dtype == np.uint8:
        return m * np.uint8(255) if m.max() <= 1 else m.copy()
    if m.dtype == bool:
        return np.where(m, 255, 0).astype(np.uint8)
    return np.clip(np.rint(m.astype(np.float64) * 255), 0, 255).astype(np.uint8)


def _mask_levels(mask: np.ndarray, soft_masks: str) -> np.ndarray:
    if soft_masks == "threshold":
        return as_uint8_mask(mask)
    if soft_masks == "raw":
        return as_uint8_levels(mask)
    raise ValueError(f"unknown soft_masks {soft_masks!r}; choose one of {SOFT_MASKS}")


def split_map_code(mask: np.ndarray, soft_masks: str = "threshold") -> tuple[np.ndarray, np.ndarray]:
    """Released LDF decoupling of one mask -> (body, detail) uint8 (``soft_masks``: module doc)."""
    mask = _mask_levels(mask, soft_masks)
    body = cv2.blur(mask, (5, 5))
    body = cv2.distanceTransform(body, distanceType=cv2.DIST_L2, maskSize=5)
    body = body**0.5
    tmp = body[np.where(body > 0)]
    if len(tmp) != 0:
        body[np.where(body > 0)] = np.floor(tmp / np.max(tmp) * 255)
    detail = mask.astype(np.float32) - body
    return body.astype(np.uint8), np.clip(detail, 0, 255).astype(np.uint8)


def split_map_paper(mask: np.ndarray, soft_masks: str = "threshold") -> tuple[np.ndarray, np.ndarray]:
    """Paper decoupling: plain Euclidean distance transform normalised to [0, 255] (``raw``: distance
    of every non-zero pixel to the nearest zero one, detail = grey mask - body)."""
    mask = _mask_levels(mask, soft_masks)
    body = cv2.distanceTransform(mask, distanceType=cv2.DIST_L2, maskSize=cv2.DIST_MASK_PRECISE)
    if body.max() > 0:
        body = np.floor(body / body.max() * 255)
    detail = mask.astype(np.float32) - body
    return body.astype(np.uint8), np.clip(detail, 0, 255).astype(np.uint8)


def edge_map(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary band (0/255) of ``width`` pixels on each side of the mask boundary."""
    mask = as_uint8_mask(mask)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, kernel)


def decouple(
    mask: np.ndarray, mode: str = "code", soft_masks: str = "threshold"
) -> tuple[np.ndarray, np.ndarray]:
    if mode == "code":
        return split_map_code(mask, soft_masks)
    if mode == "paper":
        return split_map_paper(mask, soft_masks)
    raise ValueError(f"unknown decoupling {mode!r}; choose 'code' or 'paper'")
