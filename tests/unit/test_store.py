"""Feature stores without a model: commits, ordering, superseding, compaction, fingerprints,
the write lock, verification and clean-up after an interrupted writer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedstore.errors import (
    CorruptStoreError,
    FingerprintMismatchError,
    StoreLockedError,
    StoreNotFoundError,
)
from embedstore.store.store import Store, StoreWriter

DIM = 8
FINGERPRINT = {"schema": 1, "kind": "images", "encoder": {"model": "toy"}, "view": {"size": 32, "sharpness": None}}


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def writer(store: Store, fingerprint: dict = FINGERPRINT, dtype: str = "float16", shard_rows: int = 3) -> StoreWriter:
    return store.writer(fingerprint=fingerprint, dim=DIM, dtype=dtype, shard_rows=shard_rows)


def add_rows(w: StoreWriter, keys: list[str], feats: np.ndarray) -> None:
    """Add rows one at a time, committing whenever the buffer is full (as the encode loop does)."""
    for key, row in zip(keys, feats):
        w.add([key], row[None, :])
        w.maybe_commit()


def shard_files(store: Store) -> list[str]:
    return sorted(p.name for p in (store.path / "shards").iterdir())


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def filled(store: Store, n: int = 7, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """A store with n rows img0..img{n-1} in three-row shards; returns the keys and float32 rows."""
    keys = [f"img{i}" for i in range(n)]
    feats = unit_rows(n, seed)
    with writer(store) as w:
        add_rows(w, keys, feats)
    return keys, feats


def test_commits_every_shard_rows(store):
    feats = unit_rows(5)
    with writer(store) as w:
        w.add(["a", "b"], feats[:2])
        assert w.maybe_commit() is False
        assert not store.exists()
        w.add(["c"], feats[2:3])
        assert w.maybe_commit() is True
        m = store.manifest()
        assert m["rows"] == 3 and len(m["shards"]) == 1 and m["shards"][0]["rows"] == 3
        w.add(["d", "e"], feats[3:5])
        assert w.maybe_commit() is False
        assert store.manifest()["rows"] == 3  # buffered rows are not visible yet
    m = store.manifest()  # leaving the block commits the rest
    assert m["rows"] == 5 and [s["rows"] for s in m["shards"]] == [3, 2]
    assert m["dtype"] == "float16" and m["dim"] == DIM and m["fingerprint"] == FINGERPRINT
    assert len(shard_files(store)) == 2


def test_read_natural_order_and_float16_round_trip(store):
    keys = ["img10", "img2", "b/img1", "img1", "a/img10", "a/img9"]
    feats = unit_rows(len(keys), seed=3)
    with writer(store) as w:
        add_rows(w, keys, feats)
    rows = store.read()
    assert rows.keys == ["a/img9", "a/img10", "b/img1", "img1", "img2", "img10"]
    assert rows.features.dtype == np.float32 and rows.features.shape == (6, DIM)
    assert rows.labels is None
    expected = feats[[keys.index(k) for k in rows.keys]]
    np.testing.assert_allclose(rows.features, expected, atol=1e-3, rtol=0)
    raw = store.read(as_float32=False)
    assert raw.features.dtype == np.float16
    np.testing.assert_array_equal(raw.features, expected.astype(np.float16))
    assert store.read(sort=False).keys == keys  # the written order when not sorted
    np.testing.assert_array_equal(store.features_of(["img2", "a/img9"]), raw.features[[4, 0]].astype(np.float32))
    with pytest.raises(KeyError, match="nope"):
        store.features_of(["img1", "nope"])


def test_float32_store_is_exact(store):
    feats = unit_rows(4, seed=5)
    with writer(store, dtype="float32") as w:
        w.add(["k0", "k1", "k2", "k3"], feats)
    rows = store.read(as_float32=False)
    assert rows.features.dtype == np.float32
    np.testing.assert_array_equal(rows.features, feats)


def test_superseding_a_key_keeps_only_the_new_row(store):
    keys, feats = filled(store, n=5)
    new = unit_rows(1, seed=9)
    with writer(store) as w:
        w.add(["img2"], new)
    rows = store.read()
    assert rows.keys == keys
    np.testing.assert_allclose(rows.features[2], new[0], atol=1e-3)
    assert not np.allclose(rows.features[2], feats[2], atol=1e-2)
    m = store.manifest()
    assert m["rows"] == 5
    assert [s.get("dead", []) for s in m["shards"]] == [[2], [], []]


def test_superseding_within_one_buffer_keeps_only_the_last_row(store):
    feats = unit_rows(3, seed=11)
    with writer(store, shard_rows=100) as w:
        w.add(["x", "y"], feats[:2])
        w.add(["x"], feats[2:])
    rows = store.read()
    assert rows.keys == ["x", "y"]
    np.testing.assert_allclose(rows.features[0], feats[2], atol=1e-3)
    assert store.manifest()["rows"] == 2
    with writer(store) as w:  # a reopened writer sees the same live rows
        assert sorted(w.meta) == ["x", "y"]
        w.compact(order=["x", "y"])
    assert store.read().keys == ["x", "y"]
    np.testing.assert_allclose(store.read().features[0], feats[2], atol=1e-3)


def test_drop_removes_rows(store):
    keys, feats = filled(store, n=7)
    with writer(store) as w:
        w.drop(["img1", "img5", "not-there"])
    rows = store.read()
    assert rows.keys == ["img0", "img2", "img3", "img4", "img6"]
    np.testing.assert_allclose(rows.features, feats[[0, 2, 3, 4, 6]], atol=1e-3)
    assert store.manifest()["rows"] == 5
    assert set(store.row_metadata()) == set(rows.keys)


def test_compact_writes_one_shard_in_the_given_order(store):
    written = ["img3", "img10", "img1", "img2", "img0", "img11", "img4"]
    feats = unit_rows(len(written), seed=2)
    with writer(store) as w:
        add_rows(w, written, feats)
    old = shard_files(store)
    assert len(old) == 3 and store.manifest()["sorted"] is False
    with writer(store) as w:
        w.drop(["img4"])
        order = ["img0", "img1", "img2", "img3", "img4", "img10", "img11"]
        assert w.compact(order=order) is True
    m = store.manifest()
    assert len(m["shards"]) == 1 and m["sorted"] is True and m["rows"] == 6
    assert "dead" not in m["shards"][0]
    assert shard_files(store) == [m["shards"][0]["file"]]  # old shard files deleted
    assert not set(old) & set(shard_files(store))
    expected = [k for k in order if k != "img4"]
    rows = store.read(sort=False)
    assert rows.keys == expected
    np.testing.assert_allclose(rows.features, feats[[written.index(k) for k in expected]], atol=1e-3)
    assert store.verify() == []
    with writer(store) as w:  # already compact and sorted: nothing to do
        assert w.compact(order=expected) is False
    assert shard_files(store) == [m["shards"][0]["file"]]


def test_fingerprint_mismatch_names_the_fields(store):
    filled(store, n=2)
    changed = json.loads(json.dumps(FINGERPRINT))
    changed["view"]["sharpness"] = 2.0
    with pytest.raises(FingerprintMismatchError) as info:
        with writer(store, fingerprint=changed):
            pass
    message = str(info.value)
    assert "view.sharpness" in message and "2.0" in message
    assert "view.size" not in message
    assert [d[0] for d in info.value.differences] == ["view.sharpness"]
    changed["view"]["size"] = 64
    changed["encoder"]["model"] = "other"
    with pytest.raises(FingerprintMismatchError) as info:
        store.check_fingerprint(changed)
    assert [d[0] for d in info.value.differences] == ["encoder.model", "view.sharpness", "view.size"]
    with pytest.raises(FingerprintMismatchError, match="dtype"):
        with writer(store, dtype="float32"):
            pass
    with writer(store) as w:  # refused opens released the lock; the stored rows are intact
        assert len(w.meta) == 2
    assert store.manifest()["fingerprint"] == FINGERPRINT


def test_second_writer_in_process_is_refused_and_readers_work(store):
    keys, _ = filled(store, n=4)
    with writer(store) as w:
        w.add(["new"], unit_rows(1))
        started = time.perf_counter()
        with pytest.raises(StoreLockedError) as info:
            with writer(store):
                pass
        assert time.perf_counter() - started < 2
        assert f"pid {os.getpid()}" in str(info.value)
        assert store.read().keys == keys  # readers see the last committed manifest
        assert store.verify() == []
    assert store.read().keys == keys + ["new"]
    with writer(store):  # released on exit
        pass


LOCK_CHILD = """
import sys
from embedstore.errors import StoreLockedError
from embedstore.store.store import Store
try:
    with Store(sys.argv[1]).writer(fingerprint={"kind": "whatever"}, dim=8):
        pass
