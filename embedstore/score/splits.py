"""Validation splits of a labelled dataset: stratified by label, optionally grouped.

Grouping keeps every image of a group (e.g. one person) on the same side, which the
mask/gender/age seed did not do (its 20% ``random_split`` over images let identities leak into
validation). Groups come from the row key by a regular expression (the first capture group, e.g.
``"^[^/]+/([^/]+)/"`` for ``class/person/image.jpg`` keys) or from a CSV file of ``key,group``.
A group must name what must not leak, never the class: a split that leaves a class out of
either side is refused.

In an experiment file::

    [validation]
    fraction = 0.2
    seed = 0
    group_regex = "^[^/]+/([^/]+)/"   # class/person/image.jpg: one group per person; or groups = "persons.csv"
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError

SPLIT_KEYS = {"fraction", "seed", "group_regex", "groups"}


@dataclass(frozen=True)
class SplitSpec:
    """How to hold out a validation split."""

    fraction: float = 0.2
    seed: int = 0
    group_regex: Optional[str] = None
    groups: Optional[str] = None  # CSV path with key,group

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:  # also refuses NaN
            raise SpecError(f"validation.fraction: must be in (0, 1), got {self.fraction}")
        if self.group_regex and self.groups:
            raise SpecError("validation: give group_regex or groups, not both")
        if self.group_regex:
            try:
                pattern = re.compile(self.group_regex)
            except re.error as exc:
                raise SpecError(f"validation.group_regex {self.group_regex!r}: {exc}") from None
            if pattern.groups < 1:
                raise SpecError(f"validation.group_regex {self.group_regex!r}: needs one capture group")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Optional[Path] = None) -> "SplitSpec":
        unknown = set(data) - SPLIT_KEYS
        if unknown:
            raise SpecError(f"validation: unknown key(s) {', '.join(sorted(unknown))} "
                            f"(allowed: {', '.join(sorted(SPLIT_KEYS))})")
        groups = data.get("groups")
        if groups is not None and base is not None and not Path(groups).is_absolute():
            groups = str(base / groups)
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SpecError(f"validation.seed: expected an integer, got {seed!r}")
        fraction = data.get("fraction", 0.2)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise SpecError(f"validation.fraction: expected a number, got {fraction!r}")
        return cls(float(fraction), seed, data.get("group_regex"), groups)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fraction": self.fraction, "seed": self.seed}
        if self.group_regex:
            out["group_regex"] = self.group_regex
        if self.groups:
            out["groups"] = self.groups
        return out


def group_of(keys: Sequence[str], spec: SplitSpec) -> Optional[np.ndarray]:
    """Group label of every key (None when the split is not grouped).

    Raises:
        SpecError: a key the regex does not match, or a key missing from the groups CSV (named).
    """
    if spec.group_regex:
        pattern = re.compile(spec.group_regex)
        out = []
        for key in keys:
            m = pattern.search(key)
            if m is None:
                raise SpecError(f"validation.group_regex {spec.group_regex!r} does not match key {key!r}")
            out.append(m.group(1))
        return np.asarray(out, dtype=object)
    if spec.groups:
        path = Path(spec.groups)
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or not {"key", "group"} <= set(reader.fieldnames):
                    raise SpecError(f"{path}: needs 'key' and 'group' columns, has {reader.fieldnames}")
                mapping = {row["key"]: row["group"] for row in reader}
        except OSError as exc:
            raise SpecError(f"validation.groups {path}: cannot read ({exc})") from exc
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise SpecError(f"{path}: no group for key {missing[0]!r} ({len(missing)} keys missing)")
        return np.asarray([mapping[k] for k in keys], dtype=object)
    return None


def split(keys: Sequence[str], labels: Sequence[str], spec: SplitSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, validation_rows)``: sorted row indices, stratified by label, grouped if asked.

    Deterministic for the same keys, labels and spec. Grouped splits take one fold of
    scikit-learn's ``StratifiedGroupKFold`` with ``round(1 / fraction)`` folds, so the held-out
    fraction is approximate; plain splits use ``StratifiedShuffleSplit``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

    y = np.asarray(labels, dtype=object)
    n = len(y)
    if n < 2:
        raise SpecError("validation: need at least 2 labelled rows to split")
    groups = group_of(keys, spec)
    if groups is not None:
        n_splits = max(2, round(1 / spec.fraction))
        n_groups = len(set(groups.tolist()))
        if n_groups < n_splits:
            raise SpecError(f"validation: {n_groups} groups cannot make a {spec.fraction:.0%} grouped split")
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=spec.seed)
        train, val = next(folds.split(np.zeros(n), y, groups))
        _check_both_sides(y, train, val, spec, groups)
    else:
        counts = {label: int((y == label).sum()) for label in set(y.tolist())}
        if min(counts.values()) < 2:
            rare = min(counts, key=counts.get)  # type: ignore[arg-type]
            raise SpecError(f"validation: class {rare!r} has {counts[rare]} image; a stratified split needs 2")
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=spec.fraction, random_state=spec.seed)
        try:
            train, val = next(splitter.split(np.zeros(n), y))
        except ValueError as exc:  # e.g. fewer validation rows than classes
            raise SpecError(f"validation: cannot make a stratified {spec.fraction:.0%} split of {n} images in "
                            f"{len(counts)} classes ({exc})") from None
        _check_both_sides(y, train, val, spec, None)
    return np.sort(train), np.sort(val)


def _check_both_sides(y: np.ndarray, train: np.ndarray, val: np.ndarray, spec: SplitSpec,
                      groups: Optional[np.ndarray]) -> None:
    """Refuse a split that leaves a class out of the training or the validation side: a head would
    train without it, or validation would never score it (tuning on the rest)."""
    every = set(y.tolist())
    for side, rows in (("validation", val), ("training", train)):
        missing = sorted(every - set(y[rows].tolist()))
        if not missing:
            continue
        cls = missing[0]
        count = int((y == cls).sum())
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        message = (f"validation: the split leaves class {cls!r}{more} out of the {side} side "
                   f"({len(rows)} of {len(y)} images are on that side)")
        if groups is not None:
            held = sorted(set(groups[y == cls].tolist()))
            how = f"group_regex {spec.group_regex!r}" if spec.group_regex else f"groups {spec.groups}"
            message += (f": {how} puts all {count} images of {cls!r} in {len(held)} group(s) (e.g. {held[0]!r}), "
                        "which cannot be on both sides. Groups should name what must not leak (a person, a "
                        "scene), never the class: on a class-folder dataset '^([^/]+)/' captures the class "
                        "folder; for class/person/image.jpg use '^[^/]+/([^/]+)/'")
        raise SpecError(message)
