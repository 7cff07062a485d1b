"""``embedstore verify [--repair]``: check every file of a cache, and repair what is damaged.

Checked: every image store and text bank (the manifest against its schema; every shard against
the manifest: size, HDF5 structure, shapes, dtypes, the whole-file sha256, and for a damaged
checksummed shard the chunks that fail), folders with shards but no manifest, encoder cards,
and saved FAISS indexes (pointer schema, file sizes and sha256, the store they belong to).

``repair`` (each store under its write lock, so never while an ``encode`` writes it; one atomic
manifest commit per store, the previous generation kept as usual):

- a damaged shard: rows in chunks that pass their checksum are kept (copied into a new shard),
  the others are dropped from the manifest; the next ``embedstore encode`` re-encodes exactly
  the dropped rows (for a text bank, the next command that needs those prompts encodes them);
- a shard written before per-chunk checksums is rewritten with them (its rows unchanged);
- a damaged or missing ``manifest.json``: the store falls back to ``manifest.prev.json``, the
  previous generation (rows committed after it are re-encoded by the next ``encode``);
- shard files with no manifest at all (a first commit that never finished) are removed;
- a damaged encoder card is removed (the next ``encode`` with that model writes it again);
- a damaged index (or one built before checksums were recorded) is rebuilt.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from embedstore.errors import (
    CorruptIndexError,
    CorruptStoreError,
    EmbedstoreError,
    IndexMismatchError,
)
from embedstore.search.index import (
    IndexOptions,
    build_index,
    check_belongs,
    check_files,
    read_pointer,
)
from embedstore.store.cache import Cache
from embedstore.store.inventory import all_stores
from embedstore.store.store import (
    MANIFEST,
    PREVIOUS,
    SHARDS,
    Store,
    damage_detail,
    new_shard,
)
from embedstore.store.views import View
from embedstore.util.fsutil import TMP_PREFIX

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found and did."""

    stores: int = 0
    banks: int = 0
    indexes: int = 0
    cards: int = 0
    problems: list[str] = field(default_factory=list)      # damage found
    repaired: list[str] = field(default_factory=list)      # what a repair did
    unrepaired: list[str] = field(default_factory=list)    # damage a repair could not fix
    notes: list[str] = field(default_factory=list)         # not damage, worth knowing

    @property
    def ok(self) -> bool:
        """True when nothing damaged is left (after a repair, when asked)."""
        return not self.unrepaired


def verify_cache(cache: Cache, repair: bool = False) -> VerifyReport:
    """Check (and with ``repair``, fix) every store, text bank, encoder card and index of ``cache``."""
    report = VerifyReport()
    for store in all_stores(cache):
        if store.is_text_bank:
            report.banks += 1
        else:
            report.stores += 1
        problems = store_problems(store)
        report.problems += problems
        if problems and repair:
            try:
                report.repaired += repair_store(store)
            except EmbedstoreError as exc:
                report.unrepaired.append(str(exc))
        elif problems:
            report.unrepaired += problems
        if not store.is_text_bank:
            _verify_index(store, repair, report)
    _verify_cards(cache, repair, report)
    return report


# ---- stores ------------------------------------------------------------------------------------
def store_problems(store: Store) -> list[str]:
    """Everything wrong with one store folder (empty if sound)."""
    shard_files = [p for p in (store.path / SHARDS).glob("shard-*.h5")] if (store.path / SHARDS).is_dir() else []
    if not store.manifest_path.exists() and not store.previous_path.exists():
        if shard_files:
            return [f"{store.what}: {len(shard_files)} shard file(s) in {store.path / SHARDS} but no {MANIFEST}: "
                    "nothing was committed (an interrupted first run?); the next `embedstore encode` starts "
                    "afresh, `embedstore verify --repair` removes them"]
        return []
    return store.verify()


