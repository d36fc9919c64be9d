"""GrabCut pseudo masks from boxes (the pre-processing of Box2Seg and most box-supervised methods).

Per image, every box initialises one OpenCV GrabCut (``cv2.grabCut``) on a crop around it; the
per-box foreground masks are painted into one class map:

* **Crop / margin.** GrabCut runs on the box enlarged by ``margin`` x its longer side on every
  side (clipped to the image). Pixels of the crop outside the box are certain background, so the
  background colour model sees the box's surroundings only (local, and much faster than the
  whole image). ``margin: null`` uses the whole image (``GC_INIT_WITH_RECT`` semantics).
* **No context.** When the crop has (almost) no pixels outside the box (a box covering the image),
  a strip of ``border`` pixels inside the box becomes *probable* background, so the background
  model has samples; ``cv2.grabCut`` fails without any.
* **Degenerate results.** If GrabCut keeps less than ``min_fill`` of a box's area (it can return an
  empty mask on low-contrast objects) the filled box is used instead, the usual fallback
  (Khoreva et al., CVPR 2017); 0 disables the fallback.
* **Overlap rule** (not given in the Box2Seg text; stated and configurable): ``smaller`` (default)
  — where foregrounds of several boxes overlap, the box with the smaller area wins (a small
  object in front of a large one is the common case in VOC); ``larger`` — the larger one wins.
  Boxes are painted in order of decreasing (``smaller``) / increasing (``larger``) area.
* Pixels outside every box are background (0). Pixels inside a box that GrabCut calls
  background are background too (``inside_bg: background``), or ignore (``inside_bg: ignore``).
* ``mode: rect`` skips GrabCut and fills the boxes (same overlap rule): the "train on box
  rectangles" baseline, cached and scored by the same code.

:class:`GrabCutStage` runs this over a reader's images in parallel (a process pool over all cores
by default), caches each image's mask in a :class:`~segexp.stages.cache.StageCache` (settings-hashed
directory, per-image inputs key from the image and annotation files, atomic writes), so an
interrupted run resumes with the images it has not done, and scores the masks against the
ground-truth masks where the dataset has them (the "GrabCut mIoU" papers quote), next to the
filled-box masks as a reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segexp.stages.base import LabelStage, all_cores, confusion, iou_report
from segexp.utils.hashing import content_key, file_key, stable_hash

log = logging.getLogger(__name__)

__all__ = ["GrabCutStage", "fill_boxes", "grabcut_box", "grabcut_image", "paint_order"]

OVERLAP_RULES = ("smaller", "larger")
IGNORE = 255


def paint_order(boxes: np.ndarray, overlap: str = "smaller") -> np.ndarray:
    """Indices of ``boxes`` in painting order: the box painted last wins where masks overlap."""
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    order = np.argsort(-area if overlap == "smaller" else area, kind="stable")
    return order


def _int_box(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """0-based xyxy (max exclusive) float box -> clipped integer box covering the same pixels."""
    x0, y0, x1, y1 = box
    x0, y0 = int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.floor(y0), 0, h))
    x1, y1 = int(np.clip(np.ceil(x1), 0, w)), int(np.clip(np.ceil(y1), 0, h))
    return x0, y0, x1, y1


def fill_boxes(
    boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int], overlap: str = "smaller"
) -> np.ndarray:
    """The filled-rectangle mask of ``boxes`` (uint8 class map, 0 outside every box)."""
    h, w = size
    out = np.zeros((h, w), dtype=np.uint8)
    for k in paint_order(boxes, overlap):
        x0, y0, x1, y1 = _int_box(boxes[k], h, w)
        out[y0:y1, x0:x1] = labels[k]
    return out


def grabcut_box(
    image: np.ndarray,
    box: Sequence[float],
    *,
    iterations: int,
    margin: float | None,
    border: int,
    min_fill: float,
    seed: int = 0,
) -> np.ndarray:
    """Foreground (bool HxW, False outside the box) of one GrabCut initialised from ``box``.

    ``image`` is uint8 RGB HxWx3; ``box`` 0-based xyxy with exclusive max. See the module
    docstring for ``margin``, ``border`` and ``min_fill``; their defaults live once, on
    :class:`GrabCutStage` (and in ``conf/stage/grabcut.yaml``).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _int_box(box, h, w)
    out = np.zeros((h, w), dtype=bool)
    bw, bh = x1 - x0, y1 - y0
    if bw <= 0 or bh <= 0:
        return out
    if margin is None:
        cx0, cy0, cx1, cy1 = 0, 0, w, h
    else:
        pad = int(round(margin * max(bw, bh)))
        cx0, cy0, cx1, cy1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])  # OpenCV wants BGR
    mask = np.full(crop.shape[:2], cv2.GC_BGD, dtype=np.uint8)
    bx0, by0, bx1, by1 = x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0
    mask[by0:by1, bx0:bx1] = cv2.GC_PR_FGD
    context = mask.size - bw * bh
    if context < 64 and bw > 2 * border and bh > 2 * border:
        # (almost) no pixels outside the box: give the background model a strip inside it
        strip = np.zeros_like(mask, dtype=bool)
        strip[by0:by1, bx0:bx1] = True
        strip[by0 + border : by1 - border, bx0 + border : bx1 - border] = False
        mask[strip] = cv2.GC_PR_BGD
    fg_box = None
    if bw >= 2 and bh >= 2 and iterations > 0:
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(seed)
        try:
            cv2.grabCut(crop, mask, None, bgd, fgd, int(iterations), cv2.GC_INIT_WITH_MASK)
            fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
            fg_box = fg[by0:by1, bx0:bx1]
        except cv2.error as exc:  # e.g. a uniform crop: no colour model can be fitted
            log.debug("grabCut failed on box %s: %s", (x0, y0, x1, y1), exc)
    if fg_box is None or fg_box.mean() < min_fill:
        fg_box = np.ones((bh, bw), dtype=bool)
    out[y0:y1, x0:x1] = fg_box
    return out


