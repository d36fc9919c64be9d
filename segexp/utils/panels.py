"""Image panels (input | ground truth | prediction) sent to whichever loggers are active.

One function builds the pixels, one dispatches them: TensorBoard gets an image, W&B gets a
``wandb.Image`` with class-labelled masks (toggleable in its UI), CSV runs get PNG files in the
run directory — so every logger shows the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.data.io import voc_palette, write_rgb_png

log = logging.getLogger(__name__)


def colorize(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Label map -> RGB with the VOC palette; ignore pixels white."""
    pal = voc_palette()
    rgb = pal[np.clip(label, 0, 255).astype(np.int64)]
    rgb[label == ignore_index] = 255
    return rgb


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    color = colorize(label, ignore_index).astype(np.float32)
    fg = (label > 0) & (label != ignore_index)
    out = image.astype(np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * color[fg]
    return out.clip(0, 255).astype(np.uint8)


def make_panel(image: np.ndarray, target: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """Input | GT overlay | prediction overlay, side by side (uint8 HxWx3)."""
    tiles = [image]
    if target is not None:
        tiles.append(overlay(image, target))
    tiles.append(overlay(image, pred))
    sep = np.full((image.shape[0], 2, 3), 255, dtype=np.uint8)
    out = []
    for t in tiles:
        out += [t, sep]
    return np.concatenate(out[:-1], axis=1)


def log_panels(
    loggers: Sequence,
    tag: str,
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray | None],
    preds: Sequence[np.ndarray],
    step: int,
    class_names: Sequence[str],
) -> None:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    panels = [make_panel(i, t, p) for i, t, p in zip(images, targets, preds)]
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for k, panel in enumerate(panels):
                logger.experiment.add_image(f"{tag}/{k}", panel, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            import wandb

            labels = {i: n for i, n in enumerate(class_names)}
            wb = []
            for img, tgt, prd in zip(images, targets, preds):
                masks = {"prediction": {"mask_data": prd.astype(np.uint8), "class_labels": labels}}
                if tgt is not None:
                    masks["ground_truth"] = {"mask_data": tgt.astype(np.uint8), "class_labels": labels}
                wb.append(wandb.Image(img, masks=masks))
            logger.experiment.log({tag: wb, "trainer/global_step": step})
        elif isinstance(logger, CSVLogger):
            out_dir = Path(logger.log_dir) / "panels"
            for k, panel in enumerate(panels):
                write_rgb_png(out_dir / f"{tag.replace('/', '_')}_step{step:06d}_{k}.png", panel)