def _base_manifest(store: Store) -> tuple[Optional[dict[str, Any]], str, bool]:
    """(manifest to repair from, what happened to get it, whether it is the current one)."""
    try:
        current = store.read_manifest_file(store.manifest_path)
        if current is not None:
            return current, "", True
        reason = f"{MANIFEST} is missing"
    except CorruptStoreError as exc:
        reason = f"{MANIFEST} is damaged ({damage_detail(exc)})"
    try:
        previous = store.read_manifest_file(store.previous_path)
    except CorruptStoreError as exc:
        previous = None
        reason += f", and so is {PREVIOUS} ({damage_detail(exc)})"
    if previous is None:
        return None, reason, False
    return previous, f"{reason}: fell back to the previous generation ({previous['generation']})", False


def repair_store(store: Store) -> list[str]:
    """Repair one store folder under its write lock; return one line per action.

    Raises:
        StoreLockedError: a writer is busy with it.
        CorruptStoreError: neither generation of the manifest is usable.
        WriteFailedError: the repaired shard or manifest could not be written (nothing changed).
    """
    actions: list[str] = []
    with store.lock():
        manifest, how, current = _base_manifest(store)
        if manifest is None:
            if store.manifest_path.exists():
                raise CorruptStoreError(
                    f"{store.what}: cannot repair: {how}; without a manifest its shards cannot be trusted. "
                    f"Remove the folder {store.path} and run `embedstore encode` again")
            removed = _remove_unlisted(store, set())
            return [f"{store.what}: removed {removed} shard file(s) that no manifest lists"]
        if how:
            actions.append(f"{store.what}: {how}")
        shards: list[dict[str, Any]] = []
        dropped = kept_rows = 0
        changed = not current
        for entry in manifest["shards"]:
            new_entry, live, salvaged, note = _repair_shard(store, entry, manifest)
            if new_entry is not entry:
                changed = True
            if new_entry is not None:
                shards.append(new_entry)
            dropped += live - salvaged
            kept_rows += salvaged
            if note:
                actions.append(f"{store.what}: {note}")
        if changed:
            fixed = {**manifest, "shards": shards, "rows": kept_rows,
                     "generation": int(manifest["generation"]) + 1}
            fixed["commit_id"] = uuid.uuid4().hex
            store.publish(fixed, "the store is unchanged", keep=current)
            _remove_unlisted(store, {s["file"] for s in shards})
            actions.append(f"{store.what}: committed generation {fixed['generation']} with {kept_rows} rows "
                           f"({dropped} dropped)" + (f"; {store.after_repair()}" if dropped else ""))
    return actions


def _repair_shard(store: Store, entry: dict[str, Any], manifest: dict[str, Any]) -> tuple[Optional[dict[str, Any]], int, int, str]:
    """(entry to keep or None, live rows it had, rows kept, what was done)."""
    live_rows = int(entry["rows"]) - len(set(entry.get("dead", [])))
    problems = store.check_shard(entry, manifest)
    legacy = int(entry.get("format", 1)) < 2
    if not problems and not legacy:
        return entry, live_rows, live_rows, ""
    path = store.shard_path(entry)
    if not path.is_file():
        return None, live_rows, 0, f"dropped missing shard {entry['file']} ({live_rows} rows)"
    try:
        with store.open_shard_unchecked(entry, manifest) as shard:
            if problems and (legacy or not shard.checksummed):
                return None, live_rows, 0, (f"dropped shard {entry['file']} ({live_rows} rows; no chunk checksums "
                                            f"to tell sound rows from damaged ones): {'; '.join(problems)}")
            damage = shard.scan()
            keep = shard.live() & ~damage.bad
            rows = _read_rows(shard, keep)
    except CorruptStoreError as exc:
        return None, live_rows, 0, f"dropped shard {entry['file']} ({live_rows} rows): {damage_detail(exc)}"
    if not rows["keys"]:
        return None, live_rows, 0, f"dropped shard {entry['file']} ({live_rows} rows): {'; '.join(problems)}"
    name = f"shard-{int(manifest['generation']) + 1:08d}-{uuid.uuid4().hex[:8]}.h5"
    new = new_shard(store, name, rows["keys"], rows["features"], rows["labels"], rows["size"], rows["mtime_ns"],
                    rows["hash"], "the store is unchanged")
    new["versions"] = entry.get("versions", {})
    kept = len(rows["keys"])
    if problems:
        what = (f"salvaged {kept} of {live_rows} rows of damaged shard {entry['file']} into {name} "
                f"({'; '.join(problems)})")
    else:
        what = f"rewrote shard {entry['file']} with per-chunk checksums as {name} ({kept} rows)"
    return new, live_rows, kept, what