def grabcut_image(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    *,
    overlap: str,
    inside_bg: str,
    mode: str,
    **grabcut: Any,
) -> np.ndarray:
    """The pseudo class map (uint8 HxW) of one image from its boxes (see the module docstring).

    ``grabcut``: :func:`grabcut_box`'s settings (unused when ``mode='rect'``).
    """
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if mode == "rect":
        return fill_boxes(boxes, labels, (h, w), overlap)
    if mode != "grabcut":
        raise ValueError(f"mode must be 'grabcut' or 'rect', got {mode!r}")
    if inside_bg not in ("background", "ignore"):
        raise ValueError(f"inside_bg must be 'background' or 'ignore', got {inside_bg!r}")
    out = np.zeros((h, w), dtype=np.uint8)
    if inside_bg == "ignore":
        out = np.where(fill_boxes(boxes, labels, (h, w)) > 0, IGNORE, 0).astype(np.uint8)
    for k in paint_order(boxes, overlap):
        fg = grabcut_box(image, boxes[k], seed=int(k), **grabcut)
        out[fg] = labels[k]
    return out


# ---------------------------------------------------------------------------------------------
# The stage: a reader's images -> cached masks, scored against GT next to the filled boxes
# ---------------------------------------------------------------------------------------------


def inputs_key(reader: Any, index: int) -> str:
    """Key of the files item ``index`` is computed from (image + box annotation; size and mtime)."""
    image_id = reader.ids[index]
    if hasattr(reader, "image_path"):
        files = [reader.image_path(image_id)]
        if hasattr(reader, "xml_path") and reader.xml_path(image_id).is_file():
            files.append(reader.xml_path(image_id))
        elif hasattr(reader, "sbd_path") and reader.sbd_path("inst", image_id) is not None:
            files.append(reader.sbd_path("inst", image_id))
        return file_key(*files)
    sample = reader[index]  # generic reader: key from the decoded content
    return content_key(sample["image"], np.asarray(sample["boxes"]), np.asarray(sample["box_labels"]))


