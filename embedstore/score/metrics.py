"""Classification metrics from true and predicted class indices.

Computed from one confusion matrix (``np.bincount``) with scikit-learn's definitions and its
``zero_division=0`` convention; the tests check equality with ``sklearn.metrics``. Importing
scikit-learn costs about a second, half of the cold-start budget of ``embedstore classify``, so
the classify path does not import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError


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
    """Top-1 accuracy, top-k accuracy (``top_k`` classes; None when not computed), mean per-class
    recall (balanced accuracy), macro-F1, per-class report and confusion matrix (rows: true,
    columns: predicted)."""

    accuracy: float
    macro_f1: float
    per_class: tuple[ClassReport, ...]
    confusion: np.ndarray
    n: int
    mean_recall: float = 0.0
    top_k: Optional[int] = None
    top_k_accuracy: Optional[float] = None

    def to_dict(self, with_confusion: bool = True) -> dict[str, Any]:
        """JSON-ready form (the confusion matrix left out when ``with_confusion`` is False)."""
        out = {
            "n": self.n,
            "accuracy": self.accuracy,
            "top_k": self.top_k,
            "top_k_accuracy": self.top_k_accuracy,
            "mean_recall": self.mean_recall,
            "macro_f1": self.macro_f1,
            "per_class": [c.__dict__ for c in self.per_class],
            "classes": [c.name for c in self.per_class],
        }
        if with_confusion:
            out["confusion"] = self.confusion.tolist()
        return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(c, c)`` counts, rows true class, columns predicted class."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over all ``n_classes`` (0 where undefined)."""
    cm = confusion(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    return float(_ratio(2 * tp, cm.sum(axis=0) + cm.sum(axis=1)).mean())


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                    top: Optional[np.ndarray] = None) -> Metrics:
    """Metrics over all ``len(classes)`` classes (classes absent from both arrays get zeros).

    ``top``: each row's best classes ``(n, k)``, best first, for top-k accuracy (the standard
    ImageNet figure is top-5). Mean recall averages over the classes that have true rows
    (scikit-learn's ``balanced_accuracy_score``).
    """
    c = len(classes)
    cm = confusion(y_true, y_pred, c)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    precision = _ratio(tp, cm.sum(axis=0))
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, cm.sum(axis=0) + support)
    per_class = tuple(
        ClassReport(str(name), float(p), float(r), float(f), float(1 - r) if s else 0.0, int(s))
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    )
    n = int(cm.sum())
    top_k = top_acc = None
    if top is not None:
        top = np.asarray(top)
        top_k = int(top.shape[1])
        top_acc = float((top == np.asarray(y_true)[:, None]).any(axis=1).mean()) if n else 0.0
    present = support > 0
    return Metrics(
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1.mean()) if c else 0.0,
        per_class=per_class,
        confusion=cm,
        n=n,
        mean_recall=float(recall[present].mean()) if present.any() else 0.0,
        top_k=top_k,
        top_k_accuracy=top_acc,
    )


def label_ids(labels: Sequence[str], classes: Sequence[str], where: str) -> np.ndarray:
    """Class index of each label. Raises SpecError (prefixed by ``where``) naming labels that are not classes."""
    index: Mapping[str, int] = {c: i for i, c in enumerate(classes)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise SpecError(f"{where}: label(s) {', '.join(map(repr, unknown[:5]))} are not among the classes "
                        f"({', '.join(classes)})")
    return np.asarray([index[label] for label in labels], dtype=np.int64)
