"""Feature stores: HDF5 shards plus a JSON manifest, crash-safe, one writer, many readers.

A store is a folder::

    manifest.json        committed state: fingerprint, generation, shards, dead rows, failures
    manifest.prev.json   the generation before it (what ``embedstore verify --repair`` falls back to)
    shards/*.h5          immutable once committed (features, keys, labels, size, mtime_ns, hash)
    .lock                flock held by the single writer

A writer buffers encoded rows and commits them as a new shard: the shard is written to a hidden
temp file, fsynced and renamed, then the manifest that lists it is replaced the same way (the
previous one kept as ``manifest.prev.json``). A run killed at any point loses at most the rows
not yet committed; readers only ever see the last committed manifest. A key written again
(changed image) marks its old row dead; deleted keys are marked dead too.
:meth:`StoreWriter.compact` rewrites the live rows into one shard, in the order the caller gives
(natural key order for images), so a finished store is one contiguous read.

**Integrity.** Every read goes through one checked path: :meth:`Store.open_commit` opens the
shards of one commit, each checked against the manifest (:class:`~embedstore.store.shards.ShardFile`:
size, schema, datasets, shapes, dtypes), and :meth:`ShardFile.read
<embedstore.store.shards.ShardFile.read>` turns any HDF5 error (a chunk whose fletcher32 checksum
fails) into :class:`CorruptStoreError` naming the store, the shard and the repair command.
Shards written before per-chunk checksums are compared with the manifest's sha256 before their
first use. The manifest itself is validated against :data:`embedstore.store.schemas.MANIFEST`. A
writer checks every committed row when it opens, so ``encode`` never builds on damage.

Image stores and text banks use the same class; a text bank's keys are the prompt strings.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from embedstore.errors import (
    CorruptStoreError,
    FingerprintMismatchError,
    StoreChangedError,
    StoreNotFoundError,
    WriteFailedError,
)
from embedstore.store import schemas
from embedstore.store.shards import SCHEMA_VERSION, ShardFile, file_sha256, write_shard
from embedstore.util.fsutil import (
    TMP_PREFIX,
    WriteLock,
    atomic_write_json,
    deferred_signals,
    fsync_dir,
    keep_previous,
    temp_path,
)

log = logging.getLogger(__name__)

UNIT_NORM_TOLERANCE = 2.0 ** -11
"""Largest ``|‖row‖ − 1|`` of a float16 store's rows: rounding each value to float16 changes it by
at most half a unit in the last place, 2**-11 of its size, so the norm moves by at most that share."""
MANIFEST = "manifest.json"
PREVIOUS = "manifest.prev.json"
LOCK = ".lock"
SHARDS = "shards"
DTYPES = ("float16", "float32")
PINNED_COMMITS = 4  # manifests a Store keeps to read a commit that a writer has replaced since

__all__ = ["SCHEMA_VERSION", "Store", "StoreWriter", "StoreRows", "RowMeta", "Commit", "fingerprint_differences"]


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


class Commit:
    """The shards of one committed manifest, all open (see :meth:`Store.open_commit`).

    ``shards[i]`` is the :class:`~embedstore.store.shards.ShardFile` of ``manifest["shards"][i]``.
    Shards are opened up front, so a compaction that removes them afterwards cannot pull them
    away from this reader (an open file outlives its name).
    """

    def __init__(self, manifest: dict[str, Any], shards: list[ShardFile]):
        self.manifest = manifest
        self.shards = shards

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> "Commit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FeatureBlocks = Callable[[int, int], np.ndarray]  # (start, stop) -> rows start:stop of a shard's features


class Store:
    """A feature store folder. Reading needs no lock; writing goes through :meth:`writer`."""

    def __init__(self, path: str | os.PathLike[str], what: Optional[str] = None):
        self.path = Path(path)
        self.what = what or f"store {self.path}"
        self._validated: Optional[tuple[int, int, int]] = None  # identity of the last manifest file checked
        self._commits: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # commit id -> JSON
        self._legacy_ok: set[tuple[str, int, int, str]] = set()  # format-1 shards whose sha256 matched

    # ---- reading -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def previous_path(self) -> Path:
        """The previous manifest generation, kept for ``embedstore verify --repair``."""
        return self.path / PREVIOUS

    @property
    def is_text_bank(self) -> bool:
        return self.path.name.startswith("texts") and self.path.parent.parent.name == "encoders"

    def exists(self) -> bool:
        """True when a manifest has been committed."""
        return self.manifest_path.is_file()

    def repair_command(self) -> str:
        """The ``embedstore verify --repair`` command line for this store's cache."""
        path = self.path.resolve()
        root = None
        if self.is_text_bank:
            root = path.parents[2]
        elif len(path.parts) >= 5 and path.parents[2].name == "datasets":
            root = path.parents[3]
        return "embedstore verify --repair" + (f" --cache {root}" if root is not None else "")

    def after_repair(self) -> str:
        """What brings back the rows a repair drops."""
        if self.is_text_bank:
            return "run the same command again (the dropped prompts are encoded again)"
        return "run the same `embedstore encode` command again (it re-encodes exactly the dropped rows)"

    def repair_advice(self) -> str:
        """What to run when this store is damaged: the repair, then what re-encodes what it drops."""
        return f"run `{self.repair_command()}`, then {self.after_repair()}"

    def damaged(self, where: Path | str, detail: str) -> CorruptStoreError:
        """The error for damage found in ``where`` (a shard or the manifest) of this store."""
        return CorruptStoreError(f"{self.what}: {where} is damaged: {detail}; {self.repair_advice()}")

    def read_manifest_file(self, path: Path) -> Optional[dict[str, Any]]:
        """Parse and validate a manifest file (``None`` if it does not exist).

        Raises:
            CorruptStoreError: not JSON, not a manifest (schema), or another schema version.
        """
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptStoreError(f"{self.what}: cannot read {path} ({exc.strerror or exc}); "
                                    "check the file's permissions") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise self.damaged(path, f"not valid JSON ({exc})") from None
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if path != self.manifest_path or identity != self._validated:
            found = schemas.problem(data, "MANIFEST")
            if found:
                raise self.damaged(path, f"not a store manifest ({found})")
            if data["schema"] != SCHEMA_VERSION:
                raise CorruptStoreError(f"{path}: schema {data['schema']!r}, this embedstore reads "
                                        f"{SCHEMA_VERSION}; use the embedstore version that wrote it")
            if path == self.manifest_path:
                self._validated = identity
        if path == self.manifest_path and data.get("commit_id"):
            self._commits[data["commit_id"]] = raw.decode("utf-8")
            self._commits.move_to_end(data["commit_id"])
            while len(self._commits) > PINNED_COMMITS:
                self._commits.popitem(last=False)
        return data

    def manifest(self) -> dict[str, Any]:
        """The last committed manifest (validated against its schema).

        Raises:
            StoreNotFoundError: nothing was committed yet.
            CorruptStoreError: the manifest is damaged, or missing while an earlier generation
                exists (the message says to run ``embedstore verify --repair``).
        """
        data = self.read_manifest_file(self.manifest_path)
        if data is None:
            if self.previous_path.is_file():
                raise self.damaged(self.manifest_path, f"missing while {PREVIOUS} exists (deleted?)")
            raise StoreNotFoundError(f"{self.what}: not in the cache ({self.path})")
        return data

    def _manifest_at(self, commit_id: Optional[str]) -> dict[str, Any]:
        """The current manifest, or (``commit_id``) that commit's, if this Store read it before."""
        manifest = self.manifest()
        if commit_id is None or manifest.get("commit_id") == commit_id:
            return manifest
        pinned = self._commits.get(commit_id)
        if pinned is None:
            raise StoreChangedError(f"{self.what} was committed to while it was being read "
                                    "(a concurrent `embedstore encode`?); run again")
        return json.loads(pinned)

    def check_fingerprint(self, requested: Mapping[str, Any]) -> None:
        """Raise :class:`FingerprintMismatchError` if the stored fingerprint differs."""
        if not self.exists():
            return
        diffs = fingerprint_differences(self.manifest()["fingerprint"], requested)
        if diffs:
            raise FingerprintMismatchError(str(self.path), diffs)

    def shard_path(self, entry: Mapping[str, Any]) -> Path:
        return self.path / SHARDS / entry["file"]

    def open_shard(self, entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> ShardFile:
        """Open one shard of ``manifest``, checked against its entry (see
        :class:`~embedstore.store.shards.ShardFile`). A format-1 shard (no chunk checksums) is first
        compared with the manifest's sha256 (once per :class:`Store` object and file state).

        Raises:
            FileNotFoundError: the shard is gone (a concurrent compaction: read the manifest again).
            CorruptStoreError: the shard does not match the manifest or cannot be read.
        """
        path = self.shard_path(entry)
        if int(entry.get("format", 1)) < 2:
            st = path.stat()
            state = (entry["file"], st.st_size, st.st_mtime_ns, entry["sha256"])
            if state not in self._legacy_ok:
                if st.st_size != entry["bytes"]:
                    raise self.damaged(path, f"{st.st_size} bytes, the manifest says {entry['bytes']} "
                                             "(truncated or replaced)")
                log.info("%s: checking %s against its sha256 (written before per-chunk checksums; "
                         "`embedstore verify --repair` adds them)", self.what, path.name)
                if file_sha256(path) != entry["sha256"]:
                    raise self.damaged(path, "its checksum (sha256) differs from the manifest's")
                self._legacy_ok.add(state)
        return ShardFile(path, entry, manifest, lambda detail: self.damaged(path, detail))

    def open_shard_unchecked(self, entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> ShardFile:
        """Like :meth:`open_shard` without the sha256 comparison of a format-1 shard (for repair,
        which reads a shard it already knows to be damaged, chunk by chunk)."""
        path = self.shard_path(entry)
        return ShardFile(path, entry, manifest, lambda detail: self.damaged(path, detail))

    def open_commit(self, manifest: Optional[dict[str, Any]] = None) -> Commit:
        """Open every shard of ``manifest`` (default: the current one) up front, each checked;
        the one read path every reader of a store uses (see the module docstring).

        Read features in row blocks with ``commit.shards[i].features(start, stop)`` (each chunk
        is checksummed; a damaged one raises :class:`CorruptStoreError`), keys and labels with
        ``.column("keys")``; ``.live()`` masks the rows marked dead. Close the commit when done.

        Raises:
            FileNotFoundError: a shard vanished (a writer compacted since the manifest was read).
            CorruptStoreError: a shard does not match the manifest.
        """
        manifest = self.manifest() if manifest is None else manifest
        opened: list[ShardFile] = []
        try:
            for entry in manifest["shards"]:
                opened.append(self.open_shard(entry, manifest))
        except BaseException:
            for shard in opened:
                shard.close()
            raise
        return Commit(manifest, opened)

    def _read_once(self, with_features: bool, as_float32: bool, sort: bool,
                   with_meta: bool = True, expect_commit: Optional[str] = None) -> tuple[dict[str, Any], StoreRows, list[RowMeta]]:
        """Keys and labels, plus features (``with_features``) or else per-row metadata (``with_meta``).

        Reading features skips the metadata columns and per-row objects: with 100k rows they
        cost more than the features themselves.
        """
        manifest = self._manifest_at(expect_commit)
        keys: list[str] = []
        labels_all: list[str] = []
        feats: list[np.ndarray] = []
        metas: list[RowMeta] = []
        with self.open_commit(manifest) as commit:
            for shard in commit.shards:
                live = shard.live()
                idx = np.flatnonzero(live)
                everything = len(idx) == shard.rows
                shard_keys = shard.column("keys")
                labels = shard.column("labels")
                if with_features:
                    block = shard.features()
                    block = block if everything else block[live]
                    feats.append(block.astype(np.float32) if as_float32 else block)
                elif with_meta:
                    sizes = shard.column("size")
                    mtimes = shard.column("mtime_ns")
                    hashes = shard.column("hash")
                    metas.extend(RowMeta(labels[i] or None, int(sizes[i]), int(mtimes[i]), hashes[i]) for i in idx)
                keys.extend((shard_keys if everything else shard_keys[idx]).tolist())
                labels_all.extend((labels if everything else labels[idx]).tolist())
        dim = int(manifest.get("dim") or 0)
        dtype = np.float32 if as_float32 else np.dtype(manifest.get("dtype", "float16"))
        features = np.concatenate(feats) if len(feats) > 1 else feats[0] if feats else np.zeros((0, dim), dtype=dtype)
        if sort and not manifest.get("sorted", False) and keys:
            from embedstore.util.order import natural_order

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
                if expect_commit is not None and self.manifest().get("commit_id") != expect_commit:
                    raise StoreChangedError(f"{self.what} was compacted while it was being read "
                                            "(a concurrent `embedstore encode`?); run again") from None
                if attempt == 2:
                    raise self.damaged(self.path / SHARDS, "a shard listed in the manifest is missing") from None
                time.sleep(0.05)  # a writer compacted between our manifest read and shard open
        raise AssertionError("unreachable")

    def read(self, as_float32: bool = True, sort: bool = True, expect_commit: Optional[str] = None) -> StoreRows:
        """All live rows, features as float32 by default (``expect_commit``: see :meth:`read_keys_labels`).

        Features are the stored values, not renormalised: the encoder's unit vectors rounded to
        the store's dtype, so each row's norm is 1 within :data:`UNIT_NORM_TOLERANCE` (float16
        rounding; float32 stores are unit to float32 precision). Everything computed from them
        (scoring, indexes, queries, ``embedstore export``) renormalises each row in float32 first
        (:func:`embedstore.util.arrays.unit_rows`).

        Order: a compacted store keeps the order given to :meth:`StoreWriter.compact` (natural key
        order for image stores); rows committed since the last compaction are put in natural key
        order, unless ``sort=False``.

        Raises:
            CorruptStoreError: a shard or the manifest is damaged (the message names it and the
                repair command); nothing damaged is ever returned.
        """
        return self._read(True, as_float32, sort, expect_commit=expect_commit)[1]

    def read_keys_labels(self, expect_commit: Optional[str] = None) -> StoreRows:
        """Keys and labels of the live rows in :meth:`read`'s order, without features (``features``
        is an empty ``(0, d)`` array). ``expect_commit``: read the rows of that commit (one this
        :class:`Store` object has seen, and whose shards still exist), else raise
        :class:`StoreChangedError`."""
        return self._read(False, with_meta=False, expect_commit=expect_commit)[1]

    def row_metadata(self, expect_commit: Optional[str] = None) -> dict[str, RowMeta]:
        """Live key -> :class:`RowMeta`, without reading features (``expect_commit``: see :meth:`read_keys_labels`)."""
        _, rows, metas = self._read(False, sort=False, expect_commit=expect_commit)
        return dict(zip(rows.keys, metas))

    def features_of(self, keys: Sequence[str]) -> np.ndarray:
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

    def check_shard(self, entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
        """Problems of one committed shard (empty if sound): missing, size, structure against the
        manifest (:class:`~embedstore.store.shards.ShardFile`), and every byte against the manifest's
        sha256; for a damaged format-2 shard, which chunks or columns fail."""
        path = self.shard_path(entry)
        try:
            with ShardFile(path, entry, manifest, lambda detail: self.damaged(path, detail)) as shard:
                if file_sha256(path) == entry["sha256"]:
                    return []
                found = shard.scan().problems if shard.checksummed else []
                return [f"{path}: its checksum (sha256) differs from the manifest's" + (f" ({'; '.join(found)})" if found else "")]
        except FileNotFoundError:
            return [f"{path}: missing"]
        except CorruptStoreError as exc:
            return [f"{path}: {damage_detail(exc)}"]

    def verify(self) -> list[str]:
        """Check the manifest and every shard byte for byte; one message per problem (empty if sound)."""
        try:
            manifest = self.manifest()
        except (StoreNotFoundError, CorruptStoreError) as exc:
            return [str(exc)]
        problems: list[str] = []
        for entry in manifest["shards"]:
            problems += self.check_shard(entry, manifest)
        return problems

    def lock(self) -> WriteLock:
        """This store's write lock (not yet taken): ``with store.lock(): ...``, or hand a taken
        one to :meth:`writer` so the store is locked before a slow step (a model load)."""
        return WriteLock(self.path / LOCK, self.what)

    # ---- writing -------------------------------------------------------------------------
    def writer(self, fingerprint: Mapping[str, Any], dim: int, dtype: str = "float16",
               provenance: Optional[Mapping[str, Any]] = None, shard_rows: int = 4096,
               shard_seconds: float = 30.0, lock: Optional[WriteLock] = None) -> "StoreWriter":
        """A :class:`StoreWriter` (use as a context manager; it holds the write lock).

        ``lock``: this store's :meth:`lock`, already taken by the caller (who releases it)."""
        return StoreWriter(self, dict(fingerprint), dim, dtype, dict(provenance or {}), shard_rows, shard_seconds, lock)

    def publish(self, manifest: Mapping[str, Any], kept: str = "", keep: bool = True) -> None:
        """Write ``manifest`` as the committed one, keeping the current one as the previous
        generation (unless ``keep`` is False: a repair replacing a damaged manifest). Only the
        lock holder calls this (:class:`StoreWriter`, repair)."""
        if keep:
            keep_previous(self.manifest_path, self.previous_path, kept)
        atomic_write_json(self.manifest_path, manifest, kept)


class StoreWriter:
    """The single writer of a store. Use ``with store.writer(...) as w:``.

    On entry it takes the lock (unless the caller hands it a taken one), refuses a different
    fingerprint, checks every committed shard byte for byte (damage raises
    :class:`CorruptStoreError` with the repair command, so nothing is built on it), and removes
    temp files and shards left by a killed writer. Rows are buffered by :meth:`add` and committed
    as a shard when the buffer holds ``shard_rows`` rows or ``shard_seconds`` have passed
    (:meth:`maybe_commit`), on :meth:`commit`, and on exit (also on Ctrl-C, SIGTERM or an
    exception, so finished work is kept; signals are held while that last commit runs).

    A write that fails (no space left, file-size limit, permission) raises
    :class:`~embedstore.errors.WriteFailedError` naming the path; its temp file is removed and
    the committed rows stay as they were.
    """

    def __init__(self, store: Store, fingerprint: dict[str, Any], dim: int, dtype: str,
                 provenance: dict[str, Any], shard_rows: int, shard_seconds: float,
                 lock: Optional[WriteLock] = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.store = store
        self.fingerprint = fingerprint
        self.dim = int(dim)
        self.dtype = dtype
        self.provenance = provenance
        self.shard_rows = max(1, int(shard_rows))
        self.shard_seconds = shard_seconds
        self._own_lock = lock is None
        self._lock = lock if lock is not None else store.lock()
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
        if self._own_lock:
            self._lock.acquire()
        elif not self._lock.held:
            raise ValueError("the lock handed to StoreWriter must be taken")
        try:
            self._open()
        except BaseException:
            if self._own_lock:
                self._lock.release()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
            elif not isinstance(exc, (WriteFailedError, CorruptStoreError)):
                try:
                    with deferred_signals():  # a second Ctrl-C must not cut this commit in half
                        self.commit()
                except Exception as commit_exc:  # keep the original error; report this one
                    log.error("could not commit buffered rows after %s: %s", exc_type.__name__, commit_exc)
        finally:
            if self._own_lock:
                self._lock.release()

    @property
    def _kept(self) -> str:
        rows = int(self._committed_snapshot.get("rows", 0) or 0)
        return f"the {rows} rows committed before are safe" if rows else "nothing was committed yet"

    def _open(self) -> None:
        store = self.store
        try:
            (store.path / SHARDS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteFailedError(store.path / SHARDS, exc, "nothing was written") from exc
        if store.exists():
            self.manifest = store.manifest()
            diffs = fingerprint_differences(self.manifest["fingerprint"], self.fingerprint)
            if diffs:
                raise FingerprintMismatchError(str(store.path), diffs)
            if self.manifest["dtype"] != self.dtype:
                raise FingerprintMismatchError(str(store.path), [("dtype", self.manifest["dtype"], self.dtype)])
            if self.manifest["dim"] != self.dim:
                raise FingerprintMismatchError(str(store.path), [("dim", self.manifest["dim"], self.dim)])
            problems = [p for entry in self.manifest["shards"] for p in store.check_shard(entry, self.manifest)]
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise CorruptStoreError(f"{store.what}: damaged shard {problems[0]}{more}; {store.repair_advice()}")
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
            if store.previous_path.is_file():  # never start afresh over committed rows
                store.manifest()  # raises: manifest.json missing while manifest.prev.json exists
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
                path.unlink(missing_ok=True)
        for path in self.store.path.glob(TMP_PREFIX + "*"):
            path.unlink(missing_ok=True)

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
        # the shard is written before anything in memory changes: a failed write leaves the
        # writer as it was (rows still buffered)
        name = self._new_shard(buf.keys, features, buf) if len(buf) else None
        for key in self._pending_dead:
            if key in self._live:
                self._kill(key)
        self._pending_dead.clear()
        if name is not None:
            for key in buf.keys:
                if key in self._live:
                    self._kill(key)
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
        try:
            self._publish()
        except WriteFailedError:
            if name is not None:  # not listed by any manifest: remove it now (the rows stay buffered)
                self.store.shard_path(name).unlink(missing_ok=True)
            raise
        self._batches = []

    def _info_changed(self) -> bool:
        return self.manifest != self._committed_snapshot

    def _new_shard(self, keys: Sequence[str], features: "np.ndarray | tuple[FeatureBlocks, int, str]",
                   buf: _Buffer) -> dict[str, Any]:
        name = f"shard-{self.manifest['generation'] + 1:08d}-{uuid.uuid4().hex[:8]}.h5"
        entry = new_shard(self.store, name, keys, features, buf.labels, buf.sizes, buf.mtimes, buf.hashes, self._kept)
        entry["versions"] = self.provenance
        return entry

    def _publish(self) -> None:
        m = self.manifest
        m["generation"] = int(m["generation"]) + 1
        m["commit_id"] = uuid.uuid4().hex
        m["failures"] = dict(self._failures)
        m["rows"] = len(self._live)
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            self.store.publish(m, self._kept)
        except WriteFailedError:
            m["generation"] -= 1  # not committed: the next try publishes this generation again
            raise
        self._committed_snapshot = _snapshot(m)
        self._last_commit = time.monotonic()

    def compact(self, order: Optional[Sequence[str]] = None) -> bool:
        """Rewrite the live rows as one shard, in ``order`` (keys; default: current order).

        Keys in ``order`` that are not live are skipped; live keys missing from ``order`` are
        appended in their current order. Returns False when the store was already compact.
        """
        self.commit()
        shards = self.manifest["shards"]
        legacy = any(int(s.get("format", 1)) < 2 for s in shards)  # rewritten with chunk checksums
        already = len(shards) <= 1 and not any(s.get("dead") for s in shards) and not legacy
        if already and (order is None or self.manifest.get("sorted")):
            return False
        from embedstore.store.reader import StoreReader

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
        before = (self.manifest["shards"], self.manifest.get("sorted"), self._live)
        self.manifest["shards"] = [new]
        self.manifest["sorted"] = order is not None
        self._live = {k: (0, i) for i, k in enumerate(wanted)}
        try:
            self._publish()
        except WriteFailedError:
            self.manifest["shards"], self.manifest["sorted"], self._live = before
            self.store.shard_path(new).unlink(missing_ok=True)
            raise
        for name in old:
            (self.store.path / SHARDS / name).unlink(missing_ok=True)
        try:  # the previous generation listed the shards just removed: keep this one instead
            keep_previous(self.store.manifest_path, self.store.previous_path)
        except WriteFailedError as exc:
            log.warning("%s (the previous manifest generation is out of date)", exc)
        return True


def new_shard(store: Store, name: str, keys: Sequence[str], features: "np.ndarray | tuple[FeatureBlocks, int, str]",
              labels: Sequence[str],
              sizes: Sequence[int], mtimes: Sequence[int], hashes: Sequence[str], kept: str = "",
              checksums: bool = True) -> dict[str, Any]:
    """Write a shard as ``shards/<name>`` (temp file, fsync, rename, fsync the folder) and return
    its manifest entry. Only the lock holder calls this.

    Raises:
        WriteFailedError: a write failed (the temp file is removed; ``kept`` goes in the message).
    """
    folder = store.path / SHARDS
    tmp = temp_path(folder, ".h5")
    final = folder / name
    try:
        fields = write_shard(tmp, keys, features, labels, sizes, mtimes, hashes, checksums)
        os.replace(tmp, final)
        fsync_dir(folder)
        entry = {"file": name, "rows": len(keys), "bytes": final.stat().st_size, "sha256": file_sha256(final), **fields}
    except OSError as exc:
        final.unlink(missing_ok=True)
        raise WriteFailedError(tmp if tmp.exists() else final, exc, kept) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return entry


def damage_detail(exc: CorruptStoreError) -> str:
    """The part of a :meth:`Store.damaged` message between "is damaged:" and the advice."""
    return str(exc).split(" is damaged: ", 1)[-1].split("; run `", 1)[0]


def _snapshot(manifest: Mapping[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(dict(manifest))
