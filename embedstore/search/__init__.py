"""Nearest-neighbour search over a store (FAISS behind this package only).

The names below are this package's public surface; other modules are its implementation.
"""

from __future__ import annotations

from embedstore.search.index import Hit as Hit
from embedstore.search.index import IndexOptions as IndexOptions
from embedstore.search.index import StoreIndex as StoreIndex
from embedstore.search.index import build_index as build_index
from embedstore.search.index import open_index as open_index

__all__ = ["Hit", "IndexOptions", "StoreIndex", "build_index", "open_index"]
