"""Row-block reads of one committed image store (or text bank), straight from its HDF5 shards.

A :class:`StoreReader` pins one commit: on entry it reads the manifest and opens every shard that
commit lists, so a writer that compacts meanwhile cannot take them away (an unlinked file stays
readable while it is open). It holds the keys and labels (natural key order, as
:meth:`embedstore.store.store.Store.read` returns them) and reads features in row blocks on demand, in
their stored dtype (float16 by default): never a whole store, never a float32 copy of it.

Every read goes through the store's one checked path (:meth:`embedstore.store.store.Store.open_commit`):
each shard is checked against the manifest when it is opened, features come from
:meth:`ShardFile.read <embedstore.store.shards.ShardFile.read>` (a chunk whose checksum fails raises
:class:`~embedstore.errors.CorruptStoreError` naming the shard and the repair command), and the
key and label columns are compared with their digests.

Rows have two orders: the *natural* order (keys in natural sort order; the order of every output)
and the *storage* order (shards in manifest order, dead rows skipped). A compacted store (what a
finished ``embedstore encode`` leaves) has one shard in natural order, so the two coincide and a
block is one contiguous read; otherwise :meth:`rows` maps natural rows to storage rows.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from embedstore.errors import StoreChangedError
from embedstore.store.shards import ShardFile
from embedstore.store.store import Commit, Store

log = logging.getLogger(__name__)

Rows = Union[slice, np.ndarray]  # storage rows: a range, or increasing indices


@dataclass(frozen=True)
class Layout:
    """Keys, labels and row order of one commit (what a reader reads before any feature); a
    session keeps it to open the same commit again without re-reading them."""

    commit_id: str
    keys: list[str]
    labels: Optional[list[str]]
    order: Optional[np.ndarray]


class StoreReader:
    """One commit of ``store``, read in row blocks. Use ``with StoreReader(store) as r:``.

    Attributes (after entry): ``manifest``, ``commit_id``, ``keys`` and ``labels`` (natural
    order; ``labels`` is None for an unlabelled store), ``dim``, ``dtype``, ``order`` (natural row
    -> storage row, or None when they coincide), ``layout`` (those as a :class:`Layout`).
    ``layout``: a layout read earlier; reused when the store is still at its commit.
    ``natural=False`` keeps the storage order (for lookups by key, e.g. text banks: no sort).
    """

    def __init__(self, store: Store, expect_commit: Optional[str] = None, attempts: int = 5,
                 layout: Optional[Layout] = None, natural: bool = True):
        self.store = store
        self.natural = natural
        self.expect_commit = expect_commit
        self.attempts = attempts
        self._known = layout
        self._ahead: Optional[tuple[int, int, Future[np.ndarray]]] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._commit: Optional[Commit] = None
        self._segments: list[tuple[int, int, ShardFile, Optional[np.ndarray]]] = []  # (start, stop, shard, live rows)

    # -- opening
    def __enter__(self) -> "StoreReader":
        for attempt in range(self.attempts):
            try:
                self._open()
                return self
            except FileNotFoundError:  # compacted between our manifest read and the shard open
                self.close()
                if self.expect_commit is not None and self.store.manifest().get("commit_id") != self.expect_commit:
                    raise StoreChangedError(f"{self.store.what} was compacted while it was being read "
                                            "(a concurrent `embedstore encode`?); run again") from None
                if attempt == self.attempts - 1:
                    raise self.store.damaged(self.store.path / "shards",
                                             "a shard listed in the manifest is missing") from None
                time.sleep(0.02 * (attempt + 1))
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files (the reader cannot read features afterwards)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None
        if self._commit is not None:
            self._commit.close()
        self._commit, self._segments = None, []

    def _open(self) -> None:
        # the commit asked for: the current one, or one this Store read before and whose shards
        # still exist (pinned); otherwise StoreChangedError
        manifest = self.store._manifest_at(self.expect_commit)
        known = self._known if self._known is not None and self._known.commit_id == manifest.get("commit_id") else None
        keys: list[str] = []
        labels: list[str] = []
        start = 0
        self._commit = self.store.open_commit(manifest)  # every shard checked against the manifest
        for f in self._commit.shards:
            n = f.rows
            live = None
            dead = f.entry.get("dead") or []
            if dead:
                mask = np.ones(n, dtype=bool)
                mask[np.asarray(dead, dtype=np.int64)] = False
                live = np.flatnonzero(mask)
            if known is None:
                shard_keys = f.column("keys").tolist()
                shard_labels = f.column("labels").tolist()
                keys.extend(shard_keys if live is None else [shard_keys[i] for i in live])
                labels.extend(shard_labels if live is None else [shard_labels[i] for i in live])
            count = n if live is None else len(live)
            if count:
                self._segments.append((start, start + count, f, live))
            start += count
        self.manifest = manifest
        self.commit_id: str = manifest.get("commit_id", "")
        self.dim = int(manifest.get("dim") or 0)
        self.dtype = np.dtype(manifest.get("dtype", "float16"))
        if known is not None:
            self.keys, self.labels, self.order, self.layout = known.keys, known.labels, known.order, known
            return
        self.order: Optional[np.ndarray] = None
        if self.natural and not manifest.get("sorted", False) and keys:
            from embedstore.util.order import natural_order

            order = np.asarray(natural_order(keys), dtype=np.int64)
            if not np.array_equal(order, np.arange(len(keys))):
                self.order = order
                keys = [keys[i] for i in order]
                labels = [labels[i] for i in order]
        self.keys = keys
        self.labels: Optional[list[str]] = labels if manifest.get("labelled") else None
        self.layout = Layout(self.commit_id, self.keys, self.labels, self.order)

    # -- rows
    def __len__(self) -> int:
        return len(self.keys)

    @property
    def contiguous(self) -> bool:
        """True when natural and storage order coincide (blocks are plain ranges)."""
        return self.order is None

    def rows(self, start: int, stop: int) -> Rows:
        """Storage rows of the natural rows ``start:stop``."""
        return slice(start, stop) if self.order is None else self.order[start:stop]

    def storage_rows(self, natural: np.ndarray) -> np.ndarray:
        """Storage rows of arbitrary natural rows."""
        natural = np.asarray(natural, dtype=np.int64)
        return natural if self.order is None else self.order[natural]

    def features(self, rows: Rows) -> np.ndarray:
        """Features of storage ``rows`` (a range or indices, in that order), stored dtype."""
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(len(self.keys))
            return self._sequential(start, stop)
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size == 0:
            return np.zeros((0, self.dim), dtype=self.dtype)
        first, last = int(idx.min()), int(idx.max())
        if last - first + 1 == idx.size and (np.diff(idx) == 1).all():  # a range after all
            return self._range(first, last + 1)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        out = np.empty((idx.size, self.dim), dtype=self.dtype)
        lo = 0
        # read covering ranges of at most 8192 rows (small temporaries), keep the wanted rows
        while lo < sorted_idx.size:
            start = int(sorted_idx[lo])
            hi = int(np.searchsorted(sorted_idx, start + 8192, side="left"))
            block = self._range(start, int(sorted_idx[hi - 1]) + 1)
            out[order[lo:hi]] = block[sorted_idx[lo:hi] - start]
            lo = hi
        return out

    def _sequential(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``; the next block of the same height is read in the background
        meanwhile (disk reads overlap the caller's computation)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (start, stop):
            block = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].cancel()
            block = self._range(start, stop)
        n = len(self.keys)
        if stop < n:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="embedstore-read")
            nxt = (stop, min(n, stop + (stop - start)))
            self._ahead = (nxt[0], nxt[1], self._pool.submit(self._range, *nxt))
        return block

    def _range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for seg_start, seg_stop, shard, live in self._segments:
            a, b = max(start, seg_start), min(stop, seg_stop)
            if a >= b:
                continue
            parts.append(self._read(shard, a - seg_start, b - seg_start, live))
        if not parts:
            return np.zeros((0, self.dim), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _read(self, shard: ShardFile, a: int, b: int, live: Optional[np.ndarray]) -> np.ndarray:
        """Live rows ``a:b`` of one shard (checked read: a damaged chunk raises CorruptStoreError)."""
        if live is None:
            return shard.features(a, b)
        lo, hi = int(live[a]), int(live[b - 1]) + 1
        return shard.features(lo, hi)[live[a:b] - lo]

    def file_states(self) -> np.ndarray:
        """``(n, 2)`` int64 size and mtime_ns of each row's source file when it was encoded
        (natural order): two stores hold the same images only where these agree."""
        parts = []
        for _, _, f, live in self._segments:
            state = np.stack([np.asarray(f.column("size"), dtype=np.int64),
                              np.asarray(f.column("mtime_ns"), dtype=np.int64)], 1)
            parts.append(state if live is None else state[live])
        out = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        return out if self.order is None else out[self.order]

    def label_ids(self, classes: Sequence[str]) -> Optional[np.ndarray]:
        """Class index of each row's label (natural order), -1 for labels not among ``classes``;
        None for an unlabelled store."""
        if self.labels is None:
            return None
        index = {c: i for i, c in enumerate(classes)}
        return np.fromiter((index.get(label, -1) for label in self.labels), dtype=np.int64, count=len(self.labels))
