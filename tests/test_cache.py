"""Stage cache: reuse, invalidation on settings/inputs changes, atomic writes, disjoint rank shards."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from segexp.stages.cache import StageCache, shard
from segexp.utils.hashing import content_key, file_key, stable_hash

SETTINGS = {"iterations": 5, "margin": 0.1, "classes": ["cat", "dog"]}


def test_put_then_get_round_trip(tmp_path):
    c = StageCache(tmp_path, "grabcut", SETTINGS)
    arrays = {"mask": np.arange(12, dtype=np.uint8).reshape(3, 4), "score": np.float32([0.5])}
    c.put("2007_000032", "k1", arrays)
    got = c.get("2007_000032", "k1")
    assert set(got) == {"mask", "score"}
    np.testing.assert_array_equal(got["mask"], arrays["mask"])
    assert got["mask"].dtype == np.uint8
    c.put("single", "k", np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(c.get("single", "k")["data"], np.ones((2, 2)))
    assert c.get("never-written", "k1") is None


def test_reused_across_instances_and_key_order(tmp_path):
    a = StageCache(tmp_path, "cam", {"b": 1, "a": [1, 2]})
    a.put("x", "k", np.zeros(3))
    b = StageCache(tmp_path, "cam", {"a": [1, 2], "b": 1})  # same settings, other order
    assert b.dir == a.dir and b.get("x", "k") is not None
    record = (a.dir / "settings.json").read_text()
    assert '"stage": "cam"' in record and '"b": 1' in record


@pytest.mark.parametrize(
    "change",
    [
        {"settings": {**SETTINGS, "iterations": 6}},
        {"settings": {**SETTINGS, "classes": ["dog", "cat"]}},
        {"version": 2},
        {"stage": "pseudo"},
    ],
)
def test_any_setting_change_invalidates(tmp_path, change):
    base = StageCache(tmp_path, "grabcut", SETTINGS)
    base.put("x", "k", np.zeros(3))
    other = StageCache(
        tmp_path,
        change.get("stage", "grabcut"),
        change.get("settings", SETTINGS),
        version=change.get("version", 1),
    )
    assert other.dir != base.dir and other.get("x", "k") is None
    assert base.get("x", "k") is not None  # the old entries are left alone


def test_input_change_invalidates(tmp_path):
    src = tmp_path / "img.png"
    src.write_bytes(b"first version")
    c = StageCache(tmp_path / "cache", "ldf", {"kernel": 5})
    key1 = file_key(src)
    c.put("img", key1, np.zeros(4))
    assert c.get("img", file_key(src)) is not None
    time.sleep(0.01)
    src.write_bytes(b"second version!")  # other size and mtime
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert file_key(src) != key1 and c.get("img", file_key(src)) is None
    assert c.missing(["img"], {"img": file_key(src)}) == ["img"]
    # content keys see edits that keep size and mtime
    assert content_key(b"abc", np.zeros(2)) != content_key(b"abd", np.zeros(2))
    assert content_key(np.zeros(2, np.uint8)) != content_key(np.zeros(2, np.int8))
    assert content_key(np.zeros((2, 3))) != content_key(np.zeros((3, 2)))
    before = content_key(src)
    stat = src.stat()
    src.write_bytes(b"second versioN!")  # same size, mtime restored below: only content differs
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_key(src) == file_key(src) and content_key(src) != before


def test_put_is_atomic(tmp_path, monkeypatch):
    c = StageCache(tmp_path, "cam", SETTINGS)
    c.put("x", "old", np.zeros(3))
    seen = []
    real_savez = np.savez_compressed

    def crash_midway(fh, **arrays):
        real_savez(fh, **arrays)
        fh.flush()
        seen.append(c.get("x", "new"))  # while the new entry is being written...
        raise RuntimeError("killed")

    monkeypatch.setattr(np, "savez_compressed", crash_midway)
    with pytest.raises(RuntimeError):
        c.put("x", "new", np.ones(3))
    assert seen == [None]  # ...readers never saw it
    assert c.get("x", "old") is not None  # the previous entry is intact
    assert sorted(p.name for p in c.entries.iterdir()) == ["x.npz"]  # no temporary left behind


def test_corrupt_entry_is_a_miss_and_said(tmp_path, caplog):
    c = StageCache(tmp_path, "cam", SETTINGS)
    c.put("x", "k", np.zeros(3))
    c.path("x").write_bytes(b"PK\x03\x04 truncated")
    assert c.get("x", "k") is None and c.missing(["x"], lambda i: "k") == ["x"]
    assert str(c.path("x")) in caplog.text and "recomputing" in caplog.text


def test_entries_are_readable_by_others_as_plain_files_are(tmp_path):
    c = StageCache(tmp_path, "cam", SETTINGS)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert c.put("x", "k", np.zeros(3)).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_ids_with_slashes_and_settings_types(tmp_path):
    from omegaconf import OmegaConf

    c = StageCache(tmp_path, "cam", {"cfg": OmegaConf.create({"a": 1}), "root": tmp_path, "n": np.int64(3)})
    c.put("cultural/apse__indoor/ADE_1", "k", np.zeros(1))
    assert c.get("cultural/apse__indoor/ADE_1", "k") is not None
    assert len(list(c.entries.iterdir())) == 1
    assert stable_hash({"a": np.int64(3)}) == stable_hash({"a": 3})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        StageCache(tmp_path, "cam", {"f": object()})
    with pytest.raises(ValueError, match="plain directory name"):
        StageCache(tmp_path, "../escape", {})


def test_shards_are_disjoint_and_cover_everything():
    ids = [f"img{i}" for i in range(11)]
    parts = [shard(ids, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and len(set(parts[0]) & set(parts[1])) == 0
    assert shard(list(reversed(ids)), 1, 3) == parts[1]  # independent of the caller's order
    with pytest.raises(ValueError):
        shard(ids, 3, 3)


def _rank_worker(args):
    root, rank, world_size, ids = args
    c = StageCache(root, "pseudo", SETTINGS)
    todo = c.missing(ids, lambda i: f"key-{i}", rank=rank, world_size=world_size)
    for item in todo:
        c.put(item, f"key-{item}", np.full((4, 4), int(item[3:]), np.int32))
    return todo


def test_two_ranks_fill_disjoint_shards(tmp_path):
    ids = [f"img{i}" for i in range(9)]
    pre = StageCache(tmp_path, "pseudo", SETTINGS)
    pre.put("img4", "key-img4", np.full((4, 4), 4, np.int32))  # resumed run: already done
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_rank_worker, [(tmp_path, r, 2, ids) for r in range(2)]))
    assert set(done[0]).isdisjoint(done[1]) and "img4" not in done[0] + done[1]
    assert sorted(done[0] + done[1] + ["img4"]) == sorted(ids)
    c = StageCache(tmp_path, "pseudo", SETTINGS)
    assert c.missing(ids, lambda i: f"key-{i}") == []
    assert all(int(c.get(i, f"key-{i}")["data"][0, 0]) == int(i[3:]) for i in ids)
    assert sorted(p.name for p in c.dir.iterdir()) == ["entries", "settings.json"]  # no shared index
