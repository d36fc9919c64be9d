"""One LightningDataModule for every dataset: a reader per split + a transform + a collate.

Which dataset is read is entirely in ``conf/data/<name>.yaml`` (the ``reader`` partial and the
``splits`` mapping); which sample keys are loaded is what the method declares it needs
(``train_keys``/``eval_keys``). A method asking for supervision the dataset does not have fails
here, at construction, before any model is built or file is read.

``train_wrappers``/``eval_wrappers`` are callables ``reader -> reader`` applied in order (label
corruption, pseudo labels read from a stage cache, ...). A wrapper class that adds sample keys
lists them in a class attribute ``adds`` so the key check knows about them.

``expected_sizes`` (split or test-set name -> the official release's image count) guards the readers
that list folders (SOD, ADE20K): a copy still in progress, or an archive unpacked in part, would
otherwise be read as a smaller data set and trained on without a word. A split whose count differs
stops the run; ``data.expected_sizes=null`` (or one name set to null) accepts a deliberate subset.
The readers that list their images in a file (VOC split files, COCO JSON) are checked for images the
list names but the disk lacks, before training rather than at the first missing one, mid-run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from segexp.data.collate import pad_collate
from segexp.data.io import DatasetError
from segexp.data.transforms import SampleTransform

log = logging.getLogger(__name__)


class TransformedDataset(Dataset):
    """A reader seen through a transform: raw numpy sample in, tensor sample out."""

    def __init__(self, reader: Dataset, transform: Callable[[dict], dict]):
        self.reader = reader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.reader[index])


def check_split_size(reader: Dataset, where: str | None, expected: int | None, key: str) -> None:
    """``DatasetError`` when ``reader`` (split ``where``) does not hold the official release's ``expected``
    image count, naming its folder and the config ``key`` that accepts a subset (module docstring)."""
    if expected is None or len(reader) == expected:
        return
    place = getattr(reader, "image_dir", None) or getattr(reader, "root", None) or f"split '{where}'"
    raise DatasetError(
        f"{place}: split '{where}' has {len(reader)} images, the official release {expected} ({key}); "
        f"finish copying it, or set {key}=null to use a subset"
    )


def check_listed_images(reader: Dataset, where: str | None) -> None:
    """``DatasetError`` naming the first file that ``reader``'s list (``ids``: a VOC split file, a COCO
    JSON) needs but the disk lacks - the image, or the annotation its ``missing_file`` names - with how
    many more listed images miss a file."""
    ids = getattr(reader, "ids", None)
    missing_file = getattr(reader, "missing_file", None)
    if missing_file is None and hasattr(reader, "image_path"):
        missing_file = functools.partial(_missing_image, reader.image_path)
    if ids is None or missing_file is None:
        return
    missing = [path for path in map(missing_file, ids) if path is not None]
    if missing:
        raise DatasetError(
            missing[0],
            f"not found, nor the files of {len(missing) - 1} more of the {len(ids)} images split '{where}' "
            "lists; finish copying the data set (python -m segexp.data.check lists every problem)",
        )


def _missing_image(path_of: Callable[[str], Path], image_id: str) -> Path | None:
    path = path_of(image_id)
    return None if path.is_file() else path


def _reader_class(reader: Callable) -> type:
    return reader.func if isinstance(reader, functools.partial) else reader


class SegDataModule(pl.LightningDataModule):
    def __init__(
        self,
        name: str,
        class_names: Sequence[str],
        num_classes: int,
        reader: Callable[..., Dataset],
        splits: Mapping[str, str],
        transforms: Mapping[str, Any],
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 2,
        image_size: int | None = None,
        ignore_index: int = 255,
        prepare: Callable[[], Any] | None = None,
        train_keys: Sequence[str] = ("image", "mask"),
        eval_keys: Sequence[str] = ("image", "mask"),
        pin_memory: bool | str = "auto",
        train_wrappers: Sequence[Callable[[Dataset], Dataset]] = (),
        eval_wrappers: Sequence[Callable[[Dataset], Dataset]] = (),
        test_sets: Mapping[str, Callable[..., Dataset]] | None = None,
        min_box_visibility: float = 0.1,
        extra_maps: Mapping[str, str] | None = None,
        expected_sizes: Mapping[str, int | None] | None = None,
    ):
        super().__init__()
        if len(class_names) != num_classes:
            raise ValueError(
                f"data '{name}': num_classes={num_classes} but {len(class_names)} class_names are given"
            )
        self.name = name
        self.class_names = list(class_names)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reader = reader
        self.splits = dict(splits)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.prepare = prepare
        # page-locked batches copy to a GPU asynchronously; on CPU-only machines they only cost memory
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.train_keys = tuple(train_keys)
        self.eval_keys = tuple(eval_keys)
        self.wrappers = {"train": list(train_wrappers), "eval": list(eval_wrappers)}
        # Several test sets in one evaluation (e.g. the six SOD benchmarks): name -> reader partial,
        # each called without a split; one test dataloader per set, in this order.
        self.test_sets = dict(test_sets or {})
        self.test_set_names = list(self.test_sets)
        self.expected_sizes = dict(expected_sizes or {})
        self._check_keys()
        # per-pixel maps the wrappers add (declared by them) move with the image like the contract's
        declared = {
            k: kind
            for w in (*self.wrappers["train"], *self.wrappers["eval"])
            for k, kind in getattr(_reader_class(w), "map_kinds", {}).items()
        }
        extra_maps = {**declared, **(extra_maps or {})}
        # boxes less visible than this after augmentation are dropped (albumentations min_visibility)
        common = dict(ignore_index=ignore_index, min_box_visibility=min_box_visibility, extra_maps=extra_maps)
        self.train_transform = SampleTransform(transforms.get("train", ()), **common)
        self.eval_transform = SampleTransform(transforms.get("eval", ()), **common)
        self.pad_ignore_keys = tuple(k for k, kind in self.train_transform.kinds.items() if kind == "ignore")
        self.datasets: dict[str, Dataset] = {}

    def _check_keys(self) -> None:
        cls = _reader_class(self.reader)
        provides = getattr(cls, "provides", None)
        if provides is None:
            return
        for role, keys, wrappers in (
            ("training", self.train_keys, self.wrappers["train"]),
            ("evaluation", self.eval_keys, self.wrappers["eval"]),
        ):
            added = {k for w in wrappers for k in getattr(_reader_class(w), "adds", ())}
            missing = sorted(set(keys) - set(provides) - added - {"meta"})
            if missing:
                raise ValueError(
                    f"the method needs {missing} for {role}, but dataset '{self.name}' "
                    f"({cls.__name__}) provides only {sorted(provides)}; choose another data= "
                    f"or a method whose supervision this dataset has"
                )

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs on one process only: generate the synthetic set if it is configured and absent."""
        if self.prepare is not None:
            self.prepare()

    def generated_root(self) -> Path | None:
        """The synthetic root ``prepare`` writes (``ensure_synthetic``'s ``root``), if any."""
        root = getattr(self.prepare, "keywords", {}).get("root")
        return None if root is None else Path(root)

    def _check_generated_root(self) -> None:
        """A synthetic root without its completion marker is being written by another process (or was
        interrupted): readers that list folders (SOD) would see part of a split and train on it
        silently. Reported as a missing file, so the caller runs ``prepare_data``, which waits for the
        other generator's lock or regenerates."""
        from segexp.data.synth import COMPLETE_MARKER

        root = self.generated_root()
        if root is not None and root.exists() and not (root / COMPLETE_MARKER).is_file():
            raise DatasetError(
                root / COMPLETE_MARKER,
                "not written: this synthetic set is incomplete (being generated, or interrupted)",
            )

    def setup(self, stage: str | None = None) -> None:
        self._check_generated_root()
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
            None: ("train", "val", "test"),
        }[stage]
        for role in wanted:
            if role == "test" and self.test_sets:
                for name in self.test_set_names:
                    if f"test/{name}" not in self.datasets:
                        self.datasets[f"test/{name}"] = self.build_dataset("test", self.test_sets[name])
                continue
            if role in self.datasets or role not in self.splits:
                continue
            self.datasets[role] = self.build_dataset(role)

    def build_dataset(
        self, role: str, reader_factory: Callable[..., Dataset] | None = None
    ) -> TransformedDataset:
        keys = self.train_keys if role == "train" else self.eval_keys
        wrappers = self.wrappers["train" if role == "train" else "eval"]
        added = {k for w in wrappers for k in getattr(_reader_class(w), "adds", ())}
        keys = [k for k in keys if k not in added]
        if reader_factory is not None:
            reader = reader_factory(keys=keys)  # a test set's reader names its own folders
        else:
            reader = self.reader(split=self.splits[role], keys=keys)
        where = getattr(reader, "name", None) if reader_factory is not None else self.splits[role]
        check_split_size(reader, where, self.expected_sizes.get(where), "data.expected_sizes")
        check_listed_images(reader, where)
        for wrap in wrappers:  # e.g. label noise (CAS), pseudo labels from a cached stage (Box2Seg, WSSS)
            reader = wrap(reader)
        if len(reader) == 0:
            raise ValueError(f"data '{self.name}': split '{where}' ({role}) has no images")
        transform = self.train_transform if role == "train" else self.eval_transform
        log.info("data %s: %s split '%s' has %d images", self.name, role, where, len(reader))
        return TransformedDataset(reader, transform)

    def _loader(self, role: str, shuffle: bool) -> DataLoader:
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "fit", "test": "test"}.get(role, "test"))
        batch_size = self.batch_size if role == "train" else self.eval_batch_size
        return DataLoader(
            self.datasets[role],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.datasets[role]) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=functools.partial(
                pad_collate, ignore_index=self.ignore_index, ignore_keys=self.pad_ignore_keys
            ),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.test_sets:
            return [self._loader(f"test/{name}", shuffle=False) for name in self.test_set_names]
        return self._loader("test", shuffle=False)
