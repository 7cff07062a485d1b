"""``embedstore rm``: remove what is no longer wanted from a cache, never beside a writer.

What can go (:func:`plan_removal` selects, :func:`remove` deletes):

- image stores of a dataset (all, one encoder's, or one view), with their indexes and logits;
- an encoder's text banks (one per weights digest it had);
- empty stores: store folders whose runs committed no row (every image failed) or nothing at all
  (killed before the first commit);
- derived data: the saved indexes of stores (``--index``) and the logit cache (``<cache>/logits``);
  both are rebuilt on demand.

Each store (and its index) is removed while holding its write lock, so a store being written by
``encode`` or an index being built is refused with the writer named, and nothing is removed. A
removed folder is first renamed into ``<cache>/.trash/`` (one atomic step: readers see the store
or nothing), then deleted; leftovers of an interrupted removal are deleted by the next one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from embedstore.errors import SpecError
from embedstore.store.cache import Cache, StoreLocation
from embedstore.store.logit_cache import logits_folder
from embedstore.store.spec import EncoderSpec
from embedstore.store.store import LOCK
from embedstore.store.views import ViewOptions
from embedstore.util.fsutil import WriteLock

log = logging.getLogger(__name__)

TRASH = ".trash"
INDEX_DIR = "index"  # embedstore.search.index.INDEX_DIR (not imported: that module imports faiss's wrapper)
LOGITS_DIR = "logits"


@dataclass(frozen=True)
class Target:
    """One folder to remove, what it is, its size, and the lock files to hold while removing it."""

    what: str
    path: Path
    bytes: int
    locks: tuple[Path, ...] = field(default_factory=tuple)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _store_rows(path: Path) -> Optional[int]:
    """Rows of the store at ``path`` per its manifest; None when nothing was ever committed."""
    from embedstore.errors import CorruptStoreError, StoreNotFoundError
    from embedstore.store.store import Store

    try:  # validated: a damaged or foreign manifest counts as nothing readable (rm still removes it)
        return int(Store(path).manifest().get("rows", 0))
    except (CorruptStoreError, StoreNotFoundError):
        return None


def _store_targets(cache: Cache, location: StoreLocation, index_only: bool) -> list[Target]:
    path = location.path
    index = path / INDEX_DIR
    label = f"dataset {location.dataset!r}, encoder {location.encoder_id}, view {location.view_key}"
    if index_only:
        return [Target(f"index of {label}", index, folder_bytes(index), (path / LOCK, index / LOCK))] \
            if index.is_dir() else []
    out = [Target(f"store of {label}", path, folder_bytes(path), (path / LOCK, index / LOCK))]
    logits = logits_folder(cache.root, path)
    if logits.is_dir():
        out.append(Target(f"logits of {label}", logits, folder_bytes(logits)))
    return out


def _store_folders(cache: Cache) -> Iterator[StoreLocation]:
    """Every store folder under ``datasets/``, committed or not (``Cache.stores`` lists committed ones)."""
    base = cache.root / "datasets"
    if not base.is_dir():
        return
    for view_dir in sorted(base.glob("*/*/*")):
        if view_dir.is_dir() and not view_dir.name.startswith("."):
            yield StoreLocation(view_dir.parent.parent.name, view_dir.parent.name, view_dir.name, view_dir)


def plan_removal(cache: Cache, dataset: Optional[str] = None, spec: Optional[EncoderSpec] = None,
                 view: Optional[ViewOptions] = None, texts: bool = False, empty: bool = False,
                 index: bool = False, logits: bool = False) -> list[Target]:
    """What ``embedstore rm`` with these options would remove (nothing is touched).

    ``dataset`` selects its stores (narrowed to ``spec``'s encoder, and to one view when ``view``
    sets any option); with ``index`` only their saved indexes. ``texts`` selects ``spec``'s text
    bank, ``empty`` every store without rows, ``logits`` the whole logit cache.

    Raises:
        SpecError: nothing to select by, or a selection that matches nothing (named).
    """
    if not (dataset or texts or empty or logits or index):
        raise SpecError("say what to remove: --dataset NAME (its stores), --texts --model M (a text bank), "
                        "--empty (stores left without rows), --index (with --dataset: saved indexes) "
                        "or --logits (the logit cache)")
    if texts and spec is None:
        raise SpecError("--texts: give --model (and --pretrained) of the encoder whose text bank to remove")
    if index and dataset is None and not logits:
        raise SpecError("--index: give --dataset NAME (and optionally --model / view options) whose indexes to remove")
    targets: list[Target] = []
    if dataset is not None:
        locations = [loc for loc in _store_folders(cache) if loc.dataset == dataset]
        if spec is not None:
            locations = [loc for loc in locations if loc.encoder_id == spec.id]
            if view is not None and view != ViewOptions():
                key = cache.resolve_view(spec, view).key
                locations = [loc for loc in locations if loc.view_key == key]
        if not locations:
            narrowed = f" encoded by {spec}" if spec is not None else ""
            raise SpecError(f"dataset {dataset!r} has no stores{narrowed} in {cache.root} (`embedstore info` lists them)")
        for loc in locations:
            targets += _store_targets(cache, loc, index_only=index)
        if index and not targets:
            raise SpecError(f"dataset {dataset!r}: no saved index to remove")
    if texts:
        assert spec is not None
        banks = sorted(p for p in cache.encoder_dir(spec).glob("texts*") if p.is_dir())
        if not banks:
            raise SpecError(f"no text bank of {spec} in {cache.root}")
        for bank in banks:  # one per weights digest the encoder had
            targets.append(Target(f"text bank of {spec} ({bank.name})", bank, folder_bytes(bank), (bank / LOCK,)))
    if empty:
        chosen = {t.path for t in targets}
        for loc in _store_folders(cache):
            rows = _store_rows(loc.path)
            if loc.path not in chosen and not rows:
                state = "no row committed" if rows == 0 else "nothing committed"
                targets += [Target(f"empty store ({state}) of dataset {loc.dataset!r}, encoder {loc.encoder_id}, "
                                   f"view {loc.view_key}", loc.path, folder_bytes(loc.path),
                                   (loc.path / LOCK, loc.path / INDEX_DIR / LOCK))]
    if logits:
        folder = cache.root / LOGITS_DIR
        if folder.is_dir():
            targets.append(Target("logit cache (recomputed on demand)", folder, folder_bytes(folder)))
    return targets


def remove(cache: Cache, targets: list[Target]) -> int:
    """Remove ``targets``; return the bytes freed.

    Every target's locks are taken first (all or nothing), so a store being written or an index
    being built is refused before anything is removed.

    Raises:
        StoreLockedError: a writer holds one of the locks (the message names it).
    """
    trash = cache.root / TRASH
    _empty_trash(trash)
    with contextlib.ExitStack() as held:
        for target in targets:
            for lock in target.locks:
                if lock.parent.is_dir():
                    held.enter_context(WriteLock(lock, target.what))
        trash.mkdir(parents=True, exist_ok=True)
        moved = []
        for target in targets:
            if target.path.exists():
                away = trash / uuid.uuid4().hex
                os.replace(target.path, away)  # one step: readers see the folder or nothing
                moved.append(away)
                log.info("removed %s (%s)", target.what, target.path)
    for away in moved:
        shutil.rmtree(away, ignore_errors=True)
    _remove_empty_parents(cache, [t.path for t in targets])
    _empty_trash(trash)
    return sum(t.bytes for t in targets)


def _empty_trash(trash: Path) -> None:
    if trash.is_dir():
        for leftover in trash.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        with contextlib.suppress(OSError):
            trash.rmdir()


def _remove_empty_parents(cache: Cache, paths: list[Path]) -> None:
    """Drop dataset and encoder folders left empty (never the cache's top-level folders)."""
    stop = {cache.root.resolve(), (cache.root / "datasets").resolve(), (cache.root / "encoders").resolve()}
    for path in paths:
        parent = path.parent
        while parent.resolve() not in stop and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
