"""Image panels (image | GT | prediction | CAM ...) sent to whichever loggers are active.

One function builds the pixels, one dispatches them. Every logger gets the same titled figure (one
row per image, a column title over each column, a legend of the classes present, small images
enlarged with nearest-neighbour so label edges stay exact): TensorBoard as an image, CSV runs as
PNG files in the run directory, W&B as an image next to its ``wandb.Image`` with class-labelled,
toggleable masks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
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


def heat(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A [0, 1] map (a CAM) as a JET heat map blended over the image."""
    u8 = (np.clip(values, 0, 1) * 255).astype(np.uint8)
    colour = cv2.applyColorMap(u8, cv2.COLORMAP_JET)[..., ::-1].astype(np.float32)  # BGR -> RGB
    return ((1 - alpha) * image.astype(np.float32) + alpha * colour).clip(0, 255).astype(np.uint8)


def make_panel(
    image: np.ndarray, target: np.ndarray | None, pred: np.ndarray, extras: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """Input | GT overlay | prediction overlay | extra columns, side by side (uint8 HxWx3).
    An extra column of floats is drawn as a heat map (a CAM), one of integers as labels."""
    tiles = [image]
    if target is not None:
        tiles.append(overlay(image, target))
    tiles.append(overlay(image, pred))
    for extra in extras:
        tiles.append(heat(image, extra) if np.issubdtype(extra.dtype, np.floating) else overlay(image, extra))
    sep = np.full((image.shape[0], 2, 3), 255, dtype=np.uint8)
    out = []
    for t in tiles:
        out += [t, sep]
    return np.concatenate(out[:-1], axis=1)


MIN_TILE = 160  # px: a 64-px testbed image is drawn 3x


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.45) -> None:
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def make_figure(
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray | None],
    preds: Sequence[np.ndarray],
    class_names: Sequence[str],
    ignore_index: int = 255,
    extras: dict[str, Sequence[np.ndarray]] | None = None,
    target_title: str = "GT",
) -> np.ndarray:
    """Rows of :func:`make_panel` under column titles, above a legend of the classes shown.
    ``extras``: more columns, title -> one map per image (e.g. ``{"CAM": cams}``); ``target_title``
    names the target column (``pseudo label`` on training panels)."""
    extras = extras or {}
    has_target = any(t is not None for t in targets)
    titles = ["image"] + ([target_title] if has_target else []) + ["prediction", *extras]
    columns = [[col[k] for col in extras.values()] for k in range(len(images))]
    rows = [make_panel(i, t, p, e) for i, t, p, e in zip(images, targets, preds, columns)]
    h, w = images[0].shape[:2]
    scale = max(1, -(-MIN_TILE // max(h, w)))
    rows = [cv2.resize(r, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) for r in rows]
    width = max(r.shape[1] for r in rows)
    header = np.full((22, width, 3), 255, np.uint8)
    for k, title in enumerate(titles):
        _text(header, title, k * (w * scale + 2 * scale) + 4, 16)
    present = sorted(
        {int(v) for arr in [*targets, *preds] if arr is not None for v in np.unique(arr)} - {ignore_index}
    )
    legend = np.full((22, width, 3), 255, np.uint8)
    x, palette = 4, voc_palette()
    for c in present:
        name = class_names[c] if c < len(class_names) else str(c)
        legend[5:17, x : x + 12] = palette[c]
        _text(legend, name, x + 16, 15)
        x += 16 + 8 * len(name) + 14
    padded = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate([header, *padded, legend], axis=0)


def log_panels(
    loggers: Sequence,
    tag: str,
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray | None],
    preds: Sequence[np.ndarray],
    step: int,
    class_names: Sequence[str],
    extras: dict[str, Sequence[np.ndarray]] | None = None,
    target_title: str = "GT",
) -> None:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    figure = make_figure(images, targets, preds, class_names, extras=extras, target_title=target_title)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, figure, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            import wandb

            labels = {i: n for i, n in enumerate(class_names)}
            wb = []
            for img, tgt, prd in zip(images, targets, preds):
                masks = {"prediction": {"mask_data": prd.astype(np.uint8), "class_labels": labels}}
                if tgt is not None:
                    masks["ground_truth"] = {"mask_data": tgt.astype(np.uint8), "class_labels": labels}
                wb.append(wandb.Image(img, masks=masks))
            figure_image = wandb.Image(figure)
            logger.experiment.log({tag: wb, f"{tag}_figure": figure_image, "trainer/global_step": step})
        elif isinstance(logger, CSVLogger):
            out_dir = Path(logger.log_dir) / "panels"
            write_rgb_png(out_dir / f"{tag.replace('/', '_')}_step{step:06d}.png", figure)
