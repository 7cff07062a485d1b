"""Queries against a cached image view: nearest images to texts, images or stored rows, and
nearest classes of images.

Query vectors come from the cache wherever they can: a text from the encoder's text bank
(prompts never seen before are encoded once and added to it), a stored row from the store. An
image file is encoded by :func:`embedstore.encode.image_query.image_vectors` (stage 1: it loads the
model), which the CLI calls; this module never loads a model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from embedstore.errors import SpecError
from embedstore.score.prompts import PromptSet, expand, load_prompt_set
from embedstore.score.scoring import Rule, class_matrix, member_part, softmax, top_k
from embedstore.search.index import Hit, StoreIndex, hits
from embedstore.store.cache import Cache
from embedstore.store.spec import EncoderSpec
from embedstore.store.store import Store
from embedstore.store.textbank import PromptEncoder, text_features
from embedstore.util.arrays import unit_rows

log = logging.getLogger(__name__)

MATCHES = ("mean", "best")


def text_vectors(cache: Cache, spec: EncoderSpec, store: Store, texts: Sequence[str],
                 encode_prompts: Optional[PromptEncoder] = None) -> np.ndarray:
    """Unit text features ``(len(texts), d)`` from the text bank of the weights ``store`` was
    encoded with (texts not yet in it are encoded by ``encode_prompts``)."""
    if not texts:
        raise SpecError("no query text given")
    return unit_rows(text_features(cache, spec, store.manifest(), texts, encode_prompts, what=str(store.path)).features)


def key_vectors(store: Store, keys: Sequence[str]) -> np.ndarray:
    """Unit features of stored rows. Raises SpecError naming a key the store does not hold."""
    try:
        return unit_rows(store.features_of(list(keys)))
    except KeyError as exc:
        raise SpecError(f"--key: {exc.args[0]}") from None


def nearest_images(index: StoreIndex, queries: np.ndarray, k: int,
                   exclude: Optional[Sequence[Optional[str]]] = None) -> list[list[Hit]]:
    """The ``k`` nearest rows of each query; ``exclude[i]`` (a query's own key) is left out."""
    extra = 1 if exclude is not None and any(e is not None for e in exclude) else 0
    k_search = min(k + extra, index.rows.n_live)
    if k > index.rows.n_live - extra:
        raise SpecError(f"-k {k} is larger than the store ({index.rows.n_live - extra} other rows)")
    scores, ids = index.search(queries, k_search)
    return hits(index, scores, ids, list(exclude) if exclude is not None else None, k)


@dataclass(frozen=True)
class ClassVectors:
    """Class directions for nearest-class queries.

    ``match="mean"``: one prompt-averaged unit vector per class, and probabilities exactly as
    ``aggregate = "embed-mean"`` scores (:func:`embedstore.score.scoring.member_part`); ``"best"``:
    every prompt vector, a class scoring its best-matching prompt, probabilities the softmax of
    ``scale`` times those similarities.
    """

    classes: tuple[str, ...]
    match: str
    vectors: np.ndarray        # (c, d) for "mean", (P, d) for "best"
    class_index: np.ndarray    # (P,) class of each prompt ("best"); arange(c) for "mean"
    scale: float

    def similarities(self, features: np.ndarray) -> np.ndarray:
        """Cosine similarity of each unit row to each class ``(n, c)``."""
        sims = np.asarray(features, dtype=np.float32) @ self.vectors.T
        if self.match == "mean":
            return sims
        ci = self.class_index
        if len(ci) and (np.diff(ci) >= 0).all() and np.array_equal(np.unique(ci), np.arange(len(self.classes))):
            starts = np.flatnonzero(np.r_[True, np.diff(ci) > 0])  # prompts come class by class (expand)
            return np.maximum.reduceat(sims, starts, axis=1)
        out = np.full((len(features), len(self.classes)), -np.inf, dtype=np.float32)
        for c in range(len(self.classes)):
            out[:, c] = sims[:, ci == c].max(axis=1)
        return out


def class_vectors(cache: Cache, spec: EncoderSpec, store: Store, classes: Sequence[str], templates: "str | PromptSet",
                  match: str = "mean", scale: float = 100.0,
                  encode_prompts: Optional[PromptEncoder] = None) -> ClassVectors:
    """Class directions of ``classes`` under a prompt set (a name/path, or a loaded set), with the
    text features of the weights ``store`` was encoded with."""
    if match not in MATCHES:
        raise SpecError(f"--match {match!r}: expected one of {', '.join(MATCHES)}")
    prompt_set = templates if isinstance(templates, PromptSet) else load_prompt_set(templates)
    expansion = expand(prompt_set, list(classes))
    text = text_vectors(cache, spec, store, expansion.texts, encode_prompts)
    if match == "mean":
        rule = Rule("embed-mean", expansion.class_index, len(classes))
        return ClassVectors(tuple(classes), match, class_matrix(rule, text), np.arange(len(classes)), float(scale))
    return ClassVectors(tuple(classes), match, text, np.asarray(expansion.class_index), float(scale))


@dataclass
class ClassRanking:
    """Nearest classes of ``keys`` (or query descriptions): top ``k`` per row, best first."""

    keys: list[str]
    classes: tuple[str, ...]
    top: np.ndarray            # (n, k) class indices
    similarity: np.ndarray     # (n, k) cosine similarity
    probability: np.ndarray    # (n, k) probability over all classes


def nearest_classes(vectors: ClassVectors, features: np.ndarray, keys: Sequence[str], k: int = 3) -> ClassRanking:
    """Rank every class for each row of ``features`` (unit rows) and keep the top ``k`` (best
    first, ties to the lowest class index as :func:`embedstore.score.scoring.predict` breaks them)."""
    c = len(vectors.classes)
    k = max(1, min(k, c))
    sims = vectors.similarities(features)
    if vectors.match == "mean":
        rule = Rule("embed-mean", np.arange(c), c)
        probs = member_part(rule, vectors.scale, class_logits=sims)
    else:
        probs = softmax(np.float32(vectors.scale) * sims)
    top = top_k(sims, k)
    rows = np.arange(len(sims))[:, None]
    return ClassRanking(list(keys), vectors.classes, top, sims[rows, top], probs[rows, top])
