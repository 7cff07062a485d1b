"""A FAISS index saved next to an image store: build, refresh, load, staleness, search.

Layout inside the store folder::

    index/
      current.json        the committed index: kind, tuning, the store commit it was built from
      b-<id>/index.faiss  the FAISS index (always the CPU form)
      b-<id>/rows.h5      id -> key, label, row version (size:mtime:hash) and a live flag
      .lock               held while an index is being built

Saving writes a new ``b-<id>`` folder (files fsynced), renames it into place, then replaces
``current.json`` atomically and only then deletes older builds; a crash at any point leaves the
previous index readable. ``current.json`` records the size and sha256 of both files, checked on
every load and by ``embedstore verify`` (a damaged index gives a clear error, never wrong scores;
``embedstore verify --repair`` or ``index build --rebuild`` rebuilds it). An index is *stale* when the store's rows changed since it was built
(rows added, removed or re-encoded); a store that was only compacted is not stale. ``build`` on a
stale index adds new rows and removes old ones in place where the kind allows (flat, IVF) and
rebuilds otherwise (HNSW).

Ids are positions in ``rows.h5``; a full build gives ids equal to the store's row positions
(natural key order); updates append new ids and mark removed ones dead.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from embedstore.errors import (
    CorruptIndexError,
    IndexMismatchError,
    IndexNotFoundError,
    SpecError,
    WriteFailedError,
)
from embedstore.search import ann
from embedstore.store import schemas
from embedstore.store.shards import file_sha256
from embedstore.store.store import RowMeta, Store, fingerprint_differences
from embedstore.util.arrays import unit_rows
from embedstore.util.fsutil import (
    TMP_PREFIX,
    WriteLock,
    atomic_write_json,
    fsync_dir,
    fsync_file,
    tolerant_file,
)
from embedstore.util.progress import progress_bar

log = logging.getLogger(__name__)

INDEX_DIR = "index"
POINTER = "current.json"
INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.h5"
INDEX_SCHEMA = 1
MAX_DEAD_FRACTION = 0.3  # rebuild instead of updating once this share of ids would be dead


def row_version(meta: RowMeta) -> str:
    """What identifies one encoding of a row and its label: a re-encoded or relabelled image gets a
    new version (kNN votes with the label the index holds)."""
    return f"{meta.size}:{meta.mtime_ns}:{meta.hash}:{meta.label or ''}"


@dataclass
class IndexRows:
    """The id table of an index: ``keys[id]``, ``labels[id]``, ``versions[id]``, ``live[id]``."""

    keys: list[str]
    labels: list[str]
    versions: list[str]
    live: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_live(self) -> int:
        return int(self.live.sum())

    def live_ids(self) -> dict[str, int]:
        """Live key -> id."""
        return {self.keys[i]: int(i) for i in np.flatnonzero(self.live)}

    def write(self, path: Path) -> None:
        """Write the table to ``path`` (fsynced). Raises the first OSError (HDF5 never sees it)."""
        import h5py

        strings = h5py.string_dtype("utf-8")
        with tolerant_file(path) as sink, h5py.File(sink, "w") as f:
            f.create_dataset("keys", data=np.asarray(self.keys, dtype=object), dtype=strings)
            f.create_dataset("labels", data=np.asarray(self.labels, dtype=object), dtype=strings)
            f.create_dataset("versions", data=np.asarray(self.versions, dtype=object), dtype=strings)
            f.create_dataset("live", data=self.live.astype(bool))

    @classmethod
    def read(cls, path: Path) -> "IndexRows":
        import h5py

        if not path.is_file():
            raise FileNotFoundError(path)  # a concurrent build replaced the index: the caller retries
        try:
            with h5py.File(path, "r", locking=False) as f:
                keys = f["keys"].asstr()[:].tolist()
                labels = f["labels"].asstr()[:].tolist()
                versions = f["versions"].asstr()[:].tolist()
                live = f["live"][:].astype(bool)
        except (OSError, KeyError) as exc:
            raise CorruptIndexError(f"{path}: cannot read the index's id table ({exc}); "
                                    "run `embedstore index build --rebuild`") from exc
        if not len(keys) == len(labels) == len(versions) == len(live):
            raise CorruptIndexError(f"{path}: id table columns have different lengths")
        return cls(keys, labels, versions, live)


@dataclass(frozen=True)
class Staleness:
    """How the store differs from what an index was built from."""

    added: int = 0
    removed: int = 0
    changed: int = 0
    index_generation: int = 0
    store_generation: int = 0

    @property
    def stale(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        """A sentence for warnings."""
        if not self.stale:
            return "the index is up to date"
        return (f"the index is stale: built from store generation {self.index_generation}, the store is at "
                f"{self.store_generation} ({self.added} rows added, {self.changed} re-encoded, {self.removed} removed "
                "since); run `embedstore index build` again to refresh it")


@dataclass(frozen=True)
class IndexOptions:
    """How to build an index (see :mod:`embedstore.search.ann` for the kinds)."""

    kind: Optional[str] = None   # None: the existing index's kind, or "auto" for a new one
    max_memory: Optional[int] = None
    recall_target: float = 0.95
    recall_k: int = 10
    sample: int = 1000
    device: str = "auto"
    rebuild: bool = False
    seed: int = 0
    progress: bool = True   # a bar on stderr through the build's stages (see embedstore.util.progress)

    def __post_init__(self) -> None:
        if not 0 < self.recall_target <= 1:
            raise SpecError(f"--recall: must be in (0, 1], got {self.recall_target}")
        if self.sample < 1 or self.recall_k < 1:
            raise SpecError("--sample and the recall k must be >= 1")


@dataclass
class BuildReport:
    """What :func:`build_index` did."""

    action: str                 # "built", "updated", "unchanged"
    factory: str
    rows: int
    added: int = 0
    removed: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    tuning: Optional[dict[str, Any]] = None
    index_bytes: int = 0
    reason: str = ""


def _diff(rows: IndexRows, current: Mapping[str, str]) -> tuple[list[str], list[int], list[str]]:
    """(keys new to the index, ids of rows gone from the store, keys re-encoded since)."""
    live = rows.live_ids()
    added = [k for k in current if k not in live]
    removed = [i for k, i in live.items() if k not in current]
    changed = [k for k, i in live.items() if k in current and current[k] != rows.versions[i]]
    return added, removed, changed


class StoreIndex:
    """A loaded index with its id table; search returns FAISS-style ``(scores, ids)``."""

    def __init__(self, store: Store, index: Any, rows: IndexRows, meta: dict[str, Any], on_gpu: bool = False,
                 saved: bool = True):
        self.store = store
        self.index = index
        self.rows = rows
        self.meta = meta
        self.on_gpu = on_gpu
        self.saved = saved

    # -- opening
    @staticmethod
    def folder(store: Store) -> Path:
        return store.path / INDEX_DIR

    @classmethod
    def exists(cls, store: Store) -> bool:
        return (cls.folder(store) / POINTER).is_file()

    @classmethod
    def load(cls, store: Store, device: str = "cpu") -> "StoreIndex":
        """Open the saved index of ``store``.

        Raises:
            IndexNotFoundError: none was built.
            IndexMismatchError: it was built from another store, encoder or view.
            CorruptIndexError: a file is truncated or unreadable.
        """
        for attempt in range(3):
            try:
                return cls._load_once(store, device)
            except FileNotFoundError:
                if attempt == 2:
                    raise CorruptIndexError(f"{cls.folder(store)}: a file named in {POINTER} is missing; "
                                            "run `embedstore index build --rebuild`") from None
                time.sleep(0.05)  # a concurrent build replaced the index between our reads
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, store: Store, device: str) -> "StoreIndex":
        folder = cls.folder(store)
        meta = read_pointer(store)
        if meta is None:
            raise IndexNotFoundError(f"{store.what}: no index was built; run `embedstore index build` "
                                     "with the same --dataset, --model and view options")
        manifest = store.manifest()
        check_belongs(meta, manifest, store)
        build_dir = folder / meta["build"]
        index_path = build_dir / INDEX_FILE
        problems = check_files(store, meta)
        if problems:
            raise CorruptIndexError(f"{problems[0]}; run `embedstore index build --rebuild` (or `embedstore verify --repair`)")
        faiss = ann.faiss_module()
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise CorruptIndexError(f"{index_path}: FAISS cannot read it ({str(exc).strip().splitlines()[-1]}); "
                                    "run `embedstore index build --rebuild`") from exc
        rows = IndexRows.read(build_dir / ROWS_FILE)
        if index.ntotal != rows.n_live or index.d != int(manifest["dim"]):
            raise CorruptIndexError(f"{index_path}: {index.ntotal} vectors of width {index.d}, the id table has "
                                    f"{rows.n_live} live rows and the store width {manifest['dim']}")
        if meta.get("tuning") and meta["tuning"].get("value"):
            ann.set_search_parameter(index, int(meta["tuning"]["value"]))
        on_gpu = ann.resolve_device(device, meta["factory"]) == "cuda"
        if on_gpu:
            index = ann.to_gpu(index)
        return cls(store, index, rows, meta, on_gpu)

    @classmethod
    def exact(cls, store: Store) -> "StoreIndex":
        """An in-memory exact index over the store's current rows (nothing saved)."""
        manifest = store.manifest()
        data = store.read()
        metas = store.row_metadata()
        rows = IndexRows(list(data.keys), list(data.labels or [""] * len(data.keys)),
                         [row_version(metas[k]) for k in data.keys], np.ones(len(data.keys), dtype=bool))
        index = ann.build(unit_rows(data.features), np.arange(len(data.keys)), "Flat") if len(data.keys) else None
        meta = {"factory": "Flat", "store_generation": manifest["generation"],
                "store_commit_id": manifest.get("commit_id"), "tuning": None}
        return cls(store, index, rows, meta, saved=False)

    # -- state
    @property
    def factory(self) -> str:
        return str(self.meta["factory"])

    def staleness(self) -> Staleness:
        """Compare the id table with the store's current rows (cheap when nothing was committed since)."""
        manifest = self.store.manifest()
        generation = int(manifest["generation"])
        if manifest.get("commit_id") == self.meta.get("store_commit_id"):
            return Staleness(index_generation=int(self.meta["store_generation"]), store_generation=generation)
        current = {k: row_version(m) for k, m in self.store.row_metadata().items()}
        added, removed, changed = _diff(self.rows, current)
        return Staleness(len(added), len(removed), len(changed), int(self.meta["store_generation"]), generation)

    # -- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` nearest rows of each query (ids index :attr:`rows`).

        Raises:
            SpecError: ``k`` outside [1, rows] or a query width that differs from the index's.
        """
        n = self.rows.n_live
        if k < 1:
            raise SpecError(f"-k {k}: must be at least 1")
        if k > n:
            raise SpecError(f"-k {k} is larger than the store ({n} rows)")
        if self.index is None:
            raise SpecError(f"{self.store.what} has no rows to search")
        return ann.search(self.index, queries, k)

    # -- saving
    def save(self) -> None:
        """Write the index (CPU form) and its id table as a new build, then switch ``current.json`` to it."""
        faiss = ann.faiss_module()
        folder = self.folder(self.store)
        folder.mkdir(parents=True, exist_ok=True)
        build = f"b-{uuid.uuid4().hex[:12]}"
        tmp = folder / f"{TMP_PREFIX}{build}"
        kept = "the previous index (if any) is unchanged"
        try:
            tmp.mkdir()
            try:
                faiss.write_index(ann.to_cpu(self.index, self.on_gpu), str(tmp / INDEX_FILE))
            except RuntimeError as exc:  # FAISS reports a failed write (a full disk) as RuntimeError
                raise WriteFailedError(tmp / INDEX_FILE, _faiss_reason(exc), kept) from exc
            self.rows.write(tmp / ROWS_FILE)
            files = {}
            for name in (INDEX_FILE, ROWS_FILE):
                fsync_file(tmp / name)
                files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
            os.replace(tmp, folder / build)
            fsync_dir(folder)
        except WriteFailedError:
            raise
        except OSError as exc:
            raise WriteFailedError(getattr(exc, "filename", None) or tmp, exc, kept) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        meta = {**self.meta, "schema": INDEX_SCHEMA, "build": build,
                "index_bytes": files[INDEX_FILE]["bytes"], "files": files}
        try:
            atomic_write_json(folder / POINTER, meta, kept)
        except WriteFailedError:
            shutil.rmtree(folder / build, ignore_errors=True)
            raise
        self.meta, self.saved = meta, True
        _remove_old_builds(folder, keep=build)


def _faiss_reason(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "FAISS could not write the index"


def read_pointer(store: Store) -> Optional[dict[str, Any]]:
    """The validated ``current.json`` of ``store``'s index, or None when none was built.

    Raises:
        CorruptIndexError: not JSON, not an index pointer (schema), or another schema version.
    """
    path = StoreIndex.folder(store) / POINTER
    fix = "run `embedstore index build --rebuild` (or `embedstore verify --repair`)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(f"{path}: not readable JSON ({exc}); {fix}") from exc
    schemas.check(meta, "INDEX_POINTER", path, fix, CorruptIndexError)
    if meta["schema"] != INDEX_SCHEMA:
        raise CorruptIndexError(f"{path}: index schema {meta['schema']!r}, this embedstore reads {INDEX_SCHEMA}; {fix}")
    return meta


def check_files(store: Store, meta: Mapping[str, Any]) -> list[str]:
    """Problems of the index files ``meta`` names: missing, size, and sha256 (indexes built before
    checksums were recorded are checked by size only)."""
    build_dir = StoreIndex.folder(store) / meta["build"]
    expected = meta.get("files") or {INDEX_FILE: {"bytes": meta["index_bytes"]}}
    problems = []
    for name, want in expected.items():
        path = build_dir / name
        if not path.is_file():
            raise FileNotFoundError(path)  # a concurrent build replaced the index: the caller retries
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{path}: {size:,} bytes, {POINTER} says {want['bytes']:,} (truncated or replaced)")
        elif "sha256" in want and file_sha256(path) != want["sha256"]:
            problems.append(f"{path}: its sha256 differs from the one recorded in {POINTER} (damaged)")
    return problems


def check_belongs(meta: Mapping[str, Any], manifest: Mapping[str, Any], store: Store) -> None:
    """Raise :class:`IndexMismatchError` if ``meta`` describes an index of another store, encoder or view."""
    if meta.get("store_id") != manifest.get("store_id"):
        raise IndexMismatchError(f"{store.path / INDEX_DIR}: the index was built from another store "
                                 f"(store id {meta.get('store_id')}, this store is {manifest.get('store_id')}); "
                                 "run `embedstore index build --rebuild`")
    diffs = fingerprint_differences(meta.get("fingerprint", {}), manifest["fingerprint"])
    if diffs:
        lines = "; ".join(f"{f}: index has {a!r}, store has {b!r}" for f, a, b in diffs[:5])
        raise IndexMismatchError(f"{store.path / INDEX_DIR}: the index was built for a different encoder or view "
                                 f"({lines}); run `embedstore index build --rebuild`")


def _remove_old_builds(folder: Path, keep: str) -> None:
    for path in folder.iterdir():
        if path.is_dir() and path.name != keep and (path.name.startswith("b-") or path.name.startswith(TMP_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def _stages(bar: Any, what: str) -> Any:
    """An ``on_stage`` callback that moves ``bar`` on and names the stage starting."""
    def on_stage(name: str) -> None:
        bar.set_description_str(f"{what}: {name}")
        bar.update(1)
    return on_stage


def _full_build(store: Store, manifest: Mapping[str, Any], options: IndexOptions) -> tuple[StoreIndex, BuildReport]:
    started = time.perf_counter()
    with progress_bar(4, "index: read rows", "stage", options.progress) as bar:
        data = store.read(expect_commit=manifest.get("commit_id"))
        if not len(data.keys):
            raise SpecError(f"{store.what} has no rows to index")
        metas = store.row_metadata(expect_commit=manifest.get("commit_id"))
        factory = ann.choose_factory(options.kind or "auto", len(data.keys), data.features.shape[1],
                                        options.max_memory)
        device = ann.resolve_device(options.device, factory)
        ids = np.arange(len(data.keys), dtype=np.int64)
        log.info("building %s over %d rows (searched on %s)", factory, len(ids), device)
        features = unit_rows(data.features)
        # built and tuned on the CPU (FAISS's GPU classes are not IndexIVF/IndexHNSW, so tuning would
        # not see them), then copied to the GPU for searching
        index, tuning = ann.build_tuned(features, ids, factory, options.recall_target, options.recall_k,
                                           options.sample, options.seed, "cpu",
                                           on_stage=_stages(bar, f"index {factory}"))
        bar.set_description_str(f"index {factory}: built")
        bar.update(max(0, (bar.total or 0) - bar.n))
    if device == "cuda":
        index = ann.to_gpu(index)
    rows = IndexRows(list(data.keys), list(data.labels or [""] * len(ids)),
                     [row_version(metas[k]) for k in data.keys], np.ones(len(ids), dtype=bool))
    meta = _meta(manifest, factory, options, tuning, time.perf_counter() - started)
    out = StoreIndex(store, index, rows, meta, on_gpu=device == "cuda", saved=False)
    return out, BuildReport("built", factory, len(ids), added=len(ids), device=device,
                            tuning=meta["tuning"], seconds=time.perf_counter() - started)


def _meta(manifest: Mapping[str, Any], factory: str, options: IndexOptions, tuning: ann.Tuning,
          seconds: float) -> dict[str, Any]:
    faiss = ann.faiss_module()
    return {
        "schema": INDEX_SCHEMA,
        "factory": factory,
        "kind_requested": options.kind or "auto",
        "max_memory": options.max_memory,
        "store_id": manifest.get("store_id"),
        "store_generation": int(manifest["generation"]),
        "store_commit_id": manifest.get("commit_id"),
        "fingerprint": manifest["fingerprint"],
        "tuning": asdict(tuning),
        "build_seconds": round(seconds, 3),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "faiss_version": getattr(faiss, "__version__", "unknown"),
    }


def _update(existing: StoreIndex, store: Store, manifest: Mapping[str, Any], options: IndexOptions,
            added: list[str], removed: list[int], changed: list[str]) -> tuple[StoreIndex, BuildReport]:
    """Remove gone and re-encoded rows, add new and re-encoded ones, re-tune, keep the kind."""
    started = time.perf_counter()
    rows = existing.rows
    live = rows.live_ids()
    gone = np.asarray(sorted(removed + [live[k] for k in changed]), dtype=np.int64)
    data = store.read(expect_commit=manifest.get("commit_id"))
    data.features = unit_rows(data.features)
    position = {k: i for i, k in enumerate(data.keys)}
    metas = store.row_metadata(expect_commit=manifest.get("commit_id"))
    new_keys = added + changed
    new_ids = np.arange(len(rows), len(rows) + len(new_keys), dtype=np.int64)
    index = existing.index  # loaded on the CPU by build_index: updates run there
    ann.remove(index, gone)
    if new_keys:
        ann.add(index, data.features[[position[k] for k in new_keys]], new_ids)
    live_mask = rows.live.copy()
    live_mask[gone] = False
    labels_of = dict(zip(data.keys, data.labels or [""] * len(data.keys)))
    rows = IndexRows(rows.keys + new_keys, rows.labels + [labels_of[k] for k in new_keys],
                     rows.versions + [row_version(metas[k]) for k in new_keys],
                     np.concatenate([live_mask, np.ones(len(new_keys), dtype=bool)]))
    live_ids = np.flatnonzero(rows.live)
    order = [position[rows.keys[i]] for i in live_ids]
    tuning = ann.tune(index, data.features[order], live_ids, options.recall_target, options.recall_k,
                         options.sample, options.seed)
    meta = _meta(manifest, existing.factory, options, tuning, time.perf_counter() - started)
    out = StoreIndex(store, index, rows, meta, on_gpu=False, saved=False)
    return out, BuildReport("updated", existing.factory, rows.n_live, added=len(new_keys), removed=len(gone),
                            tuning=meta["tuning"], seconds=time.perf_counter() - started)


def build_index(store: Store, options: IndexOptions = IndexOptions()) -> tuple[StoreIndex, BuildReport]:
    """Build the index of ``store``, or bring an existing one up to date, and save it atomically.

    An existing index of the requested kind is updated in place when the store changed (rows
    added, removed or re-encoded) and its kind supports removal; it is rebuilt from scratch when
    ``options.rebuild`` is set, another kind is asked for, it cannot remove rows (HNSW), too many
    of its ids would be dead, or it is damaged or belongs to another store.

    Raises:
        StoreNotFoundError: the store does not exist.
        StoreLockedError: another process is building this index.
        SpecError: a bad kind, an empty store, or a budget no index fits.
    """
    manifest = store.manifest()
    with WriteLock(StoreIndex.folder(store) / ".lock", f"the index of {store.what}"):
        existing: Optional[StoreIndex] = None
        reason = ""
        if not options.rebuild:
            try:
                existing = StoreIndex.load(store, device="cpu")
            except IndexNotFoundError:
                existing = None
            except (CorruptIndexError, IndexMismatchError) as exc:
                reason = f"previous index unusable: {exc}"
                log.warning("rebuilding: %s", exc)
        kind = options.kind or (str(existing.meta.get("kind_requested", "auto")) if existing else "auto")
        options = replace(options, kind=kind)
        if existing is not None and kind not in (existing.meta.get("kind_requested"), existing.factory):
            reason, existing = f"kind {kind!r} asked for, the index is {existing.factory!r}", None
        if existing is not None:
            current = {k: row_version(m) for k, m in store.row_metadata(expect_commit=manifest.get("commit_id")).items()}
            added, removed, changed = _diff(existing.rows, current)
            dead = int((~existing.rows.live).sum()) + len(removed) + len(changed)
            total = len(existing.rows) + len(added) + len(changed)
            wanted = ann.choose_factory(options.kind, max(1, len(current)), int(manifest["dim"]), options.max_memory)
            if not (added or removed or changed):
                existing.meta.update(store_generation=int(manifest["generation"]),
                                     store_commit_id=manifest.get("commit_id"))
                atomic_write_json(StoreIndex.folder(store) / POINTER, existing.meta)
                return existing, BuildReport("unchanged", existing.factory, existing.rows.n_live,
                                             tuning=existing.meta.get("tuning"),
                                             index_bytes=int(existing.meta["index_bytes"]))
            if (removed or changed) and not ann.supports_removal(existing.index):
                reason = f"{existing.factory} cannot remove rows"
            elif dead > MAX_DEAD_FRACTION * total:
                reason = f"{dead} of {total} ids would be dead"
            elif options.kind == "auto" and wanted != existing.factory:
                reason = f"the store now has {len(current)} rows: auto picks {wanted}, the index is {existing.factory}"
            else:
                out, report = _update(existing, store, manifest, options, added, removed, changed)
                out.save()
                report.index_bytes = int(out.meta["index_bytes"])
                return out, report
            log.info("rebuilding the index: %s", reason)
        out, report = _full_build(store, manifest, options)
        out.save()
        report.index_bytes, report.reason = int(out.meta["index_bytes"]), reason
        return out, report


def open_index(store: Store, device: str = "cpu", allow_exact: bool = True) -> tuple[StoreIndex, Staleness]:
    """An index that answers with the store's current rows only, and the saved index's staleness.

    Without a saved index (and ``allow_exact``), an exact in-memory index over the rows. A stale
    saved index (rows added, removed or re-encoded since its build) never answers: its ids could
    name deleted rows or old vectors, so the exact in-memory index is returned instead, with the
    saved index's :class:`Staleness` for the caller to report, until ``index build`` refreshes it.
    """
    try:
        index = StoreIndex.load(store, device)
    except IndexNotFoundError:
        if not allow_exact:
            raise
        log.info("%s has no saved index: exact search over its rows", store.what)
        index = StoreIndex.exact(store)
        return index, Staleness()
    staleness = index.staleness()
    if staleness.stale:
        log.info("%s: %s; exact search over the current rows meanwhile", store.what, staleness.describe())
        return StoreIndex.exact(store), staleness
    return index, staleness


@dataclass(frozen=True)
class Hit:
    """One neighbour: the row key, its label (None when unlabelled), the cosine similarity, the id."""

    key: str
    label: Optional[str]
    score: float
    id: int


def hits(index: StoreIndex, scores: np.ndarray, ids: np.ndarray, exclude: Optional[list[Optional[str]]] = None,
         k: Optional[int] = None) -> list[list[Hit]]:
    """Turn ``(scores, ids)`` into :class:`Hit` lists, dropping ``exclude[i]`` (a query's own key)."""
    out: list[list[Hit]] = []
    for i, (row_s, row_i) in enumerate(zip(scores, ids)):
        found: list[Hit] = []
        for s, j in zip(row_s.tolist(), row_i.tolist()):
            if j < 0:
                continue
            key = index.rows.keys[j]
            if exclude is not None and exclude[i] == key:
                continue
            found.append(Hit(key, index.rows.labels[j] or None, float(s), int(j)))
        out.append(found[:k] if k is not None else found)
    return out
