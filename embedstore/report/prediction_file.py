"""Reading prediction CSVs: what ``classify`` writes (full probabilities or top-k columns) and the
seed's ``--format ajou`` submissions. Files are read one line at a time and validated; the
writing side is :mod:`embedstore.report.predictions`, and voting over them :mod:`embedstore.tune.vote`.
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError

__all__ = ["KEY_COLUMNS", "RESERVED_COLUMNS", "PredictionFile", "read_predictions"]

RESERVED_COLUMNS = ("key", "id_idx", "label", "label_index", "votes")
"""Columns that are never read as class probabilities; every other column is one."""
KEY_COLUMNS = ("key", "id_idx")
"""The key column of a prediction file: ``key`` (``classify``'s CSV) or ``id_idx`` (the seed's
``--format ajou`` submission, which has no ``key``)."""


@dataclass(frozen=True)
class PredictionFile:
    """One prediction CSV: keys and labels in file order, optional class probabilities."""

    path: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    classes: Optional[tuple[str, ...]] = None
    """The probability columns, in file order (None when the file has none)."""
    probabilities: Optional[np.ndarray] = None
    """``(rows, len(classes))`` float64, or None."""
    key_column: str = "key"
    """``key``, or ``id_idx`` for a ``--format ajou`` submission."""
    own_probabilities: Optional[np.ndarray] = None
    """A top-k file's (``class_1,probability_1,...``, what ``classify`` writes above 20 classes)
    probability of each row's own label (NaN where the label is not among its top classes)."""

    def __len__(self) -> int:
        return len(self.keys)

    def label_probabilities(self) -> Optional[np.ndarray]:
        """Each row's probability of its own label (None without probability columns)."""
        if self.own_probabilities is not None:
            return self.own_probabilities
        if self.classes is None or self.probabilities is None:
            return None
        col = {c: i for i, c in enumerate(self.classes)}
        idx = np.fromiter((col[label] for label in self.labels), dtype=np.int64, count=len(self.labels))
        return self.probabilities[np.arange(len(self.labels)), idx]


