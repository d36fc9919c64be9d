"""How different LDF's branch targets are on a generated SOD set: ``python
experiments/study_ldf_supervision/target_overlap.py <root> [<root> ...]`` (a ``shapes-...`` data root).

Per root, over the train masks: the salient share of the pixels, the 1-px edge band's share, the share
of the detail map's mass that lies inside that band and the detail map's support over the band's size.
Where most of the detail mass is in the edge band, "detail" and "edge" are nearly one target and
Table 5's rows cannot differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from segexp.data.decouple import edge_map, split_map_code


def target_overlap(root: Path) -> dict[str, float]:
    salient = edge = detail_in_edge = detail_mass = detail_support = pixels = 0.0
    masks = sorted((root / "SOD" / "train" / "Mask").glob("*.png"))
    for path in masks:
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        band = edge_map(mask) > 0
        detail = split_map_code(mask)[1].astype(np.float64)
        salient += (mask > 127).sum()
        edge += band.sum()
        detail_in_edge += detail[band].sum()
        detail_mass += detail.sum()
        detail_support += (detail > 0).sum()
        pixels += mask.size
    return {
        "masks": len(masks),
        "salient_share": salient / pixels,
        "edge_band_share": edge / pixels,
        "detail_mass_in_edge_band": detail_in_edge / detail_mass,
        "detail_support_over_edge_band": detail_support / edge,
    }


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        stats = target_overlap(Path(arg))
        shown = (f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        print(Path(arg).name, "  ".join(shown))
