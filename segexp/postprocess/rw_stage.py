"""AffinityNet random-walk refinement of CAMs (``conf/stage/rw.yaml``): psa ``infer_aff.py`` per image,
cached, parallel-safe (each rank / worker fills its own share of the cache), scored like the CRF stage.

Per image (:func:`random_walk_label`):

1. the image (normalised) is zero-padded to a multiple of the AffinityNet stride (8);
2. AffinityNet embedding -> pair affinities within the radius -> sparse symmetric affinity with unit
   diagonal (:func:`segexp.postprocess.random_walk.sparse_affinity`);
3. scores ``[bg = (1 - max CAM)^alpha, CAMs]`` at full size, zero-padded the same way and
   average-pooled by the stride (:func:`segexp.postprocess.random_walk.rw_scores`);
4. random walk ``v T^(2^logt)`` with ``T = A^beta`` column-normalised, as 2^logt sparse products
   (:func:`segexp.postprocess.random_walk.random_walk`; no dense (hw)^2 matrix);
5. bilinear upsampling to the padded size, crop, argmax over [background, the image's classes].

Defaults are SEAM's (beta 8, logt 6, alpha 6); psa's (beta 8, logt 8, alpha 16, high CRF alpha 32,
AffinityNet lr 0.1) are ``conf/stage/rw_psa.yaml``.

In the pipeline, :meth:`RandomWalkStage.prepare` first builds the affinity labels of the train split
(:class:`~segexp.postprocess.affinity_stage.AffinityLabelStage`) and trains ``method=affinitynet`` on
them (``<pipeline dir>/rw_affinity``, skipped when current, resumed when interrupted). The checkpoint it
produced is recorded under ``<cache_dir>/rw/affinitynet/<key>.json`` (key = CAM, label and training
settings), so the same stage built again from its config (the retraining run's ``PseudoLabels`` wrapper,
``python -m segexp.pseudo stage=rw``) finds it without ``affinity_ckpt``.

The per-image loop, parallel jobs and scoring are :class:`~segexp.postprocess.crf.CRFStage`'s: this
stage only replaces ``refine`` (CAMs -> label) and the settings of the cache key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segexp.data.cache import file_key, stable_hash
from segexp.methods.loading import load_method
from segexp.pipeline import method_override_key, without_method
from segexp.postprocess.affinity_stage import AffinityLabelStage
from segexp.postprocess.cam_export import CAMStage, image_tensor
from segexp.postprocess.crf import CRFStage
from segexp.postprocess.random_walk import random_walk, rw_scores, sparse_affinity
from segexp.utils.atomic import write_json
from segexp.utils.device import resolve_device

log = logging.getLogger(__name__)

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


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return (
        OmegaConf.to_container(node, resolve=True)
        if isinstance(node, (DictConfig, ListConfig))
        else dict(node)
    )


def augment_ops(crop: int, hflip: bool, color_jitter: Sequence[float] | None) -> list[dict[str, Any]]:
    """psa/SEAM ``train_aff.py`` augmentation as albumentations configs: ColorJitter, random crop
    (zero padding; padded labels become ignore), horizontal flip - no rescaling."""
    ops: list[dict[str, Any]] = []
    if color_jitter:
        b, c, s, hue = color_jitter
        ops.append(
            {
                "_target_": "albumentations.ColorJitter",
                "brightness": b,
                "contrast": c,
                "saturation": s,
                "hue": hue,
                "p": 1.0,
            }
        )
    ops += [
        {
            "_target_": "albumentations.PadIfNeeded",
            "min_height": crop,
            "min_width": crop,
            "border_mode": 0,
            "fill": 0,
            "fill_mask": 0,
        },
        {"_target_": "albumentations.RandomCrop", "height": crop, "width": crop},
    ]
    if hflip:
        ops.append({"_target_": "albumentations.HorizontalFlip", "p": 0.5})
    return ops


class RandomWalkStage(CRFStage):
    """CAMs of ``cam_stage`` -> AffinityNet random-walk label maps (uint8, 0 = background), cached.

    Args:
        cam_stage: the CAM stage (the pipeline passes its own).
        labels: the :class:`AffinityLabelStage` AffinityNet is trained on (rebound to ``cam_stage``).
        affinity_ckpt: a trained AffinityNet checkpoint; None = the one ``prepare`` trained for these
            CAMs and labels (see the module docstring).
        beta, logt, alpha: random walk (SEAM 8, 6, 6; psa 8, 8, 16).
        weights: which weights of the AffinityNet run the walk uses: ``last`` (psa/SEAM: the final
            ones) or ``best`` (best ``val/aff_balanced_acc``, pair accuracy against GT masks).
        schedule: schedule group of the AffinityNet run.
        train_overrides: further overrides of the AffinityNet run (e.g. ``[schedule.optimizer.lr=0.1]``).
        augment: ``{crop, hflip, color_jitter}`` of the AffinityNet run (psa/SEAM: crop 448, flip,
            ColorJitter 0.3/0.3/0.3/0.1, no rescale); null = the experiment's train transforms.
        device: ``auto`` = cuda when available; workers: processes (CPU), null = 1.
    """

    def __init__(
        self,
        cam_stage: CAMStage,
        labels: AffinityLabelStage,
        name: str = "rw",
        affinity_ckpt: str | os.PathLike | None = None,
        beta: float = 8.0,
        logt: int = 6,
        alpha: float = 6.0,
        weights: str = "last",
        schedule: str = "seam_poly",
        train_overrides: Sequence[str] = (),
        augment: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike = "stage_cache",
        device: str = "auto",
        workers: int | None = None,
        progress: bool = True,
        version: int = 1,
    ):
        super().__init__(
            cam_stage, name=name, cache_dir=cache_dir, workers=workers, progress=progress, version=version
        )
        self.labels = labels.bind(cam_stage)
        self.affinity_ckpt = None if affinity_ckpt is None else str(affinity_ckpt)
        self.beta = float(beta)
        self.logt = int(logt)
        self.alpha = float(alpha)
        if weights not in ("last", "best"):
            raise ValueError(f"{name} stage: weights must be 'last' or 'best', got {weights!r}")
        self.weights = weights
        self.schedule = schedule
        self.train_overrides = list(train_overrides)
        self.augment = _plain(augment) if augment else None
        self.device = resolve_device(device)
        self._method = None
        self._method_cfg: dict[str, Any] | None = None
        self.peak_bytes = 0

    # -- the AffinityNet ----------------------------------------------------------------------
    def _record_path(self) -> Path:
        key = stable_hash(
            {"cams": self.cam_stage.settings(), "labels": self.labels.settings(), **self.training()}
        )
        return self.cache_dir / self.name / "affinitynet" / f"{key}.json"

    def checkpoint(self) -> str:
        """The AffinityNet checkpoint: ``affinity_ckpt``, else the one recorded by ``prepare``."""
        if self.affinity_ckpt is None:
            record = self._record_path()
            if record.is_file():
                self.affinity_ckpt = json.loads(record.read_text())["ckpt"]
                log.info("%s: AffinityNet trained by the pipeline: %s", self.name, self.affinity_ckpt)
        if self.affinity_ckpt is None:
            raise FileNotFoundError(
                f"{self.name} stage: no AffinityNet checkpoint for these CAMs (no {self._record_path()}): "
                "run the pipeline with this stage (its prepare step trains it) or set "
                "stage.affinity_ckpt=<ckpt>"
            )
        if not Path(self.affinity_ckpt).is_file():
            raise FileNotFoundError(
                f"{self.name} stage: AffinityNet checkpoint {self.affinity_ckpt!r} not found"
            )
        return self.affinity_ckpt

    def method_config(self) -> dict[str, Any]:
        """The AffinityNet method config, read from ``config.yaml`` of the checkpoint's run directory."""
        if self._method_cfg is None:
            from omegaconf import OmegaConf

            import segexp.utils.resolvers  # noqa: F401

            run_config = Path(self.checkpoint()).resolve().parent.parent / "config.yaml"
            if not run_config.is_file():
                raise FileNotFoundError(
                    f"{self.name} stage: {run_config} (the AffinityNet run's config) not found next to "
                    f"{self.affinity_ckpt}"
                )
            cfg = OmegaConf.load(run_config)
            if cfg.get("method") is None or "affinitynet" not in str(cfg.method.get("_target_", "")).lower():
                raise ValueError(
                    f"{run_config}: method is not affinitynet; is {self.affinity_ckpt} an AffinityNet?"
                )
            self._method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
        return self._method_cfg

    @property
    def method(self):
        if self._method is None:
            self._method = load_method(self.checkpoint(), self.method_config(), self.device)
        return self._method

    def settings(self) -> dict[str, Any]:
        method = {k: v for k, v in self.method_config().items() if k not in ("schedule", "panels")}
        return {
            "cams": self.cam_stage.settings(),
            "affinity": {"ckpt": file_key(self.checkpoint()), "method": method},
            "beta": self.beta,
            "logt": self.logt,
            "alpha": self.alpha,
        }

    # -- pipeline hook: affinity labels + AffinityNet training ------------------------------------
    def training(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "train_overrides": self.train_overrides,
            "augment": self.augment,
            "weights": self.weights,
        }

    def prepare(self, context: Any) -> dict[str, Any]:
        """Affinity labels of the train split, then ``method=affinitynet`` trained on them in
        ``<pipeline dir>/<name>_affinity`` (skipped when current); records the checkpoint for this stage."""
        report = self.labels.run(context.reader, evaluate=True)
        context.report[self.labels.name] = {
            k: report[k]
            for k in ("images", "computed", "seconds", "cache_dir", "confident_fraction")
            if k in report
        }
        if "pseudo" in report:
            context.report[self.labels.name]["confident_mIoU"] = report["pseudo"]["mIoU"]
        overrides = [
            *context.overrides,
            f"schedule={self.schedule}",
            "optimized_metric=val/aff_balanced_acc",
            "test=false",
            f"run_name={context.cfg.run_name}_affinity",
            *without_method(self.train_overrides),
        ]
        wrapper = {
            "_target_": "segexp.data.pseudo_labels.PseudoLabels",
            "_partial_": True,
            "stage": self.labels.config(),
        }
        patch: dict[str, Any] = {"data.train_wrappers": [wrapper]}
        if self.augment:
            patch["data.transforms.train"] = augment_ops(**self.augment)
        depends = {"labels": self.labels.settings(), "overrides": overrides, "patch": patch}
        method_overrides = [a for a in self.train_overrides if method_override_key(a)]
        record = context.train(
            f"{self.name}_affinity", overrides, depends, patch, "affinitynet", method_overrides
        )
        last = Path(record["ckpt"]).parent / "last.ckpt"
        self.affinity_ckpt = str(last) if self.weights == "last" and last.is_file() else record["ckpt"]
        self._method = self._method_cfg = None
        write_json(self._record_path(), {"ckpt": self.affinity_ckpt, "key": record["key"]})
        context.report[f"{self.name}_affinity"] = record["metrics"]
        return record

    # -- one image ------------------------------------------------------------------------------
    def refine(self, image: np.ndarray, cam_entry: Mapping[str, np.ndarray]) -> np.ndarray:
        cams = cam_entry["cams"].astype(np.float32)
        classes = np.asarray(cam_entry["classes"], np.int64)
        method = self.method
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        index = random_walk_label(method, image, cams, self.beta, self.logt, self.alpha, self.device)
        if self.device.startswith("cuda"):
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())
        lut = np.concatenate([[0], classes]).astype(np.uint8)
        return lut[index]

    def run(
        self,
        reader: Any,
        evaluate: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
    ) -> dict[str, Any]:
        """:meth:`CRFStage.run` with the random walk; adds seconds per image and, on CUDA, the
        allocator's peak memory of in-process work (on CPU the walk holds only the sparse T, O(pairs))."""
        self.checkpoint()
        self.peak_bytes = 0
        report = super().run(reader, evaluate=evaluate, rank=rank, world_size=world_size, workers=workers)
        if report["computed"]:
            report["seconds_per_image"] = round(report["seconds"] / report["computed"], 4)
            if self.peak_bytes:
                report["peak_memory_MB"] = round(self.peak_bytes / 2**20, 2)
        return report

    def __getstate__(self) -> dict[str, Any]:  # no networks are sent to worker processes
        state = super().__getstate__()
        state["_method"] = None
        state["labels"] = None  # workers only refine; the checkpoint is resolved before they start
        return state
