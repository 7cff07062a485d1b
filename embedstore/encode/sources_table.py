"""Parquet and Arrow shards: images as bytes in a column, read with pyarrow.

Hugging Face datasets (the hub's Parquet files, ``save_to_disk`` Arrow files) store an image as
a struct ``{bytes, path}``; other writers use a plain binary column. Both are read. Listing reads
only the key and label columns; reading a shard streams the image column in record batches (one
batch in memory at a time) and yields the wanted rows in file order. Integer labels become class
names through ``--classes``, else the ``ClassLabel`` names Hugging Face keeps in the schema
metadata, else stay integers; ``-1`` (Hugging Face's "no label") on every row means unlabelled.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from embedstore.encode.samples import Blob, read_file_blob
from embedstore.encode.sources import FileState, SourceItem
from embedstore.errors import SourceError

if TYPE_CHECKING:
    import pyarrow as pa

    from embedstore.encode.sources_shards import ShardOptions, _Listing

log = logging.getLogger(__name__)

READ_BATCH_ROWS = 64  # rows of the image column decoded from a record batch at a time
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_LABEL_COLUMN = "label"


@dataclass(frozen=True)
class TableRow:
    """Where an image's bytes are in its table: a row of a column."""

    row: int
    column: str


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SourceError("reading .parquet/.arrow shards needs pyarrow: pip install 'embedstore[parquet]'") from None
    return pyarrow


def _is_parquet(path: str | Path) -> bool:
    return str(path).lower().endswith(".parquet")


def table_schema(path: str | Path) -> "pa.Schema":
    """The Arrow schema of a Parquet or Arrow (IPC stream or file) shard."""
    pa = _pyarrow()
    if _is_parquet(path):
        return pa.parquet.ParquetFile(path).schema_arrow
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).schema
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).schema


def record_batches(path: str | Path, columns: Sequence[str], rows: int = READ_BATCH_ROWS) -> Iterator["pa.RecordBatch"]:
    """Stream ``columns`` of a shard in record batches (Parquet: of ``rows`` rows)."""
    pa = _pyarrow()
    if _is_parquet(path):
        yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=rows, columns=list(columns))
        return
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
            batches: Iterator[Any] = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        for batch in batches:
            yield batch.select(list(columns))


def _image_column(schema: "pa.Schema", wanted: Optional[str], path: Path) -> str:
    pa = _pyarrow()

    def holds_bytes(t: Any) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    if wanted is not None:
        if wanted not in schema.names:
            raise SourceError(f"{path}: no column {wanted!r} (--image-column); columns: {', '.join(schema.names)}")
        if not holds_bytes(schema.field(wanted).type):
            raise SourceError(f"{path}: column {wanted!r} is {schema.field(wanted).type}, not image bytes "
                              "(binary, or a struct with a 'bytes' field)")
        return wanted
    if DEFAULT_IMAGE_COLUMN in schema.names and holds_bytes(schema.field(DEFAULT_IMAGE_COLUMN).type):
        return DEFAULT_IMAGE_COLUMN
    candidates = [f.name for f in schema if holds_bytes(f.type)]
    if len(candidates) != 1:
        raise SourceError(f"{path}: {'no column holds' if not candidates else 'several columns hold'} image bytes "
                          f"({', '.join(candidates) or 'columns: ' + ', '.join(schema.names)}); "
                          "name the image column with --image-column")
    return candidates[0]


