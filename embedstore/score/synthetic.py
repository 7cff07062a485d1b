"""Synthetic caches for tests and benchmarks: fake encoders with features that carry signal.

No model is involved. Each fake encoder gets an encoder card (as ``embedstore encode`` saves
one), an image store of a labelled dataset (fp16, written with the real store writer) and a text
bank holding the prompts of a prompt set. Per encoder, every class has a random unit centre;
an image is its class centre scaled by ``signal`` plus Gaussian noise, a prompt is its class
centre plus a little noise, all L2-normalised. ``signal = 0`` gives an encoder that knows
nothing, so searches over ensemble weights have a known answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from embedstore.score.prompts import PromptSet, expand
from embedstore.store.cache import Cache
from embedstore.store.card import EncoderCard
from embedstore.store.fingerprint import image_fingerprint, text_fingerprint
from embedstore.store.spec import EncoderSpec
from embedstore.store.views import View

# Recorded in every shard the synthetic writer makes (provenance, not compared).
PROVENANCE = {"synthetic": True, "device": "cpu", "precision": "fp32"}


@dataclass(frozen=True)
class FakeEncoder:
    """A fake encoder: name (its ``local-dir:`` spec never needs to exist), width, signal strength,
    and ``shift`` to make it systematically wrong."""

    name: str
    dim: int = 64
    signal: float = 1.0
    shift: int = 0   # images of class c sit at the centre of class c + shift: a confidently wrong encoder

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(f"local-dir:/synthetic/{self.name}")


def fake_card(enc: FakeEncoder) -> EncoderCard:
    return EncoderCard(spec=enc.spec, weights_digest=f"synthetic-{enc.name}-{enc.dim}", weights_files=(),
                       default_view=View(), dim=enc.dim, logit_scale=100.0)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_synthetic_cache(cache: Cache, dataset: str, encoders: Sequence[FakeEncoder], classes: Sequence[str],
                          per_class: int, prompt_set: Optional[PromptSet] = None, seed: int = 0,
                          noise: float = 1.0, keys: Optional[Sequence[str]] = None,
                          labels: Optional[Sequence[str]] = None) -> list[str]:
    """Write cards, one image store per encoder (default view) and text banks; return the keys.

    Keys are ``<class>/<i>.jpg`` in natural order unless ``keys``/``labels`` are given. Each store
    is one shard written row block by row block, so memory stays bounded whatever the number of
    images.
    """
    if keys is None:
        width = max(6, len(str(max(per_class - 1, 0))))
        keys = [f"{c}/{i:0{width}d}.jpg" for c in classes for i in range(per_class)]
        labels = [c for c in classes for _ in range(per_class)]
    assert labels is not None and len(labels) == len(keys)
    index = {c: i for i, c in enumerate(classes)}
    class_of = np.fromiter((index[label] for label in labels), dtype=np.int64, count=len(labels))
    for j, enc in enumerate(encoders):
        rng = np.random.default_rng(seed * 1000 + j)
        centres = _unit(rng.standard_normal((len(classes), enc.dim)))
        card = fake_card(enc)
        cache.save_card(card)
        store = cache.image_store(dataset, enc.spec, card.default_view)
        def image_rows(start: int, stop: int, enc: FakeEncoder = enc, centres: np.ndarray = centres,
                       rng: np.random.Generator = rng) -> np.ndarray:
            return _unit(enc.signal * centres[(class_of[start:stop] + enc.shift) % len(classes)]
                         + noise / np.sqrt(enc.dim) * rng.standard_normal((stop - start, enc.dim)))

        with store.writer(image_fingerprint(card, card.default_view, "float16"), enc.dim, "float16", dict(PROVENANCE)) as w:
            w.add_blocks(list(keys), image_rows, list(labels), sizes=[1] * len(keys), mtimes=[1] * len(keys))
            w.set_info(source={"location": f"synthetic:{dataset}", "images": len(keys)}, labelled=True,
                       classes=sorted(set(labels)))
            w.compact(order=list(keys))  # one shard already in this order: only marked sorted
        if prompt_set is not None:
            expansion = expand(prompt_set, classes)
            text = _unit(centres[expansion.class_index]
                         + 0.3 / np.sqrt(enc.dim) * rng.standard_normal((len(expansion), enc.dim)))
            bank = cache.text_bank(enc.spec, card.weights_digest)
            existing = set(bank.row_metadata()) if bank.exists() else set()
            new = [i for i, t in enumerate(expansion.texts) if t not in existing]
            if new:
                with bank.writer(text_fingerprint(card, "float32"), enc.dim, "float32", dict(PROVENANCE)) as w:
                    w.add([expansion.texts[i] for i in new], text[new])
    return list(keys)
