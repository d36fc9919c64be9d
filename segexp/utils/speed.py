"""GPU speed options as a Lightning callback (``conf/callbacks/default.yaml: speed``), off by default.

Why a callback: device-level choices belong to the trainer side of a run, never to method code, and a
callback reaches the model after Lightning has moved it to its device, for every method alike.

* ``channels_last``: model and every batch's images in NHWC memory layout. On tensor-core GPUs
  convolutions in 16-mixed / bf16-mixed often run faster in NHWC; on CPU it rarely helps. Off until
  ``python -m segexp.bench gpu --channels-last`` shows a gain on the machine in use.
* ``compile``: ``torch.compile`` of the method's network in place (``nn.Module.compile``), so the
  checkpoint's parameter names stay those of the plain network (``load_method`` reads them as ever).
  A mapping is passed to ``torch.compile`` (e.g. ``{mode: max-autotune}``). The first steps pay the
  compilation; worth it only for long runs, and only where measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

IMAGE_KEYS = ("image",)  # batch entries that are NCHW image tensors


def to_channels_last(batch: Any) -> Any:
    """The batch with its 4-d image tensors in channels-last layout (other entries untouched)."""
    if isinstance(batch, Mapping):
        for key in IMAGE_KEYS:
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                batch[key] = value.contiguous(memory_format=torch.channels_last)
    return batch


class SpeedOptions(pl.Callback):
    """Applies ``channels_last`` and ``compile`` to the method's network (module docstring)."""

    def __init__(self, channels_last: bool = False, compile: bool | Mapping[str, Any] = False):
        self.channels_last = bool(channels_last)
        self.compile_options = dict(compile) if isinstance(compile, Mapping) else ({} if compile else None)

    @property
    def active(self) -> bool:
        return self.channels_last or self.compile_options is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile_options is not None and not getattr(pl_module, "_segexp_compiled", False):
            network = getattr(pl_module, "model", pl_module)
            network.compile(**self.compile_options)
            pl_module._segexp_compiled = True

    def _batch(self, batch: Any) -> None:
        if self.channels_last:
            to_channels_last(batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(batch)
