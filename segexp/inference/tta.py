"""Test-time augmentation: multi-scale x flip, optionally with sliding-window inference.

Class probabilities (softmax of the scores) are averaged over every view at the input size,
which is how DeepLab-style evaluations report "MS+Flip". Sliding windows keep memory bounded
for large images: overlapping windows are averaged, and images smaller than the window are
zero-padded (the padded region is cut away again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Predictor = Callable[[torch.Tensor], torch.Tensor]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_window(predict: Predictor, images: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Average the probabilities of overlapping ``window`` x ``window`` crops taken every ``stride``."""
    b, _, h, w = images.shape
    ph, pw = max(0, window - h), max(0, window - w)
    padded = F.pad(images, (0, pw, 0, ph)) if (ph or pw) else images
    hh, ww = padded.shape[-2:]
    total, count = None, torch.zeros(1, 1, hh, ww, device=images.device)
    for y in _window_starts(hh, window, stride):
        for x in _window_starts(ww, window, stride):
            crop = padded[..., y : y + window, x : x + window]
            probs = _resize(predict(crop), crop.shape[-2:]).softmax(1)
            if total is None:
                total = torch.zeros(b, probs.shape[1], hh, ww, device=images.device, dtype=probs.dtype)
            total[..., y : y + window, x : x + window] += probs
            count[..., y : y + window, x : x + window] += 1
    return (total / count)[..., :h, :w]


def predict_tta(
    predict: Predictor,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Class probabilities (B, C, H, W) averaged over scales x {identity, horizontal flip}."""
    size = tuple(images.shape[-2:])

    def one_view(x: torch.Tensor) -> torch.Tensor:
        if window:
            return sliding_window(predict, x, window, stride or max(1, window * 2 // 3))
        return _resize(predict(x), x.shape[-2:]).softmax(1)

    total = None
    views = 0
    for scale in scales:
        scaled_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        x = _resize(images, scaled_size)
        for flipped in (False, True) if flip else (False,):
            inp = x.flip(-1) if flipped else x
            probs = one_view(inp)
            if flipped:
                probs = probs.flip(-1)
            probs = _resize(probs, size)
            total = probs if total is None else total + probs
            views += 1
    return total / views
