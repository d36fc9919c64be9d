"""Batching samples of different sizes and with variable-length keys.

Evaluation keeps images at their original size (metrics are defined there), so samples in a
batch may differ in size: images are zero-padded to the largest one (bottom/right) and semantic
maps padded with ``ignore_index`` so padding never counts in a metric. Boxes stay lists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_LIST_KEYS = ("boxes", "box_labels", "box_difficult", "meta")
_PAD_IGNORE = ("mask", "pseudo")


def _pad_to(t: torch.Tensor, h: int, w: int, value: float) -> torch.Tensor:
    dh, dw = h - t.shape[-2], w - t.shape[-1]
    if dh == 0 and dw == 0:
        return t
    return F.pad(t, (0, dw, 0, dh), value=value)


def pad_collate(
    samples: list[dict[str, Any]], ignore_index: int = 255, ignore_keys: tuple[str, ...] = _PAD_IGNORE
) -> dict[str, Any]:
    """Collate a list of tensor samples (see ``segexp.data.transforms``) into a batch dict;
    maps in ``ignore_keys`` are padded with ``ignore_index``, other maps with 0."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    h = max(s["image"].shape[-2] for s in samples)
    w = max(s["image"].shape[-1] for s in samples)
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in _LIST_KEYS:
            batch[key] = values
        elif isinstance(values[0], torch.Tensor) and values[0].dim() >= 2:
            fill = ignore_index if key in ignore_keys else 0
            batch[key] = torch.stack([_pad_to(v, h, w, fill) for v in values])
        else:
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
    return batch


def unpadded_sizes(batch: dict[str, Any]) -> list[tuple[int, int]]:
    """(h, w) of each image's own area in a :func:`pad_collate` batch (padding is bottom/right; the
    ``valid`` map, when the batch has one, marks the image's pixels)."""
    valid = batch.get("valid")
    if valid is None:
        images = batch["image"]
        return [tuple(images.shape[-2:])] * images.shape[0]
    sizes = []
    for v in valid:
        rows, cols = v.any(1).nonzero(), v.any(0).nonzero()
        sizes.append((int(rows.max()) + 1 if len(rows) else 0, int(cols.max()) + 1 if len(cols) else 0))
    return sizes
