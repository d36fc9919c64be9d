"""Saliency maps of the training images from a trained segexp SOD model (``method=cas`` or ``ldf``),
cached per image: the realistic saliency source of the PPC/EPS base (EPS/PPC used maps of an
off-the-shelf SOD network trained on DUTS; this stage is the same thing with our own SOD models).

``python -m segexp.pseudo stage=saliency_sod ... stage.ckpt_path=<sod run>/checkpoints/last.ckpt``
fills the cache; a :class:`~segexp.data.saliency.SaliencyFromStage` train wrapper reads it (and
fills what is missing). Entries store the map as uint8 (x 255, the precision of the PNGs EPS reads);
``get`` returns float32 in [0, 1] at the image's size. The cache key holds the checkpoint file (path,
size, mtime) and the SOD method config, so a retrained SOD model never serves stale maps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segexp.data.transforms import image_tensor
from segexp.stages.base import Stage
from segexp.utils.checkpoints import load_method, method_config_of
from segexp.utils.device import resolve_device
from segexp.utils.hashing import file_key

__all__ = ["SODSaliencyStage"]


class SODSaliencyStage(Stage):
    """Per-image saliency of a SOD method (``saliency(images)`` -> (N, 1, H, W) in [0, 1]).

    Args:
        ckpt_path: the SOD checkpoint (a ``method=cas``/``ldf`` run).
        method: its method config; None = the one the checkpoint records.
        name, cache_dir, device (``auto`` = cuda when available), progress, version: as every stage.
    """

    in_process = True  # one network, on ``device``

    def __init__(
        self,
        ckpt_path: str | os.PathLike | None,
        method: Mapping[str, Any] | None = None,
        name: str = "saliency_sod",
        cache_dir: str | os.PathLike = "stage_cache",
        device: str = "auto",
        progress: bool = True,
        version: int = 1,
    ):
        from omegaconf import DictConfig, OmegaConf

        if not ckpt_path or not Path(ckpt_path).is_file():
            raise FileNotFoundError(
                f"{name} stage: SOD checkpoint {ckpt_path!r} not found (stage.ckpt_path=...)"
            )
        self.name, self.version, self.progress = name, int(version), progress
        self.ckpt_path = str(ckpt_path)
        if isinstance(method, DictConfig):
            method = OmegaConf.to_container(method, resolve=True)
        self.method_cfg = dict(method) if method is not None else method_config_of(self.ckpt_path)
        self._method = None  # loaded on first use (a filled cache never loads the network)
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)

    def settings(self) -> dict[str, Any]:
        method = {k: v for k, v in self.method_cfg.items() if k not in ("panels", "schedule")}
        return {"ckpt": file_key(self.ckpt_path), "method": method}

    @property
    def method(self):
        if self._method is None:
            self._method = load_method(self.ckpt_path, self.method_cfg, self.device)
            if not hasattr(self._method, "saliency"):
                raise TypeError(
                    f"{self.ckpt_path}: {type(self._method).__name__} is not a SOD method (no saliency())"
                )
        return self._method

    @torch.no_grad()
    def compute(self, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
        x = image_tensor(sample["image"]).to(self.device)
        s = self.method.saliency(x)[0, 0].float().clamp(0, 1).cpu().numpy()
        return {"saliency": np.round(s * 255).astype(np.uint8)}

    def value(self, entry, reader, index) -> np.ndarray:
        """Float32 (H, W) saliency in [0, 1]."""
        return entry["saliency"].astype(np.float32) / 255.0
