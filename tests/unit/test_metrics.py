"""Metrics from one confusion matrix equal scikit-learn's (the oracle) on random and edge cases."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from embedstore.score.metrics import compute_metrics, macro_f1


@pytest.mark.parametrize("seed, n, c", [(0, 500, 6), (1, 50, 18), (2, 7, 4), (3, 1, 3)])
def test_equal_to_scikit_learn(seed, n, c):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, c - 1, n))  # class c-1 never predicted
    m = compute_metrics(y, pred, [f"k{i}" for i in range(c)])
    labels = np.arange(c)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert m.accuracy == pytest.approx(accuracy_score(y, pred))
    assert m.macro_f1 == pytest.approx(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    assert macro_f1(y, pred, c) == pytest.approx(m.macro_f1)
    np.testing.assert_array_equal(m.confusion, confusion_matrix(y, pred, labels=labels))
    np.testing.assert_allclose([x.precision for x in m.per_class], p)
    np.testing.assert_allclose([x.recall for x in m.per_class], r)
    np.testing.assert_allclose([x.f1 for x in m.per_class], f)
    assert [x.support for x in m.per_class] == s.tolist()
    assert [x.error_rate for x in m.per_class] == pytest.approx([1 - x.recall if x.support else 0.0 for x in m.per_class])
