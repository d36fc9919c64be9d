"""IRN's semantic pseudo labels (``conf/stage/irn.yaml``): the CAMs walked on IRNet's boundary affinities,
``jiwoon-ahn/irn : step/make_sem_seg_labels.py`` per image (:mod:`segexp.inference.irn_random_walk`).

The release walks the stride-4 CAMs its CAM export writes beside the full-size ones (the network's
maps resized to ``ceil(H / 4) x ceil(W / 4)``, max-normalised); the CAM stage here caches the full-size
maps only, so they are resized (bilinear) to that grid and max-normalised again. ``cam_power`` raises
them to a power first (IRN 1; AMN's ``make_sem_seg_labels.py`` 1.3).

The stage is given a trained IRN (``irn_ckpt``): the pipeline's ``irn`` step trains it on the IR labels
of the same CAMs (:mod:`segexp.pipeline.irn`); the network is rebuilt from what its checkpoint records.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segexp.data.transforms import image_tensor
from segexp.inference.irn_random_walk import boundary_map, irn_random_walk, walk_labels
from segexp.stages.base import LabelStage, Stage
from segexp.stages.crf import class_lut
from segexp.stages.network import TrainedNetwork
from segexp.utils.device import resolve_device

__all__ = ["IRNLabelStage", "irn_label", "grid_cams"]


def grid_cams(cams: torch.Tensor, grid: tuple[int, int], power: float = 1.0) -> torch.Tensor:
    """Full-size CAMs (K, H, W) -> (K, *grid): bilinear, divided by each map's max + 1e-5, ``** power``."""
    small = F.interpolate(cams[None], size=grid, mode="bilinear", align_corners=False)[0]
    small = small / (small.flatten(1).amax(1)[:, None, None] + 1e-5)
    return small.clamp(min=0).pow(power)


@torch.no_grad()
def irn_label(
    network: torch.nn.Module,
    image: np.ndarray,
    cams: np.ndarray,
    *,
    beta: float,
    exp_times: int,
    radius: int,
    bg_threshold: float,
    cam_power: float,
    pad_size: int | None,
    device: str = "cpu",
) -> np.ndarray:
    """Index map (H, W) into ``[background, *cams]`` of one image (module docstring); the walk's
    settings have their defaults once, on :class:`IRNLabelStage` (and ``conf/stage/irn.yaml``)."""
    h, w = image.shape[:2]
    if len(cams) == 0:
        return np.zeros((h, w), np.int64)
    boundary = boundary_map(network, image_tensor(image).to(device), pad_size=pad_size)
    v = grid_cams(torch.from_numpy(np.asarray(cams, np.float32)).to(device), tuple(boundary.shape), cam_power)
    walked = irn_random_walk(v, boundary, beta=beta, exp_times=exp_times, radius=radius)
    return walk_labels(walked, (h, w), int(network.stride), bg_threshold).cpu().numpy()


class IRNLabelStage(TrainedNetwork, LabelStage):
    """CAMs of ``cam_stage`` -> IRN random-walk label maps (uint8, 0 = background), cached.

    Args:
        cam_stage: the CAM stage (the pipeline passes its own).
        irn_ckpt: a trained IRN checkpoint (``method=irn``).
        beta, exp_times, radius: the walk (release 10, 8, 5).
        bg_threshold: background score after the walk (``sem_seg_bg_thres`` 0.25).
        cam_power: CAMs ** power before the walk (IRN 1, AMN 1.3).
        pad_size: images are zero-padded to this size for IRNet (release 512); null = no padding.
        device: ``auto`` = cuda when available.
    """

    in_process = True  # one network, on ``device``
    ckpt_key, network_name, network_method, pipeline_step = ("irn_ckpt", "IRN", "method=irn", "irn")

    @staticmethod
    def accepts(target: str) -> bool:
        return target.endswith(".IRN")

    def __init__(
        self,
        cam_stage: Stage,
        irn_ckpt: str | os.PathLike | None = None,
        name: str = "irn",
        beta: float = 10.0,
        exp_times: int = 8,
        radius: int = 5,
        bg_threshold: float = 0.25,
        cam_power: float = 1.0,
        pad_size: int | None = 512,
        cache_dir: str | os.PathLike = "stage_cache",
        device: str = "auto",
        progress: bool = True,
        version: int = 1,
    ):
        self.cam_stage = cam_stage
        self.irn_ckpt = None if irn_ckpt is None else str(irn_ckpt)
        self.name = name
        self.beta = float(beta)
        self.exp_times = int(exp_times)
        self.radius = int(radius)
        self.bg_threshold = float(bg_threshold)
        self.cam_power = float(cam_power)
        self.pad_size = None if pad_size is None else int(pad_size)
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self.progress = progress
        self.version = int(version)

    def settings(self) -> dict[str, Any]:
        return {
            "cams": self.cam_stage.settings(),
            "irn": self.network_settings(),
            "beta": self.beta,
            "exp_times": self.exp_times,
            "radius": self.radius,
            "bg_threshold": self.bg_threshold,
            "cam_power": self.cam_power,
            "pad_size": self.pad_size,
        }

    def upstream(self) -> dict[str, Stage]:
        return {"cams": self.cam_stage}

    def compute(self, sample: Mapping[str, Any], cams: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = irn_label(
            self.method.model,
            sample["image"],
            cams["cams"].astype(np.float32),
            beta=self.beta,
            exp_times=self.exp_times,
            radius=self.radius,
            bg_threshold=self.bg_threshold,
            cam_power=self.cam_power,
            pad_size=self.pad_size,
            device=self.device,
        )
        return {"pseudo": class_lut(cams["classes"])[index]}
