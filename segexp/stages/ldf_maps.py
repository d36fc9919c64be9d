"""LDF's body / detail maps as a cached train wrapper (``data.train_wrappers``), the maps themselves
from :mod:`segexp.data.decouple` (released or paper decoupling of the saliency mask, grey masks cut at
0.5 first or - ``soft_masks: raw``, as released - decoupled as they are) or, for the fine
stage, from a coarse LDF model's predictions on the training images (the released README's second
stage), computed once per (checkpoint, image) and cached.

Transport: the wrapper declares ``body`` and ``detail`` as float maps (``map_kinds``); the data
module passes them to ``SampleTransform(extra_maps=...)``, so they move with the image through the
augmentation (nearest interpolation, 0 outside the image) and reach the method as [0, 1] tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from segexp.data.decouple import MAP_KEYS, SOFT_MASKS, SOURCES, as_uint8_levels, as_uint8_mask, decouple
from segexp.stages.cache import StageCache
from segexp.utils.hashing import content_key, file_key

__all__ = ["LDFLabels"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


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
        soft_masks: ``threshold`` (paper: cut grey masks at 0.5 first) or ``raw`` (released
            ``utils.py:split_map``: decouple the grey levels as read); ``code``/``paper`` only.
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
        soft_masks: str = "threshold",
    ):
        if source not in SOURCES:
            raise ValueError(f"unknown LDF label source {source!r}; choose one of {SOURCES}")
        if soft_masks not in SOFT_MASKS:
            raise ValueError(f"unknown soft_masks {soft_masks!r}; choose one of {SOFT_MASKS}")
        self.reader = reader
        self.source = source
        self.soft_masks = soft_masks
        name = getattr(reader, "name", type(reader).__name__)
        settings: dict[str, Any] = {"source": source, "reader": name}
        if soft_masks != "threshold" and source != "coarse":  # the default keeps its cache directory
            settings["soft_masks"] = soft_masks
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
        levels = as_uint8_levels if self.soft_masks == "raw" else as_uint8_mask
        return content_key(levels(sample["saliency"]))

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
            body, detail = decouple(sample["saliency"], self.source, self.soft_masks)
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
        prefixed = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        model.load_state_dict(prefixed or state)
        model.eval()
        from segexp.data.transforms import SampleTransform

        norm = SampleTransform()
        log.info("LDF coarse stage: predicting body/detail maps for %d training images", len(missing))
        for i in missing:
            s, k = samples[i]
            image = norm({"image": s["image"]})["image"][None]
            h, w = image.shape[-2:]
            x = torch.nn.functional.interpolate(
                image, size=(size, size), mode="bilinear", align_corners=False
            )
            outs = model(x)
            maps = []
            for logit in (outs[3], outs[4]):  # outb2, outd2
                up = torch.nn.functional.interpolate(logit, size=(h, w), mode="bilinear", align_corners=False)
                maps.append(torch.round(torch.sigmoid(up)[0, 0] * 255).byte().numpy())
            self.cache.put(str(s["meta"]["id"]), k, {"body": maps[0], "detail": maps[1]})
