"""One shard file of a store: its HDF5 layout, a write that fails cleanly, and the checked reads.

Layout of a shard (``format`` 2 in its manifest entry, written since per-chunk checksums)::

    features        (rows, d) float16/float32, chunked in whole row blocks of about CHUNK_BYTES
                    (so a block of rows is one contiguous read per chunk), fletcher32 per chunk
    size, mtime_ns  (rows,) int64, chunked, fletcher32
    keys, labels, hash   (rows,) variable-length UTF-8 strings; HDF5 allows no filter on them, so
                    the manifest entry keeps a digest of each column (``digests``)
    attrs["schema"] = 1

Files are written in HDF5's 1.10 format, whose metadata (superblock, object headers, chunk
indexes) is checksummed too, so a flipped byte anywhere is either caught by HDF5 (an error on
read, turned into :class:`~embedstore.errors.CorruptStoreError` here) or by a digest.
Shards of ``format`` 1 (no ``format`` in the entry; written before) are contiguous and carry no
checksums: the store checks their whole-file sha256 before first use (see
:meth:`embedstore.store.store.Store.open_commit`), and ``embedstore verify --repair`` rewrites them.

Reading goes through :class:`ShardFile` (opened by the store, checked against the manifest:
schema, datasets, shapes, dtypes, column lengths, dead rows) and its :meth:`ShardFile.read`,
the one place where an h5py/HDF5 error becomes a :class:`CorruptStoreError` naming the store,
the shard and the repair command.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from embedstore.errors import CorruptStoreError
from embedstore.util.fsutil import tolerant_file

SCHEMA_VERSION = 1
FORMAT = 2                      # manifest shard entries of checksummed shards carry "format": 2
CHUNK_BYTES = 1 << 20           # target size of one features chunk (0.5-2 MB keeps reads contiguous)
LIBVER = ("v110", "v110")       # HDF5 1.10 file format: checksummed metadata
INT_COLUMNS = ("size", "mtime_ns")
STRING_COLUMNS = ("keys", "labels", "hash")
COLUMNS = ("features", *INT_COLUMNS, *STRING_COLUMNS)
# what reading an HDF5 dataset raises when its bytes are damaged (h5py maps HDF5 errors to these)
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)

Damaged = Callable[[str], CorruptStoreError]


def chunk_rows_for(dim: int, dtype: Any) -> int:
    """Rows per features chunk: the largest power of two whose rows fit in :data:`CHUNK_BYTES`
    (0.5-1 MB per chunk; 512 rows at d=768 or 1024 in float16), so row-block readers can align."""
    fit = max(1, CHUNK_BYTES // max(1, int(dim) * np.dtype(dtype).itemsize))
    return 1 << (fit.bit_length() - 1)


def strings_digest(values: Sequence[str]) -> str:
    """Digest of a string column (count and contents), kept in the manifest entry."""
    h = hashlib.sha256(str(len(values)).encode())
    h.update("\x1f".join(values).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 16 MB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


FeatureBlocks = Callable[[int, int], np.ndarray]  # (start, stop) -> rows start:stop of a shard's features
WRITE_BLOCK_BYTES = 64 << 20  # features given as blocks are written in row blocks of about this size


def write_shard(path: Path, keys: Sequence[str], features: "np.ndarray | tuple[FeatureBlocks, int, Any]",
                labels: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int], hashes: Sequence[str],
                checksums: bool = True) -> dict[str, Any]:
    """Write a shard file at ``path`` (fsynced) and return the manifest entry fields it needs
    besides ``file``/``rows``/``bytes``/``sha256``: ``format``, ``chunk_rows`` and ``digests``.

    ``features`` is an ``(n, d)`` array, or ``(blocks, d, dtype)`` with ``blocks(start, stop)``
    giving rows ``start:stop``: a shard of any size is then written one row block (whole chunks)
    at a time, in bounded memory.

    ``checksums=False`` writes the format-1 layout (contiguous, no checksums) that stores made
    before format 2 have; only tests and benchmarks ask for it.

    Raises:
        OSError: the first write error (no space left, file-size limit, ...). HDF5 never sees it
            (see :class:`~embedstore.util.fsutil.TolerantFile`); the caller removes the file.
    """
    import h5py

    text = h5py.string_dtype("utf-8")
    n = len(keys)
    if isinstance(features, np.ndarray):
        blocks, dim, dtype = None, features.shape[1], features.dtype
    else:
        blocks, dim, dtype = features
    chunk = min(max(1, n), chunk_rows_for(dim, dtype))
    ints = {"size": np.asarray(sizes, dtype=np.int64), "mtime_ns": np.asarray(mtimes, dtype=np.int64)}
    strings = {"keys": list(keys), "labels": list(labels), "hash": list(hashes)}
    with tolerant_file(path) as sink, h5py.File(sink, "w", libver=LIBVER if checksums else "earliest") as f:
        layout: dict[str, Any] = {"chunks": (chunk, dim), "fletcher32": True} if checksums else {}
        if blocks is None:
            f.create_dataset("features", data=features, **layout)
        else:
            dataset = f.create_dataset("features", shape=(n, dim), dtype=dtype, **layout)
            budget = max(1, WRITE_BLOCK_BYTES // max(1, dim * np.dtype(dtype).itemsize))
            step = budget // chunk * chunk if budget >= chunk else budget  # whole chunks where they fit
            for start in range(0, n, step):
                stop = min(n, start + step)
                dataset[start:stop] = blocks(start, stop)
        for name, values in ints.items():
            if checksums:
                f.create_dataset(name, data=values, chunks=(max(1, min(n, 1 << 16)),), fletcher32=True)
            else:
                f.create_dataset(name, data=values)
        for name, values in strings.items():
            f.create_dataset(name, data=np.array(values, dtype=object), dtype=text)
        f.attrs["schema"] = SCHEMA_VERSION
    if not checksums:
        return {}
    return {"format": FORMAT, "chunk_rows": chunk,
            "digests": {name: strings_digest(values) for name, values in strings.items()}}


@dataclass(frozen=True)
class RowDamage:
    """What :meth:`ShardFile.scan` found: rows whose data failed a check, and why."""

    bad: np.ndarray          # bool (rows,): True where a row cannot be trusted
    problems: list[str]

    @property
    def sound(self) -> bool:
        return not self.problems


class ShardFile:
    """A committed shard, open for reading and checked against its manifest entry.

    Opening checks the file's size, HDF5 structure, schema, the six datasets, their shapes and
    dtypes against the manifest (``dim``, ``dtype``, ``rows``), the chunk checksums' presence
    (format 2) and the dead rows. Reads go through :meth:`read` (any slice of a dataset) or
    :meth:`features` / :meth:`column`; an HDF5 error there (a chunk whose fletcher32 checksum
    fails, damaged metadata) raises :class:`CorruptStoreError` from ``damaged``, which names the
    store, the shard and the command to run. String columns read whole are compared with their
    manifest digest. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path, entry: Mapping[str, Any], manifest: Mapping[str, Any], damaged: Damaged):
        import h5py

        self.path = path
        self.entry = entry
        self.rows = int(entry["rows"])
        self.dim = int(manifest["dim"])
        self.dtype = np.dtype(manifest["dtype"])
        self.checksummed = int(entry.get("format", 1)) >= FORMAT
        self._damaged = damaged
        size = path.stat().st_size  # FileNotFoundError: the caller re-reads the manifest
        if size != entry["bytes"]:
            raise damaged(f"{size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        try:
            self.file = h5py.File(path, "r", locking=False)
        except FileNotFoundError:
            raise
        except H5_ERRORS as exc:
            raise damaged(f"not a readable HDF5 file ({_reason(exc)})") from None
        try:
            self._check_structure()
        except BaseException:
            self.file.close()
            raise

    def _check_structure(self) -> None:
        f, rows = self.file, self.rows
        try:
            schema = f.attrs.get("schema")
            missing = [name for name in COLUMNS if name not in f]
            shapes = {name: f[name].shape for name in COLUMNS if name in f}
            dtypes = {name: f[name].dtype for name in COLUMNS if name in f}
            filters = {name: (f[name].fletcher32, f[name].chunks) for name in ("features", *INT_COLUMNS) if name in f}
        except H5_ERRORS as exc:
            raise self._damaged(f"unreadable HDF5 structure ({_reason(exc)})") from None
        if schema != SCHEMA_VERSION:
            raise self._damaged(f"shard schema {schema!r}, this embedstore reads {SCHEMA_VERSION}")
        if missing:
            raise self._damaged(f"dataset(s) {', '.join(missing)} missing")
        if shapes["features"] != (rows, self.dim):
            raise self._damaged(f"features are {shapes['features']}, the manifest says ({rows}, {self.dim})")
        if dtypes["features"] != self.dtype:
            raise self._damaged(f"features are {dtypes['features']}, the manifest says {self.dtype}")
        for name in (*INT_COLUMNS, *STRING_COLUMNS):
            if shapes[name] != (rows,):
                raise self._damaged(f"column {name} has shape {shapes[name]}, the manifest says ({rows},)")
        for name in INT_COLUMNS:
            if dtypes[name].kind not in "iu":
                raise self._damaged(f"column {name} is {dtypes[name]}, expected integers")
        for name in STRING_COLUMNS:
            if dtypes[name].kind != "O":
                raise self._damaged(f"column {name} is {dtypes[name]}, expected strings")
        if self.checksummed:
            unchecked = [name for name, (fletcher, chunks) in filters.items() if not fletcher or chunks is None]
            if unchecked:
                raise self._damaged(f"dataset(s) {', '.join(unchecked)} have no chunk checksums, "
                                    "the manifest says they do")
        dead = self.entry.get("dead", [])
        if dead and max(dead) >= rows:
            raise self._damaged(f"dead row {max(dead)} is beyond its {rows} rows")

    # ---- reading ---------------------------------------------------------------------------
    @property
    def chunk_rows(self) -> int:
        """Rows per features chunk (the whole shard for a format-1 shard)."""
        chunks = self.file["features"].chunks
        return int(chunks[0]) if chunks else max(1, self.rows)

    def live(self) -> np.ndarray:
        """Bool mask of the rows not marked dead in the manifest entry."""
        mask = np.ones(self.rows, dtype=bool)
        mask[np.asarray(self.entry.get("dead", []), dtype=np.int64)] = False
        return mask

    def read(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        """``dataset[selection]`` (strings as ``str``), or :class:`CorruptStoreError` if HDF5
        cannot read it (a chunk whose checksum fails, damaged metadata)."""
        try:
            dataset = self.file[name]
            if name in STRING_COLUMNS:  # read as bytes, then decoded: ~3x faster than h5py's asstr()
                raw = dataset[selection]
                return np.array([b.decode("utf-8") for b in raw.tolist()], dtype=object) if raw.ndim else raw.decode()
            return dataset[selection]
        except H5_ERRORS as exc:
            raise self._damaged(f"cannot read {name}[{_describe(selection)}] ({_reason(exc)})") from None

    def features(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Features of rows ``[start, stop)`` in the stored dtype (checked read)."""
        return self.read("features", slice(start, self.rows if stop is None else stop))

    def column(self, name: str) -> np.ndarray:
        """A whole metadata column (``keys``, ``labels``, ``hash``, ``size``, ``mtime_ns``); string
        columns of a format-2 shard are compared with their manifest digest."""
        values = self.read(name)
        if name in STRING_COLUMNS and self.checksummed:
            expected = (self.entry.get("digests") or {}).get(name)
            if expected is not None and strings_digest(values.tolist()) != expected:
                raise self._damaged(f"column {name} differs from its digest in the manifest")
        return values

    def scan(self) -> RowDamage:
        """Read everything once and report which rows cannot be trusted (for verify and repair).

        Format 2: features chunk by chunk (a chunk that fails marks its rows), the integer
        columns and the string digests (a failure there marks every row). Format 1 has no
        checksums: the caller compares the file's sha256 instead, so only readability is checked.
        """
        bad = np.zeros(self.rows, dtype=bool)
        problems: list[str] = []
        step = self.chunk_rows
        for start in range(0, self.rows, step):
            try:
                self.features(start, min(self.rows, start + step))
            except CorruptStoreError:
                bad[start:start + step] = True
        if bad.any():
            blocks = np.flatnonzero(bad[::step])
            problems.append(f"{int(bad.sum())} of {self.rows} rows in {len(blocks)} damaged chunk(s) of "
                            f"{step} rows (first at row {int(blocks[0]) * step})")
        for name in (*INT_COLUMNS, *STRING_COLUMNS):
            try:
                self.column(name)
            except CorruptStoreError as exc:
                bad[:] = True
                problems.append(f"column {name}: {_detail(exc)}")
        return RowDamage(bad, problems)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _describe(selection: Any) -> str:
    if isinstance(selection, slice):
        start = "" if selection.start is None else selection.start
        stop = "" if selection.stop is None else selection.stop
        return f"{start}:{stop}"
    return "..."


def _detail(exc: CorruptStoreError) -> str:
    """The part of a damage message between 'is damaged: ' and the repair advice."""
    text = str(exc)
    text = text.split(" is damaged: ", 1)[-1]
    return text.split("; run `", 1)[0]
