"""On-disk cache of per-prompt logits ``img . txt`` (float32, scale 1) of image stores, by prompt column.

``prob-mean`` needs every image's similarity to every prompt. Computing them costs a read of the
image features and a matrix product; reading them back costs a read of ``n x P x 4`` bytes. So
stage 2 keeps them on disk while they fit a byte budget, and a later run (another weight,
``drop_below`` or ``scale``, or a prompt list that shares prompts) reads the columns it needs in
row blocks instead of recomputing them. Adding a template computes and appends only the new
prompts' columns.

Layout: ``<cache>/logits/<store hash>/<commit id>/`` holds ``index.json`` (rows, and for each
column chunk its file, the text bank it came from and its prompt texts) and ``c-*.npy`` chunks,
each a row-major ``(n, p)`` float32 ``.npy`` (no pickle), rows in the store's storage order of
that commit. Chunks are written to a temp file and renamed, then listed in ``index.json`` under a
short lock; a crash leaves at most an unlisted temp file. Everything is keyed, not trusted: the
store path and commit id (the folder), the text bank's id and fingerprint (per chunk), the exact
prompt texts (per column). A newer commit of a store removes the older ones; the whole cache is
kept under its byte budget, least recently used chunks removed first. Files are read with
``pread`` into block buffers, not memory-mapped, so reading a large chunk does not grow the
process's resident memory. A damaged chunk (wrong size, unreadable, non-finite values) is removed
and recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from embedstore.util.fsutil import TMP_PREFIX, atomic_write_json, read_json

log = logging.getLogger(__name__)

INDEX = "index.json"
VERSION = 1


class DamagedChunk(Exception):
    """A chunk could not be read back as written (raised to the caller, which recomputes)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def logits_folder(cache_root: Path, store_path: Path) -> Path:
    """The folder holding every cached commit of one image store's logits."""
    return Path(cache_root) / "logits" / _hash(str(Path(store_path).resolve()))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """A short exclusive lock for read-modify-write of ``index.json`` (blocking)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class _Chunk:
    path: Path
    columns: int
    offset: int  # bytes of the .npy header

    def read(self, rows: slice | np.ndarray, cols: np.ndarray, n_rows: int) -> np.ndarray:
        """Float32 ``(len(rows), len(cols))`` of the chunk's columns ``cols``."""
        width = self.columns * 4
        try:
            with open(self.path, "rb", buffering=0) as fh:
                if isinstance(rows, slice):
                    start, stop, _ = rows.indices(n_rows)
                    buf = np.empty((stop - start, self.columns), dtype=np.float32)
                    _pread_into(fh.fileno(), buf, self.offset + start * width, self.path)
                    return buf[:, cols] if cols.size != self.columns else buf
                idx = np.asarray(rows, dtype=np.int64)
                out = np.empty((idx.size, cols.size), dtype=np.float32)
                row = np.empty(self.columns, dtype=np.float32)
                for i, r in enumerate(idx.tolist()):
                    _pread_into(fh.fileno(), row, self.offset + r * width, self.path)
                    out[i] = row[cols]
                return out
        except OSError as exc:
            raise DamagedChunk(self.path, f"unreadable ({exc})") from exc


def _pread_into(fd: int, buf: np.ndarray, offset: int, path: Path) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (short reads continued; end of file is damage)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise DamagedChunk(path, "shorter than its index says")
        done += got


@dataclass
class Columns:
    """Where the cached columns of a prompt list are: ``available[j]`` says whether prompt ``j``
    is cached; :meth:`read` returns the cached columns of a row block."""

    folder: Path
    n_rows: int
    texts: tuple[str, ...]
    available: np.ndarray                      # (P,) bool
    _plan: list[tuple[_Chunk, np.ndarray, np.ndarray]]  # (chunk, its columns, output columns)

    @property
    def missing(self) -> np.ndarray:
        """Indices of the prompts not cached."""
        return np.flatnonzero(~self.available)

    def read(self, rows: slice | np.ndarray, out: np.ndarray) -> None:
        """Fill ``out[:, available]`` with the cached logits of storage ``rows``.

        Raises:
            DamagedChunk: a chunk is short, unreadable or holds non-finite values.
        """
        for chunk, cols, dest in self._plan:
            block = chunk.read(rows, np.arange(chunk.columns), self.n_rows)
            if not np.isfinite(block).all():
                raise DamagedChunk(chunk.path, "holds non-finite values")
            for src, dst, length in _runs(cols, dest):  # column runs: slice copies, not a fancy scatter
                out[:, dst:dst + length] = block[:, src:src + length]


