"""Encoders: parse a spec, load the right adapter, and keep its card in the cache.

Only :mod:`embedstore.store.spec` and :mod:`embedstore.encode.encoders.base` are imported eagerly;
the adapters import torch and their libraries when :func:`load_encoder` is called.
"""
from __future__ import annotations

import logging
from typing import Sequence

from embedstore.encode.encoders.base import Encoder
from embedstore.store.card import EncoderCard, WeightsFile
from embedstore.store.spec import EncoderSpec

log = logging.getLogger(__name__)

__all__ = ["Encoder", "EncoderCard", "EncoderSpec", "WeightsFile", "load_encoder", "weights_digest"]


def weights_digest(spec: EncoderSpec, known: Sequence[WeightsFile] = (),
                   allow_random: bool = False) -> tuple[str, tuple[WeightsFile, ...]]:
    """Locate and digest the weight files of ``spec`` (reusing ``known`` hashes of unchanged files).

    A spec without weights is refused unless ``allow_random`` or ``spec.random_weights``.
    """
    from embedstore.encode.encoders.weights import digest_weights, locate_weights

    return digest_weights(spec, locate_weights(spec, allow_random), known)


def load_encoder(
    spec: EncoderSpec,
    device: str = "auto",
    precision: str = "auto",
    weights: tuple[str, tuple[WeightsFile, ...]] | None = None,
    card: EncoderCard | None = None,
    text_only: bool = False,
) -> Encoder:
    """Load the adapter for ``spec`` on ``device`` (``auto``: GPU if visible, else CPU).

    ``precision`` ``auto`` means fp16 weights and autocast on GPU, fp32 on CPU. ``weights`` is a
    digest already computed by :func:`weights_digest` (computed here when omitted). With a known
    ``card`` and ``text_only``, only what ``encode_texts`` needs is kept: transformers CLIP
    models load just the text tower; open_clip builds the whole model (it has no text-only
    loader) and frees the image tower afterwards.
    """
    if text_only and card is None:
        raise ValueError("text_only needs the encoder's card (from an earlier full load)")
    from embedstore.encode.encoders.torch_utils import resolve_device, resolve_precision

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if weights is None:
        weights = weights_digest(spec)
    log.info("loading %s on %s (%s)", spec, device, precision)
    if spec.kind == "hf":
        from embedstore.encode.encoders.hf import HFEncoder

        return HFEncoder(spec, weights, device=device, precision=precision, card=card, text_only=text_only)
    from embedstore.encode.encoders.open_clip import OpenClipEncoder

    return OpenClipEncoder(spec, weights, device=device, precision=precision, card=card, text_only=text_only)
