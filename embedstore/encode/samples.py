"""What the decoding loaders hand to the encode loop: one sample per image, made from its bytes.

A :class:`Blob` is an image's bytes as read from wherever they live (a file, a tar member, a
Parquet or Arrow row) with the state change detection records (the file's or the shard's size
and mtime), or the error reading them raised. :func:`sample_from_blob` is the one path from bytes
to a sample, shared by the folder and shard loaders on the CPU and by the PIL path of
``--decode gpu``, so the same bytes give the same tensor, hash and failure record whatever
they were read from.

A sample is the tuple ``(index, tensor or None, size, mtime_ns, content hash, error type,
message)`` the encode loop consumes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from embedstore.encode.sources import (
    ImageLoadError,
    content_hash,
    decode_image,
    read_bytes,
)

Sample = tuple[Any, ...]


@dataclass(frozen=True)
class Blob:
    """One image's bytes (``data``), or why they could not be read (``error``: type, message)."""

    index: int
    data: Optional[bytes]
    size: int
    mtime_ns: int
    error: Optional[tuple[str, str]] = None


def read_file_blob(index: int, path: str, size: int = -1, mtime_ns: int = -1) -> Blob:
    """Read an image file (``stat`` then :func:`read_bytes`); problems become ``Blob.error``.
    ``size``/``mtime_ns``: the listed state, kept when the file cannot be stat'ed."""
    try:
        st = os.stat(path)
        size, mtime_ns = st.st_size, st.st_mtime_ns
        return Blob(index, read_bytes(path), size, mtime_ns)
    except ImageLoadError as exc:
        return Blob(index, None, size, mtime_ns, (exc.kind, exc.message))
    except OSError as exc:
        return Blob(index, None, size, mtime_ns, (type(exc).__name__, str(exc) or repr(exc)))


def sample_from_blob(blob: Blob, transform: Callable[[Any], Any]) -> Sample:
    """Hash, decode and transform a blob's bytes; any per-image problem becomes a failure sample."""
    if blob.error is not None:
        return blob.index, None, blob.size, blob.mtime_ns, "", blob.error[0], blob.error[1]
    try:
        digest = content_hash(blob.data or b"")
        tensor = transform(decode_image(blob.data or b""))
        return blob.index, tensor, blob.size, blob.mtime_ns, digest, "", ""
    except ImageLoadError as exc:
        return blob.index, None, blob.size, blob.mtime_ns, "", exc.kind, exc.message
    except Exception as exc:  # noqa: BLE001 - any per-image error is recorded, never fatal to the run
        return blob.index, None, blob.size, blob.mtime_ns, "", type(exc).__name__, str(exc) or repr(exc)
