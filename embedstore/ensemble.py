"""Ensembling in pure numpy: weight normalisation and weighted averages of score arrays."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from embedstore.errors import SpecError


def normalise_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1. Negative weights or an all-zero list are an error."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise SpecError("weights: need at least one model weight")
    if (w < 0).any() or not np.isfinite(w).all():
        raise SpecError(f"weights: must be finite and non-negative, got {list(weights)}")
    if w.sum() == 0:
        raise SpecError("weights: all model weights are zero")
    return w / w.sum()


def weighted_average(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_i w_i * arrays[i]`` in float32 with normalised weights; arrays must share a shape."""
    w = normalise_weights(weights)
    if len(arrays) != w.size:
        raise ValueError(f"{len(arrays)} arrays but {w.size} weights")
    shape = arrays[0].shape
    for a in arrays[1:]:
        if a.shape != shape:
            raise ValueError(f"cannot average arrays of shapes {shape} and {a.shape}")
    out = np.zeros(shape, dtype=np.float32)
    for a, wi in zip(arrays, w):
        if wi:
            out += np.float32(wi) * np.asarray(a, dtype=np.float32)
    return out
