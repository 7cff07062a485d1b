"""Shard sources: images stored inside files (WebDataset tars, Parquet or Arrow tables, saved
Hugging Face datasets), listed without extracting anything and read shard by shard.

This module owns the shard *set*: expanding brace ranges and globs as webdataset spells them
(``data/{00000..00099}.tar``, ``train-*.parquet``), the set's location (recorded in the store,
compared by ``check_source``) and default dataset name, the options that pick columns and class
names, listing every shard into :class:`~embedstore.encode.sources.SourceItem` rows, and reading
a shard's wanted members back as :class:`~embedstore.encode.samples.Blob` in file order.

Each listed image keeps the shard file's size and mtime as its state, so change detection,
failure records, resume and the torchrun merge work per shard through the same code as for
folders: an unchanged shard's rows are cached, a changed shard's rows are encoded again.
Keys are ``<shard>/<sample key>`` (``00042.tar/000420017``), ``<shard>/<row>`` for a table
without a key column, or the key column's values.

The formats live in :mod:`embedstore.encode.sources_tar` (tarfile) and
:mod:`embedstore.encode.sources_table` (pyarrow); :mod:`embedstore.encode.sources_hf` opens a
saved dataset with ``datasets`` and lists its Arrow files here.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from embedstore.encode.samples import Blob
from embedstore.encode.sources import (
    FileState,
    Source,
    SourceItem,
    _ordered,
    file_state,
)
from embedstore.errors import SourceError

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".parquet", ".arrow")
HF_PREFIX = "hf-dataset:"
_PATTERN_CHARS = re.compile(r"[*?\[{]")


@dataclass(frozen=True)
class ShardOptions:
    """Which parts of a shard hold the image, the label and the key.

    ``image_column``: a table column (default ``image``, else the only binary column) or, for
    tars, the image member's extension (default: the sample's only image member).
    ``label_column``: a table column (default ``label`` when present) or, for tars, a member
    extension (``cls``, ``txt``) or ``json:FIELD`` (default ``cls`` when every sample has one).
    ``key_column``: a table column whose values are the keys (default ``<shard>/<row>``).
    ``classes``: names of integer labels (label ``i`` is ``classes[i]``); without it a
    dataset's own ``ClassLabel`` names are used, else the integers themselves.
    ``classes_file``: the file ``classes`` were read from (recorded in the location, so that the
    source can be listed again from it); see :meth:`from_classes_file`.
    """

    image_column: Optional[str] = None
    label_column: Optional[str] = None
    key_column: Optional[str] = None
    classes: Optional[tuple[str, ...]] = None
    classes_file: Optional[str] = None

    @classmethod
    def from_classes_file(cls, path: Optional[str | os.PathLike[str]], **columns: Optional[str]) -> "ShardOptions":
        """Options with the class names of ``path`` (see :func:`load_classes`), if any."""
        if path is None:
            return cls(**columns)
        return cls(**columns, classes=load_classes(path), classes_file=Path(path).resolve().as_posix())

    def fragment(self, first: Sequence[tuple[str, str]] = ()) -> str:
        """The options as a location suffix (``#key=id&classes=/abs/classes.txt``), or ``""``.

        The location recorded in a store thus says how its source was read: ``info`` and
        ``soup --val`` list it again the same way, and the same files read with other columns
        are another source (``check_source``)."""
        from urllib.parse import urlencode

        pairs = list(first) + [(k, v) for k, v in (("image", self.image_column), ("label", self.label_column),
                                                   ("key", self.key_column)) if v is not None]
        if self.classes is not None:
            digest = hashlib.blake2b("\n".join(self.classes).encode(), digest_size=6).hexdigest()
            pairs.append(("classes", self.classes_file or f"names:{len(self.classes)}:{digest}"))
        return "#" + urlencode(pairs, safe="/:*{}") if pairs else ""


def split_location(location: str) -> tuple[str, dict[str, str], ShardOptions]:
    """``(base, extra fields, options)`` of a location made with :meth:`ShardOptions.fragment`.

    Raises:
        SourceError: an unknown field, or class names that were not read from a file.
    """
    from urllib.parse import parse_qsl

    base, _, fragment = location.partition("#")
    fields = dict(parse_qsl(fragment, keep_blank_values=True))
    columns = {f"{k}_column": fields.pop(k) for k in ("image", "label", "key") if k in fields}
    classes = fields.pop("classes", None)
    extra = {k: fields.pop(k) for k in ("split",) if k in fields}
    if fields:
        raise SourceError(f"{location}: unknown location field(s) {', '.join(sorted(fields))}")
    if classes is not None and classes.startswith("names:"):
        raise SourceError(f"{location}: was read with class names given in code ({classes}); list it with "
                          "ShardOptions(classes=...) again")
    return base, extra, ShardOptions.from_classes_file(classes, **columns)


def load_classes(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names from a file, one per line (line ``i`` names integer label ``i``).

    Raises:
        SourceError: the file cannot be read, is empty or names a class twice.
    """
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"--classes {path}: cannot read it ({exc})") from None
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise SourceError(f"--classes {path}: needs one class name per line, without blank lines")
    if len(set(names)) != len(names):
        raise SourceError(f"--classes {path}: a class is named twice")
    return tuple(names)


