"""Feature stores: HDF5 shards plus a JSON manifest, crash-safe, one writer, many readers.

A store is a folder::

    manifest.json        committed state: fingerprint, generation, shards, dead rows, failures
    shards/*.h5          immutable once committed (features, keys, labels, size, mtime_ns, hash)
    .lock                flock held by the single writer

A writer buffers encoded rows and commits them as a new shard: the shard is written to a hidden
temp file, fsynced and renamed, then the manifest that lists it is replaced the same way. A run
killed at any point loses at most the rows not yet committed; readers only ever see the last
committed manifest. A key written again (changed image) marks its old row dead; deleted keys are
marked dead too. :meth:`StoreWriter.compact` rewrites the live rows into one shard, in the order
the caller gives (natural key order for images), so a finished store is one contiguous read.

Image stores and text banks use the same class; a text bank's keys are the prompt strings.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from embedstore.errors import CorruptStoreError, FingerprintMismatchError, StoreChangedError, StoreNotFoundError
from embedstore.fsutil import (
    TMP_PREFIX,
    WriteLock,
    atomic_write_json,
    fsync_dir,
    fsync_file,
    read_json,
    temp_path,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
UNIT_NORM_TOLERANCE = 2.0 ** -11
"""Largest ``|‖row‖ − 1|`` of a float16 store's rows: rounding each value to float16 changes it by
at most half a unit in the last place, 2**-11 of its size, so the norm moves by at most that share."""
MANIFEST = "manifest.json"
LOCK = ".lock"
SHARDS = "shards"
DTYPES = ("float16", "float32")


def fingerprint_differences(stored: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Fields (dotted names) whose values differ between two nested fingerprint dicts."""
    diffs: list[tuple[str, Any, Any]] = []
    for key in sorted(set(stored) | set(requested)):
        old, new = stored.get(key), requested.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            diffs.extend(fingerprint_differences(old, new, name + "."))
        elif old != new:
            diffs.append((name, old, new))
    return diffs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


@dataclass
class RowMeta:
    """Per-row metadata of a live row (what change detection needs)."""

    label: Optional[str]
    size: int
    mtime_ns: int
    hash: str


@dataclass
class StoreRows:
    """Rows read from a store: keys, float features ``(n, d)`` and labels (``None`` if unlabelled)."""

    keys: list[str]
    features: np.ndarray
    labels: Optional[list[str]]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Buffer:
    keys: list[str] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def join(cls, batches: Sequence[tuple[Any, ...]]) -> "_Buffer":
        """One buffer from ``(keys, features, labels, sizes, mtimes, hashes)`` batches."""
        buf = cls()
        for keys, features, labels, sizes, mtimes, hashes in batches:
            buf.keys.extend(keys)
            buf.features.append(features)
            buf.labels.extend(labels)
            buf.sizes.extend(sizes)
            buf.mtimes.extend(mtimes)
            buf.hashes.extend(hashes)
        return buf


FeatureBlocks = Callable[[int, int], np.ndarray]  # (start, stop) -> rows start:stop of a shard's features
WRITE_BLOCK_BYTES = 64 << 20  # features are written in row blocks of this size: memory stays bounded


def _write_shard(path: Path, keys: Sequence[str], features: "np.ndarray | tuple[FeatureBlocks, int, str]",
                 labels: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int], hashes: Sequence[str]) -> None:
    """Write a shard file. ``features`` is an array, or ``(blocks, dim, dtype)``: a function
    giving rows ``start:stop``, so a shard of any size is written one row block at a time."""
    import h5py

    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w", locking=False) as f:
        if isinstance(features, np.ndarray):
            f.create_dataset("features", data=features)
        else:
            blocks, dim, dtype = features
            n = len(keys)
            ds = f.create_dataset("features", shape=(n, dim), dtype=dtype)
            step = max(1, WRITE_BLOCK_BYTES // max(1, dim * np.dtype(dtype).itemsize))
            for start in range(0, n, step):
                stop = min(n, start + step)
                ds[start:stop] = blocks(start, stop)
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=text)
        f.create_dataset("labels", data=np.array(labels, dtype=object), dtype=text)
        f.create_dataset("size", data=np.asarray(sizes, dtype=np.int64))
        f.create_dataset("mtime_ns", data=np.asarray(mtimes, dtype=np.int64))
        f.create_dataset("hash", data=np.array(hashes, dtype=object), dtype=text)
        f.attrs["schema"] = SCHEMA_VERSION


