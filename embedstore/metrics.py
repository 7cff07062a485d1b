"""Classification metrics from true and predicted class indices (scikit-learn underneath)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class ClassReport:
    """Per-class figures; ``error_rate`` is ``1 - recall`` (the share of the class misclassified)."""

    name: str
    precision: float
    recall: float
    f1: float
    error_rate: float
    support: int


@dataclass(frozen=True)
class Metrics:
    """Accuracy, macro-F1, per-class report and confusion matrix (rows: true, columns: predicted)."""

    accuracy: float
    macro_f1: float
    per_class: tuple[ClassReport, ...]
    confusion: np.ndarray
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": [c.__dict__ for c in self.per_class],
            "confusion": self.confusion.tolist(),
            "classes": [c.name for c in self.per_class],
        }


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> Metrics:
    """Metrics over all ``len(classes)`` classes (classes absent from both arrays get zeros)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = np.arange(len(classes))
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = tuple(
        ClassReport(str(name), float(p), float(r), float(f), float(1 - r) if s else 0.0, int(s))
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    )
    return Metrics(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=labels),
        n=int(y_true.size),
    )