except StoreLockedError as exc:
    print(exc)
    sys.exit(3)
"""


def test_second_writer_in_another_process_is_refused(store):
    filled(store, n=2)
    with writer(store):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(store.path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout and "being written by another process" in proc.stdout
        assert time.perf_counter() - started < 30  # (mostly interpreter start-up)
        assert len(store.read()) == 2
    proc = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(store.path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "FingerprintMismatchError" in proc.stderr  # got the lock this time


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])


def damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) - 200):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert path.stat().st_size == len(data)


@pytest.mark.parametrize(
    "damage, words",
    [
        (damage_truncate, "truncated"),
        (damage_flip, "checksum"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["truncated", "flipped", "missing"],
)
def test_verify_names_the_damaged_shard(store, damage, words):
    filled(store, n=7)
    assert store.verify() == []
    shards = store.manifest()["shards"]
    victim = store.path / "shards" / shards[1]["file"]
    size = victim.stat().st_size
    damage(victim)
    problems = store.verify()
    assert len(problems) == 1
    assert str(victim) in problems[0] and words in problems[0]
    if words == "checksum":
        assert victim.stat().st_size == size
    if words == "missing":
        with pytest.raises(CorruptStoreError, match="missing"):
            store.read()


def test_verify_without_manifest(store):
    problems = store.verify()
    assert len(problems) == 1 and "not in the cache" in problems[0]
    with pytest.raises(StoreNotFoundError):
        store.read()


def test_orphans_are_removed_when_the_next_writer_opens(store):
    filled(store, n=4)
    listed = shard_files(store)
    shards = store.path / "shards"
    orphans = [
        shards / ".tmp-0123456789abcdef.h5",                  # shard being written when killed
        shards / "shard-00000099-deadbeef.h5",               # renamed, but the manifest was never published
        store.path / ".tmp-fedcba9876543210.json",           # manifest being written when killed
    ]
    for path in orphans:
        path.write_bytes(b"partial")
    assert all(p.exists() for p in orphans)
    assert len(store.read()) == 4  # readers ignore them
    with writer(store):
        pass
    assert not any(p.exists() for p in orphans)
    assert shard_files(store) == listed
    assert len(store.read()) == 4 and store.verify() == []


def test_exception_inside_writer_commits_buffered_rows(store):
    feats = unit_rows(2)
    with pytest.raises(RuntimeError, match="boom"):
        with writer(store, shard_rows=100) as w:
            w.add(["a", "b"], feats)
            raise RuntimeError("boom")
    rows = store.read()
    assert rows.keys == ["a", "b"]
    np.testing.assert_allclose(rows.features, feats, atol=1e-3)
    with writer(store):  # the lock was released
        pass


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(store, bad):
    feats = unit_rows(3)
    feats[1, 4] = bad
    with writer(store) as w:
        with pytest.raises(ValueError, match="'second'"):
            w.add(["first", "second", "third"], feats)
        w.add(["ok"], unit_rows(1))
    assert store.read().keys == ["ok"]  # nothing of the refused batch was buffered


def test_wrong_shape_and_dtype_are_refused(store):
    with writer(store) as w:
        with pytest.raises(ValueError, match="shape"):
            w.add(["a", "b"], unit_rows(3))
    with pytest.raises(ValueError, match="dtype"):
        store.writer(fingerprint=FINGERPRINT, dim=DIM, dtype="int8")


def test_block_written_shards_and_a_streamed_compaction_keep_every_row(tmp_path, monkeypatch):
    import embedstore.store.shards as shards_module
    from embedstore.store.reader import StoreReader

    monkeypatch.setattr(shards_module, "WRITE_BLOCK_BYTES", 5 * DIM * 2)  # 5 rows per written block
    store = Store(tmp_path / "s")
    feats = unit_rows(23)
    keys = [f"img{i}.jpg" for i in range(23)]
    calls = []

    def blocks(a, b):
        calls.append((a, b))
        return feats[a:b]

    with writer(store) as w:
        w.add_blocks(keys[:13], blocks, labels=["x"] * 13)
        w.add_blocks(keys[13:], lambda a, b: feats[13 + a:13 + b])
        w.drop(["img3.jpg"])
    assert calls == [(0, 5), (5, 10), (10, 13)]
    order = sorted(k for k in keys if k != "img3.jpg")  # another order than the writes': img10 before img2
    with writer(store) as w:
        assert w.compact(order=order)
    with StoreReader(store) as r:
        assert r.keys == order and r.contiguous  # a compacted store keeps the order it was given
        assert len(store.manifest()["shards"]) == 1
        got = r.features(r.rows(0, len(r.keys)))
    expected = feats[[int(k[3:-4]) for k in r.keys]].astype(np.float16)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="non-finite"):
        with writer(store) as w:
            w.add_blocks(["bad.jpg"], lambda a, b: np.full((b - a, DIM), np.nan, dtype=np.float32))
