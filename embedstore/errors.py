"""Exception types that users of embedstore can catch.

Every error raised on bad input is an :class:`EmbedstoreError` whose message names the file,
field or option at fault, so the CLI can print it without a traceback.
"""
from __future__ import annotations


class EmbedstoreError(Exception):
    """Base class of every error embedstore raises on purpose."""


class SpecError(EmbedstoreError, ValueError):
    """A model spec, view option or other user-supplied setting is invalid."""


class SourceError(EmbedstoreError):
    """An image source (folder or list file) cannot be read."""


class StoreNotFoundError(EmbedstoreError):
    """The requested store, encoder or dataset is not in the cache."""


class StoreLockedError(EmbedstoreError):
    """Another process holds the write lock of a store."""


class FingerprintMismatchError(EmbedstoreError):
    """A store was opened with settings that differ from the ones it was written with."""

    def __init__(self, path: str, differences: list[tuple[str, object, object]]):
        self.path = path
        self.differences = differences
        lines = [f"  {field}: store has {old!r}, requested {new!r}" for field, old, new in differences]
        super().__init__(
            f"store {path} was written with different settings; refusing to mix them:\n"
            + "\n".join(lines)
            + "\nUse another --cache or --dataset, or other view options, to keep both."
        )


class CorruptStoreError(EmbedstoreError):
    """A store file is damaged, truncated or does not match its manifest."""


class SearchIndexError(EmbedstoreError):
    """Base of the FAISS index errors below."""


class IndexNotFoundError(SearchIndexError, StoreNotFoundError):
    """No index has been built for the store."""


class CorruptIndexError(SearchIndexError):
    """An index file is damaged or truncated."""


class IndexMismatchError(SearchIndexError):
    """An index does not belong to the store it was found in (other store, encoder or view)."""


class StoreChangedError(EmbedstoreError):
    """A store was committed to between two reads that must see the same commit."""


class WeightsChangedError(EmbedstoreError):
    """The model behind a spec now has other weights than the features it is to be combined with."""

    def __init__(self, spec: object, expected: str, found: str):
        self.expected, self.found = expected, found
        model = f"--model {getattr(spec, 'model', spec)}"
        super().__init__(
            f"{spec}: the cached image features were encoded with weights {expected}, but the model now has "
            f"weights {found}; refusing to combine features of different weights. Either restore the old weights "
            f"file, or encode the images again with the new weights: `embedstore rm --dataset DATASET {model}` "
            f"then `embedstore encode IMAGES --dataset DATASET {model} ...`"
        )


class BudgetError(EmbedstoreError):
    """A request needs more memory than the budget (``--max-memory``) allows."""
