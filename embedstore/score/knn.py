"""k-nearest-neighbour classification from a labelled cached view.

Each image takes the labels of its ``k`` nearest rows in a reference store (cosine similarity)
and turns them into class probabilities. Weightings:

``uniform``     every neighbour counts 1 (majority vote);
``distance``    weight ``1 / (1 - similarity)`` (scikit-learn's ``weights="distance"`` on cosine distance);
``similarity``  weight ``exp(similarity / temperature)`` (the weighted kNN of Wu et al. 2018 and DINO,
                temperature 0.07).

When the reference is the store being classified, each image's own row is left out of its
neighbours (leave-one-out), so a dataset never votes for itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from embedstore.errors import SpecError

WEIGHTINGS = ("uniform", "distance", "similarity")


@dataclass(frozen=True)
class KnnOptions:
    """Settings of a ``kind = "knn"`` ensemble member."""

    k: int = 10
    weighting: str = "similarity"
    temperature: float = 0.07
    reference: Optional[str] = None    # dataset to vote from (default: the experiment's dataset)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SpecError(f"k: must be >= 1, got {self.k}")
        if self.weighting not in WEIGHTINGS:
            raise SpecError(f"weighting: {self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise SpecError(f"temperature: must be positive, got {self.temperature}")

    def describe(self) -> str:
        ref = f" from {self.reference!r}" if self.reference else ""
        return f"kNN k={self.k} {self.weighting}{ref}"


def neighbour_weights(scores: np.ndarray, weighting: str, temperature: float = 0.07) -> np.ndarray:
    """Vote weight of each neighbour from its cosine similarity ``(m, k)``."""
    s = np.asarray(scores, dtype=np.float64)
    if weighting == "uniform":
        return np.ones_like(s)
    if weighting == "distance":
        return 1.0 / np.maximum(1.0 - s, 1e-6)
    if weighting == "similarity":
        return np.exp((s - s.max(axis=1, keepdims=True)) / temperature)  # shift: same ratios, no overflow
    raise SpecError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")


def class_votes(labels: np.ndarray, scores: np.ndarray, n_classes: int, weighting: str = "similarity",
         temperature: float = 0.07) -> np.ndarray:
    """Class probabilities ``(m, n_classes)`` from neighbour class ids ``labels`` (``-1`` = no
    neighbour, ignored) and their similarities ``scores``, both ``(m, k)``. Rows sum to 1; a row
    without any neighbour is all zeros."""
    labels = np.asarray(labels, dtype=np.int64)
    w = neighbour_weights(scores, weighting, temperature)
    w = np.where(labels >= 0, w, 0.0)
    out = np.zeros((labels.shape[0], n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(labels.shape[0]), labels.shape[1])
    np.add.at(out, (rows, np.clip(labels, 0, None).ravel()), w.ravel())
    totals = out.sum(axis=1, keepdims=True)
    np.divide(out, totals, out=out, where=totals > 0)
    return out.astype(np.float32)
