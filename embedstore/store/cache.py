"""The cache folder: where encoder cards, text banks and image stores live.

Layout (``EMBEDSTORE_CACHE`` or ``./cache`` by default)::

    encoders/<encoder-id>/encoder.json          encoder card (default view, width, digest, ...)
    encoders/<encoder-id>/texts-<digest>/       text bank of one set of weights (a store keyed by prompt text)
    datasets/<dataset>/<encoder-id>/<view-key>/ image store of one dataset, encoder and view

The encoder id is a readable slug of the model spec plus a hash of it; the view key likewise
(see :attr:`embedstore.store.views.View.key`), so different encoders or views never share rows. A text
bank belongs to one set of weights (``<digest>`` is a hash of the weights digest): when the files
behind a spec change, new prompts go to a new bank instead of joining features of other weights.
Caches written before banks were keyed by weights keep a single ``texts/`` bank, which is used for
the weights it was written with.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from embedstore.errors import CorruptStoreError, SpecError, StoreNotFoundError
from embedstore.store import schemas
from embedstore.store.card import EncoderCard
from embedstore.store.spec import EncoderSpec
from embedstore.store.store import Store
from embedstore.store.views import View, ViewOptions
from embedstore.util.fsutil import atomic_write_json

ENV_VAR = "EMBEDSTORE_CACHE"
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_cache_root() -> Path:
    """``$EMBEDSTORE_CACHE`` if set, else ``./cache``."""
    return Path(os.environ.get(ENV_VAR) or "cache")


def short_digest(weights_digest: str) -> str:
    """A weights digest as people read it: ``sha256:`` and 12 hex digits, or the whole of a short one."""
    kind, _, value = weights_digest.partition(":")
    return f"{kind}:{value[:12]}" if kind == "sha256" and value else weights_digest[:40]


def bank_digest(store: Store) -> Optional[str]:
    """The weights digest a text bank (or image store) was written with."""
    return ((store.manifest().get("fingerprint") or {}).get("encoder") or {}).get("weights_digest")


def check_dataset_name(name: str) -> str:
    """Dataset names become folder names: letters, digits, ``.``, ``_``, ``-``."""
    if not _DATASET_NAME.match(name or ""):
        raise SpecError(f"--dataset {name!r}: use letters, digits, '.', '_' or '-' (and start with a letter or digit)")
    return name


@dataclass(frozen=True)
class StoreLocation:
    """One image store's coordinates in a cache."""

    dataset: str
    encoder_id: str
    view_key: str
    path: Path


