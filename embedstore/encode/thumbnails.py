"""Thumbnails of source images for the playground (``embedstore serve``): decoded with the same
safe path as encoding (:func:`embedstore.encode.sources.read_bytes` refuses non-regular and
oversized files, :func:`~embedstore.encode.sources.decode_image` decompression bombs and formats
not allowed), resized to at most ``size`` pixels a side, sent as JPEG. Never the whole file.
"""
from __future__ import annotations

import functools
import io
from pathlib import Path

from embedstore.encode.sources import ImageLoadError, decode_image, read_bytes
from embedstore.errors import SourceError

MAX_SIDE = 512
MAX_SOURCE_BYTES = 64 << 20


@functools.lru_cache(maxsize=2048)
def _thumbnail(path: str, size: int, mtime_ns: int) -> bytes:
    from PIL import Image

    try:
        image = decode_image(read_bytes(path, MAX_SOURCE_BYTES))
    except ImageLoadError as exc:
        raise SourceError(f"{path}: cannot make a thumbnail ({exc})") from None
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def thumbnail(path: Path, size: int = 160) -> bytes:
    """JPEG bytes of ``path`` resized to fit ``size`` x ``size`` (1..512 px); kept in a small
    in-memory cache keyed by the file's mtime.

    Raises:
        SourceError: the file is missing, not a regular file, too large or not a readable image.
    """
    if not 1 <= size <= MAX_SIDE:
        raise SourceError(f"thumbnail size {size}: must be in 1..{MAX_SIDE}")
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError as exc:
        raise SourceError(f"{path}: cannot make a thumbnail ({exc.strerror or exc})") from None
    return _thumbnail(str(path), int(size), mtime)
