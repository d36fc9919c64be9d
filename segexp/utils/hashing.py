"""Keys of what a computation depends on: settings hashes and inputs keys.

Why one module: stage caches, pipeline run keys and the synthetic data's directory names must all
agree that equal settings give equal hashes in every process, and that an edited input file is a
new input. Pure functions, no segexp imports, so every layer may use them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["canonical_json", "stable_hash", "file_key", "content_key"]


def _jsonable(value: Any) -> Any:
    """Canonical JSON form of settings values (OmegaConf containers, paths, numpy scalars, tuples)."""
    if hasattr(value, "_content") and hasattr(value, "_get_node"):  # an OmegaConf container
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"setting value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of the canonical JSON of ``obj``: equal settings give equal hashes in every process."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_key(*paths: str | os.PathLike) -> str:
    """Inputs key of source files from their resolved path, size and modification time (cheap)."""
    parts = []
    for p in paths:
        st = Path(p).stat()
        parts.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return stable_hash(parts, length=32)


def content_key(*items: bytes | str | np.ndarray | os.PathLike) -> str:
    """Inputs key from content: bytes, strings, arrays (dtype, shape and data) or files' bytes."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray):
            arr = np.ascontiguousarray(item)
            h.update(f"array:{arr.dtype.str}:{arr.shape}".encode())
            h.update(arr.tobytes())
        elif isinstance(item, bytes):
            h.update(b"bytes:%d:" % len(item) + item)
        elif isinstance(item, os.PathLike):
            data = Path(item).read_bytes()
            h.update(b"file:%d:" % len(data) + data)
        else:
            text = str(item).encode("utf-8")
            h.update(b"str:%d:" % len(text) + text)
    return h.hexdigest()[:32]