def is_shard_location(location: str) -> bool:
    """True for what :func:`list_shard_source` reads: a ``.tar``/``.parquet``/``.arrow`` path,
    a glob or brace pattern that is not itself an existing path, or a ``hf-dataset:`` location."""
    if location.startswith(HF_PREFIX):
        return True
    location = location.partition("#")[0] if not os.path.exists(location) else location
    if location.lower().endswith(SHARD_SUFFIXES):
        return True
    return bool(_PATTERN_CHARS.search(location)) and not os.path.exists(location)


def expand_shards(patterns: Sequence[str]) -> list[Path]:
    """Shard files named by ``patterns`` (brace ranges ``{000..099}``, then globs), resolved,
    each once, in the order given.

    Raises:
        SourceError: a pattern matches nothing, or names a file that is not a shard.
    """
    from braceexpand import braceexpand

    found: dict[Path, None] = {}
    for pattern in patterns:
        for name in braceexpand(str(pattern)):
            name = os.path.expanduser(name)
            matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
            if not matches or not all(os.path.exists(m) for m in matches):
                missing = name if not matches else next(m for m in matches if not os.path.exists(m))
                raise SourceError(f"{missing}: no such shard (from {pattern!r}); check the path or pattern")
            for m in matches:
                path = Path(m).resolve()
                if path.suffix.lower() not in SHARD_SUFFIXES or not path.is_file():
                    raise SourceError(f"{m}: not a shard file (from {pattern!r}); shards are "
                                      f"{', '.join(SHARD_SUFFIXES)} files, each given or matched by a pattern")
                found[path] = None
    if not found:
        raise SourceError(f"{', '.join(map(str, patterns))}: no shard files")
    return list(found)


def shard_set_name(paths: Sequence[Path]) -> tuple[Path, str, str]:
    """``(folder, location, default dataset name)`` of a shard set.

    The folder is the shards' common folder; the location is a pattern over it made of the
    file names' common prefix before their numbers (``/data/train-*.parquet``,
    ``/data/*.tar``), so that a set that gains shards keeps its location, and two sets in one
    folder (``train-*``, ``test-*``) get two. The name is that prefix (``train``), else the
    folder's name.
    """
    folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
    rels = [p.relative_to(folder).as_posix() for p in paths]
    suffixes = sorted({p.suffix.lower() for p in paths})
    prefix = os.path.commonprefix(rels) if len(rels) > 1 else re.sub(r"\d+$", "", Path(rels[0]).stem)
    prefix = re.sub(r"\d+$", "", prefix.split("{")[0])
    if len(rels) > 1 or prefix != Path(rels[0]).stem:
        location = f"{folder.as_posix()}/{prefix}*{suffixes[0] if len(suffixes) == 1 else ''}"
    else:
        location = paths[0].as_posix()
    name = re.sub(r"[-_.]+$", "", Path(prefix).name) or folder.name
    return folder, location, name