def _runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """``(src start, dst start, length)`` of the stretches where both column lists step by one."""
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, src.size]
    return [(int(src[a]), int(dst[a]), int(b - a)) for a, b in zip(starts, ends)]


class ChunkWriter:
    """Writes the logits of new prompt columns row block by row block, in a background thread
    (at most a few blocks queued, so the writes overlap the caller's computation and memory stays
    bounded); :meth:`commit` waits for them and lists the chunk in the index (nothing is visible
    before)."""

    def __init__(self, cache: "LogitCache", folder: Path, n_rows: int, bank: str, texts: Sequence[str]):
        self.cache, self.folder, self.n_rows, self.bank, self.texts = cache, folder, n_rows, bank, tuple(texts)
        folder.mkdir(parents=True, exist_ok=True)
        self.name = f"c-{uuid.uuid4().hex[:12]}.npy"
        self.tmp = folder / f"{TMP_PREFIX}{self.name}"
        header = {"descr": "<f4", "fortran_order": False, "shape": (n_rows, len(self.texts))}
        with open(self.tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            self.offset = fh.tell()
            fh.truncate(self.offset + n_rows * len(self.texts) * 4)
        self._fd: Optional[int] = os.open(self.tmp, os.O_WRONLY | os.O_CLOEXEC)
        self.written = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="embedstore-logits")
        self._pending: list[Future[None]] = []

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows ``start:start+len(values)`` (storage order) of the new columns (copied: the copy is
        written in the background)."""
        assert self._fd is not None
        data = np.array(values, dtype=np.float32, order="C", copy=True)
        while len(self._pending) >= 4:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._pwrite, self.offset + start * len(self.texts) * 4, data))
        self.written += len(data)

    def _pwrite(self, offset: int, data: np.ndarray) -> None:
        assert self._fd is not None
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def commit(self) -> None:
        """Rename the chunk into place and list it (only when every row was written)."""
        try:
            for future in self._pending:
                future.result()
        except OSError as exc:
            log.warning("%s: could not write the logit cache (%s); the logits are recomputed next time", self.tmp, exc)
            self.abort()
            return
        self._close()
        if self.written != self.n_rows:
            self.abort()
            return
        final = self.folder / self.name
        try:
            os.replace(self.tmp, final)  # not fsynced: a chunk lost to a crash is recomputed
            with _locked(self.folder):
                index = self.cache._index(self.folder) or {"version": VERSION, "rows": self.n_rows, "chunks": []}
                index["chunks"].append({"file": self.name, "bank": self.bank, "texts": list(self.texts),
                                        "bytes": final.stat().st_size})
                atomic_write_json(self.folder / INDEX, index)
        except OSError as exc:  # a full disk: derived data, recomputed next time
            log.warning("%s: could not list the logit cache chunk (%s); the logits are recomputed next time",
                        self.folder, getattr(exc, "strerror", None) or exc)
            final.unlink(missing_ok=True)
            self.tmp.unlink(missing_ok=True)
            return
        self.cache.enforce_budget()

    def abort(self) -> None:
        """Forget the chunk (an interrupted or failed run)."""
        self._close()
        self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LogitCache:
    """Per-prompt logits of image stores under ``<cache root>/logits``, within ``budget`` bytes."""

    def __init__(self, cache_root: Path, budget: int):
        self.root = Path(cache_root) / "logits"
        self.budget = int(budget)

    def folder(self, store_path: Path, commit_id: str) -> Path:
        return logits_folder(self.root.parent, store_path) / commit_id

    def _index(self, folder: Path) -> Optional[dict[str, Any]]:
        try:
            data = read_json(folder / INDEX)
        except ValueError:
            log.warning("%s: damaged logit cache index; removing the folder", folder)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        ok = isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("chunks"), list)
        return data if ok else None

    def columns(self, store_path: Path, commit_id: str, n_rows: int, bank: str, texts: Sequence[str]) -> Columns:
        """Which of ``texts`` are cached for this store commit and text bank, and where."""
        folder = self.folder(store_path, commit_id)
        texts = tuple(texts)
        available = np.zeros(len(texts), dtype=bool)
        plan: list[tuple[_Chunk, np.ndarray, np.ndarray]] = []
        index = self._index(folder) if self.budget > 0 else None
        if index is not None and index.get("rows") == n_rows:
            wanted: dict[str, list[int]] = {}
            for j, t in enumerate(texts):
                wanted.setdefault(t, []).append(j)
            for entry in index["chunks"]:
                if entry.get("bank") != bank:
                    continue
                chunk_texts = entry.get("texts", [])
                src, dst = [], []
                for c, t in enumerate(chunk_texts):
                    for j in wanted.get(t, ()):
                        if not available[j]:
                            src.append(c)
                            dst.append(j)
                            available[j] = True
                if src:
                    path = folder / entry["file"]
                    plan.append((self._chunk(path, n_rows, len(chunk_texts)), np.asarray(src), np.asarray(dst)))
        return Columns(folder, n_rows, texts, available, plan)

    def _chunk(self, path: Path, n_rows: int, columns: int) -> _Chunk:
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh)
                offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise DamagedChunk(path, f"unreadable header ({exc})") from exc
        if shape != (n_rows, columns) or fortran or dtype != np.float32:
            raise DamagedChunk(path, f"holds {shape} {dtype}, the index says ({n_rows}, {columns}) float32")
        if path.stat().st_size != offset + n_rows * columns * 4:
            raise DamagedChunk(path, "truncated")
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept longest
        return _Chunk(path, columns, offset)

    def fits(self, nbytes: int) -> bool:
        """Whether a chunk of ``nbytes`` may be cached at all."""
        return 0 < nbytes <= self.budget

    def writer(self, store_path: Path, commit_id: str, n_rows: int, bank: str, texts: Sequence[str]) -> ChunkWriter:
        """A :class:`ChunkWriter` for new columns; other commits of the store are removed first."""
        folder = self.folder(store_path, commit_id)
        for other in folder.parent.glob("*") if folder.parent.is_dir() else ():
            if other.is_dir() and other.name != commit_id:
                shutil.rmtree(other, ignore_errors=True)
        return ChunkWriter(self, folder, n_rows, bank, texts)

    def drop(self, chunk_path: Path) -> None:
        """Unlist and remove a damaged chunk."""
        log.warning("%s: damaged logit cache chunk; removing it, the logits are recomputed", chunk_path)
        self._unlist(chunk_path)

    # -- size
    def chunks(self) -> list[tuple[Path, int, float]]:
        """Every chunk file with its bytes and last use (mtime, refreshed on every use)."""
        out = []
        if self.root.is_dir():
            for path in self.root.glob("*/*/c-*.npy"):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    out.append((path, st.st_size, st.st_mtime))
        return out

    def size(self) -> int:
        """Bytes the cache takes on disk."""
        return sum(size for _, size, _ in self.chunks())

    def enforce_budget(self) -> int:
        """Remove least recently used chunks until the cache fits its budget; return the bytes
        removed. Temp files older than an hour (left by killed runs) go too."""
        removed = 0
        now = time.time()
        for tmp in self.root.glob(f"*/*/{TMP_PREFIX}*") if self.root.is_dir() else ():
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > 3600:
                    removed += tmp.stat().st_size
                    tmp.unlink()
        chunks = sorted(self.chunks(), key=lambda c: c[2])
        total = sum(size for _, size, _ in chunks)
        for path, size, _ in chunks:
            if total <= self.budget:
                break
            self._unlist(path)
            total -= size
            removed += size
        return removed

    def _unlist(self, chunk_path: Path) -> None:
        folder = chunk_path.parent
        with _locked(folder):
            index = self._index(folder)
            if index is not None:
                index["chunks"] = [c for c in index["chunks"] if c.get("file") != chunk_path.name]
                atomic_write_json(folder / INDEX, index)
        chunk_path.unlink(missing_ok=True)

    def clear(self) -> int:
        """Remove the whole cache; return the bytes it took."""
        size = self.size()
        shutil.rmtree(self.root, ignore_errors=True)
        return size
