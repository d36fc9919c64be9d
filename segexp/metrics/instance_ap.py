"""Instance-segmentation AP through pycocotools' ``COCOeval`` (``iouType="segm"``).

Why pycocotools itself: AP@[.50:.95] depends on many protocol details (101-point interpolated
precision, greedy score-ordered matching, ``maxDets``, crowd handling); the only safe way to be
exact is to run the reference. Here we only build the COCO structures: masks are encoded to RLE
with ``pycocotools.mask.encode``; GT and detections get image ids and annotation ids numbered
from 1 by us -- ``COCOeval.evaluateImg`` stores the *id* of the matched GT in ``dtm`` and
``accumulate`` counts a detection as a true positive iff that id is non-zero, so a GT annotation
with id 0 turns a correct detection into a false positive. Class-agnostic by default (one
category); pass ``labels`` for class-aware AP.

DDP: each image's RLE strings are stored as uint8 byte tensors with their lengths (cat-lists),
so they can be gathered across ranks; COCOeval runs once in ``compute()``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric

__all__ = ["InstanceAP", "masks_from_instance_map", "coco_ap"]


def masks_from_instance_map(instance_map, background: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N,H,W) bool, ids (N,)) for every id of an (H,W) instance map except ``background``."""
    m = np.asarray(instance_map.cpu() if isinstance(instance_map, torch.Tensor) else instance_map)
    ids = np.unique(m)
    if background is not None:
        ids = ids[ids != background]
    return m[None] == ids[:, None, None], ids


def _encode(masks: np.ndarray) -> list[dict]:
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def coco_ap(images: list[dict], max_dets: int = 100) -> dict:
    """Run COCOeval (segm) over ``images``: dicts with ``height, width, gt_rles, gt_labels,
    dt_rles, dt_labels, dt_scores``. Returns AP, AP50, AP75 (NaN when there is no GT)."""
    gt_anns, dt_anns, cats = [], [], set()
    for img_id, im in enumerate(images, start=1):
        for rle, lab in zip(im["gt_rles"], im["gt_labels"]):
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": img_id, "category_id": int(lab),
                            "segmentation": rle, "area": float(mask_utils.area(rle)),
                            "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
            cats.add(int(lab))
        for rle, lab, score in zip(im["dt_rles"], im["dt_labels"], im["dt_scores"]):
            dt_anns.append({"image_id": img_id, "category_id": int(lab), "segmentation": rle,
                            "score": float(score)})
            cats.add(int(lab))
    if not gt_anns:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    dataset = {"images": [{"id": i, "height": im["height"], "width": im["width"]}
                          for i, im in enumerate(images, start=1)],
               "annotations": gt_anns, "categories": [{"id": c} for c in sorted(cats)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(dt_anns) if dt_anns else COCO()
        if not dt_anns:
            dt.dataset = {"images": dataset["images"], "annotations": [],
                          "categories": dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap = [float(x) if x >= 0 else float("nan") for x in ev.stats[:3]]
    return {"AP": ap[0], "AP50": ap[1], "AP75": ap[2]}


def _to_bytes(rles: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    raw = [r["counts"] if isinstance(r["counts"], bytes) else r["counts"].encode() for r in rles]
    data = np.frombuffer(b"".join(raw), dtype=np.uint8).copy()
    return torch.from_numpy(data), torch.tensor([len(b) for b in raw], dtype=torch.long)


def _flat(state) -> torch.Tensor:
    """A cat-list state as one 1-D tensor (a list before sync, possibly a tensor after)."""
    if isinstance(state, torch.Tensor):
        return state.reshape(-1)
    return torch.cat([x.reshape(-1) for x in state]) if state else torch.zeros(0, dtype=torch.long)


class InstanceAP(Metric):
    """AP, AP50, AP75 (COCO segm) of predicted instances against GT instance maps.

    ``update(pred_masks, scores, gt, pred_labels=None, gt_labels=None)`` for one image:
    ``pred_masks`` (N,H,W) bool (may overlap) *or* an (H,W) instance map (then ``scores`` is
    indexed in the order of its sorted non-background ids), ``gt`` an (H,W) instance map or
    (M,H,W) masks. Instance-map ids equal to ``background`` are not instances; any other id --
    0 included when ``background`` is None -- is, and COCO ids are renumbered from 1.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, background: int | None = 0, max_dets: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.background, self.max_dets = background, max_dets
        for name in ("meta", "gt_bytes", "gt_len", "gt_labels", "dt_bytes", "dt_len", "dt_labels",
                     "dt_scores"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _masks(self, x) -> np.ndarray:
        x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
        return x.astype(bool) if x.ndim == 3 else masks_from_instance_map(x, self.background)[0]

    def update(self, pred_masks, scores, gt, pred_labels=None, gt_labels=None) -> None:
        dm, gm = self._masks(pred_masks), self._masks(gt)
        h, w = gm.shape[1:]
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).cpu()
        if len(scores) != len(dm):
            raise ValueError(f"{len(scores)} scores for {len(dm)} predicted instances")
        for prefix, masks, labels in (("gt", gm, gt_labels), ("dt", dm, pred_labels)):
            data, lens = _to_bytes(_encode(masks))
            getattr(self, f"{prefix}_bytes").append(data)
            getattr(self, f"{prefix}_len").append(lens)
            lab = torch.ones(len(masks), dtype=torch.long) if labels is None else torch.as_tensor(labels)
            getattr(self, f"{prefix}_labels").append(lab.long().reshape(-1).cpu())
        self.dt_scores.append(scores)
        self.meta.append(torch.tensor([h, w, len(gm), len(dm)], dtype=torch.long))

    def _images(self) -> list[dict]:
        cat = _flat
        meta = cat(self.meta).view(-1, 4).tolist()
        streams = {}
        for prefix in ("gt", "dt"):
            data = cat(getattr(self, f"{prefix}_bytes")).to(torch.uint8).numpy().tobytes()
            lens = cat(getattr(self, f"{prefix}_len")).long().tolist()
            offs = np.concatenate([[0], np.cumsum(lens)]).astype(int)
            streams[prefix] = ([data[offs[i]:offs[i + 1]] for i in range(len(lens))],
                               cat(getattr(self, f"{prefix}_labels")).long().tolist())
        scores = cat(self.dt_scores).double().tolist()
        images, gi, di = [], 0, 0
        for h, w, ng, nd in meta:
            size = [int(h), int(w)]
            images.append({
                "height": size[0], "width": size[1],
                "gt_rles": [{"size": size, "counts": c} for c in streams["gt"][0][gi:gi + ng]],
                "gt_labels": streams["gt"][1][gi:gi + ng],
                "dt_rles": [{"size": size, "counts": c} for c in streams["dt"][0][di:di + nd]],
                "dt_labels": streams["dt"][1][di:di + nd],
                "dt_scores": scores[di:di + nd],
            })
            gi, di = gi + ng, di + nd
        return images

    def compute(self) -> dict:
        return coco_ap(self._images(), self.max_dets)
