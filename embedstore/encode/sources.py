"""Image sources: list the images of a folder or list file, their labels and file state.

A source is an ordered list of :class:`SourceItem` (key = path relative to the source root, with
``/`` separators; order = natural sort of the keys, as the seed's ``natsort`` did). A folder whose
images all sit in first-level subfolders is labelled by those subfolder names; any other folder is
unlabelled. A ``.txt`` list has one path per line; a ``.csv`` list has a ``path`` column and an
optional ``label`` column. Relative paths in a list are relative to the list file's folder.

:func:`decode_image` decodes one file into an RGB PIL image, or raises :class:`ImageLoadError` with a
type and message fit for the failure log. Pillow's decompression-bomb limit stays on, and only the
formats in :data:`ALLOWED_FORMATS` reach a decoder (never EPS/PS/PDF, whose Pillow plugins run
Ghostscript): a file of another format is recorded as ``format not allowed: <format>``.
:func:`read_bytes` reads regular files only (a FIFO, a device such as ``/dev/zero`` or a socket is
recorded, never opened for reading), up to :data:`MAX_FILE_BYTES`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from embedstore.errors import SourceError
from embedstore.util.order import natural_order

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
LIST_SUFFIXES = (".txt", ".csv")
SUPPORTED_SOURCES = ("a folder of images (class subfolders become labels), a .txt list (one image path per line), "
                     "a .csv list (a 'path' column and an optional 'label' column), with local paths relative "
                     "to the list file's folder, WebDataset .tar shards, .parquet or .arrow files with image "
                     "bytes in a column, or a saved Hugging Face dataset (--hf-dataset)")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Pillow formats that may be decoded: pure decoders, no external programs (EPS, PS and PDF would
# start Ghostscript). JPEG includes MPO (camera files), which Pillow's JPEG plugin opens.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
MAX_FILE_BYTES = 512 << 20  # a larger "image" is recorded as FileTooLarge, never read into memory
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class FileState:
    """What change detection compares: size and mtime, and optionally a content hash."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SourceItem:
    """One image of a source.

    For an image inside a shard (a tar member, a Parquet or Arrow row), ``path`` and ``state``
    are the shard file's, ``shard`` names the shard (its path relative to the shard set's folder)
    and ``member`` says where the image is in it (see :mod:`embedstore.encode.sources_shards`).
    """

    key: str
    path: str
    label: Optional[str]
    state: FileState
    shard: Optional[str] = None
    member: Optional[Any] = None

    @property
    def unit(self) -> str:
        """What a torchrun rank takes whole: the shard of a shard member, else the image's key."""
        return self.shard if self.shard is not None else self.key


@dataclass(frozen=True)
class Source:
    """An ordered image listing. ``labels`` is ``None`` for unlabelled sources."""

    location: str
    items: tuple[SourceItem, ...]
    labelled: bool

    @property
    def default_name(self) -> str:
        """Dataset name used when the user gives none: the folder name or list-file stem."""
        path = Path(self.location)
        return path.stem if path.is_file() else path.name

    @property
    def classes(self) -> list[str]:
        """Sorted distinct labels (empty when unlabelled)."""
        return sorted({item.label for item in self.items if item.label is not None})

    def __len__(self) -> int:
        return len(self.items)


def file_state(path: str) -> FileState:
    """Size and mtime of ``path`` (follows symlinks)."""
    st = os.stat(path)
    return FileState(size=st.st_size, mtime_ns=st.st_mtime_ns)


