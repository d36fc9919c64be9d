"""SC-CAM sub-category discovery as cached stages: image features -> per-class k-means -> labels.

* :class:`FeatureStage` - the clustering feature of every training image: global average of the
  backbone's last map (ResNet-38: conv6, before the classifier's dropout), eval mode, the image at
  its own size (scale 1.0), unflipped, raw (no L2 / PCA), as ``extract_feature.py`` does. One cache
  entry per image (``feature`` float32 (D,), ``labels``), keyed by the network's weights (checkpoint
  file, or the seed of its initial weights) and its config.
* :class:`SubCategoryStage` - for each parent class, k-means over the features of the images that
  contain it (an image with several classes joins several clusterings), K clusters, ``n_init``
  restarts, seed ``random_state``, every setting explicit so no library default decides the result
  (:func:`kmeans_labels`). One entry per image (``clusters`` int64 (C,), -1 for absent classes); the
  entries depend on the whole split, so every entry carries the split's key (ids + every image's
  inputs key) and any change recomputes the clustering.
* :func:`subcategory_labels` - the multi-hot (C * K) sub-category label: one bit ``c * K + k_c``
  per present parent class ``c`` (``make_subclass_label``).
* :class:`SubCategoryLabels` - the train wrapper adding ``sub_labels`` to every sample.

k-means backends (``backend``): ``sklearn`` (default) = ``KMeans(algorithm="lloyd")``, what the released
``create_pseudo_label.py`` ran, and on one CPU thread ~4x faster than torch at 10,000 x 2,048 (``python -m
segexp.bench sccam``); ``torch`` = :func:`segexp.utils.kmeans.kmeans` (same k-means++ + Lloyd, on the GPU
when there is one). Both are deterministic for a seed, but they draw different k-means++ seeds, so
their partitions agree only where the clustering is unambiguous (a planted mixture: adjusted Rand
index 1.0); the backend (and scikit-learn's version, whose internals may change a partition) is part
of the cache key.

Choice: a class with fewer than K images is clustered into as many clusters as it has images
(scikit-learn would refuse); it is logged. Under DDP each rank extracts its share of the features,
the ranks meet at a barrier, and rank 0 alone clusters (the caller's barrier holds the others until the
clusters are written): the clustering is one decision over the whole split, so it is made once.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from segexp.data.pseudo_labels import PseudoLabels, barrier
from segexp.data.transforms import image_tensor
from segexp.stages.base import Stage, reader_root
from segexp.utils.checkpoints import load_method
from segexp.utils.device import resolve_device
from segexp.utils.hashing import file_key, stable_hash
from segexp.utils.kmeans import kmeans

log = logging.getLogger(__name__)

__all__ = [
    "FeatureStage",
    "SubCategoryStage",
    "SubCategoryLabels",
    "subcategory_labels",
    "cluster_per_class",
    "kmeans_labels",
    "BACKENDS",
]

_NOT_NETWORK = ("panels", "schedule", "bg_threshold", "inference", "cam_source")  # no effect on features
BACKENDS = ("sklearn", "torch")


def image_label_reader(reader: Any) -> Any:
    """A copy of ``reader`` that loads only the image and its image-level labels, with the
    ``ids`` / ``image_path(id)`` the stage cache keys items by (COCO readers have image records)."""
    provides = getattr(reader, "provides", None)
    if provides is not None and "labels" not in provides:
        raise ValueError(f"{type(reader).__name__} provides no image-level labels: SC-CAM needs them")
    out = copy.copy(reader)
    out.keys = frozenset({"image", "labels"})
    if not hasattr(reader, "ids") and hasattr(reader, "images"):  # COCO readers index image records
        records = {str(info["id"]): info for info in reader.images}
        out.ids = list(records)
        out.image_path = lambda item: reader.image_path(records[item] if isinstance(item, str) else item)
    return out


def subcategory_labels(labels: np.ndarray, clusters: np.ndarray, num_subcategories: int) -> np.ndarray:
    """Multi-hot (N, C * K) float32: bit ``c * K + clusters[n, c]`` for every present class ``c``.

    ``labels`` (N, C) foreground multi-hot, ``clusters`` (N, C) cluster per (image, class), ignored
    where the class is absent.
    """
    labels = np.asarray(labels) > 0
    clusters = np.asarray(clusters)
    if labels.shape != clusters.shape:
        raise ValueError(f"labels {labels.shape} and clusters {clusters.shape} differ in shape")
    k = int(num_subcategories)
    bad = labels & ((clusters < 0) | (clusters >= k))
    if bad.any():
        n, c = np.argwhere(bad)[0]
        raise ValueError(f"image {n} has class {c} but cluster {clusters[n, c]} is not in 0..{k - 1}")
    out = np.zeros((labels.shape[0], labels.shape[1] * k), np.float32)
    rows, cols = np.nonzero(labels)
    out[rows, cols * k + clusters[rows, cols]] = 1.0
    return out


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def backend_key(backend: str, device: str) -> dict[str, str]:
    """What a clustering's result depends on besides its settings: the implementation (and its
    version) and, for torch, the device (its random streams differ between CPU and CUDA)."""
    if _check_backend(backend) == "sklearn":
        import sklearn

        return {"backend": "sklearn KMeans(algorithm='lloyd')", "version": sklearn.__version__}
    return {"backend": "segexp.utils.kmeans (k-means++, lloyd)", "device": torch.device(device).type}


def kmeans_labels(
    x: np.ndarray,
    k: int,
    backend: str = "sklearn",
    n_init: int = 10,
    random_state: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    device: str = "cpu",
) -> tuple[np.ndarray, float]:
    """Cluster ``x`` (N, D) float32 into ``k`` clusters; ``(labels (N,) int64, inertia)``."""
    if _check_backend(backend) == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(
            n_clusters=k,
            n_init=n_init,
            random_state=random_state,
            max_iter=max_iter,
            tol=tol,
            algorithm="lloyd",
        ).fit(np.asarray(x, np.float32))
        return km.labels_.astype(np.int64), float(km.inertia_)
    xt = torch.as_tensor(np.asarray(x, np.float32), device=device)
    res = kmeans(xt, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=random_state)
    return res.labels.cpu().numpy().astype(np.int64), float(res.inertia)


def cluster_per_class(
    features: np.ndarray,
    labels: np.ndarray,
    num_subcategories: int,
    n_init: int = 10,
    random_state: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    device: str = "cpu",
    backend: str = "sklearn",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Clusters (N, C) int64 (-1 where absent) of k-means per parent class, and per-class stats."""
    _check_backend(backend)
    feats = np.asarray(features, np.float32)
    present = np.asarray(labels) > 0
    clusters = np.full(present.shape, -1, np.int64)
    stats: dict[str, Any] = {}
    for c in range(present.shape[1]):
        members = np.flatnonzero(present[:, c])
        if len(members) == 0:
            continue
        k = min(int(num_subcategories), len(members))
        if k < num_subcategories:
            log.warning(
                "class %d has %d images: clustered into %d, not %d, sub-categories",
                c,
                len(members),
                k,
                num_subcategories,
            )
        clusters[members, c], inertia = kmeans_labels(
            feats[members], k, backend, n_init, random_state, max_iter, tol, device
        )
        sizes = np.bincount(clusters[members, c], minlength=k)
        stats[str(c)] = {"images": int(len(members)), "k": k, "sizes": sizes.tolist(), "inertia": inertia}
    return clusters, stats


