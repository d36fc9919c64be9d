"""SC-CAM's sub-category labels from the part set's true body sub-types: clusters of purity 1.

SC-CAM (Chang et al., CVPR 2020) clusters each class's images into K pseudo sub-categories and trains
the classifier on them too. On the testbed's part set the clusters it finds barely match the hidden
sub-types (purity 0.42-0.45 against 0.39 for one cluster per class, ``experiments/study_sccam``), so a
failure there cannot tell a weak clustering from a mechanism that does not work. This train wrapper
gives the network the sub-categories the clustering is meant to recover - sub-category ``k`` of class
``c`` is the ``k``-th body class ``c`` may have (the ``k``-th of ``bodies``, or of the class's window where
the set's bodies are class-specific, ``testbed.parts.class_bodies``) - so the sub-category term is measured
with perfect clusters (an upper bound of what any clustering could give it). A probe, not the method.
``shuffle=True`` is its control: each class's true sub-types dealt to that class's images in a random
order (the same counts per class, no link to the image's body), so a gain that comes from the extra
C * K-way head and its gradient, not from the sub-types, shows there too.

The sub-types are read from the root's COCO instances (``attributes.body``, written by
:mod:`segexp.data.synth`); the parent labels stay the reader's own, so the label vector is SC-CAM's
(:func:`~segexp.stages.subcategory.subcategory_labels`) with the true sub-type as the cluster.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from segexp.data.pseudo_labels import ReaderWrapper
from segexp.data.synth import body_subtypes
from segexp.data.testbed import class_body_window
from segexp.stages.subcategory import subcategory_labels
from segexp.utils.errors import UserError

__all__ = ["BodySubtypeLabels", "SubtypeLabelsError", "shuffled_per_class"]


class SubtypeLabelsError(UserError, ValueError):
    """A misconfigured ``BodySubtypeLabels`` entry of ``data.train_wrappers`` (printed in one line)."""


class BodySubtypeLabels(ReaderWrapper):
    """``reader`` with ``key`` (C * K multi-hot) from the part set's body sub-types (see the module).

    Args:
        root: the generated part set's root (``data.prepare.root``).
        split: the COCO split the reader reads (``data.splits.train``).
        bodies: the sub-type names in sub-category order (``data.prepare.testbed.parts.bodies``).
        num_subcategories: K of the method; at least the bodies one class may have.
        class_bodies: ``data.prepare.testbed.parts.class_bodies`` (0: every class has every body).
        shuffle: the control (module doc): each class's sub-types permuted over its images.
        seed: of that permutation (the run's seed).
    """

    adds: ClassVar[tuple[str, ...]] = ("sub_labels",)

    def __init__(self, reader: Any, root: str | os.PathLike, split: str, bodies: Sequence[str],
                 num_subcategories: int, key: str = "sub_labels", shuffle: bool = False,
                 seed: int = 0, class_bodies: int = 0):  # fmt: skip
        bodies = list(bodies)
        per_class = len(class_body_window(bodies, class_bodies, 0))
        if num_subcategories < per_class:
            raise SubtypeLabelsError(
                f"data.train_wrappers: BodySubtypeLabels has {per_class} body sub-types per class but "
                f"method.num_subcategories={num_subcategories}; set it to {per_class}"
            )
        try:
            table = body_subtypes(root, split)
        except (OSError, ValueError) as err:
            raise SubtypeLabelsError(
                f"data.train_wrappers: BodySubtypeLabels needs a part set (testbed=parts): {err}"
            ) from err
        windows = [class_body_window(bodies, class_bodies, c) for c in range(len(next(iter(table.values()))))]
        unknown = {(c, b) for row in table.values() for c, b in enumerate(row) if b and b not in windows[c]}
        if unknown:
            c, b = min(unknown)
            raise SubtypeLabelsError(
                f"{root}: class {c + 1} has body '{b}', not one of its sub-types {list(windows[c])} under "
                f"bodies={bodies}, class_bodies={class_bodies} (data.prepare.testbed.parts); was the set "
                "generated with other parts settings?"
            )
        missing = [i for i in reader.ids if i not in table]
        if missing:
            raise SubtypeLabelsError(
                f"{root}: {len(missing)} images of split '{split}' have no COCO instances "
                f"(first: {missing[0]})"
            )
        self.reader = reader
        self.key = key
        self.num_subcategories = int(num_subcategories)
        self.clusters = {
            i: np.array([windows[c].index(b) if b else -1 for c, b in enumerate(row)], np.int64)
            for i, row in table.items()
        }
        if shuffle:
            self.clusters = shuffled_per_class(self.clusters, seed)

    def subcategory_clusters(self) -> np.ndarray:
        """The sub-category (N, C; -1 where absent) each image trains on, in the reader's order."""
        return np.stack([self.clusters[i] for i in self.reader.ids])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.reader[index]
        image_id = self.reader.ids[index]
        labels = np.asarray(sample["labels"])[None]
        try:
            clusters = self.clusters[image_id][None]
            sample[self.key] = subcategory_labels(labels, clusters, self.num_subcategories)[0]
        except ValueError as err:  # a class in the image-level labels without an annotated object
            raise SubtypeLabelsError(f"image {image_id}: {err}") from err
        return sample


def shuffled_per_class(clusters: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Per class, its images' sub-types (entries >= 0) in a random order: counts kept, bodies unlinked."""
    rng = np.random.default_rng(seed)
    ids = list(clusters)
    table = np.stack([clusters[i] for i in ids])
    for c in range(table.shape[1]):
        rows = np.flatnonzero(table[:, c] >= 0)
        table[rows, c] = table[rng.permutation(rows), c]
    return dict(zip(ids, table))
