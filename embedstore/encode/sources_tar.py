"""WebDataset tar shards: list samples with the standard library's ``tarfile``, read images in place.

A WebDataset shard groups members into samples by key: ``000420017.jpg``, ``000420017.cls``,
``000420017.json`` are the sample ``000420017`` (the key is the member name up to the first dot of
its file name, as webdataset splits it). Listing walks the tar's headers (tarfile seeks over the
data) and reads only the small label members; each image is kept as its data's offset and size,
so reading a shard later is one sequential pass of ``pread`` calls, no extraction and one image in
memory at a time. Only uncompressed tars are read (img2dataset's and webdataset's default): a
compressed one has no offsets to seek to.

A tar cut short (a download stopped early) is refused when listed, naming the file: a member's
data that runs past the end of the file, or a missing end-of-archive block.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from embedstore.encode.samples import Blob
from embedstore.encode.sources import (
    IMAGE_EXTENSIONS,
    MAX_FILE_BYTES,
    FileState,
    SourceItem,
)
from embedstore.errors import SourceError

if TYPE_CHECKING:
    from embedstore.encode.sources_shards import ShardOptions, _Listing

IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
LABEL_MEMBER_BYTES = 1 << 16  # a .cls/.txt/.json label member larger than this is not a label


@dataclass(frozen=True)
class TarMember:
    """Where an image's bytes are in its tar."""

    offset: int
    size: int


def split_name(name: str) -> tuple[str, str]:
    """``(sample key, extension)`` of a member name, as webdataset splits it (first dot of the
    file name): ``a/b/000.seg.png`` -> ``("a/b/000", "seg.png")``."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _truncated(path: Path, detail: str) -> SourceError:
    return SourceError(f"{path}: truncated tar ({detail}); the shard was cut short (an interrupted download or "
                       "copy): fetch or write it again, or leave it out of the shard list")


def _label(raw: bytes, spec: str, where: str) -> str:
    """The label text of a label member (``cls``/``txt``: its text, ``json:FIELD``: a field)."""
    text = raw.decode("utf-8", "replace").strip()
    if not spec.startswith("json:"):
        return text
    field = spec[len("json:"):]
    try:
        value = json.loads(text)[field]
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{where}: no field {field!r} in its .json member (--label-column {spec})") from None
    return str(value)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(2)


def list_tar(path: Path, rel: str, state: FileState, options: ShardOptions) -> _Listing:
    """List the image samples of one tar (see the module docstring).

    Raises:
        SourceError: the tar is truncated, unreadable or compressed; a sample has two image members
            and no ``--image-column`` picks one; a key repeats; a label is out of the class list.
    """
    from embedstore.encode.sources_shards import _Listing, label_name

    image_ext = options.image_column.lower().lstrip(".") if options.image_column else None
    label_spec = options.label_column
    label_ext = (label_spec.split(":", 1)[0] if label_spec.startswith("json:") else label_spec.lower().lstrip(".")) \
        if label_spec else None
    if label_spec and label_ext not in ("cls", "txt", "json"):
        raise SourceError(f"--label-column {label_spec}: for tar shards, a label is a member: cls, txt or json:FIELD")
    images: dict[str, tuple[str, TarMember]] = {}
    labels: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, ext = split_name(info.name)
                if not info.isreg() or not ext:
                    continue
                end = info.offset_data + info.size
                if end > state.size:
                    raise _truncated(path, f"member {info.name} ends at byte {end:,} but the file has {state.size:,}")
                if ext in ("cls", "txt", "json"):
                    if info.size <= LABEL_MEMBER_BYTES and (label_ext is None and ext == "cls" or ext == label_ext):
                        labels.setdefault(key, {})[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
                    continue
                if ext.rsplit(".", 1)[-1] not in IMAGE_EXTS or (image_ext is not None and ext != image_ext):
                    continue
                if key in images:
                    what = (f"two image members ({images[key][0]}, {ext}); pick one with --image-column EXT"
                            if images[key][0] != ext else "a member name twice")
                    raise SourceError(f"{path}: sample {key!r} has {what}")
                images[key] = (ext, TarMember(info.offset_data, info.size))
            end_of_data = tar.offset
    except tarfile.ReadError as exc:
        if _magic(path) in (b"\x1f\x8b", b"BZ", b"\xfd7", b"(\xb5"):
            raise SourceError(f"{path}: a compressed tar; shards are read in place, so decompress it first") from None
        raise SourceError(f"{path}: not a readable tar ({exc}); is the shard damaged?") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the shard ({exc})") from None
    if images and state.size < end_of_data + tarfile.BLOCKSIZE:
        raise _truncated(path, f"no end-of-archive block after byte {end_of_data:,}")
    want = label_ext or "cls"
    labelled = bool(images) and all(want in labels.get(key, {}) for key in images)
    if label_spec and images and not labelled:
        missing = next(key for key in images if want not in labels.get(key, {}))
        raise SourceError(f"{path}: sample {missing!r} has no .{want} member (--label-column {label_spec})")
    items = []
    for key, (_, member) in images.items():
        label = None
        if labelled:
            where = f"{path}: sample {key!r}"
            label = label_name(_label(labels[key][want], label_spec or "cls", where), options.classes, where)
        items.append(SourceItem(f"{rel}/{key}", str(path), label, state, rel, member))
    return _Listing(items, labelled)


def read_tar(path: str, members: Sequence[tuple[int, Optional[TarMember]]], state: FileState) -> Iterator[Blob]:
    """Read the listed members of one tar in file order, one image in memory at a time."""
    order = sorted(members, key=lambda m: m[1].offset if m[1] is not None else -1)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for index, member in order:
            assert member is not None
            if member.size > MAX_FILE_BYTES:
                yield Blob(index, None, state.size, state.mtime_ns,
                           ("FileTooLarge", f"{member.size:,} bytes; images over {MAX_FILE_BYTES:,} bytes are not read"))
                continue
            data = os.pread(fd, member.size, member.offset)
            if len(data) != member.size:
                raise OSError(f"short read at byte {member.offset:,}: the shard shrank")
            yield Blob(index, data, state.size, state.mtime_ns)
    finally:
        os.close(fd)
