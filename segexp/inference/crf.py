"""Dense CRF (pydensecrf2) of class scores, with psa / SEAM's kernels and background score.

``crf_inference`` = ``YudeWang/SEAM : tool/imutils.py:220-237``: unary ``-log`` of the *un-normalised*
stacked scores (``unary_from_softmax``), Gaussian kernel (sxy 3, compat 3), bilateral kernel
(sxy 80, srgb 13, compat 10), 10 mean-field iterations. The background score is
``(1 - max_c cam_c) ** alpha`` (SEAM: alpha 4 / 24 for the AffinityNet labels; psa 4 / 32) or, with
``bg_mode: constant``, the constant ``bg_threshold`` of the CAM protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CRFKernels", "crf_inference", "cam_crf_scores"]


@dataclass(frozen=True)
class CRFKernels:
    """Dense-CRF kernels and iterations of psa / SEAM ``imutils.crf_inference`` (common.md): the one
    place their defaults live (``conf/stage/crf.yaml`` repeats them as config)."""

    iterations: int = 10
    gauss_sxy: float = 3
    gauss_compat: float = 3
    bi_sxy: float = 80
    bi_srgb: float = 13
    bi_compat: float = 10


def crf_inference(
    image: np.ndarray, probs: np.ndarray, scale_factor: float = 1.0, **kernels: Any
) -> np.ndarray:
    """Mean-field dense CRF. ``image`` uint8 HxWx3, ``probs`` (C, H, W) scores; returns Q (C, H, W).
    ``kernels``: fields of :class:`CRFKernels` (an unknown name is a TypeError naming it)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    k = CRFKernels(**kernels)
    d.addPairwiseGaussian(sxy=k.gauss_sxy / scale_factor, compat=k.gauss_compat)
    d.addPairwiseBilateral(
        sxy=k.bi_sxy / scale_factor, srgb=k.bi_srgb, rgbim=np.ascontiguousarray(image), compat=k.bi_compat
    )
    return np.asarray(d.inference(int(k.iterations)), dtype=np.float32).reshape(c, h, w)


def cam_crf_scores(
    cams: np.ndarray, bg_mode: str = "power", alpha: float = 4.0, bg_threshold: float = 0.26
) -> np.ndarray:
    """Stacked [background, cams] scores (K+1, H, W) for the CRF (see the module docstring)."""
    if bg_mode == "power":
        bg = np.power(1.0 - cams.max(0, keepdims=True), alpha) if len(cams) else np.ones((1, *cams.shape[1:]))
    elif bg_mode == "constant":
        bg = np.full((1, *cams.shape[1:]), bg_threshold, np.float32)
    else:
        raise ValueError(f"bg_mode must be 'power' or 'constant', got {bg_mode!r}")
    return np.concatenate([bg.astype(np.float32), cams.astype(np.float32)], 0)
