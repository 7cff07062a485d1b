"""Zero-shot scoring in pure numpy (float32): similarities, softmax, prompt aggregation.

Arrays in, arrays out, no I/O. Image and text features are L2-normalised float32 ``(n, d)`` and
``(p, d)``; ``class_index`` maps each prompt to its class, so classes may have different prompt
counts. The three aggregation modes:

``prob-mean`` (the Ajou 2024 seed)
    softmax of ``scale * img @ txt.T`` over *all* prompts, then the mean probability of each
    class's prompts (:func:`prompt_probabilities`, then :func:`class_means`).
``embed-mean`` (CLIP paper, open_clip, CLIP_benchmark)
    normalise each prompt feature, average per class, renormalise (:func:`class_embeddings`),
    then softmax of ``scale * img @ W.T`` over classes.
``logit-mean``
    average the logits of each class's prompts, then softmax over classes.
"""
from __future__ import annotations

import numpy as np

AGGREGATES = ("prob-mean", "embed-mean", "logit-mean")


def as_f32(x: np.ndarray) -> np.ndarray:
    """float32 view or copy (fp16 matmul is ~400x slower on CPUs)."""
    return np.asarray(x, dtype=np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32 (modifies a float32 input in place and returns it)."""
    x = as_f32(logits)
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def averaging_matrix(class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """``(p, c)`` matrix ``M`` with ``M[j, class_index[j]] = 1 / count(class)``, so that
    ``values @ M`` is the per-class mean of ``values`` (n, p)."""
    class_index = np.asarray(class_index, dtype=np.int64)
    counts = np.bincount(class_index, minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no prompt")
    m = np.zeros((class_index.size, n_classes), dtype=np.float32)
    m[np.arange(class_index.size), class_index] = 1.0 / counts[class_index]
    return m


def class_means(values: np.ndarray, class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class mean over prompts: ``(n, p) -> (n, c)`` (a segment mean, never a reshape)."""
    return as_f32(values) @ averaging_matrix(class_index, n_classes)


BLOCK_BYTES = 1 << 22  # row blocks of about 4 MB: conversions and temporaries stay in cache


def block_rows(width: int) -> int:
    """Rows per block for arrays of ``width`` float32 columns."""
    return max(1, BLOCK_BYTES // (4 * max(1, width)))


def prompt_logits(image: np.ndarray, text: np.ndarray, scale: float) -> np.ndarray:
    """``scale * image @ text.T`` in float32: ``(n, p)``. ``image`` may be float16 (as stored): it
    is converted block by block, never as a whole float32 copy."""
    t = np.ascontiguousarray(as_f32(text).T)
    n = image.shape[0]
    out = np.empty((n, t.shape[1]), dtype=np.float32)
    step = block_rows(image.shape[1])
    for start in range(0, n, step):
        np.matmul(as_f32(image[start:start + step]), t, out=out[start:start + step])
    if scale != 1:
        out *= np.float32(scale)
    return out


def prompt_probabilities(image: np.ndarray, text: np.ndarray, scale: float) -> np.ndarray:
    """Softmax over all prompts of the scaled similarities: ``(n, p)``, rows sum to 1."""
    return softmax(prompt_logits(image, text, scale))


def drop_below(probs: np.ndarray, threshold: float, in_place: bool = False) -> np.ndarray:
    """Zero the entries not strictly above ``threshold``, without renormalising (the seed's drop).

    ``in_place`` modifies a float32 ``probs`` instead of allocating a copy.
    """
    out = probs if in_place and probs.dtype == np.float32 else np.array(probs, dtype=np.float32)
    np.putmask(out, out <= np.float32(threshold), np.float32(0))
    return out


def class_embeddings(text: np.ndarray, class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """``embed-mean`` class weights ``(c, d)``: normalise prompts, average per class, renormalise."""
    t = as_f32(text)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    w = averaging_matrix(class_index, n_classes).T @ t
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def class_probabilities(image: np.ndarray, text: np.ndarray, class_index: np.ndarray, n_classes: int,
                        scale: float, aggregate: str) -> np.ndarray:
    """Class probabilities ``(n, c)`` of one model for ``embed-mean`` or ``logit-mean``, and the
    per-class mean prompt probability for ``prob-mean``."""
    if aggregate == "prob-mean":
        return class_means(prompt_probabilities(image, text, scale), class_index, n_classes)
    if aggregate == "embed-mean":
        return softmax(prompt_logits(image, class_embeddings(text, class_index, n_classes), scale))
    if aggregate == "logit-mean":
        return softmax(class_means(prompt_logits(image, text, scale), class_index, n_classes))
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")


def normalise_rows(scores: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (rows summing to 0, e.g. everything dropped, stay 0)."""
    s = as_f32(scores)
    total = s.sum(axis=1, keepdims=True)
    return np.divide(s, total, out=np.zeros_like(s), where=total > 0)
