"""Prompt features for an image store: from the text bank of the weights the store was encoded with.

Stage 2 combines image features with text features only when both come from the same weights:
the bank is chosen by the image store's weights digest (:meth:`embedstore.store.cache.Cache.text_bank`)
and its fingerprint is compared with the store's before anything is read. Prompts missing from
the bank are encoded by a callable the caller passes in (the CLI passes
:func:`embedstore.encode.loop.prompt_encoder`); that callable refuses when the model behind the spec
now has other weights, so a changed model never adds its text features to another model's
images. Without a callable, missing prompts are an error naming the command that adds them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from embedstore.errors import FingerprintMismatchError, StoreNotFoundError
from embedstore.store.cache import Cache, short_digest
from embedstore.store.spec import EncoderSpec

# (texts, spec, weights digest the texts must be encoded with) -> how many were newly encoded
PromptEncoder = Callable[[Sequence[str], EncoderSpec, str], int]


@dataclass(frozen=True)
class TextFeatures:
    """Float32 features ``(P, d)`` of a prompt list, the prompts newly encoded for it, and the id
    of the bank they came from (part of every derived-data key)."""

    features: np.ndarray
    new: int
    bank_id: str


def weights_digest(manifest: Mapping[str, Any]) -> str:
    """The weights digest an image store (or bank) manifest records."""
    return str(manifest["fingerprint"]["encoder"]["weights_digest"])


def _bank_id(manifest: Mapping[str, Any]) -> str:
    ident = {"store_id": manifest.get("store_id") or manifest.get("created"), "fingerprint": manifest["fingerprint"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def text_features(cache: Cache, spec: EncoderSpec, image_manifest: Mapping[str, Any], texts: Sequence[str],
                  encode_prompts: Optional[PromptEncoder] = None, what: str = "") -> TextFeatures:
    """Features of ``texts`` (in that order) for the image store whose manifest is given.

    Raises:
        StoreNotFoundError: prompts are missing and no ``encode_prompts`` was given (the message
            names the command that adds them).
        FingerprintMismatchError: the bank's encoder (weights, width) differs from the store's.
    """
    digest = weights_digest(image_manifest)
    bank = cache.text_bank(spec, digest)
    found = _read(bank, texts)
    new = 0
    if isinstance(found, list):
        if encode_prompts is None:
            raise StoreNotFoundError(
                f"{len(found)} prompt(s) are not in the text bank of {spec} (weights {short_digest(digest)}), "
                f"e.g. {found[0]!r}; run `embedstore prompts {spec.cli_args()} --file PROMPTS` "
                "(or leave out --no-encode)")
        new = encode_prompts(found, spec, digest)
        found = _read(bank, texts)
        if isinstance(found, list):
            raise StoreNotFoundError(f"{bank.what}: prompt {found[0]!r} was not added; run the command again")
    features, manifest = found
    stored, expected = manifest["fingerprint"]["encoder"], image_manifest["fingerprint"]["encoder"]
    if stored != expected:
        diffs = [(f"encoder.{k}", stored.get(k), expected.get(k)) for k in sorted(set(stored) | set(expected))
                 if stored.get(k) != expected.get(k)]
        raise FingerprintMismatchError(f"{bank.path} (text bank) vs the image store {what}".strip(), diffs)
    return TextFeatures(features, new, _bank_id(manifest))


def _read(bank: Any, texts: Sequence[str]) -> "list[str] | tuple[np.ndarray, dict[str, Any]]":
    """(features, manifest) of ``texts``, or the list of texts the bank lacks."""
    from embedstore.store.reader import StoreReader

    if not bank.exists():
        return list(dict.fromkeys(texts))
    with StoreReader(bank, natural=False) as reader:
        position = {k: i for i, k in enumerate(reader.keys)}
        missing = [t for t in dict.fromkeys(texts) if t not in position]
        if missing:
            return missing
        rows = reader.storage_rows(np.asarray([position[t] for t in texts], dtype=np.int64))
        return np.asarray(reader.features(rows), dtype=np.float32), reader.manifest