@dataclass(frozen=True)
class _Listing:
    items: list[SourceItem]
    labelled: bool


def list_shard_source(patterns: Sequence[str], options: ShardOptions = ShardOptions()) -> Source:
    """List the images of the shard files (or the ``hf-dataset:`` location) ``patterns`` name.

    One pattern may be a location a store recorded (with a ``#...`` suffix of options); it is
    listed with those options. Every shard is listed (tar headers and label members, table key and label columns; no
    image bytes are read), its images keyed and labelled as :class:`ShardOptions` says.

    Raises:
        SourceError: no shards, a truncated or unreadable shard (named), a missing column, keys
            that repeat, labels out of the class list, or no images at all.
    """
    if len(patterns) == 1 and "#" in str(patterns[0]) and not os.path.exists(patterns[0]):
        base, extra, recorded = split_location(str(patterns[0]))
        if options != ShardOptions() and options != recorded:
            raise SourceError(f"{patterns[0]}: the location names its options; give them there or as options, "
                              "not both")
        patterns, options = [base], recorded
        if base.startswith(HF_PREFIX):
            from embedstore.encode.sources_hf import list_hf_location

            return list_hf_location(base[len(HF_PREFIX):], extra.get("split"), options)
    elif len(patterns) == 1 and str(patterns[0]).startswith(HF_PREFIX):
        from embedstore.encode.sources_hf import list_hf_location

        return list_hf_location(str(patterns[0])[len(HF_PREFIX):], None, options)
    paths = expand_shards(patterns)
    folder, location, name = shard_set_name(paths)
    return list_shards(paths, folder, location + options.fragment(), name, options)


def list_shards(paths: Sequence[Path], folder: Path, location: str, name: str, options: ShardOptions,
                default_labels: Optional[str] = None) -> Source:
    """List ``paths`` (shards under ``folder``) into a :class:`ShardSource` called ``location``.

    ``default_labels``: the label column to use when ``options`` names none (a dataset's own).
    """
    from embedstore.encode import sources_table, sources_tar

    items: list[SourceItem] = []
    labelled = True
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        try:
            state = file_state(str(path))
        except OSError as exc:
            raise SourceError(f"{path}: cannot read the shard ({exc})") from None
        if path.suffix.lower() == ".tar":
            listing = sources_tar.list_tar(path, rel, state, options)
        else:
            listing = sources_table.list_table(path, rel, state, options, default_labels)
        items.extend(listing.items)
        labelled = labelled and listing.labelled
    if not items:
        raise SourceError(f"{location}: no images in {len(paths)} shard(s)")
    seen: dict[str, Optional[str]] = {}
    for item in items:
        if item.key in seen:
            other = seen[item.key]
            raise SourceError(f"{location}: key {item.key!r} appears twice ({other} and {item.shard}); "
                              "keys must be unique (a --key-column with unique values, or leave it out)")
        seen[item.key] = item.shard
    if not labelled:
        items = [SourceItem(i.key, i.path, None, i.state, i.shard, i.member) for i in items]
    source = _ordered(location, items, labelled)
    return ShardSource(source.location, source.items, source.labelled, name)


@dataclass(frozen=True)
class ShardSource(Source):
    """A :class:`Source` whose images live in shard files; ``name`` is its default dataset name."""

    name: str = ""

    @property
    def default_name(self) -> str:
        return self.name