def content_hash(data: bytes) -> str:
    """Hex digest stored per row and compared by ``--strict``."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str) -> str:
    """:func:`content_hash` of a file's bytes (read as :func:`read_bytes` does).

    Raises:
        OSError: the file cannot be read (also a FIFO, a device or an oversized file).
    """
    try:
        return content_hash(read_bytes(path))
    except ImageLoadError as exc:
        raise OSError(f"{path}: {exc.message}") from None


def _walk_images(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def _item(root: Path, path: Path, label: Optional[str], key: Optional[str] = None) -> SourceItem:
    try:
        state = file_state(str(path))
    except OSError:
        state = FileState(size=-1, mtime_ns=-1)  # unreadable: load_image records the failure
    if key is None:
        key = path.relative_to(root).as_posix()
    return SourceItem(key=key, path=str(path), label=label, state=state)


def _list_folder(root: Path) -> Source:
    paths = list(_walk_images(root))
    labelled = bool(paths) and all(len(p.relative_to(root).parts) >= 2 for p in paths)
    items = [_item(root, p, p.relative_to(root).parts[0] if labelled else None) for p in paths]
    return _ordered(str(root), items, labelled)


def _unsupported(path: Path) -> Optional[str]:
    """Why ``path`` (a file) is not a source we read, or None for a .txt/.csv list."""
    suffix = path.suffix.lower()
    if suffix in LIST_SUFFIXES:
        return None
    if suffix in IMAGE_EXTENSIONS:
        return "a single image, not a source; put it in a folder (or list it in a .txt file)"
    names = path.name.lower()
    if names.endswith((".tar.gz", ".tar.bz2", ".tar.xz", ".tgz")):
        return ("a compressed tar; shards are read in place, member by member, so decompress it first "
                "(e.g. `gunzip`) and encode the .tar")
    if suffix in (".zip", ".gz", ".bz2", ".xz", ".7z"):
        return "an archive; unpack it into a folder first (only uncompressed .tar shards are read)"
    if suffix == ".tsv":
        return "a .tsv file; save it as a .csv with a 'path' column (tab-separated lists are not read)"
    return f"a {suffix or 'suffix-less'} file, not a supported image list"


def _list_file(list_path: Path) -> Source:
    why = _unsupported(list_path)
    if why is not None:
        raise SourceError(f"{list_path}: {why}. Supported sources: {SUPPORTED_SOURCES}.")
    base = list_path.parent
    rows: list[tuple[str, Optional[str]]] = []
    try:
        text = list_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{list_path}: cannot read list file ({exc})") from exc
    if list_path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise SourceError(f"{list_path}: a CSV image list needs a 'path' column (has {reader.fieldnames})")
        has_label = "label" in reader.fieldnames
        for line_no, row in enumerate(reader, start=2):
            path = (row.get("path") or "").strip()
            if not path:
                raise SourceError(f"{list_path}:{line_no}: empty 'path'")
            label = (row.get("label") or "").strip() if has_label else None
            if has_label and not label:
                raise SourceError(f"{list_path}:{line_no}: empty 'label' (every row needs one when the column exists)")
            rows.append((path, label))
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append((line, None))
    seen: set[str] = set()
    items = []
    for raw, label in rows:
        if _URL.match(raw):
            raise SourceError(f"{list_path}: {raw!r} is a URL; lists name local files (download the images "
                              f"first). Supported sources: {SUPPORTED_SOURCES}.")
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        try:
            key = path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            key = path.resolve().as_posix()
        if key in seen:
            raise SourceError(f"{list_path}: image {raw!r} is listed twice")
        seen.add(key)
        items.append(_item(base, path, label, key=key))
    labelled = bool(items) and all(item.label is not None for item in items)
    return _ordered(str(list_path), items, labelled)


def _ordered(location: str, items: list[SourceItem], labelled: bool) -> Source:
    order = natural_order([item.key for item in items])
    return Source(location=location, items=tuple(items[i] for i in order), labelled=labelled)


def list_source(location: str | os.PathLike[str]) -> Source:
    """List the images of a folder or a ``.txt``/``.csv`` list file, in natural key order.

    A shard location (``.tar``/``.parquet``/``.arrow`` files, globs and brace ranges, a
    ``hf-dataset:`` location) is listed by :func:`embedstore.encode.sources_shards.list_shard_source`
    with default column options.

    Relative paths in a list file resolve against the list file's folder (not the working
    directory); the keys are those paths relative to that folder.

    Raises:
        SourceError: the location does not exist, is empty, is not a supported source (an
            archive, a single image, a ``.tsv`` or other file; a URL in a list), or a list file is
            malformed.
    """
    from embedstore.encode import sources_shards

    if sources_shards.is_shard_location(str(location)):
        return sources_shards.list_shard_source([str(location)])
    path = Path(location).expanduser()
    if path.is_dir():
        source = _list_folder(path.resolve())
    elif path.is_file():
        source = _list_file(path.resolve())
    else:
        raise SourceError(f"{path}: no such folder or image list")
    if not source.items:
        shards = sorted({p.suffix for p in path.iterdir() if p.suffix in sources_shards.SHARD_SUFFIXES}) \
            if path.is_dir() else []
        hint = f"; to encode the shards in it, name them: '{path}/*{shards[0]}'" if shards else ""
        raise SourceError(
            f"{path}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}){hint}"
        )
    return source


class ImageLoadError(Exception):
    """A file could not be decoded; ``kind`` is a short type name for the failure log."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def _to_rgb(image):  # noqa: ANN001, ANN202 - PIL types stay lazy
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_image(data: bytes):  # noqa: ANN201 - returns a PIL image
    """Decode image bytes to an RGB PIL image (EXIF orientation applied, alpha over white).

    Raises:
        ImageLoadError: empty, truncated, corrupt or oversized (decompression bomb) data.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageLoadError("EmptyFile", "file has 0 bytes")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError("DecompressionBombError", str(exc)) from exc
    except UnidentifiedImageError as exc:
        detected = sniff_format(data)
        if detected is not None and detected not in ALLOWED_FORMATS:
            raise ImageLoadError("FormatNotAllowed", f"format not allowed: {detected}") from None
        raise ImageLoadError("UnidentifiedImageError", "not a readable image") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(type(exc).__name__, str(exc) or repr(exc)) from exc


def sniff_format(data: bytes) -> Optional[str]:
    """The Pillow format whose signature ``data`` starts with (no decoder or plugin ``open`` runs),
    or None when no plugin recognises it."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a plugin's signature check failing only means "not this one"
            continue
    return None


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_bytes(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """Read a regular file of at most ``limit`` bytes, turning every problem into :class:`ImageLoadError`.

    The file is opened non-blocking (a FIFO does not wait for a writer) and checked with
    ``fstat`` before anything is read: FIFOs, devices (a symlink to ``/dev/zero``) and sockets
    are refused as ``NotARegularFile``, larger files as ``FileTooLarge``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageLoadError(type(exc).__name__, exc.strerror or str(exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise ImageLoadError("NotARegularFile", f"{kind}; only regular files are read")
        if st.st_size > limit:
            raise ImageLoadError("FileTooLarge", f"{st.st_size:,} bytes; image files over {limit:,} bytes are not read")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise ImageLoadError("FileTooLarge", f"grew past {limit:,} bytes while it was read")
        return data
    except OSError as exc:
        raise ImageLoadError(type(exc).__name__, exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)


def unusable_key(key: str) -> Optional[str]:
    """Why a key cannot be stored (a line break: exports keep one key per line), or None."""
    if "\n" in key or "\r" in key:
        return "the file name contains a line break (keys.txt holds one key per line); rename the file"
    return None
