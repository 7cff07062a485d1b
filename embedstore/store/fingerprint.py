"""Fingerprints: everything that changes a store's numbers, compared strictly before rows are combined.

Both stages need them (stage 1 writes them, stage 2 and the query path compare them), so they live
here and need neither torch nor a model: a card and a view are enough.
"""
from __future__ import annotations

from typing import Any

from embedstore.store.card import EncoderCard
from embedstore.store.store import SCHEMA_VERSION
from embedstore.store.views import View

__all__ = ["DECODER_VERSION", "image_fingerprint", "text_fingerprint"]

# Bump when embedstore.encode.sources.decode_image changes what it returns for the same bytes.
DECODER_VERSION = "pil-rgb-v1"


def image_fingerprint(card: EncoderCard, view: View, dtype: str) -> dict[str, Any]:
    """Everything that changes an image store's numbers (compared strictly on write)."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": "images",
        "encoder": card.identity_fingerprint(),
        "view": view.to_dict(),
        "decoder": DECODER_VERSION,
        "dtype": dtype,
    }


def text_fingerprint(card: EncoderCard, dtype: str) -> dict[str, Any]:
    """Everything that changes a text bank's numbers (compared strictly on write)."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": "texts",
        "encoder": card.identity_fingerprint(),
        "tokenizer": card.tokenizer,
        "dtype": dtype,
    }
