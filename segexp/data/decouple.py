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

``edge_map`` (for the Body+Edge / Sal+Edge rows of the supervision table) is not specified in the
sources; we take the mask's morphological gradient (dilation - erosion) with a 3x3 square kernel, i.e. the
pixels within one pixel of the boundary on either side, 0/255 (the method computes the same band
with max-pooling on the augmented mask).

``LDFLabels`` is the ``data.train_wrappers`` entry that adds the maps to training samples, computed
once per image and stored in the stage cache (``segexp.data.cache``). Coarse-to-fine: with
``source: coarse`` the body/detail maps are the coarse model's predictions on the training images
themselves (sigmoid of the second-iteration branch outputs, x255, rounded; the released README's
second stage), computed once per (checkpoint, image) and cached the same way.

Transport: the wrapper declares ``body`` and ``detail`` as float maps (``map_kinds``); the data
module passes them to ``SampleTransform(extra_maps=...)``, so they move with the image through the
augmentation (nearest interpolation, 0 outside the image) and reach the method as [0, 1] tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segexp.data.cache import StageCache, content_key, file_key

__all__ = ["split_map_code", "split_map_paper", "edge_map", "decouple", "LDFLabels", "SOURCES", "MAP_KEYS"]

log = logging.getLogger(__name__)

SOURCES = ("code", "paper", "coarse")
MAP_KEYS = ("body", "detail")
CACHE_VERSION = 1


def _as_uint8_mask(mask: np.ndarray) -> np.ndarray:
    """float [0,1] / bool / uint8 -> uint8 0/255 (binarised at 0.5, as the LDF loader reads masks)."""
    m = np.asarray(mask)
    if m.dtype == np.uint8 and m.max() > 1:
        return np.where(m > 127, 255, 0).astype(np.uint8)
    return np.where(m.astype(np.float32) > 0.5, 255, 0).astype(np.uint8)