class GrabCutStage(LabelStage):
    """Box -> mask stage: ``run(reader)`` fills the cache for a split; ``get(reader, i)`` reads one mask.

    Settings that change the masks are part of the cache key (and of ``settings.json`` beside the
    entries); ``workers`` (null = all cores, shared among the DDP ranks of a node), ``progress`` and
    ``cache_dir`` are not.
    """

    reads = frozenset({"image", "boxes", "box_labels", "box_difficult"})
    requires = "boxes"

    def __init__(
        self,
        name: str = "grabcut",
        mode: str = "grabcut",
        iterations: int = 5,
        margin: float | None = 0.5,
        border: int = 2,
        min_fill: float = 0.0,
        overlap: str = "smaller",
        inside_bg: str = "background",
        use_difficult: bool = True,
        cache_dir: str | os.PathLike = "stage_cache",
        workers: int | None = None,
        progress: bool = True,
        version: int = 1,
    ):
        if overlap not in OVERLAP_RULES:
            raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
        if mode not in ("grabcut", "rect"):
            raise ValueError(f"mode must be 'grabcut' or 'rect', got {mode!r}")
        self.name = name
        self.mode = mode
        self.iterations = int(iterations)
        self.margin = None if margin is None else float(margin)
        self.border = int(border)
        self.min_fill = float(min_fill)
        self.overlap = overlap
        self.inside_bg = inside_bg
        self.use_difficult = bool(use_difficult)
        self.cache_dir = Path(cache_dir)
        self.workers = workers
        self.progress = progress
        self.version = int(version)

    def grabcut_settings(self) -> dict[str, Any]:
        """:func:`grabcut_box`'s keyword arguments, as this stage sets them."""
        names = ("iterations", "margin", "border", "min_fill")
        return {name: getattr(self, name) for name in names}

    def settings(self) -> dict[str, Any]:
        common = {"mode": self.mode, "overlap": self.overlap, "use_difficult": self.use_difficult}
        if self.mode == "rect":
            return common
        return {
            **common,
            "iterations": self.iterations,
            "margin": self.margin,
            "border": self.border,
            "min_fill": self.min_fill,
            "inside_bg": self.inside_bg,
            "opencv": cv2.__version__,
        }

    def inputs_key(self, reader: Any, index: int) -> str:
        return inputs_key(reader, index)

    def default_workers(self, world_size: int) -> int:
        return all_cores(world_size)

    def worker_init(self) -> None:
        cv2.setNumThreads(1)  # one process per core already

    def select_boxes(self, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.asarray(sample["boxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(sample["box_labels"], dtype=np.int64).reshape(-1)
        if not self.use_difficult and "box_difficult" in sample:
            keep = ~np.asarray(sample["box_difficult"], dtype=bool)
            boxes, labels = boxes[keep], labels[keep]
        return boxes, labels

    def compute(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        boxes, labels = self.select_boxes(sample)
        mask = grabcut_image(
            sample["image"],
            boxes,
            labels,
            overlap=self.overlap,
            inside_bg=self.inside_bg,
            mode=self.mode,
            **self.grabcut_settings(),
        )
        return {"pseudo": mask}

    def score(self, sample, entry, reader) -> dict[str, np.ndarray]:
        """The masks (ignore counts as background) and, as the reference, the filled boxes."""
        mask = entry["pseudo"]
        n = int(getattr(reader, "num_classes", max(int(mask.max()), 1) + 1))
        boxes, labels = self.select_boxes(sample)
        gt = np.asarray(sample["mask"])
        return {
            "cm": confusion(np.where(mask == IGNORE, 0, mask), gt, n),
            "cm_rect": confusion(fill_boxes(boxes, labels, gt.shape, self.overlap), gt, n),
        }

    def summary(self, totals, reader) -> dict[str, Any]:
        names = getattr(reader, "class_names", None)
        report = {"pseudo": iou_report(totals["cm"], names), "box_rect": iou_report(totals["cm_rect"], names)}
        log.info(
            "%s: pseudo-label mIoU %.4f vs GT (filled boxes: %.4f)",
            self.name,
            report["pseudo"]["mIoU"],
            report["box_rect"]["mIoU"],
        )
        return report

    def __repr__(self) -> str:
        return f"GrabCutStage(name={self.name!r}, {stable_hash(self.settings(), 8)}: {self.settings()})"
