"""Stage cache: derived per-image artefacts (GrabCut masks, CAMs, pseudo labels, body/detail maps).

Multi-stage methods compute an artefact per training image once and reuse it for many runs. The
cache must never hand back an artefact computed with other settings or from another version of
the input, and several workers (DDP ranks, processes) must be able to fill it at the same time.

Layout::

    <root>/<stage>/<settings hash>/settings.json       what the hash stands for (human-readable)
    <root>/<stage>/<settings hash>/entries/<id>.npz    the arrays + the hash of the item's inputs

* Settings: the directory name is a stable hash of (stage, settings, version). Changing any
  setting, or bumping ``version`` when the stage's code changes, selects a fresh directory.
* Inputs: every entry stores the key of the inputs it was computed from (:func:`file_key` of the
  source files, or :func:`content_key` of their bytes); :meth:`StageCache.get` treats an entry
  with another key as a miss, so an edited image or mask is recomputed.
* Concurrency: entries are written atomically (temporary file + rename) and there is no shared
  index; :meth:`StageCache.missing` gives each rank a fixed, disjoint share of the ids, so ranks
  never write the same file and a crashed run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from segexp.utils.atomic import atomic_path, write_json
from segexp.utils.hashing import canonical_json, content_key, file_key, stable_hash  # noqa: F401  (re-exported)

CACHE_FORMAT = 1  # bump if the on-disk layout of the cache itself changes
INPUTS_FIELD = "__inputs_key__"

log = logging.getLogger(__name__)


def shard(ids: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The ids rank ``rank`` of ``world_size`` owns: a fixed stride over the sorted ids, so every rank
    computes the same disjoint assignment without talking to the others."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return sorted(ids)[rank::world_size]


class StageCache:
    """Per-image arrays of one stage computed with one set of settings.

    ``get(id, inputs_key)`` returns the stored arrays or None (absent, stale or unreadable);
    ``put(id, inputs_key, arrays)`` stores them atomically; ``missing(ids, ...)`` lists what a
    worker still has to compute.
    """

    def __init__(self, root: str | os.PathLike, stage: str, settings: Mapping[str, Any], version: int = 1):
        if not stage or "/" in stage or stage.startswith("."):
            raise ValueError(f"stage must be a plain directory name, got {stage!r}")
        self.stage = stage
        self.version = int(version)
        self.settings = json.loads(canonical_json(dict(settings)))
        self.key = stable_hash(
            {"cache_format": CACHE_FORMAT, "stage": stage, "version": self.version, "settings": self.settings}
        )
        self.dir = Path(root) / stage / self.key
        self.entries = self.dir / "entries"
        self._write_settings()

    def _write_settings(self) -> None:
        """settings.json beside the entries; identical in every rank, so concurrent writes are harmless."""
        record = {
            "stage": self.stage,
            "version": self.version,
            "cache_format": CACHE_FORMAT,
            "settings": self.settings,
        }
        path = self.dir / "settings.json"
        if path.is_file():
            try:
                if json.loads(path.read_text()) == record:
                    return
            except (OSError, json.JSONDecodeError):
                pass  # unreadable (e.g. a crash long ago): rewrite it below
        self.entries.mkdir(parents=True, exist_ok=True)
        write_json(path, record)

    def path(self, item_id: str) -> Path:
        """Entry file of ``item_id`` (ids may contain '/', e.g. ADE's scene folders: quoted)."""
        return self.entries / f"{quote(str(item_id), safe='')}.npz"

    def get(self, item_id: str, inputs_key: str) -> dict[str, np.ndarray] | None:
        path = self.path(item_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                if INPUTS_FIELD not in data.files or str(data[INPUTS_FIELD]) != inputs_key:
                    return None  # computed from other inputs: stale
                return {name: data[name] for name in data.files if name != INPUTS_FIELD}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            log.warning("stage cache: %s is unreadable (%s): recomputing it", path, type(err).__name__)
            return None  # unreadable entries are recomputed, never served

    def put(
        self,
        item_id: str,
        inputs_key: str,
        arrays: Mapping[str, np.ndarray] | np.ndarray,
        compress: bool = True,
    ) -> Path:
        """Store ``arrays`` (a mapping, or one array stored as ``"data"``) for ``item_id`` atomically."""
        if isinstance(arrays, np.ndarray):
            arrays = {"data": arrays}
        if INPUTS_FIELD in arrays:
            raise ValueError(f"{INPUTS_FIELD!r} is reserved")
        path = self.path(item_id)
        save = np.savez_compressed if compress else np.savez
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                save(fh, **{INPUTS_FIELD: np.asarray(inputs_key)}, **dict(arrays))
        return path

    def has(self, item_id: str, inputs_key: str) -> bool:
        return self.stored_key(item_id) == inputs_key

    def stored_key(self, item_id: str) -> str | None:
        """The inputs key an entry was computed from (None if absent or unreadable); reads one field only."""
        try:
            with np.load(self.path(item_id), allow_pickle=False) as data:
                return str(data[INPUTS_FIELD]) if INPUTS_FIELD in data.files else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            return None

    def missing(
        self,
        ids: Iterable[str],
        inputs_keys: Mapping[str, str] | Callable[[str], str],
        rank: int = 0,
        world_size: int = 1,
    ) -> list[str]:
        """Ids of this rank's share that have no up-to-date entry, to compute (and ``put``) next."""
        key_of = inputs_keys if callable(inputs_keys) else inputs_keys.__getitem__
        return [i for i in shard(list(ids), rank, world_size) if not self.has(i, key_of(i))]

    def __repr__(self) -> str:
        return f"StageCache({self.dir})"
