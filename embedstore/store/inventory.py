"""What a cache holds: every image store and text bank folder, committed or not."""
from __future__ import annotations

from pathlib import Path

from embedstore.store.cache import Cache
from embedstore.store.store import Store

__all__ = ["all_stores"]


def all_stores(cache: Cache) -> list[Store]:
    """Every image store and text bank folder in the cache, committed or not: a folder with a
    manifest, a previous manifest generation or shards (for ``verify``)."""
    found: list[Path] = []
    for pattern in ("datasets/*/*/*", "encoders/*/texts*"):
        for folder in sorted(cache.root.glob(pattern)):
            if folder.is_dir() and any((folder / name).exists() for name in ("manifest.json", "manifest.prev.json", "shards")):
                found.append(folder)
    return [Store(p, what=_what(cache, p)) for p in found]


def _what(cache: Cache, path: Path) -> str:
    rel = path.relative_to(cache.root).parts
    if rel[0] == "encoders":
        return f"text bank of encoder {rel[1]}" + (f" (weights {rel[2][6:]})" if rel[2] != "texts" else "")
    return f"dataset {rel[1]!r} (encoder {rel[2]}, view {rel[3]})"
