"""Store integrity without a model: checksummed shards, the one checked read path, validated
manifests, the previous manifest generation, pinned commits, repair, and clean write failures.

Stores are written with the real writer from random unit features; damage is done by flipping
bytes at offsets HDF5 itself reports (a chunk's byte offset), so each test knows what it broke.
"""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedstore.errors import (
    CorruptStoreError,
    FingerprintMismatchError,
    StoreChangedError,
    WriteFailedError,
)
from embedstore.maintain.repair import repair_store, store_problems
from embedstore.store import shards as shards_mod
from embedstore.store.store import PREVIOUS, Store, new_shard

DIM = 16
FP = {"schema": 1, "kind": "images", "encoder": {"model": "test"}, "view": {}, "decoder": "x", "dtype": "float16"}


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def keys_of(n: int, start: int = 0) -> list[str]:
    return [f"c{i % 3}/img{i}.jpg" for i in range(start, start + n)]


def write(store: Store, n: int = 40, start: int = 0, compact: bool = True, seed: int = 0, **kw) -> list[str]:
    keys = keys_of(n, start)
    with store.writer(FP, DIM, "float16", **kw) as w:
        w.add(keys, unit(n, seed), [k.split("/")[0] for k in keys], sizes=list(range(n)), mtimes=[7] * n,
              hashes=[f"h{i}" for i in range(n)])
        w.set_info(labelled=True)
        if compact:
            from embedstore.util.order import natural_order

            all_keys = list(w.meta) + [k for k in keys if k not in w.meta]
            w.compact(order=[all_keys[i] for i in natural_order(all_keys)])
    return keys


@pytest.fixture()
def small_chunks(monkeypatch):
    """8 rows per features chunk (DIM=16 float16 rows are 32 bytes)."""
    monkeypatch.setattr(shards_mod, "CHUNK_BYTES", 8 * DIM * 2)


def only_shard(store: Store) -> Path:
    files = list((store.path / "shards").glob("shard-*.h5"))
    assert len(files) == 1
    return files[0]


def flip(path: Path, offset: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def chunk_offset(path: Path, chunk: int) -> int:
    with h5py.File(path, "r") as f:
        info = f["features"].id.get_chunk_info(chunk)
    return info.byte_offset + info.size // 2


# ---- layout ------------------------------------------------------------------------------------
def test_new_shards_are_chunked_in_row_blocks_with_checksums(tmp_path, small_chunks):
    store = Store(tmp_path / "s")
    write(store, 40)
    entry = store.manifest()["shards"][0]
    assert entry["format"] == 2 and entry["chunk_rows"] == 8
    assert set(entry["digests"]) == {"keys", "labels", "hash"}
    with h5py.File(store.shard_path(entry), "r") as f:
        assert f["features"].chunks == (8, DIM) and f["features"].fletcher32
        assert all(f[name].fletcher32 for name in ("size", "mtime_ns"))


def test_default_chunks_are_whole_row_blocks_of_half_to_one_megabyte():
    assert shards_mod.chunk_rows_for(768, "float16") == 512
    assert shards_mod.chunk_rows_for(1280, "float16") == 256
    assert shards_mod.chunk_rows_for(1024, "float32") == 256
    for dim in (32, 512, 768, 1024, 1280, 4096):
        rows = shards_mod.chunk_rows_for(dim, "float16")
        assert (rows & (rows - 1)) == 0 and shards_mod.CHUNK_BYTES // 2 < rows * dim * 2 <= shards_mod.CHUNK_BYTES


def test_commit_api_reads_row_blocks_and_names_the_damaged_block(tmp_path, small_chunks):
    store = Store(tmp_path / "s")
    write(store, 40)
    rows = store.read(as_float32=False)
    path = only_shard(store)
    flip(path, chunk_offset(path, 2))  # rows 16..23
    with store.open_commit() as commit:
        shard = commit.shards[0]
        assert shard.chunk_rows == 8 and shard.live().all()
        np.testing.assert_array_equal(shard.features(0, 16), rows.features[:16])
        np.testing.assert_array_equal(shard.features(24, 40), rows.features[24:])
        with pytest.raises(CorruptStoreError) as info:
            shard.features(16, 24)
    text = str(info.value)
    assert path.name in text and store.what in text and "embedstore verify --repair" in text
    assert "the same `embedstore encode` command again" in text


# ---- damage is never read silently --------------------------------------------------------------
@pytest.mark.parametrize("n_bytes", [8, 64])
def test_damaged_features_raise_a_clear_error_on_every_read(tmp_path, n_bytes):
    store = Store(tmp_path / "s")
    write(store, 300)
    path = only_shard(store)
    flip(path, chunk_offset(path, 0), n_bytes)
    for read in (store.read, lambda: store.read(as_float32=False), lambda: store.features_of(["c0/img0.jpg"])):
        with pytest.raises(CorruptStoreError, match=rf"{path.name} is damaged: cannot read features"):
            read()
    assert store.read_keys_labels().keys  # keys and labels are sound and still readable
    problems = store.verify()
    assert len(problems) == 1 and path.name in problems[0] and "damaged chunk" in problems[0]


def test_a_writer_refuses_to_build_on_a_damaged_store(tmp_path):
    store = Store(tmp_path / "s")
    write(store, 40)
    flip(only_shard(store), chunk_offset(only_shard(store), 0))
    with pytest.raises(CorruptStoreError, match="verify --repair"):
        with store.writer(FP, DIM, "float16"):
            pass


def test_damaged_string_columns_are_caught_by_their_digest(tmp_path):
    store = Store(tmp_path / "s")
    write(store, 40)
    path = only_shard(store)
    entry = store.manifest()["shards"][0]
    data = path.read_bytes()
    needle = b"c1/img13.jpg"
    at = data.index(needle)
    path.write_bytes(data[:at] + b"c1/img99.jpg" + data[at + len(needle):])  # same length, other key
    manifest = store.manifest()
    manifest["shards"][0]["sha256"] = shards_mod.file_sha256(path)  # even with a matching sha256
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="column keys differs from its digest"):
        store.read()
    assert entry["digests"]["keys"] != shards_mod.strings_digest(["x"])


