"""embedstore: encode images and prompts once with CLIP-style models, experiment from the cache.

Stage 1 (GPU, once): :func:`encode_images` and :func:`encode_prompts` write HDF5 feature stores.
Stage 2 (CPU, seconds): read them back with :meth:`Cache.open_image_store` and score them with
:class:`embedstore.score.Session`.

Importing ``embedstore`` loads no model library: the stage-1 names below (``encode_images``,
``encode_prompts``, ``EncodeResult``, ``Source``, ``list_source``) are resolved on first use by a
module ``__getattr__`` (PEP 562), so stage-2 code never imports :mod:`embedstore.encode`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from embedstore.errors import CorruptStoreError as CorruptStoreError
from embedstore.errors import EmbedstoreError as EmbedstoreError
from embedstore.errors import FingerprintMismatchError as FingerprintMismatchError
from embedstore.errors import SourceError as SourceError
from embedstore.errors import SpecError as SpecError
from embedstore.errors import StoreLockedError as StoreLockedError
from embedstore.errors import StoreNotFoundError as StoreNotFoundError
from embedstore.store.cache import Cache as Cache
from embedstore.store.cache import default_cache_root as default_cache_root
from embedstore.store.export import export_features as export_features
from embedstore.store.spec import EncoderSpec as EncoderSpec
from embedstore.store.store import Store as Store
from embedstore.store.store import StoreRows as StoreRows
from embedstore.store.views import View as View
from embedstore.store.views import ViewOptions as ViewOptions

if TYPE_CHECKING:
    from embedstore.encode.loop import EncodeResult, encode_images, encode_prompts
    from embedstore.encode.sources import Source, list_source

__version__ = "0.1.0"

# stage-1 names: imported from embedstore.encode when first used
_LAZY = {
    "EncodeResult": "embedstore.encode.loop",
    "encode_images": "embedstore.encode.loop",
    "encode_prompts": "embedstore.encode.loop",
    "Source": "embedstore.encode.sources",
    "list_source": "embedstore.encode.sources",
}

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


def __getattr__(name: str) -> Any:
    """Resolve a stage-1 name on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'embedstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
