"""Checks and conversions shared by the dataset readers.

Each reader decodes a different layout, but the failure modes are the same (a label map of
another size than its image, values outside the class set, a file matched by stem that is
missing), so they are checked here once and always reported with the offending file names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from segexp.data.io import DatasetError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def as_class_names(names: Sequence[str]) -> tuple[str, ...]:
    """A plain tuple of str (Hydra passes ListConfig), so readers can be pickled to workers."""
    return tuple(str(n) for n in names)


def check_same_size(
    image: np.ndarray, label: np.ndarray, image_path: str | os.PathLike, label_path: str | os.PathLike
) -> None:
    """A label map must cover its image pixel for pixel; name both files and both sizes if not."""
    if image.shape[:2] != label.shape[:2]:
        ih, iw = image.shape[:2]
        lh, lw = label.shape[:2]
        raise DatasetError(
            label_path,
            f"size {lw}x{lh} (WxH) differs from its image {image_path} of size {iw}x{ih}",
        )


def check_label_values(
    mask: np.ndarray, num_classes: int, path: str | os.PathLike, ignore_index: int = 255
) -> np.ndarray:
    """Return ``mask`` as uint8 after checking every value is a class index or ``ignore_index``."""
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8])
        more = f" (+{bad.size - 8} more)" if bad.size > 8 else ""
        raise DatasetError(
            path,
            f"label values {shown}{more} outside the class set 0..{num_classes - 1}"
            f" (and {ignore_index} = ignore)",
        )
    return mask.astype(np.uint8)


def boxes_array(boxes: Iterable[Sequence[float]]) -> np.ndarray:
    """Nx4 float32 (0x4 when there are none), so empty images batch like the others."""
    arr = np.asarray(list(boxes), dtype=np.float32)
    return arr.reshape(-1, 4)


def boxes_from_instances(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight 0-based xyxy boxes (max exclusive) of every instance id > 0, and the ids in order."""
    ids = np.unique(instances)
    ids = ids[ids > 0]
    boxes = []
    for inst in ids:
        ys, xs = np.nonzero(instances == inst)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return boxes_array(boxes), ids.astype(np.int64)


def index_by_stem(folder: str | os.PathLike, exts: Sequence[str] = IMAGE_EXTS) -> dict[str, Path]:
    """Map file stem -> path for the files of ``folder`` whose extension is in ``exts``.

    Salient-object sets mix .jpg images with .png/.bmp masks, so files are matched by stem. Two
    files with the same stem and different extensions are ambiguous and reported.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "directory not found")
    wanted = {e.lower() for e in exts}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in wanted and not p.name.startswith("."):
            if p.stem in out:
                raise DatasetError(p, f"two files with stem {p.stem!r}: {out[p.stem].name} and {p.name}")
            out[p.stem] = p
    return out