class Cache:
    """A cache root folder."""

    def __init__(self, root: Optional[str | os.PathLike[str]] = None):
        self.root = Path(root) if root is not None else default_cache_root()

    # encoders
    def encoder_dir(self, spec: EncoderSpec) -> Path:
        return self.root / "encoders" / spec.id

    def card_fix(self) -> str:
        return (f"run `embedstore verify --repair --cache {self.root}` (it removes the card; the next "
                "`embedstore encode` with this model writes it again)")

    def read_card_json(self, path: Path) -> Optional[dict]:
        """A validated ``encoder.json`` (None if missing). Raises CorruptStoreError naming the field."""
        import json

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            raise CorruptStoreError(f"{path}: not readable JSON ({exc}); {self.card_fix()}") from None
        return schemas.check(data, "ENCODER_CARD", path, self.card_fix())

    def load_card(self, spec: EncoderSpec) -> Optional[EncoderCard]:
        """The saved card of ``spec``, or None if it was never loaded into this cache.

        Raises:
            CorruptStoreError: the card is damaged or not an encoder card.
        """
        path = self.encoder_dir(spec) / "encoder.json"
        data = self.read_card_json(path)
        if data is None:
            return None
        try:
            return EncoderCard.from_dict(data, spec)
        except (SpecError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{path}: not a valid encoder card ({exc}); {self.card_fix()}") from None

    def save_card(self, card: EncoderCard) -> None:
        atomic_write_json(self.encoder_dir(card.spec) / "encoder.json", card.to_dict())

    def require_card(self, spec: EncoderSpec) -> EncoderCard:
        """Like :meth:`load_card` but raises a message naming the command that creates it."""
        card = self.load_card(spec)
        if card is None:
            raise StoreNotFoundError(
                f"encoder {spec} is not in the cache {self.root}; encode something with it first, "
                f"e.g. `embedstore encode IMAGES {spec.cli_args()} --cache {self.root}`"
            )
        return card

    def text_bank(self, spec: EncoderSpec, weights_digest: Optional[str] = None) -> Store:
        """The text bank of ``spec`` for the weights with ``weights_digest`` (default: the weights
        of the encoder's saved card)."""
        if weights_digest is None:
            weights_digest = self.require_card(spec).weights_digest
        folder = self.encoder_dir(spec)
        legacy = Store(folder / "texts", what=f"text bank of {spec}")
        if legacy.exists() and bank_digest(legacy) == weights_digest:
            return legacy
        tag = hashlib.sha256(weights_digest.encode()).hexdigest()[:16]
        return Store(folder / f"texts-{tag}", what=f"text bank of {spec} (weights {short_digest(weights_digest)})")

    def text_banks(self) -> Iterator[tuple[str, Store]]:
        """(encoder id, bank) for every committed text bank of the cache."""
        base = self.root / "encoders"
        if base.is_dir():
            for manifest in sorted(base.glob("*/texts*/manifest.json")):
                yield manifest.parent.parent.name, Store(manifest.parent, what=f"text bank {manifest.parent}")

    # image stores
    def image_store(self, dataset: str, spec: EncoderSpec, view: View) -> Store:
        check_dataset_name(dataset)
        path = self.root / "datasets" / dataset / spec.id / view.key
        return Store(path, what=f"dataset {dataset!r} encoded by {spec} with view {view.key}")

    def resolve_view(self, spec: EncoderSpec, options: ViewOptions) -> View:
        """The view selected by ``options`` on top of the encoder's default view."""
        return options.apply(self.require_card(spec).default_view)

    def open_image_store(self, dataset: str, spec: EncoderSpec, options: ViewOptions = ViewOptions()) -> Store:
        """The committed image store for (dataset, encoder, view), or a clear error naming what exists."""
        view = self.resolve_view(spec, options)
        store = self.image_store(dataset, spec, view)
        if store.exists():
            return store
        if store.previous_path.is_file():
            store.manifest()  # raises: the manifest is missing while its previous generation exists
        existing = [loc.view_key for loc in self.stores() if loc.dataset == dataset and loc.encoder_id == spec.id]
        hint = f" Views encoded for it: {', '.join(existing)}." if existing else ""
        raise StoreNotFoundError(
            f"dataset {dataset!r} has no store for {spec} with view {view.describe()} in {self.root}.{hint} "
            f"Run `embedstore encode IMAGES --dataset {dataset} {spec.cli_args()} [view options]` first."
        )

    def dataset_sources(self, dataset: str) -> dict[str, list[StoreLocation]]:
        """Source location -> the committed stores of ``dataset`` encoded from it (stores that
        record no source are left out)."""
        out: dict[str, list[StoreLocation]] = {}
        base = self.root / "datasets" / dataset
        for manifest in sorted(base.glob("*/*/manifest.json")) if base.is_dir() else []:
            try:
                location = (Store(manifest.parent).manifest().get("source") or {}).get("location")
            except CorruptStoreError:  # a damaged manifest records nothing readable; opening the store says so
                continue
            if location:
                view_dir = manifest.parent
                out.setdefault(str(location), []).append(
                    StoreLocation(dataset, view_dir.parent.name, view_dir.name, view_dir))
        return out

    def stores(self) -> Iterator[StoreLocation]:
        """Every image store folder that has a committed manifest."""
        base = self.root / "datasets"
        if not base.is_dir():
            return
        for manifest in sorted(base.glob("*/*/*/manifest.json")):
            view_dir = manifest.parent
            yield StoreLocation(view_dir.parent.parent.name, view_dir.parent.name, view_dir.name, view_dir)

    def encoder_cards(self) -> dict[str, dict]:
        """encoder id -> raw card JSON, for every encoder in the cache (``{"damaged": reason}``
        for a card that is not valid, so listings go on)."""
        base = self.root / "encoders"
        out: dict[str, dict] = {}
        if base.is_dir():
            for card in sorted(base.glob("*/encoder.json")):
                try:
                    out[card.parent.name] = self.read_card_json(card) or {}
                except CorruptStoreError as exc:
                    out[card.parent.name] = {"damaged": str(exc)}
        return out
