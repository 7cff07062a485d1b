"""Indexes saved next to stores: build, staleness, in-place refresh, damage, atomic save, GPU path."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from embedstore.errors import (
    CorruptIndexError,
    IndexMismatchError,
    IndexNotFoundError,
    SpecError,
)
from embedstore.search import ann as search
from embedstore.search.index import (
    INDEX_DIR,
    POINTER,
    IndexOptions,
    StoreIndex,
    build_index,
    open_index,
)
from embedstore.store.store import Store

D = 32


def unit(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, D))
    x = centres[rng.integers(0, 8, n)] + 0.7 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def keys_for(start: int, n: int) -> list[str]:
    return [f"c{i % 3}/img{i}.jpg" for i in range(start, start + n)]


def make_store(path, n: int = 600, seed: int = 0) -> Store:
    store = Store(path)
    keys = keys_for(0, n)
    with store.writer({"kind": "images", "encoder": {"id": "fake"}}, D, "float16") as w:
        w.add(keys, unit(n, seed), [k.split("/")[0] for k in keys])
        w.set_info(labelled=True)
        w.compact()
    return store


def oracle_keys(store: Store, queries: np.ndarray, k: int) -> list[list[str]]:
    rows = store.read()
    f = rows.features / np.linalg.norm(rows.features, axis=1, keepdims=True)
    order = np.argsort(-(queries @ f.T), axis=1, kind="stable")[:, :k]
    return [[rows.keys[i] for i in row] for row in order]


def found_keys(index: StoreIndex, queries: np.ndarray, k: int) -> list[list[str]]:
    _, ids = index.search(queries, k)
    return [[index.rows.keys[i] for i in row] for row in ids]


def test_flat_index_equals_the_oracle_and_reloads(tmp_path):
    store = make_store(tmp_path / "s")
    index, report = build_index(store, IndexOptions())
    assert report.action == "built" and report.factory == "Flat" and report.rows == 600
    q = unit(20, seed=9)
    assert found_keys(index, q, 5) == oracle_keys(store, q, 5)
    again = StoreIndex.load(store)
    assert found_keys(again, q, 5) == oracle_keys(store, q, 5)
    assert again.rows.keys == store.read().keys  # a full build: ids are store row positions
    assert not again.staleness().stale
    assert build_index(store, IndexOptions())[1].action == "unchanged"


def test_growth_makes_the_index_stale_and_build_adds_only_new_rows(tmp_path):
    store = make_store(tmp_path / "s")
    build_index(store, IndexOptions(kind="ivf", recall_target=0.9))
    with store.writer({"kind": "images", "encoder": {"id": "fake"}}, D, "float16") as w:
        new = keys_for(600, 50)
        w.add(new, unit(50, seed=3), [k.split("/")[0] for k in new])
        w.drop(["c0/img0.jpg", "c1/img1.jpg"])
        w.add(["c2/img2.jpg"], unit(1, seed=4), ["c2"], sizes=[1234], mtimes=[5678])  # the image changed on disk
    index, staleness = open_index(store)
    assert staleness.stale and (staleness.added, staleness.removed, staleness.changed) == (50, 2, 1)
    assert "50 rows added, 1 re-encoded, 2 removed" in staleness.describe()

    index, report = build_index(store, IndexOptions())
    assert report.action == "updated" and report.factory.startswith("IVF")  # the kind is kept
    assert (report.added, report.removed) == (51, 3)
    assert index.rows.n_live == 648 and len(index.rows) == 651  # ids only ever appended
    assert not index.staleness().stale
    live = {index.rows.keys[i] for i in np.flatnonzero(index.rows.live)}
    assert live == set(store.read().keys)
    _, ids = index.search(unit(1, seed=4), 1)  # the re-encoded row is found under its new vector
    assert index.rows.keys[ids[0, 0]] == "c2/img2.jpg"


def test_compaction_alone_does_not_make_an_index_stale(tmp_path):
    store = make_store(tmp_path / "s")
    with store.writer({"kind": "images", "encoder": {"id": "fake"}}, D, "float16") as w:
        w.add(keys_for(600, 10), unit(10, seed=5), ["c0"] * 10)
    build_index(store, IndexOptions())
    generation = store.manifest()["generation"]
    with store.writer({"kind": "images", "encoder": {"id": "fake"}}, D, "float16") as w:
        w.compact(order=sorted(store.read().keys))
    assert store.manifest()["generation"] > generation
    assert not StoreIndex.load(store).staleness().stale


def test_hnsw_is_rebuilt_when_rows_are_removed(tmp_path):
    store = make_store(tmp_path / "s")
    build_index(store, IndexOptions(kind="hnsw"))
    with store.writer({"kind": "images", "encoder": {"id": "fake"}}, D, "float16") as w:
        w.drop(["c0/img3.jpg"])
    index, report = build_index(store, IndexOptions())
    assert report.action == "built" and "cannot remove rows" in report.reason
    assert report.factory == "HNSW32" and index.rows.n_live == 599


def test_other_kind_rebuilds(tmp_path):
    store = make_store(tmp_path / "s")
    build_index(store, IndexOptions(kind="flat"))
    index, report = build_index(store, IndexOptions(kind="ivf"))
    assert report.action == "built" and index.factory.startswith("IVF")
    assert len(list((store.path / INDEX_DIR).glob("b-*"))) == 1  # the old build is gone


def test_errors_name_the_problem(tmp_path):
    store = make_store(tmp_path / "s")
    with pytest.raises(IndexNotFoundError, match="no index was built; run `embedstore index build`"):
        StoreIndex.load(store)
    index, _ = build_index(store, IndexOptions())
    with pytest.raises(SpecError, match="-k 601 is larger than the store \\(600 rows\\)"):
        index.search(unit(1, 0), 601)
    with pytest.raises(SpecError, match="query width 8 does not match the index width 32"):
        index.search(np.ones((1, 8), dtype=np.float32), 3)


def test_truncated_index_file_is_a_clear_error_and_build_replaces_it(tmp_path):
    store = make_store(tmp_path / "s")
    build_index(store, IndexOptions())
    meta = json.loads((store.path / INDEX_DIR / POINTER).read_text())
    path = store.path / INDEX_DIR / meta["build"] / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptIndexError, match="truncated"):
        StoreIndex.load(store)
    # same size but garbage: the recorded sha256 catches it before FAISS reads anything
    path.write_bytes(b"\0" * len(data))
    with pytest.raises(CorruptIndexError, match="sha256 differs"):
        StoreIndex.load(store)
    # an index saved before checksums were recorded: FAISS's own error, wrapped, no crash
    pointer = store.path / INDEX_DIR / POINTER
    legacy = {k: v for k, v in json.loads(pointer.read_text()).items() if k != "files"}
    pointer.write_text(json.dumps(legacy))
    with pytest.raises(CorruptIndexError, match="FAISS cannot read it"):
        StoreIndex.load(store)
    _, report = build_index(store, IndexOptions())
    assert report.action == "built" and "unusable" in report.reason
    StoreIndex.load(store)


def test_index_from_another_store_or_view_is_refused(tmp_path):
    a, b = make_store(tmp_path / "a"), make_store(tmp_path / "b", seed=1)
    build_index(a, IndexOptions())
    shutil.copytree(a.path / INDEX_DIR, b.path / INDEX_DIR)
    with pytest.raises(IndexMismatchError, match="built from another store"):
        StoreIndex.load(b)
    pointer = a.path / INDEX_DIR / POINTER
    meta = json.loads(pointer.read_text())
    meta["fingerprint"]["view"] = {"size": 336}
    pointer.write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="different encoder or view"):
        StoreIndex.load(a)


def test_kill_during_save_leaves_the_old_index_readable(tmp_path):
    store = make_store(tmp_path / "s")
    build_index(store, IndexOptions())
    before = json.loads((store.path / INDEX_DIR / POINTER).read_text())["build"]
    script = textwrap.dedent(f"""
        import os, signal
        from embedstore.search import index as ix
        from embedstore.store.store import Store

        real = ix.IndexRows.write
        def write_then_die(self, path):
            real(self, path)               # the new files exist, current.json not switched yet
            os.kill(os.getpid(), signal.SIGKILL)
        ix.IndexRows.write = write_then_die
        ix.build_index(Store({str(store.path)!r}), ix.IndexOptions(kind="ivf"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list((store.path / INDEX_DIR).glob(".tmp-*"))  # the interrupted build's leftovers
    index = StoreIndex.load(store)
    assert index.meta["build"] == before and index.factory == "Flat"
    q = unit(5, seed=2)
    assert found_keys(index, q, 3) == oracle_keys(store, q, 3)
    build_index(store, IndexOptions(kind="ivf"))
    assert not list((store.path / INDEX_DIR).glob(".tmp-*"))  # cleaned by the next build


def test_gpu_index_is_moved_to_the_cpu_before_saving(tmp_path, monkeypatch):
    """No GPU here: fake faiss-gpu's two conversion calls and check the save path uses them."""
    store = make_store(tmp_path / "s")
    faiss = search.faiss_module()
    calls: list[str] = []

    class OnGpu:  # stands for a GPU index: searchable, but faiss.write_index must never see it
        def __init__(self, cpu):
            self.cpu = cpu

        def __getattr__(self, name):
            return getattr(self.cpu, name)

    def to_gpu(index):
        calls.append("cpu->gpu")
        return OnGpu(index)

    def gpu_to_cpu(index):
        calls.append("gpu->cpu")
        assert isinstance(index, OnGpu)
        return index.cpu

    real_write = faiss.write_index

    def write_index(index, path):
        assert not isinstance(index, OnGpu), "a GPU index reached write_index"
        real_write(index, path)

    monkeypatch.setattr(search, "gpu_available", lambda: True)
    monkeypatch.setattr(search, "to_gpu", to_gpu)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", gpu_to_cpu, raising=False)
    monkeypatch.setattr(faiss, "write_index", write_index)
    index, report = build_index(store, IndexOptions(kind="ivf", recall_target=0.9))
    assert report.device == "cuda" and calls == ["cpu->gpu", "gpu->cpu"]
    monkeypatch.setattr(search, "gpu_available", lambda: False)
    reloaded = StoreIndex.load(store, device="auto")
    assert not reloaded.on_gpu
    q = unit(5, seed=1)
    assert found_keys(reloaded, q, 3) == found_keys(index, q, 3)


def test_hnsw_on_cuda_is_refused(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s")
    monkeypatch.setattr(search, "gpu_available", lambda: True)
    with pytest.raises(SpecError, match="no GPU version of 'HNSW32'"):
        build_index(store, IndexOptions(kind="hnsw", device="cuda"))
    assert not (store.path / INDEX_DIR / POINTER).exists()
    assert os.path.isdir(store.path)


def test_a_relabelled_row_makes_the_index_stale(tmp_path):
    store = make_store(tmp_path / "s")
    build_index(store, IndexOptions())
    rows = store.read()
    with store.writer({"kind": "images", "encoder": {"id": "fake"}}, D, "float16") as w:
        w.add([rows.keys[0]], rows.features[:1], ["c9"])  # same file, new label (a list file changed)
    staleness = StoreIndex.load(store).staleness()
    assert staleness.changed == 1
    index, report = build_index(store, IndexOptions())
    assert report.action == "updated" and index.rows.labels[index.rows.live_ids()[rows.keys[0]]] == "c9"
