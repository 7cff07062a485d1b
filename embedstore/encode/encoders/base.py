"""The encoder contract every adapter follows (the card it returns lives in :mod:`embedstore.store.card`).

Contract: ``encode_images(batch)`` takes a float tensor ``(n, 3, H, W)`` already preprocessed by
the encoder's view and returns float32 numpy ``(n, d)``; ``encode_texts(texts)`` returns float32
numpy ``(len(texts), d)``. Both are L2-normalised, computed in eval mode without gradients, and
deterministic for the same inputs on the same device.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from embedstore.store.card import EncoderCard as EncoderCard
from embedstore.store.card import WeightsFile as WeightsFile
from embedstore.store.spec import EncoderSpec


class Encoder(Protocol):
    """What every adapter (open_clip, transformers) provides."""

    spec: EncoderSpec
    device: str

    @property
    def card(self) -> EncoderCard:
        """Description of this encoder (see :class:`EncoderCard`)."""

    def encode_images(self, batch: Any) -> np.ndarray:
        """``(n, 3, H, W)`` preprocessed tensor -> float32 ``(n, d)``, L2-normalised."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Prompt strings -> float32 ``(n, d)``, L2-normalised."""
