"""EVICAN (Schwendy et al., 2020): brightfield cell and nucleus instances in COCO-format JSON.

Layout of the release (year 2019)::

    <root>/train2019/*.jpg, <root>/val2019/*.jpg, <root>/eval2019/*.jpg
    <root>/annotations/instances_train2019.json, instances_val2019.json
    <root>/annotations/instances_eval2019_{easy,medium,difficult}.json

The evaluation images come in three difficulty levels that share one image folder and differ
in their JSON. A split is ``train``, ``val`` or ``eval`` (+ ``difficulty``), or ``eval_<level>``
directly, so each level can be its own split in a data config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from segexp.data.readers.coco import COCOInstances

EVICAN_CLASSES = ("background", "cell", "nucleus")
DIFFICULTIES = ("easy", "medium", "difficult")


def parse_split(split: str, difficulty: str | None) -> tuple[str, str | None]:
    """('eval', 'easy') from 'eval_easy'; a level in the split name wins over ``difficulty``."""
    base, _, level = split.partition("_")
    level = level or difficulty
    if base not in ("train", "val", "eval"):
        raise ValueError(f"EVICAN split must be train, val, eval or eval_<level>, got {split!r}")
    if base == "eval":
        if level not in DIFFICULTIES:
            raise ValueError(
                f"EVICAN eval needs a difficulty in {DIFFICULTIES}, got {level!r} (split {split!r})"
            )
        return base, level
    if level is not None and split != base:
        raise ValueError(f"only the eval split has difficulty levels, got {split!r}")
    return base, None


class EVICAN(COCOInstances):
    """EVICAN cells and nuclei: instance map, semantic mask (0 bg, 1 cell, 2 nucleus), labels.

    Nuclei lie inside cells; masks are painted larger-first, so a nucleus stays visible on top
    of its cell in both maps. Eval JSONs carry no boxes, so boxes are not offered.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"image", "instances", "mask", "labels"})
    name = "evican"

    def __init__(
        self,
        root: str | Path,
        split: str,
        keys: Sequence[str] | None = None,
        difficulty: str | None = None,
        year: str | int = 2019,
        class_names: Sequence[str] = EVICAN_CLASSES,
        annotation_file: str = "annotations/instances_{split}{year}{level}.json",
        image_dir: str = "{split}{year}",
        name: str | None = None,
    ):
        base, level = parse_split(split, difficulty)
        fields = {"split": base, "year": year, "level": f"_{level}" if level else ""}
        super().__init__(
            root,
            split,
            keys,
            annotation_file=annotation_file.format(**fields),
            image_dir=image_dir.format(**fields),
            class_names=class_names,
            name=name,
        )
        self.difficulty = level