class FeatureStage(Stage):
    """Clustering features of a CAM network (see the module docstring), cached per image.

    Args:
        method: the (resolved) config of the network's method (``cam`` for round 0, ``sccam`` after).
        ckpt_path: its checkpoint; None = the network as initialised (``backbone.pretrained``
            weights, the rest from ``init_seed``) - what a standalone ``segexp.train`` run clusters.
        init_seed: torch seed of the initial weights when ``ckpt_path`` is None.
    """

    in_process = True  # one network, on ``device``
    compress = False  # float features do not compress

    def __init__(
        self,
        method: Mapping[str, Any],
        ckpt_path: str | os.PathLike | None = None,
        init_seed: int = 0,
        name: str = "sccam_features",
        cache_dir: str | os.PathLike = "stage_cache",
        device: str = "auto",
        progress: bool = True,
        version: int = 1,
    ):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(method, DictConfig):
            method = OmegaConf.to_container(method, resolve=True)
        self.method_cfg = dict(method)
        self.ckpt_path = None if ckpt_path is None else str(ckpt_path)
        self.init_seed = int(init_seed)
        self.name = name
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self.progress = progress
        self.version = int(version)
        self._network = None

    def settings(self) -> dict[str, Any]:
        if self.ckpt_path is not None and not Path(self.ckpt_path).is_file():
            raise FileNotFoundError(f"{self.name} stage: checkpoint {self.ckpt_path!r} not found")
        weights = file_key(self.ckpt_path) if self.ckpt_path else {"init_seed": self.init_seed}
        method = {k: v for k, v in self.method_cfg.items() if k not in _NOT_NETWORK}
        return {"weights": weights, "method": method, "feature": "gap(last backbone map), scale 1, no flip"}

    @property
    def network(self) -> torch.nn.Module:
        """The method's model in eval mode (dropout off)."""
        if self._network is None:
            if self.ckpt_path:
                method = load_method(self.ckpt_path, self.method_cfg, self.device)
            else:
                import hydra

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.init_seed)
                    method = hydra.utils.instantiate(dict(self.method_cfg)).to(self.device).eval()
            self._network = method.model.eval()
        return self._network

    @torch.no_grad()
    def compute(self, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
        x = image_tensor(sample["image"]).to(self.device)
        feature = self.network.backbone(x)[-1].float().mean((2, 3))[0]
        return {"feature": feature.cpu().numpy(), "labels": np.asarray(sample["labels"], np.float32)}

    def stage_reader(self, reader: Any) -> Any:
        return image_label_reader(reader)

    def load_all(self, reader: Any) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, D) and labels (N, C) of every image, in ``reader.ids`` order."""
        reader = image_label_reader(reader)
        cache = self.cache_for(reader)
        keys = self.keys(reader)
        entries = [cache.get(i, keys[i]) for i in reader.ids]
        absent = [i for i, e in zip(reader.ids, entries) if e is None]
        if absent:
            raise RuntimeError(f"{len(absent)} features missing from {cache.dir} (first: {absent[:3]})")
        return np.stack([e["feature"] for e in entries]), np.stack([e["labels"] for e in entries])


class SubCategoryStage(Stage):
    """Per-class k-means sub-categories of ``features`` (a :class:`FeatureStage`), cached per image.

    Not a per-image stage: one clustering decides every entry, so :meth:`run` is its own (features
    of this rank's share through the template, then rank 0 clusters the whole split).

    Args:
        num_subcategories: K (paper: 10).
        n_init, random_state, max_iter, tol: k-means restarts, seed, Lloyd iterations and
            tolerance (released: ``KMeans(n_clusters=10, random_state=0, max_iter=300)`` with the
            2020 scikit-learn defaults ``n_init=10``, ``tol=1e-4``).
        backend: ``sklearn`` (released, faster on CPU) or ``torch`` (GPU); see the module docstring.
        device: where the torch backend runs (``auto`` = cuda when available).
    """

    def __init__(
        self,
        features: FeatureStage,
        num_subcategories: int = 10,
        n_init: int = 10,
        random_state: int = 0,
        max_iter: int = 300,
        tol: float = 1e-4,
        name: str = "sccam_subcategories",
        cache_dir: str | os.PathLike = "stage_cache",
        device: str = "auto",
        backend: str = "sklearn",
        version: int = 1,
    ):
        if num_subcategories < 1:
            raise ValueError(f"num_subcategories must be >= 1, got {num_subcategories}")
        self.features = features
        self.num_subcategories = int(num_subcategories)
        self.n_init = int(n_init)
        self.random_state = int(random_state)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.name = name
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self.backend = _check_backend(backend)
        self.version = int(version)
        self._split_keys: dict[tuple, str] = {}

    def settings(self) -> dict[str, Any]:
        return {
            "features": self.features.settings(),
            "num_subcategories": self.num_subcategories,
            "n_init": self.n_init,
            "random_state": self.random_state,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "algorithm": backend_key(self.backend, self.device),
        }

    def split_key(self, reader: Any) -> str:
        """Key of the whole split: its ids (in order) and every image's inputs key."""
        reader = image_label_reader(reader)
        memo = (reader_root(reader), tuple(reader.ids))
        if memo not in self._split_keys:
            item_keys = self.features.keys(reader)  # the image files each feature depends on
            self._split_keys[memo] = stable_hash([list(reader.ids), [item_keys[i] for i in reader.ids]], 32)
        return self._split_keys[memo]

    def keys(self, reader: Any) -> dict[str, str]:
        reader = image_label_reader(reader)
        key = self.split_key(reader)
        return {image_id: key for image_id in reader.ids}

    def inputs_key(self, reader: Any, index: int) -> str:
        return self.split_key(reader)

    def missing(self, reader: Any, rank: int = 0, world_size: int = 1) -> list[str]:
        """Every stale entry, whatever the rank: one clustering covers the split, so every rank must
        take part in :meth:`run` (its barrier) when any entry is stale."""
        return super().missing(reader)

    def run(
        self,
        reader: Any,
        evaluate: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
    ) -> dict[str, Any]:
        """This rank's share of the missing features; then, on rank 0, the clustering of the whole
        split if any entry is stale."""
        reader = image_label_reader(reader)
        features = self.features.run(reader, rank=rank, world_size=world_size)
        if world_size > 1:
            barrier()  # every rank's features are in the cache before rank 0 reads them all
        cache = self.cache_for(reader)
        key = self.split_key(reader)
        todo = cache.missing(self.keys(reader), self.keys(reader))
        report: dict[str, Any] = {
            "stage": self.name,
            "images": len(reader),
            "computed": 0,
            "seconds": features["seconds"],
            "features": features,
            "cache_dir": str(cache.dir),
        }
        if not todo or rank != 0:
            return report
        feats, labels = self.features.load_all(reader)
        t0 = time.perf_counter()
        clusters, stats = cluster_per_class(
            feats,
            labels,
            self.num_subcategories,
            self.n_init,
            self.random_state,
            self.max_iter,
            self.tol,
            self.device,
            self.backend,
        )
        for n, image_id in enumerate(reader.ids):
            cache.put(image_id, key, {"clusters": clusters[n], "labels": labels[n]}, compress=False)
        seconds = time.perf_counter() - t0
        report.update(
            computed=len(reader),
            cluster_seconds=round(seconds, 3),
            backend=self.backend,
            classes=stats,
            seconds=round(features["seconds"] + seconds, 3),
        )
        log.info("%s: %d images clustered in %.1f s", self.name, len(reader), seconds)
        return report

    def clusters(self, reader: Any) -> tuple[np.ndarray, np.ndarray]:
        """Cluster ids (N, C; -1 where absent) and parent labels (N, C) of every image, in the
        reader's order."""
        reader = image_label_reader(reader)
        cache = self.cache_for(reader)
        key = self.split_key(reader)
        entries = [cache.get(i, key) for i in reader.ids]
        absent = [i for i, e in zip(reader.ids, entries) if e is None]
        if absent:
            raise RuntimeError(
                f"{len(absent)} sub-category entries missing or stale in {cache.dir} (first: {absent[:3]})"
            )
        return np.stack([e["clusters"] for e in entries]), np.stack([e["labels"] for e in entries])

    def label_table(self, reader: Any) -> np.ndarray:
        """Sub-category labels (N, C * K) of every image, in the reader's order."""
        clusters, labels = self.clusters(reader)
        return subcategory_labels(labels, clusters, self.num_subcategories)

    def get(self, reader: Any, index: int, key: str | None = None) -> np.ndarray | None:
        """Sub-category label (C * K,) of item ``index`` (None when not cached)."""
        reader = image_label_reader(reader)
        entry = self.cache_for(reader).get(reader.ids[index], self.split_key(reader))
        if entry is None:
            return None
        return subcategory_labels(entry["labels"][None], entry["clusters"][None], self.num_subcategories)[0]


class SubCategoryLabels(PseudoLabels):
    """``reader`` with ``sub_labels`` (C * K multi-hot) from a :class:`SubCategoryStage`'s cache;
    the clustering is run on construction when it is missing or stale."""

    adds: ClassVar[tuple[str, ...]] = ("sub_labels",)

    def __init__(
        self,
        reader: Any,
        stage: SubCategoryStage,
        key: str = "sub_labels",
        compute_missing: bool = True,
        wait_timeout_s: float = 3600.0,
    ):
        super().__init__(
            reader, stage, key=key, compute_missing=compute_missing, wait_timeout_s=wait_timeout_s
        )
        self.table = stage.label_table(reader)

    def subcategory_clusters(self) -> np.ndarray:
        """The sub-category (N, C; -1 where absent) each image trained on, in the reader's order (for
        the testbed's cluster purity: :func:`segexp.testbed.trained_subcategory_purity`)."""
        return self.stage.clusters(self.reader)[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.reader[index]
        vector = self.table[index]
        sample[self.key] = vector
        return sample
