"""Dump of predicted entity maps in the COCO panoptic format, plus per-image entity scores.

``predictions/<id>.png``: RGB PNG with segment id = R + 256 G + 256^2 B (0 = no segment, e.g.
padding), cropped to the original size; ``predictions.json``: COCO panoptic ``annotations``
(``file_name``, ``segments_info`` with id, area, bbox xywh, ``category_id`` 1 = "entity") and
one ``categories`` entry; ``per_image.csv``: GT segment count, recall@0.5 and mean best IoU per
image. DDP ranks write ``predictions.rank<r>.json`` / ``per_image.rank<r>.csv`` shards.
Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segexp.data.io import id_to_rgb, write_rgb_png
from segexp.metrics.entity import best_matches, iou_matrix
from segexp.utils.atomic import write_json, write_text

__all__ = ["EntityDump", "segments_info"]

CATEGORIES = [{"id": 1, "name": "entity", "supercategory": "entity", "isthing": 1}]


def segments_info(ids: np.ndarray) -> list[dict]:
    """COCO panoptic ``segments_info`` of an (H,W) id map (0 = no segment)."""
    info = []
    for seg_id in np.unique(ids):
        if seg_id == 0:
            continue
        ys, xs = np.nonzero(ids == seg_id)
        x0, y0 = int(xs.min()), int(ys.min())
        info.append(
            {
                "id": int(seg_id),
                "category_id": 1,
                "iscrowd": 0,
                "area": int(len(xs)),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
            }
        )
    return info


class EntityDump:
    def __init__(
        self, out_dir: str | Path, predictions: bool = True, per_image: bool = True, ignore_index: int = 255
    ):
        self.out_dir = Path(out_dir)
        self.predictions = predictions
        self.per_image = per_image
        self.ignore_index = ignore_index
        self.annotations: list[dict] = []
        self.rows: list[dict[str, Any]] = []

    @classmethod
    def like(cls, dump: Any, ignore_index: int = 255) -> EntityDump:
        """The entity counterpart of the runner's semantic ``PredictionDump`` (same folder, flags)."""
        return cls(dump.out_dir, bool(dump.predictions), bool(dump.per_image), ignore_index)

    def add(self, batch: dict[str, Any], pred: torch.Tensor, target: torch.Tensor | None = None) -> None:
        metas = batch.get("meta") or [
            {"id": f"{len(self.annotations) + len(self.rows) + i:06d}"} for i in range(len(pred))
        ]
        for i, meta in enumerate(metas):
            h, w = meta.get("orig_size", pred[i].shape)
            ids = pred[i, :h, :w].cpu().numpy().astype(np.int64)
            name = f"{meta['id']}.png"
            if self.predictions:
                write_rgb_png(self.out_dir / "predictions" / name, id_to_rgb(ids))
                self.annotations.append(
                    {"image_id": meta["id"], "file_name": name, "segments_info": segments_info(ids)}
                )
            if self.per_image and target is not None:
                gt = target[i, :h, :w].cpu()
                m = iou_matrix(
                    gt, torch.from_numpy(ids), self.ignore_index, gt_background=0, pred_background=0
                )
                best, _ = best_matches(m["iou"])
                n = int(best.numel())
                self.rows.append(
                    {
                        "id": meta["id"],
                        "num_gt": n,
                        "num_pred": len(m["pred_ids"]),
                        "recall@0.5": float((best >= 0.5).double().mean()) if n else float("nan"),
                        "mIoU": float(best.mean()) if n else float("nan"),
                    }
                )

    def finish(self, rank: int = 0) -> None:
        suffix = "" if rank == 0 else f".rank{rank}"
        if self.annotations:
            write_json(
                self.out_dir / f"predictions{suffix}.json",
                {"annotations": self.annotations, "categories": CATEGORIES},
            )
        if self.rows:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
            write_text(self.out_dir / f"per_image{suffix}.csv", buf.getvalue())
        self.annotations, self.rows = [], []