@pytest.mark.parametrize("forge", ["width", "dtype", "rows"])
def test_forged_shards_are_refused_even_with_a_recomputed_sha256(tmp_path, forge):
    store = Store(tmp_path / "s")
    write(store, 40)
    entry = store.manifest()["shards"][0]
    path = store.shard_path(entry)
    n = {"rows": 41}.get(forge, 40)
    feats = unit(n)[:, : DIM // 2] if forge == "width" else unit(n)
    feats = feats.astype(np.float32 if forge == "dtype" else np.float16)
    keys = keys_of(n)
    shards_mod.write_shard(path, keys, feats, ["c"] * n, [1] * n, [1] * n, ["h"] * n)
    manifest = store.manifest()
    manifest["shards"][0].update(bytes=path.stat().st_size, sha256=shards_mod.file_sha256(path))
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    expected = {"width": r"features are \(40, 8\), the manifest says \(40, 16\)",
                "dtype": "features are float32, the manifest says float16",
                "rows": r"features are \(41, 16\), the manifest says \(40, 16\)"}[forge]
    with pytest.raises(CorruptStoreError, match=expected):
        store.read()
    assert len(store.verify()) == 1


@pytest.mark.parametrize("text, field", [
    ("[1, 2, 3]", "the top level"),
    ('{"schema": 1, "fingerprint": {}, "dim": 16, "dtype": "float16", "generation": 1, "shards": "oops"}', r"\$\.shards"),
    ('{"schema": 1, "fingerprint": {}, "dim": 16, "dtype": "float16", "generation": 1, '
     '"shards": [{"file": "../../etc/passwd", "rows": 1, "bytes": 1, "sha256": "' + "0" * 64 + '"}]}', r"\$\.shards\[0\]\.file"),
    ("{not json", "not valid JSON"),
])
def test_garbage_manifests_are_refused_naming_the_field(tmp_path, text, field):
    store = Store(tmp_path / "s")
    write(store, 10)
    (store.path / "manifest.json").write_text(text)
    for call in (store.manifest, store.read, Store(store.path).read_keys_labels):
        with pytest.raises(CorruptStoreError, match=field):
            call()
    problems = store.verify()
    assert len(problems) == 1 and "manifest.json is damaged" in problems[0] and "verify --repair" in problems[0]


# ---- format-1 stores (written before checksums) --------------------------------------------------
def legacy_store(path: Path, n: int = 40) -> Store:
    """A store as embedstore wrote it before format 2: contiguous shard, no format/digests."""
    store = Store(path)
    keys = keys_of(n)
    (store.path / "shards").mkdir(parents=True)
    entry = new_shard(store, "shard-00000001-abcdef12.h5", keys, unit(n).astype(np.float16),
                      [k.split("/")[0] for k in keys], list(range(n)), [7] * n, ["h"] * n, checksums=False)
    assert "format" not in entry
    manifest = {"schema": 1, "fingerprint": FP, "dim": DIM, "dtype": "float16", "generation": 1, "shards": [entry],
                "failures": {}, "labelled": True, "sorted": False, "commit_id": "c1", "rows": n, "store_id": "x"}
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    return store


def test_legacy_stores_are_read_after_a_sha256_check_and_migrated_by_the_next_writer(tmp_path):
    store = legacy_store(tmp_path / "s")
    before = store.read(as_float32=False)
    with h5py.File(store.shard_path(store.manifest()["shards"][0])) as f:
        assert f["features"].chunks is None  # contiguous, unchecksummed
    with store.writer(FP, DIM, "float16") as w:
        assert w.compact() is True  # rewritten although it is one shard without dead rows
    entry = store.manifest()["shards"][0]
    assert entry["format"] == 2
    after = store.read(as_float32=False)
    assert after.keys == before.keys
    np.testing.assert_array_equal(after.features, before.features)

    damaged = legacy_store(tmp_path / "d")
    path = only_shard(damaged)
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_offset()
    flip(path, offset + 40)
    with pytest.raises(CorruptStoreError, match="checksum \\(sha256\\) differs"):
        damaged.read()


# ---- previous generation, repair -------------------------------------------------------------------
def test_previous_generation_is_kept_and_repair_falls_back_to_it(tmp_path):
    store = Store(tmp_path / "s")
    write(store, 20, compact=False)
    first = store.manifest()
    write(store, 20, start=20, compact=False)
    assert json.loads((store.path / PREVIOUS).read_text())["commit_id"] == first["commit_id"]
    (store.path / "manifest.json").write_text("garbage")
    with pytest.raises(CorruptStoreError, match="verify --repair"):
        store.read()
    with pytest.raises(CorruptStoreError):  # a writer never starts over committed rows
        with store.writer(FP, DIM, "float16"):
            pass
    actions = repair_store(store)
    assert any("fell back to the previous generation" in a for a in actions)
    rows = store.read()
    assert rows.keys == sorted(keys_of(20), key=lambda k: (k.split("/")[0], int(k[k.index("img") + 3:-4])))
    assert store.verify() == [] and store_problems(store) == []

    (store.path / "manifest.json").unlink()  # deleted, while the previous generation exists
    with pytest.raises(CorruptStoreError, match="missing while manifest.prev.json exists"):
        store.read()
    repair_store(store)
    assert len(store.read()) == 20


def test_compaction_keeps_a_previous_generation_whose_shards_exist(tmp_path):
    store = Store(tmp_path / "s")
    write(store, 20, compact=False)
    write(store, 20, start=20, compact=True)
    previous = json.loads((store.path / PREVIOUS).read_text())
    assert all((store.path / "shards" / s["file"]).is_file() for s in previous["shards"])


def test_repair_keeps_sound_chunks_and_drops_exactly_the_damaged_rows(tmp_path, small_chunks):
    store = Store(tmp_path / "s")
    write(store, 40)
    before = store.read(as_float32=False)
    path = only_shard(store)
    flip(path, chunk_offset(path, 1))  # rows 8..15 of the compacted (natural order) shard
    actions = repair_store(store)
    assert any("salvaged 32 of 40 rows" in a for a in actions), actions
    assert any("(8 dropped)" in a and "re-encodes exactly the dropped rows" in a for a in actions)
    after = store.read(as_float32=False)
    lost = set(before.keys[8:16])
    assert after.keys == [k for k in before.keys if k not in lost]
    keep = [i for i, k in enumerate(before.keys) if k not in lost]
    np.testing.assert_array_equal(after.features, before.features[keep])
    assert store.verify() == [] and not path.exists()
    assert set(store.row_metadata()) == set(after.keys)


def test_shards_without_any_manifest_are_reported_and_removed_by_repair(tmp_path):
    store = Store(tmp_path / "s")
    write(store, 10)
    (store.path / "manifest.json").unlink()
    (store.path / PREVIOUS).unlink()
    problems = store_problems(store)
    assert len(problems) == 1 and "no manifest.json" in problems[0]
    assert "removed 1 shard file" in repair_store(store)[0]
    assert store_problems(store) == [] and not list((store.path / "shards").iterdir())


# ---- pinned commits ---------------------------------------------------------------------------
def test_a_reader_reads_the_commit_it_started_with_while_a_writer_commits(tmp_path):
    store = Store(tmp_path / "s")
    write(store, 20, compact=False)
    commit = store.manifest()["commit_id"]
    index = store.read_keys_labels(expect_commit=commit)
    write(store, 10, start=20, compact=False)  # another writer commits in between
    rows = store.read(expect_commit=commit)
    assert rows.keys == index.keys and len(rows) == 20
    write(store, 0, compact=True)  # compaction removes the shards of that commit
    with pytest.raises(StoreChangedError):
        store.read(expect_commit=commit)
    with pytest.raises(StoreChangedError):
        Store(store.path).read(expect_commit=commit)  # a Store that never saw it cannot pin it


# ---- clean write failures ---------------------------------------------------------------------
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDiskFile(io.FileIO):
    """A file whose writes fail with ENOSPC past ``budget`` bytes, as on a full disk."""

    budget = 0

    def write(self, data):
        if self.tell() + memoryview(data).nbytes > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def full_disk(monkeypatch, after_bytes: int, nth_file: int = 1) -> None:
    """HDF5 shard files (written through TolerantFile) hit a full disk: the ``nth_file`` one
    opened from now on fails after ``after_bytes`` bytes; other files write normally."""
    from embedstore.util import fsutil

    opened = [0]

    def fake_open(path, mode="r", buffering=-1, **kwargs):
        if mode != "w+b":  # not a TolerantFile (fsync_file opens files too)
            return open(path, mode, buffering, **kwargs)
        opened[0] += 1
        handle = FullDiskFile(path, "w+")
        handle.budget = after_bytes if opened[0] == nth_file else 1 << 62
        return handle

    monkeypatch.setattr(fsutil, "open", fake_open, raising=False)


@pytest.mark.parametrize("step", ["shard write", "fsync", "rename", "manifest", "previous link", "compaction"])
def test_no_space_at_each_write_step_keeps_committed_rows_and_leaves_no_temp_files(tmp_path, monkeypatch, step):
    store = Store(tmp_path / "s")
    write(store, 20, compact=False)
    committed = store.read(as_float32=False)
    generation = store.manifest()["generation"]
    real_replace, real_fsync = os.replace, os.fsync
    if step == "shard write":
        full_disk(monkeypatch, after_bytes=3000)
    elif step == "fsync":
        monkeypatch.setattr(os, "fsync", enospc)
    elif step == "rename":
        monkeypatch.setattr(os, "replace", lambda a, b: enospc() if str(b).endswith(".h5") else real_replace(a, b))
    elif step == "manifest":
        monkeypatch.setattr(os, "replace", lambda a, b: enospc() if str(b).endswith("manifest.json") else real_replace(a, b))
    elif step == "previous link":
        monkeypatch.setattr(os, "link", enospc)
        monkeypatch.setattr("shutil.copyfile", enospc)
    keys = keys_of(12, 20)
    with pytest.raises(WriteFailedError) as info:
        with store.writer(FP, DIM, "float16") as w:
            w.add(keys, unit(12, 1), ["c"] * 12)
            if step == "compaction":
                w.commit()
                monkeypatch.setattr(os, "fsync", enospc)
                w.compact(order=sorted(w.meta))
            else:
                w.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "fsync", real_fsync)
    error = info.value
    assert error.errno == errno.ENOSPC and str(store.path) in error.filename
    assert "No space left on device" in str(error) and "free some disk space" in str(error)
    assert list(store.path.rglob(".tmp-*")) == []
    listed = {s["file"] for s in store.manifest()["shards"]}
    assert {p.name for p in (store.path / "shards").iterdir()} == listed  # no orphan shard left
    rows = store.read(as_float32=False)
    if step == "compaction":  # the 12 rows were committed before the compaction failed
        assert store.manifest()["generation"] == generation + 1 and len(rows) == 32
        assert "the 32 rows committed before are safe" in str(error)
    else:
        assert store.manifest()["generation"] == generation and rows.keys == committed.keys
        np.testing.assert_array_equal(rows.features, committed.features)
        assert "the 20 rows committed before are safe" in str(error)
    assert store.verify() == []


def test_a_real_file_size_limit_ends_with_an_error_not_a_crash(tmp_path):
    """``ulimit -f`` makes every write past the limit fail with EFBIG; HDF5 used to crash (SIGSEGV)."""
    script = f"""
import resource, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_integrity import FP, DIM, keys_of
from embedstore.store.store import Store
from embedstore.errors import WriteFailedError
resource.setrlimit(resource.RLIMIT_FSIZE, (60 * 1024, resource.RLIM_INFINITY))
store = Store({str(tmp_path / 's')!r})
try:
    with store.writer(FP, DIM, "float16") as w:
        w.add(keys_of(5000), np.ones((5000, DIM), np.float32), ["c"] * 5000)
except WriteFailedError as exc:
    print("clean:", exc)
    sys.exit(1)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "clean: cannot write" in proc.stdout and "(EFBIG)" in proc.stdout
    assert list((tmp_path / "s").rglob(".tmp-*")) == []


def test_fingerprint_and_width_are_still_refused(tmp_path):
    store = Store(tmp_path / "s")
    write(store, 5)
    with pytest.raises(FingerprintMismatchError, match="dim"):
        with store.writer(FP, DIM * 2, "float16"):
            pass