def _read_rows(shard: Any, keep: np.ndarray) -> dict[str, Any]:
    """Columns of the rows in ``keep`` (chunk by chunk; only chunks that passed :meth:`scan`)."""
    idx = np.flatnonzero(keep)
    out: dict[str, Any] = {}
    for name in ("keys", "labels", "hash", "size", "mtime_ns"):
        values = shard.column(name)
        out[name] = values[idx].tolist()
    step = shard.chunk_rows
    blocks = []
    for start in range(0, shard.rows, step):
        mask = keep[start:start + step]
        if mask.any():
            blocks.append(shard.features(start, min(shard.rows, start + step))[mask])
    out["features"] = np.concatenate(blocks) if blocks else np.zeros((0, shard.dim), dtype=shard.dtype)
    return out


def _remove_unlisted(store: Store, listed: set[str]) -> int:
    removed = 0
    folder = store.path / SHARDS
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name not in listed:
                path.unlink(missing_ok=True)
                removed += 1
    for path in store.path.glob(TMP_PREFIX + "*"):
        path.unlink(missing_ok=True)
    return removed


# ---- indexes and encoder cards -----------------------------------------------------------------
def _verify_index(store: Store, repair: bool, report: VerifyReport) -> None:
    meta: Optional[dict[str, Any]] = None
    try:
        meta = read_pointer(store)
        if meta is None:
            return
        report.indexes += 1
        problems = check_files(store, meta)
        if not problems:
            check_belongs(meta, store.manifest(), store)
            if not (meta.get("files") or {}).get("rows.h5"):
                report.notes.append(f"the index of {store.what} was built before checksums were recorded: "
                                    "`embedstore index build --rebuild` (or `verify --repair`) adds them")
                if repair:
                    problems = ["no checksums recorded"]
    except FileNotFoundError as exc:
        problems = [f"{exc}: missing"]
    except (CorruptIndexError, IndexMismatchError) as exc:
        problems = [str(exc)]
    except CorruptStoreError:
        return  # the store itself is damaged: reported (and repaired) above
    if not problems:
        return
    if not (repair and problems == ["no checksums recorded"]):
        report.problems += problems
    if not repair:
        report.unrepaired += problems
        return
    kind = (meta or {}).get("kind_requested")
    try:
        _, built = build_index(store, IndexOptions(kind=kind, rebuild=True))
        report.repaired.append(f"rebuilt the index of {store.what} ({built.factory}, {built.rows} rows)")
    except EmbedstoreError as exc:
        report.unrepaired.append(f"the index of {store.what} could not be rebuilt: {exc}")


def _verify_cards(cache: Cache, repair: bool, report: VerifyReport) -> None:
    base = cache.root / "encoders"
    if not base.is_dir():
        return
    for path in sorted(base.glob("*/encoder.json")):
        report.cards += 1
        try:
            data = cache.read_card_json(path)
            View.from_dict(data["default_view"])
            continue
        except CorruptStoreError as exc:
            problem = str(exc)
        except (EmbedstoreError, TypeError, ValueError) as exc:
            problem = f"{path}: not a valid encoder card ({exc})"
        report.problems.append(problem)
        if repair:
            path.unlink(missing_ok=True)
            report.repaired.append(f"removed the damaged encoder card {path} (the next `embedstore encode` "
                                   "with this model writes it again)")
        else:
            report.unrepaired.append(problem)

