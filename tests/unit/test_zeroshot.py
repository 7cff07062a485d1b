"""Pure numpy scoring against plain re-implementations of the formulas."""
from __future__ import annotations

import numpy as np
import pytest

from embedstore.ensemble import normalise_weights, weighted_average
from embedstore.errors import SpecError
from embedstore.zeroshot import (
    class_embeddings,
    class_means,
    class_probabilities,
    drop_below,
    normalise_rows,
    prompt_probabilities,
    softmax,
)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    img = unit(rng.normal(size=(7, 16))).astype(np.float32)
    txt = unit(rng.normal(size=(9, 16))).astype(np.float32)
    index = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])  # unequal counts
    return img, txt, index


def test_softmax_matches_definition():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]], dtype=np.float32)
    expected = np.exp(x - x.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(softmax(x.copy()), expected, rtol=1e-6)


def test_prob_mean_is_segment_mean_of_global_softmax(data):
    img, txt, index = data
    probs = prompt_probabilities(img, txt, 100.0)
    logits = 100.0 * img.astype(np.float64) @ txt.T.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, p, atol=1e-6)
    means = class_means(probs, index, 3)
    for c in range(3):
        np.testing.assert_allclose(means[:, c], p[:, index == c].mean(1), atol=1e-6)


def test_embed_mean_and_logit_mean(data):
    img, txt, index = data
    w = np.stack([unit(unit(txt[index == c]).mean(0, keepdims=True))[0] for c in range(3)])
    np.testing.assert_allclose(class_embeddings(txt, index, 3), w, atol=1e-6)
    z = 50.0 * img @ w.T
    ref = np.exp(z - z.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(class_probabilities(img, txt, index, 3, 50.0, "embed-mean"), ref, atol=1e-6)
    logits = 50.0 * img @ txt.T
    zl = np.stack([logits[:, index == c].mean(1) for c in range(3)], 1)
    ref = np.exp(zl - zl.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(class_probabilities(img, txt, index, 3, 50.0, "logit-mean"), ref, atol=1e-6)


def test_drop_is_strict_and_does_not_renormalise():
    p = np.array([[0.002, 0.0021, 0.5, 0.4959]], dtype=np.float32)
    out = drop_below(p, 0.002)
    assert out.tolist()[0][0] == 0.0 and out[0, 1] == np.float32(0.0021)
    assert out.sum() < 1.0


def test_normalise_rows_keeps_zero_rows_zero():
    out = normalise_rows(np.array([[1.0, 3.0], [0.0, 0.0]], dtype=np.float32))
    assert out.tolist() == [[0.25, 0.75], [0.0, 0.0]]


def test_class_without_prompt_is_an_error():
    with pytest.raises(ValueError, match=r"\[1\]"):
        class_means(np.ones((2, 3), dtype=np.float32), np.array([0, 0, 2]), 3)


def test_weights():
    assert normalise_weights([1, 3]).tolist() == [0.25, 0.75]
    for bad in ([], [-1, 2], [0, 0], [float("nan")]):
        with pytest.raises(SpecError):
            normalise_weights(bad)
    a = np.ones((2, 2), dtype=np.float32)
    np.testing.assert_allclose(weighted_average([a, 3 * a], [1, 1]), 2 * a)
    with pytest.raises(ValueError, match="shapes"):
        weighted_average([a, np.ones((2, 3))], [1, 1])