def read_predictions(path: str | os.PathLike[str]) -> PredictionFile:
    """Read and validate one prediction CSV.

    It needs a key column (``key``, or ``id_idx`` in a ``--format ajou`` submission) and a ``label``
    column, non-empty unique keys and at least one row. Every column other than ``key``, ``id_idx``,
    ``label``, ``label_index`` and ``votes`` is a class probability: its values must be finite
    numbers, and then every label must be one of those columns.
    Raises :class:`SpecError` naming the file (and key, column or row) at fault.
    """
    name = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return _parse_predictions(name, csv.reader(fh))
    except FileNotFoundError:
        raise SpecError(f"prediction file {name}: not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SpecError(f"prediction file {name}: cannot be read as a UTF-8 CSV ({exc})") from None


_TOP_COLUMN = re.compile(r"(class|probability)_(\d+)")


def _top_columns(header: Sequence[str]) -> list[tuple[int, int]]:
    """``[(class column, probability column), ...]`` of a top-k file (``class_1,probability_1,...``)."""
    found: dict[tuple[str, int], int] = {}
    for i, h in enumerate(header):
        m = _TOP_COLUMN.fullmatch(h)
        if m:
            found[(m.group(1), int(m.group(2)))] = i
    ranks = sorted({rank for _, rank in found})
    return [(found[("class", r)], found[("probability", r)]) for r in ranks
            if ("class", r) in found and ("probability", r) in found]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class _Columns:
    """Where the parts of a prediction file are, from its header."""

    header: list[str]
    key_column: str
    key: int
    label: int
    top: list[tuple[int, int]]
    probabilities: list[int]


def _columns(name: str, header_row: Optional[list[str]]) -> _Columns:
    """Check the header (a key and a label column, no repeated names) and place its columns."""
    if header_row is None:
        raise SpecError(f"prediction file {name}: empty (expected a header with key and label columns)")
    header = [h.strip() for h in header_row]
    key_column = next((col for col in KEY_COLUMNS if col in header), None)
    if key_column is None:
        raise SpecError(f"prediction file {name}: no 'key' column (nor 'id_idx', as in a --format ajou "
                        f"submission) (header: {','.join(header)})")
    if "label" not in header:
        raise SpecError(f"prediction file {name}: no 'label' column (header: {','.join(header)})")
    seen: set[str] = set()
    for col in header:
        if col in seen:
            raise SpecError(f"prediction file {name}: column {col!r} appears twice in the header")
        seen.add(col)
    top = _top_columns(header)
    top_cols = {i for pair in top for i in pair}
    probabilities = [i for i, h in enumerate(header) if h not in RESERVED_COLUMNS and i not in top_cols]
    return _Columns(header, key_column, header.index(key_column), header.index("label"), top, probabilities)


def _row_numbers(name: str, cols: _Columns, key: str, row: list[str]) -> list[float]:
    """A row's class probabilities, each a finite number."""
    numbers = [_number(row[i]) for i in cols.probabilities]
    for value, i in zip(numbers, cols.probabilities):
        if not math.isfinite(value):
            raise SpecError(
                f"prediction file {name}: key {key!r}, column {cols.header[i]!r}: {row[i]!r} is not a finite "
                f"number (every column other than {', '.join(RESERVED_COLUMNS)} and the top-k columns "
                "class_N, probability_N is read as a class probability)"
            )
    return numbers


def _own_probability(name: str, cols: _Columns, key: str, label: str, row: list[str]) -> float:
    """A top-k row's probability of its own label (NaN when the label is not among its top classes)."""
    mine = next((row[p] for c, p in cols.top if row[c] == label), None)
    value = math.nan if mine is None else _number(mine)
    if mine is not None and not math.isfinite(value):
        raise SpecError(f"prediction file {name}: key {key!r}: probability {mine!r} is not a finite number")
    return value


def _check_labels(name: str, keys: list[str], labels: list[str], classes: tuple[str, ...]) -> None:
    """Every label is one of the probability columns."""
    known = set(classes)
    for key, label in zip(keys, labels):
        if label not in known:
            raise SpecError(
                f"prediction file {name}: key {key!r} has label {label!r}, which is not one of its "
                f"probability columns ({', '.join(classes)})"
            )


def _parse_predictions(name: str, reader: Any) -> PredictionFile:
    """The rows of one prediction CSV, read one line at a time (labels shared, numbers as arrays)."""
    cols = _columns(name, next(reader, None))
    keys: list[str] = []
    labels: list[str] = []
    shared: dict[str, str] = {}
    first_row: dict[str, int] = {}
    values: list[list[float]] = []
    own: list[float] = []
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(cols.header):
            raise SpecError(f"prediction file {name}, line {line}: {len(row)} fields, the header has {len(cols.header)}")
        key, label = row[cols.key], row[cols.label]
        if not key.strip():
            raise SpecError(f"prediction file {name}, line {line}: empty key")
        if not label.strip():
            raise SpecError(f"prediction file {name}: key {key!r} has an empty label")
        if key in first_row:
            raise SpecError(f"prediction file {name}: duplicate key {key!r} (lines {first_row[key]} and {line})")
        first_row[key] = line
        keys.append(key)
        labels.append(shared.setdefault(label, label))
        if cols.probabilities:
            values.append(_row_numbers(name, cols, key, row))
        elif cols.top:
            own.append(_own_probability(name, cols, key, label, row))
    if not keys:
        raise SpecError(f"prediction file {name}: no rows")
    classes: Optional[tuple[str, ...]] = None
    probs: Optional[np.ndarray] = None
    if cols.probabilities:
        classes = tuple(cols.header[i] for i in cols.probabilities)
        probs = np.asarray(values, dtype=np.float64).reshape(len(keys), len(cols.probabilities))
        _check_labels(name, keys, labels, classes)
    return PredictionFile(path=name, keys=tuple(keys), labels=tuple(labels), classes=classes, probabilities=probs,
                          key_column=cols.key_column,
                          own_probabilities=np.asarray(own, dtype=np.float64) if cols.top and not cols.probabilities else None)
