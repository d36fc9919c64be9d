"""AffinityNet random-walk refinement of CAMs (``conf/stage/rw.yaml``): psa ``infer_aff.py`` per image.

Per image (:func:`random_walk_label`):

1. the image (normalised) is zero-padded to a multiple of the AffinityNet stride (8);
2. AffinityNet embedding -> pair affinities within the radius -> sparse symmetric affinity with unit
   diagonal (:func:`segexp.inference.random_walk.sparse_affinity`);
3. scores ``[bg = (1 - max CAM)^alpha, CAMs]`` at full size, zero-padded the same way and
   average-pooled by the stride (:func:`segexp.inference.random_walk.rw_scores`);
4. random walk ``v T^(2^logt)`` with ``T = A^beta`` column-normalised, as 2^logt sparse products
   (:func:`segexp.inference.random_walk.random_walk`; no dense (hw)^2 matrix);
5. bilinear upsampling to the padded size, crop, argmax over [background, the image's classes].

Defaults are SEAM's (beta 8, logt 6, alpha 6); psa's (beta 8, logt 8, alpha 16) are
``conf/stage/rw_psa.yaml``. The stage is given a trained AffinityNet (``affinity_ckpt``): the
pipeline's ``affinity`` step trains it on the affinity labels of the same CAMs
(:mod:`segexp.pipeline.affinity`); the network is rebuilt from what its checkpoint records.
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
from segexp.inference.random_walk import random_walk, rw_scores, sparse_affinity
from segexp.stages.base import LabelStage, Stage
from segexp.stages.crf import class_lut
from segexp.stages.network import TrainedNetwork
from segexp.utils.device import resolve_device

__all__ = ["RandomWalkStage", "random_walk_label", "affinity_of"]


def affinity_of(method: Any, x: torch.Tensor) -> torch.Tensor:
    """Sparse (hw, hw) affinity of one normalised image (1, 3, H, W) from an AffinityNet method."""
    aff, src, dst, (h, w) = method.affinities(x)
    return sparse_affinity(aff[0], src, dst, h * w)


@torch.no_grad()
def random_walk_label(
    method: Any,
    image: np.ndarray,
    cams: np.ndarray,
    beta: float = 8.0,
    logt: int = 6,
    alpha: float = 6.0,
    device: str = "cpu",
) -> np.ndarray:
    """Index map (H, W) into ``[background, *cams]`` after the random walk (module docstring)."""
    x = image_tensor(image).to(device)
    stride = int(method.model.stride)
    h, w = x.shape[-2:]
    ph, pw = -(-h // stride) * stride, -(-w // stride) * stride
    x = F.pad(x, (0, pw - w, 0, ph - h))
    aff = affinity_of(method, x)
    v = rw_scores(torch.from_numpy(np.asarray(cams, np.float32)).to(device), alpha=alpha, stride=1)
    v = F.avg_pool2d(F.pad(v, (0, pw - w, 0, ph - h))[None], stride, stride)[0]
    if v.shape[-2] * v.shape[-1] != aff.shape[0]:
        raise RuntimeError(
            f"AffinityNet grid has {aff.shape[0]} cells but the CAM grid is {tuple(v.shape[-2:])} "
            f"(input {ph}x{pw}, stride {stride}): the backbone's feature size is not input / stride"
        )
    walked = random_walk(v, aff.to(v.dtype), beta=beta, logt=logt)
    up = F.interpolate(walked[None], (ph, pw), mode="bilinear", align_corners=False)[0, :, :h, :w]
    return up.argmax(0).cpu().numpy()


class RandomWalkStage(TrainedNetwork, LabelStage):
    """CAMs of ``cam_stage`` -> AffinityNet random-walk label maps (uint8, 0 = background), cached.

    Args:
        cam_stage: the CAM stage (the pipeline passes its own).
        affinity_ckpt: a trained AffinityNet checkpoint (``method=affinitynet``).
        beta, logt, alpha: random walk (SEAM 8, 6, 6; psa 8, 8, 16).
        device: ``auto`` = cuda when available; workers: processes (CPU), null = 1.
    """

    ckpt_key, network_name, network_method, pipeline_step = (
        "affinity_ckpt", "AffinityNet", "method=affinitynet", "affinity"
    )

    @staticmethod
    def accepts(target: str) -> bool:
        return "affinitynet" in target.lower()

    def __init__(
        self,
        cam_stage: Stage,
        affinity_ckpt: str | os.PathLike | None = None,
        name: str = "rw",
        beta: float = 8.0,
        logt: int = 6,
        alpha: float = 6.0,
        cache_dir: str | os.PathLike = "stage_cache",
        device: str = "auto",
        workers: int | None = None,
        progress: bool = True,
        version: int = 1,
    ):
        self.cam_stage = cam_stage
        self.name = name
        self.affinity_ckpt = None if affinity_ckpt is None else str(affinity_ckpt)
        self.beta = float(beta)
        self.logt = int(logt)
        self.alpha = float(alpha)
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self.workers = workers
        self.progress = progress
        self.version = int(version)

    def settings(self) -> dict[str, Any]:
        return {
            "cams": self.cam_stage.settings(),
            "affinity": self.network_settings(),
            "beta": self.beta,
            "logt": self.logt,
            "alpha": self.alpha,
        }

    def upstream(self) -> dict[str, Stage]:
        return {"cams": self.cam_stage}

    def compute(self, sample: Mapping[str, Any], cams: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = random_walk_label(
            self.method,
            sample["image"],
            cams["cams"].astype(np.float32),
            self.beta,
            self.logt,
            self.alpha,
            self.device,
        )
        return {"pseudo": class_lut(cams["classes"])[index]}

    def run(
        self,
        reader: Any,
        evaluate: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
    ) -> dict[str, Any]:
        """The template's run, plus seconds per image (the walk's cost, for the benchmark tables)."""
        report = super().run(reader, evaluate=evaluate, rank=rank, world_size=world_size, workers=workers)
        if report["computed"]:
            report["seconds_per_image"] = round(report["seconds"] / report["computed"], 4)
        return report
