"""embedstore: encode images and prompts once with CLIP-style models, experiment from the cache.

Stage 1 (GPU, once): :func:`encode_images` and :func:`encode_prompts` write HDF5 feature stores.
Stage 2 (CPU, seconds): read them back with :func:`open_image_store` / :func:`open_text_bank`.

Heavy libraries (torch, open_clip, transformers, faiss) are imported only when a model is loaded.
"""
from __future__ import annotations

__version__ = "0.1.0"

from embedstore.store.cache import Cache, default_cache_root
from embedstore.store.spec import EncoderSpec
from embedstore.errors import (
    CorruptStoreError,
    EmbedstoreError,
    FingerprintMismatchError,
    SourceError,
    SpecError,
    StoreLockedError,
    StoreNotFoundError,
)
from embedstore.store.views import View, ViewOptions
from embedstore.encode.sources import Source, list_source
from embedstore.store.store import Store, StoreRows
from embedstore.encode.loop import EncodeResult, encode_images, encode_prompts
from embedstore.store.export import export_features

__all__ = [
    "__version__",
    "Cache",
    "default_cache_root",
    "EncoderSpec",
    "View",
    "ViewOptions",
    "Source",
    "list_source",
    "Store",
    "StoreRows",
    "EncodeResult",
    "encode_images",
    "encode_prompts",
    "export_features",
    "EmbedstoreError",
    "SpecError",
    "SourceError",
    "StoreNotFoundError",
    "StoreLockedError",
    "FingerprintMismatchError",
    "CorruptStoreError",
]
