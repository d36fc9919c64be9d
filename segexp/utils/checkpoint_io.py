"""Checkpoints written atomically: a crash mid-save never leaves a truncated ``last.ckpt``.

Lightning's ``TorchCheckpointIO`` writes straight into the target file; this writes to a
temporary file in the same directory and renames it over the target.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from segexp.utils.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None
    ) -> None:
        if get_filesystem(path).protocol not in ("file", ("file", "local")) and "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's own
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)
