"""The cache on disk (numpy + h5py): specs, cards, views, fingerprints, stores, shards, text banks, derived data.

The names below are this package's public surface; other modules are its implementation.
"""

from __future__ import annotations

from embedstore.store.cache import Cache as Cache
from embedstore.store.cache import default_cache_root as default_cache_root
from embedstore.store.card import EncoderCard as EncoderCard
from embedstore.store.card import WeightsFile as WeightsFile
from embedstore.store.export import export_features as export_features
from embedstore.store.fingerprint import image_fingerprint as image_fingerprint
from embedstore.store.fingerprint import text_fingerprint as text_fingerprint
from embedstore.store.inventory import all_stores as all_stores
from embedstore.store.logit_cache import LogitCache as LogitCache
from embedstore.store.reader import StoreReader as StoreReader
from embedstore.store.spec import EncoderSpec as EncoderSpec
from embedstore.store.store import RowMeta as RowMeta
from embedstore.store.store import Store as Store
from embedstore.store.store import StoreRows as StoreRows
from embedstore.store.store import StoreWriter as StoreWriter
from embedstore.store.textbank import TextFeatures as TextFeatures
from embedstore.store.textbank import text_features as text_features
from embedstore.store.views import View as View
from embedstore.store.views import ViewOptions as ViewOptions

__all__ = [
    "Cache",
    "EncoderCard",
    "EncoderSpec",
    "LogitCache",
    "RowMeta",
    "Store",
    "StoreReader",
    "StoreRows",
    "StoreWriter",
    "TextFeatures",
    "View",
    "ViewOptions",
    "WeightsFile",
    "all_stores",
    "default_cache_root",
    "export_features",
    "image_fingerprint",
    "text_features",
    "text_fingerprint",
]