def class_label_names(schema: "pa.Schema", column: str) -> Optional[tuple[str, ...]]:
    """The ``ClassLabel`` names Hugging Face recorded for ``column`` in the schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return tuple(str(n) for n in feature["names"])
    return None


def list_table(path: Path, rel: str, state: FileState, options: ShardOptions,
               default_labels: Optional[str] = None) -> _Listing:
    """List the rows of one Parquet or Arrow shard (see the module docstring).

    Raises:
        SourceError: an unreadable shard, a missing or wrong column, a row without a key or label,
            a label outside the class names.
    """
    from embedstore.encode.sources_shards import _Listing, label_name

    pa = _pyarrow()
    try:
        schema = table_schema(path)
        image = _image_column(schema, options.image_column, path)
        label = options.label_column or default_labels
        if label is None and DEFAULT_LABEL_COLUMN in schema.names:
            label = DEFAULT_LABEL_COLUMN
        for what, column in (("--label-column", options.label_column), ("--key-column", options.key_column)):
            if column is not None and column not in schema.names:
                raise SourceError(f"{path}: no column {column!r} ({what}); columns: {', '.join(schema.names)}")
        columns = [c for c in dict.fromkeys([label, options.key_column]) if c is not None]
        values: dict[str, list[Any]] = {c: [] for c in columns}
        n = 0
        if columns or not _is_parquet(path):  # an Arrow file is memory-mapped: counting its rows reads nothing
            for batch in record_batches(path, columns or [image], rows=65536):
                n += batch.num_rows
                for c in columns:
                    values[c].extend(batch.column(c).to_pylist())
        else:
            n = pa.parquet.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{path}: not a readable {'Parquet' if _is_parquet(path) else 'Arrow'} file ({exc}); "
                          "is the shard damaged or cut short?") from None
    labels: list[Optional[str]] = [None] * n
    labelled = False
    if label is not None:
        raw = values[label]
        given = [v is not None and not (isinstance(v, int) and v < 0) for v in raw]
        explicit = options.label_column is not None
        if all(given):
            classes = options.classes or class_label_names(schema, label)
            labels = [label_name(v, classes, f"{path}: row {i} ({label!r})") for i, v in enumerate(raw)]
            labelled = True
        elif any(given) or explicit and n:
            row = given.index(False)
            raise SourceError(f"{path}: row {row} has no label in column {label!r} (null or -1); label every row, "
                              "or encode without labels" + (" (leave --label-column out)" if explicit else ""))
    keys = [f"{rel}/{i}" for i in range(n)]
    if options.key_column is not None:
        keys = []
        for i, v in enumerate(values[options.key_column]):
            if v is None or str(v).strip() == "":
                raise SourceError(f"{path}: row {i} has no key in column {options.key_column!r}")
            keys.append(str(v).strip())
        if len(set(keys)) != n:
            raise SourceError(f"{path}: column {options.key_column!r} repeats a key; keys must be unique")
    items = [SourceItem(keys[i], str(path), labels[i], state, rel, TableRow(i, image)) for i in range(n)]
    return _Listing(items, labelled)


def _bytes_of(value: Any) -> tuple[Optional[bytes], Optional[str]]:
    """``(bytes, path)`` of an image cell: plain bytes, or a ``{bytes, path}`` struct."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    return value, None


def read_table(path: str, members: Sequence[tuple[int, Optional[TableRow]]], state: FileState) -> Iterator[Blob]:
    """Stream the image column of one shard and yield the wanted rows, in row order.

    A ``{bytes: null, path}`` cell (a dataset that refers to image files) reads the file at
    ``path``; a row with neither is recorded as ``MissingImage``.
    """
    wanted = {m.row: index for index, m in members if m is not None}
    column = next(m.column for _, m in members if m is not None)
    last = max(wanted) if wanted else -1
    start = 0
    for batch in record_batches(path, [column]):
        stop = start + batch.num_rows
        rows = [r for r in range(start, stop) if r in wanted]
        if rows:
            cells = batch.column(0)
            for r in rows:
                data, ref = _bytes_of(cells[r - start].as_py())
                index = wanted[r]
                if data is not None:
                    yield Blob(index, data, state.size, state.mtime_ns)
                elif ref:
                    blob = read_file_blob(index, ref)  # size/mtime of the shard: the row's state
                    yield Blob(index, blob.data, state.size, state.mtime_ns, blob.error)
                else:
                    yield Blob(index, None, state.size, state.mtime_ns,
                               ("MissingImage", f"row {r} of column {column!r} holds no image bytes"))
        start = stop
        if start > last:
            break
    if start <= last:
        raise OSError(f"{path}: has {start} rows, {last + 1} were listed")
