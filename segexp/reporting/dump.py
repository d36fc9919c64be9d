"""Per-image outputs of an evaluation: prediction PNGs at original size and a per-image CSV.

Predictions are written as VOC-palette PNGs named by the sample id, cropped back to the image's
original size (evaluation batches are padded bottom/right). Each DDP rank writes its own CSV
shard, so ranks never write the same file. Salient-object methods write their continuous maps
instead (:class:`SaliencyDump`), in the folder layout ``segexp.sod_eval`` reads.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from segexp.data.collate import unpadded_sizes
from segexp.data.io import write_gray_png, write_palette_png
from segexp.metrics.semantic import confusion_matrix, scores_from_confusion
from segexp.utils.atomic import write_text


class PredictionDump:
    def __init__(self, out_dir: str | Path, num_classes: int, class_names: Sequence[str],
                 ignore_index: int = 255, predictions: bool = True, per_image: bool = True):
        self.out_dir = Path(out_dir)
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.predictions = predictions
        self.per_image = per_image
        self.rows: list[dict[str, Any]] = []

    def add(self, batch: dict[str, Any], labels: torch.Tensor) -> None:
        metas = batch.get("meta") or [{"id": f"{len(self.rows) + i:06d}"} for i in range(len(labels))]
        for i, meta in enumerate(metas):
            h, w = meta.get("orig_size", labels[i].shape)
            pred = labels[i, :h, :w]
            if self.predictions:
                write_palette_png(self.out_dir / "predictions" / f"{meta['id']}.png",
                                  pred.to(torch.uint8).cpu().numpy())
            if self.per_image and "mask" in batch:
                cm = confusion_matrix(pred, batch["mask"][i, :h, :w], self.num_classes, self.ignore_index)
                scores = scores_from_confusion(cm.cpu())
                row = {"id": meta["id"], "mIoU": scores["mIoU"], "pixel_acc": scores["pixel_acc"]}
                row.update({f"IoU_{n}": float(v) for n, v in zip(self.class_names, scores["iou"].tolist())})
                self.rows.append(row)

    def finish(self, rank: int = 0) -> None:
        if not self.rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        name = "per_image.csv" if rank == 0 else f"per_image.rank{rank}.csv"
        write_text(self.out_dir / name, buf.getvalue())
        self.rows = []


class SaliencyDump:
    """Saliency maps as 8-bit grayscale PNGs at each image's original size, where
    ``segexp.sod_eval`` looks for them: ``<out>/saliency/<method>/<dataset>/<id>.png``."""

    def __init__(self, out_dir: str | Path, method: str, datasets: Sequence[str]):
        self.root = Path(out_dir) / "saliency"
        self.method = method
        self.datasets = list(datasets)
        self.count = 0

    def folder(self, dataset_index: int = 0) -> Path:
        return self.root / self.method / self.datasets[dataset_index]

    def add(self, batch: dict[str, Any], saliency: torch.Tensor, dataset_index: int = 0) -> None:
        """``saliency`` (B, H, W) in [0, 1] at the batch size; padding cropped, then resized back."""
        for i, (meta, (vh, vw)) in enumerate(zip(batch["meta"], unpadded_sizes(batch))):
            sal = saliency[i, :vh, :vw].float()
            h, w = meta.get("orig_size", sal.shape)
            if tuple(sal.shape) != (h, w):
                sal = F.interpolate(sal[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            out = (sal.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            write_gray_png(self.folder(dataset_index) / f"{meta['id']}.png", out)
            self.count += 1

    def finish(self, rank: int = 0) -> None:
        pass
