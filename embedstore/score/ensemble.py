"""Ensembling in pure numpy: weight normalisation and weighted averages of score arrays."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from embedstore.errors import SpecError

BLOCK_BYTES = 1 << 16  # 64 KB row blocks: temporaries stay in cache and below malloc's mmap threshold


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
    terms = [(a, np.float32(wi)) for a, wi in zip(arrays, w) if wi]
    # np.empty, not np.zeros: a large calloc'd array costs a page fault per 4 KB on first write
    out = np.empty(shape, dtype=np.float32)
    if out.ndim != 2:
        np.multiply(terms[0][0], terms[0][1], out=out)
        for a, wi in terms[1:]:
            out += wi * np.asarray(a, dtype=np.float32)
        return out
    step = max(1, BLOCK_BYTES // (4 * max(1, shape[1])))  # row blocks: temporaries stay small and in cache
    tmp = np.empty((min(step, shape[0]), shape[1]), dtype=np.float32)
    for start in range(0, shape[0], step):
        block = out[start:start + step]
        np.multiply(terms[0][0][start:start + step], terms[0][1], out=block)
        for a, wi in terms[1:]:
            part = tmp[:len(block)]
            np.multiply(a[start:start + step], wi, out=part)
            block += part
    return out


def minmax_rows(scores: np.ndarray) -> np.ndarray:
    """Each row scaled to [0, 1] by its min and max; a constant row becomes all zeros (it abstains).

    The seed divided by zero on constant rows; here such a member simply adds nothing.
    """
    s = np.asarray(scores, dtype=np.float32)
    lo = s.min(axis=1, keepdims=True)
    span = s.max(axis=1, keepdims=True) - lo
    out = np.subtract(s, lo)
    np.divide(out, span, out=out, where=span > 0)
    out[(span <= 0).ravel()] = 0
    return out


def soft_vote(class_scores: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The seed's soft voting, weighted: ``sum_i w_i * minmax(log p_i)`` per image.

    ``class_scores`` are per-member class probabilities (or other positive scores) ``(n, c)``.
    Min-max scaling ignores a per-row additive constant, so on log-probabilities it equals the
    seed's min-max of raw logits for softmax members.
    """
    logs = [np.log(np.maximum(np.asarray(p, dtype=np.float32), np.float32(1e-30))) for p in class_scores]
    return weighted_average([minmax_rows(x) for x in logs], weights)
