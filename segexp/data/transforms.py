"""Albumentations pipelines that turn a raw reader sample into the tensor sample of the contract.

Every spatial target moves together: ``mask``, ``instances``, ``saliency`` and ``pseudo`` are
albumentations masks, boxes are ``pascal_voc`` bboxes with their labels. Padding and rotation
fill every map with 0 and a ``valid`` map marks the pixels that came from the image, so that
afterwards the semantic maps get ``ignore_index`` there and entity maps get 0 (unlabeled) —
one fill value per target, which albumentations alone cannot express.

Randomness: albumentations 2 draws from a generator of its own, seeded from OS entropy unless given a
seed, so ``seed_everything`` does not reach it and forked DataLoader workers inherit one state and repeat
each other's draws. :class:`SampleTransform` reseeds it once per process from numpy's global generator,
which ``seed_everything`` seeds in the main process and Lightning's worker init in each worker: a run is
reproducible from its ``seed`` and workers draw apart.

A method's own per-pixel maps (LDF's body/detail, ...) join with ``extra_maps``: ``{key: kind}``
where kind says what fills pixels outside the image — ``ignore`` (an integer label map, filled with
``ignore_index``), ``zero`` (an integer map filled with 0) or ``float`` (a float map filled with 0).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MAP_KINDS = {"mask": "ignore", "pseudo": "ignore", "instances": "zero", "saliency": "float"}
EXTRA_MAP_KINDS = ("ignore", "zero", "float")
VECTOR_KEYS = ("labels", "sub_labels")  # per-image multi-hot vectors (classes; SC-CAM sub-categories)


def map_kinds(extra_maps: Mapping[str, str] | None = None) -> dict[str, str]:
    """Fill kind of every per-pixel target: the contract's maps plus a method's ``extra_maps``."""
    extra = dict(extra_maps or {})
    for key, kind in extra.items():
        if kind not in EXTRA_MAP_KINDS:
            raise ValueError(f"extra_maps[{key!r}] = {kind!r}: the kind must be one of {EXTRA_MAP_KINDS}")
        if key in MAP_KINDS or key in ("image", "valid", "boxes", "labels"):
            raise ValueError(f"extra_maps: {key!r} is a key of the sample contract already")
    return {**MAP_KINDS, **extra}


class SampleTransform:
    """Apply an albumentations pipeline to a raw sample and convert it to tensors.

    ``ops`` is a list of albumentations transforms (instantiated from ``conf/data/transforms``);
    normalisation and tensor conversion are always appended here so configs cannot forget them.
    """

    def __init__(
        self,
        ops: Sequence[A.BasicTransform] = (),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
        min_box_visibility: float = 0.1,
        extra_maps: Mapping[str, str] | None = None,
    ):
        self.ignore_index = ignore_index
        self.kinds = map_kinds(extra_maps)
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.std = np.asarray(std, dtype=np.float32) * 255.0
        self.compose = (
            None
            if not ops
            else A.Compose(
                list(ops),
                additional_targets={k: "mask" for k in (*self.kinds, "valid") if k != "mask"},
                bbox_params=A.BboxParams(
                    format="pascal_voc",
                    label_fields=["box_labels", "box_difficult"],
                    min_visibility=min_box_visibility,
                    clip=True,
                ),
                strict=False,
            )
        )
        self._seeded_in: int | None = None  # the process whose numpy generator seeded ``compose``

    def _seed_for_this_process(self) -> None:
        """Seed the pipeline's own generator from numpy's global one, once per process (module doc)."""
        if self.compose is not None and self._seeded_in != os.getpid():
            self.compose.set_random_seed(int(np.random.randint(2**31 - 1)))
            self._seeded_in = os.getpid()

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        self._seed_for_this_process()
        image = sample["image"]
        h, w = image.shape[:2]
        inputs: dict[str, Any] = {"image": image, "valid": np.ones((h, w), dtype=np.uint8)}
        for key in self.kinds:
            if key in sample:
                inputs[key] = sample[key]
        has_boxes = "boxes" in sample
        boxes = np.asarray(sample.get("boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
        inputs["bboxes"] = boxes
        inputs["box_labels"] = np.asarray(sample.get("box_labels", np.zeros(len(boxes))), dtype=np.int64)
        inputs["box_difficult"] = np.asarray(
            sample.get("box_difficult", np.zeros(len(boxes), dtype=bool)), dtype=bool
        )
        out = self.compose(**inputs) if self.compose is not None else inputs

        valid = np.asarray(out["valid"]).astype(bool)
        result: dict[str, Any] = {"image": self._to_image_tensor(out["image"])}
        for key, kind in self.kinds.items():
            if key not in out or key not in sample:
                continue
            arr = np.asarray(out[key])
            if kind == "float":
                result[key] = torch.from_numpy(np.where(valid, arr, 0).astype(np.float32))
                continue
            arr = arr.astype(np.int64)
            arr[~valid] = self.ignore_index if kind == "ignore" else 0
            result[key] = torch.from_numpy(arr)
        if has_boxes:
            result["boxes"] = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
            result["box_labels"] = torch.as_tensor(np.asarray(out["box_labels"], dtype=np.int64))
            result["box_difficult"] = torch.as_tensor(np.asarray(out["box_difficult"], dtype=bool))
        for key in VECTOR_KEYS:  # image-level vectors: untouched by augmentation
            if key in sample:
                result[key] = torch.as_tensor(np.asarray(sample[key], dtype=np.float32))
        result["valid"] = torch.from_numpy(valid)
        if "meta" in sample:
            result["meta"] = dict(sample["meta"])
        return result

    def _to_image_tensor(self, image: np.ndarray) -> torch.Tensor:
        image = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Tensor 3xHxW (normalised) -> uint8 HxWx3, for panels and notebooks."""
    m = torch.tensor(mean, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, device=image.device).view(3, 1, 1)
    rgb = (image.float() * s + m).clamp(0, 1) * 255
    return rgb.byte().permute(1, 2, 0).cpu().numpy()


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> normalised float (1, 3, H, W) (ImageNet mean/std, as the DataModule does):
    one image fed to a network outside a DataLoader (stages, diagnostics)."""
    # a copy: readers may hand out read-only arrays (decoded from a cache), which torch warns about
    x = torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std)[None]