class Store:
    """A feature store folder. Reading needs no lock; writing goes through :meth:`writer`."""

    def __init__(self, path: str | os.PathLike[str], what: Optional[str] = None):
        self.path = Path(path)
        self.what = what or f"store {self.path}"

    # ---- reading -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        """True when a manifest has been committed."""
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        """The last committed manifest.

        Raises:
            StoreNotFoundError: nothing was committed yet.
            CorruptStoreError: the manifest is not valid JSON.
        """
        try:
            data = read_json(self.manifest_path)
        except ValueError as exc:
            raise CorruptStoreError(f"{self.manifest_path}: manifest is not valid JSON ({exc})") from exc
        if data is None:
            raise StoreNotFoundError(f"{self.what}: not in the cache ({self.path})")
        if data.get("schema") != SCHEMA_VERSION:
            raise CorruptStoreError(
                f"{self.manifest_path}: schema {data.get('schema')!r}, this embedstore reads {SCHEMA_VERSION}"
            )
        return data

    def lock(self) -> WriteLock:
        """The store's write lock: held by its writer, and briefly by anything that must not run
        beside one (a no-op encode check, ``embedstore rm``)."""
        return WriteLock(self.path / LOCK, self.what)

    def check_fingerprint(self, requested: Mapping[str, Any]) -> None:
        """Raise :class:`FingerprintMismatchError` if the stored fingerprint differs."""
        if not self.exists():
            return
        diffs = fingerprint_differences(self.manifest()["fingerprint"], requested)
        if diffs:
            raise FingerprintMismatchError(str(self.path), diffs)

    def _open_shard(self, name: str) -> Any:
        import h5py

        path = self.path / SHARDS / name
        try:
            return h5py.File(path, "r", locking=False)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise CorruptStoreError(f"{path}: cannot open shard ({exc}); run `embedstore verify`") from exc

    def _read_once(self, with_features: bool, as_float32: bool, sort: bool,
                   with_meta: bool = True, expect_commit: Optional[str] = None) -> tuple[dict[str, Any], StoreRows, list[RowMeta]]:
        """Keys and labels, plus features (``with_features``) or else per-row metadata (``with_meta``).

        Reading features skips the metadata columns and per-row objects: with 100k rows they
        cost more than the features themselves.
        """
        manifest = self.manifest()
        if expect_commit is not None and manifest.get("commit_id") != expect_commit:
            raise StoreChangedError(f"{self.what} was committed to while it was being read "
                                    "(a concurrent `embedstore encode`?); run again")
        keys: list[str] = []
        labels_all: list[str] = []
        feats: list[np.ndarray] = []
        metas: list[RowMeta] = []
        for shard in manifest["shards"]:
            dead = np.asarray(shard.get("dead", []), dtype=np.int64)
            with self._open_shard(shard["file"]) as f:
                n = f["keys"].shape[0]
                if n != shard["rows"]:
                    raise CorruptStoreError(
                        f"{self.path / SHARDS / shard['file']}: {n} rows, manifest says {shard['rows']}"
                    )
                live = np.ones(n, dtype=bool)
                live[dead] = False
                idx = np.flatnonzero(live)
                everything = len(idx) == n
                shard_keys = f["keys"].asstr()[:]
                labels = f["labels"].asstr()[:]
                if with_features:
                    block = f["features"][:]
                    block = block if everything else block[live]
                    feats.append(block.astype(np.float32) if as_float32 else block)
                elif with_meta:
                    sizes = f["size"][:]
                    mtimes = f["mtime_ns"][:]
                    hashes = f["hash"].asstr()[:]
                    metas.extend(RowMeta(labels[i] or None, int(sizes[i]), int(mtimes[i]), hashes[i]) for i in idx)
            keys.extend((shard_keys if everything else shard_keys[idx]).tolist())
            labels_all.extend((labels if everything else labels[idx]).tolist())
        dim = int(manifest.get("dim") or 0)
        dtype = np.float32 if as_float32 else np.dtype(manifest.get("dtype", "float16"))
        features = np.concatenate(feats) if len(feats) > 1 else feats[0] if feats else np.zeros((0, dim), dtype=dtype)
        if sort and not manifest.get("sorted", False) and keys:
            from embedstore.sources import natural_order

            order = natural_order(keys)
            keys = [keys[i] for i in order]
            labels_all = [labels_all[i] for i in order]
            metas = [metas[i] for i in order] if metas else metas
            if with_features:
                features = features[np.asarray(order)]
        labels_out = labels_all if manifest.get("labelled") else None
        return manifest, StoreRows(keys, features if with_features else features[:0], labels_out), metas

    def _read(self, with_features: bool, as_float32: bool = True, sort: bool = True,
              with_meta: bool = True, expect_commit: Optional[str] = None) -> tuple[dict[str, Any], StoreRows, list[RowMeta]]:
        for attempt in range(3):
            try:
                return self._read_once(with_features, as_float32, sort, with_meta, expect_commit)
            except FileNotFoundError:
                if attempt == 2:
                    raise CorruptStoreError(
                        f"{self.path}: a shard listed in the manifest is missing; run `embedstore verify`"
                    ) from None
                time.sleep(0.05)  # a writer compacted between our manifest read and shard open
        raise AssertionError("unreachable")

    def read(self, as_float32: bool = True, sort: bool = True, expect_commit: Optional[str] = None) -> StoreRows:
        """All live rows, features as float32 by default (``expect_commit``: see :meth:`read_index`).

        Features are the stored values, not renormalised: the encoder's unit vectors rounded to
        the store's dtype, so each row's norm is 1 within :data:`UNIT_NORM_TOLERANCE` (float16
        rounding; float32 stores are unit to float32 precision). Everything computed from them
        (scoring, indexes, queries, ``embedstore export``) renormalises each row in float32 first
        (:func:`embedstore.scoring.unit_rows`).

        Order: a compacted store keeps the order given to :meth:`StoreWriter.compact` (natural key
        order for image stores); rows committed since the last compaction are put in natural key
        order, unless ``sort=False``.
        """
        return self._read(True, as_float32, sort, expect_commit=expect_commit)[1]

    def read_index(self, expect_commit: Optional[str] = None) -> StoreRows:
        """Keys and labels of the live rows in :meth:`read`'s order, without features (``features``
        is an empty ``(0, d)`` array). ``expect_commit``: raise :class:`StoreChangedError` unless
        the rows read are those of that commit."""
        return self._read(False, with_meta=False, expect_commit=expect_commit)[1]

    def row_metadata(self, expect_commit: Optional[str] = None) -> dict[str, RowMeta]:
        """Live key -> :class:`RowMeta`, without reading features (``expect_commit``: see :meth:`read_index`)."""
        _, rows, metas = self._read(False, sort=False, expect_commit=expect_commit)
        return dict(zip(rows.keys, metas))

    def read_keys(self, keys: Sequence[str]) -> np.ndarray:
        """Float32 features of ``keys`` (in that order). Raises KeyError naming a missing key."""
        rows = self.read(sort=False)
        index = {k: i for i, k in enumerate(rows.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"{self.what}: {len(missing)} key(s) not stored, e.g. {missing[0]!r}")
        return rows.features[np.asarray([index[k] for k in keys], dtype=np.int64)] if keys else rows.features[:0]

    def disk_bytes(self) -> int:
        """Bytes of the committed shards and manifest."""
        if not self.exists():
            return 0
        total = self.manifest_path.stat().st_size
        for shard in self.manifest()["shards"]:
            p = self.path / SHARDS / shard["file"]
            total += p.stat().st_size if p.exists() else 0
        return total

    def verify(self) -> list[str]:
        """Check every shard against the manifest; return one message per problem (empty if sound)."""
        import h5py

        problems: list[str] = []
        try:
            manifest = self.manifest()
        except (StoreNotFoundError, CorruptStoreError) as exc:
            return [str(exc)]
        for shard in manifest["shards"]:
            path = self.path / SHARDS / shard["file"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']} (truncated or replaced)")
                continue
            if _sha256(path) != shard["sha256"]:
                problems.append(f"{path}: checksum differs from the manifest (damaged)")
                continue
            try:
                with h5py.File(path, "r", locking=False) as f:
                    shapes = {name: f[name].shape[0] for name in ("features", "keys", "labels", "size", "mtime_ns", "hash")}
                    if set(shapes.values()) != {shard["rows"]}:
                        problems.append(f"{path}: column lengths {shapes} differ from {shard['rows']} rows")
                    elif shard["rows"] and f["features"].shape[1] != manifest["dim"]:
                        problems.append(f"{path}: width {f['features'].shape[1]}, manifest says {manifest['dim']}")
            except (OSError, KeyError) as exc:
                problems.append(f"{path}: unreadable HDF5 ({exc})")
        return problems

    # ---- writing -------------------------------------------------------------------------
    def writer(self, fingerprint: Mapping[str, Any], dim: int, dtype: str = "float16",
               provenance: Optional[Mapping[str, Any]] = None, shard_rows: int = 4096,
               shard_seconds: float = 30.0) -> "StoreWriter":
        """A :class:`StoreWriter` (use as a context manager; it holds the write lock)."""
        return StoreWriter(self, dict(fingerprint), dim, dtype, dict(provenance or {}), shard_rows, shard_seconds)


class StoreWriter:
    """The single writer of a store. Use ``with store.writer(...) as w:``.

    On entry it takes the lock, refuses a different fingerprint, and removes temp files and
    shards left by a killed writer. Rows are buffered by :meth:`add` and committed as a shard
    when the buffer holds ``shard_rows`` rows or ``shard_seconds`` have passed
    (:meth:`maybe_commit`), on :meth:`commit`, and on exit (also on Ctrl-C or an exception, so
    finished work is kept).
    """

    def __init__(self, store: Store, fingerprint: dict[str, Any], dim: int, dtype: str,
                 provenance: dict[str, Any], shard_rows: int, shard_seconds: float):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.store = store
        self.fingerprint = fingerprint
        self.dim = int(dim)
        self.dtype = dtype
        self.provenance = provenance
        self.shard_rows = max(1, int(shard_rows))
        self.shard_seconds = shard_seconds
        self._lock = store.lock()
        self._batches: list[tuple[Any, ...]] = []  # appended whole, so Ctrl-C never leaves half a batch
        self._failures: dict[str, dict[str, Any]] = {}
        self._pending_dead: set[str] = set()
        self._last_commit = time.monotonic()
        self.manifest: dict[str, Any] = {}
        self._live: dict[str, tuple[int, int]] = {}  # key -> (shard index, row)
        self.meta: dict[str, RowMeta] = {}
        self.committed_rows = 0
        self._committed_snapshot: dict[str, Any] = {}

    # -- lifecycle
    def __enter__(self) -> "StoreWriter":
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                try:
                    self.commit()
                except Exception as commit_exc:  # keep the original error; report this one
                    log.error("could not commit buffered rows after %s: %s", exc_type.__name__, commit_exc)
        finally:
            self._lock.release()

    def _open(self) -> None:
        store = self.store
        (store.path / SHARDS).mkdir(parents=True, exist_ok=True)
        if store.exists():
            self.manifest = store.manifest()
            diffs = fingerprint_differences(self.manifest["fingerprint"], self.fingerprint)
            if diffs:
                raise FingerprintMismatchError(str(store.path), diffs)
            if self.manifest["dtype"] != self.dtype:
                raise FingerprintMismatchError(str(store.path), [("dtype", self.manifest["dtype"], self.dtype)])
            _, rows, metas = store._read(False, sort=False)
            position = 0
            for si, shard in enumerate(self.manifest["shards"]):
                dead = set(shard.get("dead", []))
                for r in range(shard["rows"]):
                    if r not in dead:
                        self._live[rows.keys[position]] = (si, r)
                        position += 1
            self.meta = dict(zip(rows.keys, metas))
            self._failures = dict(self.manifest.get("failures", {}))
        else:
            self.manifest = {
                "schema": SCHEMA_VERSION,
                "fingerprint": self.fingerprint,
                "dim": self.dim,
                "dtype": self.dtype,
                "generation": 0,
                "shards": [],
                "failures": {},
                "labelled": False,
                "sorted": True,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "store_id": uuid.uuid4().hex,  # tells an index which store it was built from
            }
        self._committed_snapshot = _snapshot(self.manifest)
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        for path in (self.store.path / SHARDS).iterdir():
            if path.name not in listed:
                log.info("removing %s left by an interrupted writer", path)
                path.unlink()
        for path in self.store.path.glob(TMP_PREFIX + "*"):
            path.unlink()

    # -- rows
    def set_info(self, **info: Any) -> None:
        """Store extra manifest fields (e.g. ``source``, ``labelled``); committed with the next shard."""
        self.manifest.update(info)

    def add(self, keys: Sequence[str], features: np.ndarray, labels: Optional[Sequence[Optional[str]]] = None,
            sizes: Optional[Sequence[int]] = None, mtimes: Optional[Sequence[int]] = None,
            hashes: Optional[Sequence[str]] = None) -> None:
        """Buffer encoded rows (features float, ``(len(keys), dim)``)."""
        n = len(keys)
        features = np.asarray(features)
        if features.shape != (n, self.dim):
            raise ValueError(f"features shape {features.shape}, expected ({n}, {self.dim})")
        if not np.isfinite(features).all():
            bad = keys[int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])]
            raise ValueError(f"non-finite features for {bad!r} (the encoder overflowed; try fp32 or bf16)")
        batch = (
            list(keys),
            features.astype(self.dtype),
            [(lab or "") for lab in (labels if labels is not None else [None] * n)],
            list(sizes) if sizes is not None else [-1] * n,
            list(mtimes) if mtimes is not None else [-1] * n,
            list(hashes) if hashes is not None else [""] * n,
        )
        self._batches.append(batch)

    @property
    def buffered(self) -> int:
        """Rows added but not yet committed."""
        return sum(len(b[0]) for b in self._batches)

    def add_failure(self, key: str, kind: str, message: str, size: int = -1, mtime_ns: int = -1) -> None:
        """Record that ``key`` could not be encoded; its old row, if any, is dropped."""
        self._failures[key] = {"type": kind, "message": message[:500], "size": size, "mtime_ns": mtime_ns}
        if key in self._live:
            self._pending_dead.add(key)

    def drop(self, keys: Iterable[str]) -> None:
        """Mark rows (and failure records) of keys that left the source as gone."""
        for key in keys:
            self._failures.pop(key, None)
            if key in self._live:
                self._pending_dead.add(key)

    def maybe_commit(self) -> bool:
        """Commit if the buffer is full or old enough; return whether it did."""
        buffered = self.buffered
        if buffered >= self.shard_rows or (
            buffered and time.monotonic() - self._last_commit >= self.shard_seconds
        ):
            self.commit()
            return True
        return False

    @property
    def failures(self) -> dict[str, dict[str, Any]]:
        """Failure records as they will be committed."""
        return self._failures

    def _kill(self, key: str) -> None:
        si, row = self._live.pop(key)
        self.manifest["shards"][si].setdefault("dead", []).append(row)
        self.meta.pop(key, None)

    def commit(self) -> None:
        """Write buffered rows as a shard and publish a new manifest (no-op if nothing changed)."""
        buf = _Buffer.join(self._batches)
        self._commit(buf, np.concatenate(buf.features) if len(buf) else np.zeros((0, self.dim), self.dtype))

    def add_blocks(self, keys: Sequence[str], blocks: FeatureBlocks, labels: Optional[Sequence[Optional[str]]] = None,
                   sizes: Optional[Sequence[int]] = None, mtimes: Optional[Sequence[int]] = None,
                   hashes: Optional[Sequence[str]] = None) -> None:
        """Commit ``keys`` as one shard whose features come from ``blocks(start, stop)`` (float rows
        ``start:stop``), written one row block at a time: a shard of any size in bounded memory.
        Rows buffered by :meth:`add` are committed first."""
        self.commit()
        n = len(keys)

        def checked(start: int, stop: int) -> np.ndarray:
            block = np.asarray(blocks(start, stop))
            if block.shape != (stop - start, self.dim):
                raise ValueError(f"features block shape {block.shape}, expected ({stop - start}, {self.dim})")
            if not np.isfinite(block).all():
                bad = keys[start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])]
                raise ValueError(f"non-finite features for {bad!r}")
            return block.astype(self.dtype)

        buf = _Buffer(keys=list(keys), labels=[(lab or "") for lab in (labels if labels is not None else [None] * n)],
                      sizes=list(sizes) if sizes is not None else [-1] * n,
                      mtimes=list(mtimes) if mtimes is not None else [-1] * n,
                      hashes=list(hashes) if hashes is not None else [""] * n)
        self._commit(buf, (checked, self.dim, self.dtype))

    def _commit(self, buf: _Buffer, features: "np.ndarray | tuple[FeatureBlocks, int, str]") -> None:
        for key in buf.keys:
            self._failures.pop(key, None)
        changed_failures = self._failures != self.manifest.get("failures", {})
        if not len(buf) and not self._pending_dead and not changed_failures and not self._info_changed():
            return
        shards = self.manifest["shards"]
        for key in self._pending_dead:
            if key in self._live:
                self._kill(key)
        self._pending_dead.clear()
        if len(buf):
            for key in buf.keys:
                if key in self._live:
                    self._kill(key)
            name = self._new_shard(buf.keys, features, buf)
            si = len(shards)
            last = {key: row for row, key in enumerate(buf.keys)}
            if len(last) < len(buf.keys):  # a key added twice before this commit: only its last row lives
                name["dead"] = [row for row, key in enumerate(buf.keys) if last[key] != row]
            shards.append(name)
            for row, key in enumerate(buf.keys):
                self._live[key] = (si, row)
                self.meta[key] = RowMeta(buf.labels[row] or None, buf.sizes[row], buf.mtimes[row], buf.hashes[row])
            self.committed_rows += len(buf)
            self.manifest["sorted"] = False
        for shard in shards:
            if "dead" in shard:
                shard["dead"] = sorted(set(shard["dead"]))
        self._batches = []
        self._publish()

    def _info_changed(self) -> bool:
        return self.manifest != self._committed_snapshot

    def _new_shard(self, keys: Sequence[str], features: "np.ndarray | tuple[FeatureBlocks, int, str]",
                   buf: _Buffer) -> dict[str, Any]:
        folder = self.store.path / SHARDS
        tmp = temp_path(folder, ".h5")
        try:
            _write_shard(tmp, keys, features, buf.labels, buf.sizes, buf.mtimes, buf.hashes)
            fsync_file(tmp)
            name = f"shard-{self.manifest['generation'] + 1:08d}-{uuid.uuid4().hex[:8]}.h5"
            final = folder / name
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(folder)
        return {
            "file": name,
            "rows": len(keys),
            "bytes": final.stat().st_size,
            "sha256": _sha256(final),
            "versions": self.provenance,
        }

    def _publish(self) -> None:
        m = self.manifest
        m["generation"] = int(m["generation"]) + 1
        m["commit_id"] = uuid.uuid4().hex
        m["failures"] = dict(self._failures)
        m["rows"] = len(self._live)
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.store.manifest_path, m)
        self._committed_snapshot = _snapshot(m)
        self._last_commit = time.monotonic()

    def compact(self, order: Optional[Sequence[str]] = None) -> bool:
        """Rewrite the live rows as one shard, in ``order`` (keys; default: current order).

        Keys in ``order`` that are not live are skipped; live keys missing from ``order`` are
        appended in their current order. Returns False when the store was already compact.
        """
        self.commit()
        shards = self.manifest["shards"]
        already = len(shards) <= 1 and not any(s.get("dead") for s in shards)
        if already and (order is None or self.manifest.get("sorted")):
            return False
        from embedstore.reader import StoreReader

        with StoreReader(self.store, expect_commit=self.manifest["commit_id"], natural=False) as reader:
            storage = reader.storage_rows(np.arange(len(reader.keys)))
            position = dict(zip(reader.keys, storage.tolist()))
            current = [reader.keys[i] for i in np.argsort(storage, kind="stable")]  # storage order
            wanted = [k for k in (order or []) if k in position]
            seen = set(wanted)
            wanted += [k for k in current if k not in seen]
            if already and wanted == current:  # one shard, already in order: nothing to rewrite
                self.manifest["sorted"] = True
                self._publish()
                return False
            perm = np.asarray([position[k] for k in wanted], dtype=np.int64)
            metas = [self.meta[k] for k in wanted]
            buf = _Buffer(
                keys=list(wanted),
                labels=[m.label or "" for m in metas],
                sizes=[m.size for m in metas],
                mtimes=[m.mtime_ns for m in metas],
                hashes=[m.hash for m in metas],
            )
            new = self._new_shard(wanted, (lambda a, b: reader.features(perm[a:b]), self.dim, self.dtype), buf)
        old = [s["file"] for s in shards]
        self.manifest["shards"] = [new]
        self.manifest["sorted"] = order is not None
        self._live = {k: (0, i) for i, k in enumerate(wanted)}
        self._publish()
        for name in old:
            (self.store.path / SHARDS / name).unlink(missing_ok=True)
        return True


def _snapshot(manifest: Mapping[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(dict(manifest))