def label_name(value: object, classes: Optional[Sequence[str]], where: str) -> str:
    """A label value as the class name stored: ``classes[value]`` for an integer when class
    names are known, else the value as text.

    Raises:
        SourceError: an integer outside the class list (``where`` names the row).
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if classes is not None:
        try:
            number = int(str(value).strip())
        except ValueError:
            return str(value).strip()
        if not 0 <= number < len(classes):
            raise SourceError(f"{where}: label {number} is outside the {len(classes)} class names")
        return classes[number]
    return str(value).strip()


def check_state(path: str, state: FileState) -> Optional[tuple[str, str]]:
    """None while a shard is as listed, else the error its unread images are recorded with."""
    try:
        now = file_state(path)
    except OSError as exc:
        return type(exc).__name__, f"shard {path}: {exc}"
    if now != state:
        return "ShardChanged", f"shard {path} changed while it was read; run the command again"
    return None


def shard_groups(items: Sequence[SourceItem]) -> list[list[int]]:
    """Indices of ``items`` grouped by shard (shards in first-seen order, members in file order)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.path].append(i)
    return list(groups.values())


def read_group(items: Sequence[SourceItem], indices: Sequence[int]) -> Iterator[Blob]:
    """Stream the images ``indices`` (all of one shard) as blobs; a shard that cannot be read,
    or changed since it was listed, gives every unread image a blob with that error."""
    from embedstore.encode import sources_table, sources_tar

    first = items[indices[0]]
    state = first.state
    problem = check_state(first.path, state)
    done: set[int] = set()
    if problem is None:
        reader = sources_tar.read_tar if first.path.lower().endswith(".tar") else sources_table.read_table
        try:
            for blob in reader(first.path, [(i, items[i].member) for i in indices], state):
                done.add(blob.index)
                yield blob
        except (OSError, ValueError) as exc:  # pyarrow's errors are ValueError/OSError subclasses
            problem = (type(exc).__name__, f"shard {first.path}: {exc}")
    if problem is not None:
        for i in indices:
            if i not in done:
                yield Blob(i, None, state.size, state.mtime_ns, problem)


def resolve_source(sources: Sequence[str], options: ShardOptions = ShardOptions(),
                   hf_dataset: Optional[str] = None, split: Optional[str] = None) -> Source:
    """The source the ``encode`` command's arguments name: one folder or list file, shard files
    and patterns, or a saved Hugging Face dataset (``hf_dataset``, ``split``).

    Raises:
        SourceError: nothing or too much is named, a path does not exist, column options are given
            for a folder or list, or the listing fails.
    """
    from embedstore.encode.sources import list_source

    column_flags = [flag for flag, value in (("--image-column", options.image_column),
                                             ("--label-column", options.label_column),
                                             ("--key-column", options.key_column),
                                             ("--classes", options.classes)) if value is not None]
    if hf_dataset is not None:
        if sources:
            raise SourceError(f"--hf-dataset {hf_dataset}: give either SOURCE or --hf-dataset, not both")
        from embedstore.encode.sources_hf import list_hf_location

        return list_hf_location(hf_dataset, split, options)
    if split is not None:
        raise SourceError("--split applies to --hf-dataset")
    if not sources:
        raise SourceError("give a SOURCE (a folder, a list file, shard files or patterns) or --hf-dataset DIR")
    if any(is_shard_location(s) for s in sources):
        return list_shard_source(list(sources), options)
    if len(sources) > 1:
        raise SourceError(f"{len(sources)} sources given ({sources[0]}, {sources[1]}, ...): several SOURCE "
                          "arguments must all be .tar, .parquet or .arrow shards; encode folders one at a time")
    if not os.path.exists(sources[0]):
        raise SourceError(f"{sources[0]}: path does not exist")
    if column_flags:
        raise SourceError(f"{', '.join(column_flags)}: for shard sources (.tar, .parquet, .arrow, --hf-dataset), "
                          f"not for {sources[0]}")
    return list_source(sources[0])