def split_map_code(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Released LDF decoupling of one mask -> (body, detail) uint8."""
    mask = _as_uint8_mask(mask)
    body = cv2.blur(mask, (5, 5))
    body = cv2.distanceTransform(body, distanceType=cv2.DIST_L2, maskSize=5)
    body = body**0.5
    tmp = body[np.where(body > 0)]
    if len(tmp) != 0:
        body[np.where(body > 0)] = np.floor(tmp / np.max(tmp) * 255)
    detail = mask.astype(np.float32) - body
    return body.astype(np.uint8), np.clip(detail, 0, 255).astype(np.uint8)


def split_map_paper(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paper decoupling: plain Euclidean distance transform normalised to [0, 255]."""
    mask = _as_uint8_mask(mask)
    body = cv2.distanceTransform(mask, distanceType=cv2.DIST_L2, maskSize=cv2.DIST_MASK_PRECISE)
    if body.max() > 0:
        body = np.floor(body / body.max() * 255)
    detail = mask.astype(np.float32) - body
    return body.astype(np.uint8), np.clip(detail, 0, 255).astype(np.uint8)


def edge_map(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary band (0/255) of ``width`` pixels on each side of the mask boundary."""
    mask = _as_uint8_mask(mask)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, kernel)


def decouple(mask: np.ndarray, mode: str = "code") -> tuple[np.ndarray, np.ndarray]:
    if mode == "code":
        return split_map_code(mask)
    if mode == "paper":
        return split_map_paper(mask)
    raise ValueError(f"unknown decoupling {mode!r}; choose 'code' or 'paper'")


class LDFLabels(Dataset):
    """Train wrapper adding LDF ``body`` / ``detail`` maps (float, [0, 1]; see the module doc).

    Args:
        reader: a saliency reader (``saliency`` key).
        source: ``code`` (released decoupling), ``paper`` (plain distance transform) or ``coarse``
            (predictions of a coarse LDF model, ``coarse_ckpt`` + ``coarse_model``).
        cache_dir: stage-cache root.
        coarse_ckpt: Lightning checkpoint (or plain state dict) of the coarse stage.
        coarse_model: the network of the coarse stage (same architecture as the fine one).
        coarse_size: square input size for the coarse predictions (released test: 352).
    """

    adds: ClassVar[tuple[str, ...]] = MAP_KEYS
    #: per-pixel maps this wrapper adds and how augmentation fills them (see SampleTransform)
    map_kinds: ClassVar[dict[str, str]] = {key: "float" for key in MAP_KEYS}

    def __init__(
        self,
        reader: Dataset,
        source: str = "code",
        cache_dir: str | Path = "cache",
        coarse_ckpt: str | Path | None = None,
        coarse_model: torch.nn.Module | None = None,
        coarse_size: int = 352,
    ):
        if source not in SOURCES:
            raise ValueError(f"unknown LDF label source {source!r}; choose one of {SOURCES}")
        self.reader = reader
        self.source = source
        name = getattr(reader, "name", type(reader).__name__)
        settings: dict[str, Any] = {"source": source, "reader": name}
        if source == "coarse":
            if not coarse_ckpt:
                raise ValueError(
                    "LDF fine stage: set coarse_ckpt=<checkpoint of the coarse run> "
                    "(e.g. logs/.../checkpoints/last.ckpt)"
                )
            if coarse_model is None:
                raise ValueError("LDF fine stage: coarse_model (the coarse network config) is required")
            settings.update(ckpt=file_key(coarse_ckpt), size=int(coarse_size))
        self.cache = StageCache(cache_dir, f"ldf_{source}", settings, version=CACHE_VERSION)
        if source == "coarse":
            self._predict_coarse(coarse_model, coarse_ckpt, int(coarse_size))

    def __len__(self) -> int:
        return len(self.reader)

    def __getattr__(self, name: str) -> Any:
        if name == "reader":
            raise AttributeError(name)
        return getattr(self.reader, name)

    def _inputs_key(self, sample: dict[str, Any]) -> str:
        if self.source == "coarse":
            return content_key(sample["image"])
        return content_key(_as_uint8_mask(sample["saliency"]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.reader[index])
        if "saliency" not in sample:
            raise KeyError("LDFLabels needs the saliency key (method train_keys must include it)")
        item_id = str(sample["meta"]["id"])
        key = self._inputs_key(sample)
        entry = self.cache.get(item_id, key)
        if entry is None:
            if self.source == "coarse":
                raise RuntimeError(f"coarse LDF maps for {item_id!r} missing from {self.cache.dir}")
            body, detail = decouple(sample["saliency"], self.source)
            entry = {"body": body, "detail": detail}
            self.cache.put(item_id, key, entry)
        for key in MAP_KEYS:
            sample[key] = entry[key].astype(np.float32) / 255.0
        return sample

    @torch.no_grad()
    def _predict_coarse(self, model: torch.nn.Module, ckpt: str | Path, size: int) -> None:
        samples = {}
        missing = []
        for i in range(len(self.reader)):
            s = self.reader[i]
            k = self._inputs_key(s)
            if not self.cache.has(str(s["meta"]["id"]), k):
                missing.append(i)
                samples[i] = (s, k)
        if not missing:
            return
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
        prefixed = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        model.load_state_dict(prefixed or state)
        model.eval()
        from segexp.data.transforms import SampleTransform

        norm = SampleTransform()
        log.info("LDF coarse stage: predicting body/detail maps for %d training images", len(missing))
        for i in missing:
            s, k = samples[i]
            image = norm({"image": s["image"]})["image"][None]
            h, w = image.shape[-2:]
            x = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear",
                                                align_corners=False)
            outs = model(x)
            maps = []
            for logit in (outs[3], outs[4]):  # outb2, outd2
                up = torch.nn.functional.interpolate(logit, size=(h, w), mode="bilinear", align_corners=False)
                maps.append(torch.round(torch.sigmoid(up)[0, 0] * 255).byte().numpy())
            self.cache.put(str(s["meta"]["id"]), k, {"body": maps[0], "detail": maps[1]})
