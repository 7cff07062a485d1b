"""Hard voting over prediction CSVs (``embedstore vote``), joined by key.

The seed (``hard_voting.ipynb``) aligned its CSVs by row position and took the pandas mode of each
row; here files are joined by their ``key`` column, every key must be in every file exactly once,
and ties are broken by a stated rule:

``confidence`` (default)
    Among the labels that tie for the most votes, the one with the highest probability summed over
    the files that voted for it (each file's probability column of the label it voted for). A tied
    row where some file voting for a tied label has no probability columns falls back to ``first``,
    as does a row whose summed probabilities are exactly equal; both are counted in the notes.
``first``
    Among the tied labels, the one voted for by the first-listed file that voted for any of them.

``--split`` (:class:`Split`) votes per attribute of a composite integer label. It lists the number
of values of each attribute, most significant first: the seed's ``class = 6*mask + 3*gender + age``
(mask 0..2, gender 0..1, age 0..2) is ``mask=3,gender=2,age=3``; place values (6, 3, 1) follow from
the radices. Each label is decoded into its digits, each attribute takes its own vote (ties by the
same rule, with each file's probability of an attribute value being the sum of its class
probabilities having that value), and the winners are re-encoded, which can give a label no single
file predicted.

Everything here is pure (no printing); :func:`vote_files` reads, validates and votes, and
:func:`write_votes` writes the ``key,label,label_index,votes`` CSV atomically.
"""
from __future__ import annotations

import csv
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError
from embedstore.report.prediction_file import PredictionFile as PredictionFile
from embedstore.report.prediction_file import read_predictions as read_predictions
from embedstore.util.fsutil import atomic_write
from embedstore.util.order import natural_order

log = logging.getLogger(__name__)

TIE_RULES = ("confidence", "first")
OUTPUT_COLUMNS = ("key", "label", "label_index", "votes")
OUTPUT_FORMATS = ("auto", "csv", "ajou")

CONFIDENCE_TOLERANCE = 1e-9
"""Summed probabilities closer than this count as equal (classify writes 6 significant digits)."""

UNANIMOUS, MAJORITY, TIED = 0, 1, 2
STATUS_NAMES = ("unanimous", "majority", "tied")

_INT = re.compile(r"\s*[+-]?\d+\s*")
_SPLIT_ITEM = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*)?([+-]?\d+)\s*")


# ---------------------------------------------------------------------------------------------
# reading and aligning


@dataclass(frozen=True)
class Aligned:
    """Files joined by key: ``rows[f, i]`` is the row of file ``f`` holding ``keys[i]``."""

    files: tuple[PredictionFile, ...]
    keys: tuple[str, ...]
    """All keys, in natural sort order."""
    rows: np.ndarray
    """``(files, keys)`` int64."""

    def labels(self) -> list[list[str]]:
        """``labels[f][i]``: file ``f``'s label of ``keys[i]``."""
        return [[pf.labels[r] for r in self.rows[f].tolist()] for f, pf in enumerate(self.files)]


def align(files: Sequence[PredictionFile]) -> Aligned:
    """Join ``files`` by key, ordered by natural sort of the keys.

    Every key must be in every file; otherwise :class:`SpecError` names the first missing key (in
    natural order), the file lacking it and a file that has it.
    """
    if not files:
        raise SpecError("no prediction files to vote on")
    indices = [{k: i for i, k in enumerate(pf.keys)} for pf in files]
    union: dict[str, int] = {}
    for f, pf in enumerate(files):
        for k in pf.keys:
            union.setdefault(k, f)
    all_keys = list(union)
    order = natural_order(all_keys)
    keys = tuple(all_keys[i] for i in order)
    for pf, index in zip(files, indices):
        if len(index) == len(keys):
            continue
        missing = [k for k in keys if k not in index]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SpecError(
            f"key {missing[0]!r}{more} is missing from prediction file {pf.path} "
            f"(it is in {files[union[missing[0]]].path}); every file must have the same keys"
        )
    rows = np.array([[index[k] for k in keys] for index in indices], dtype=np.int64).reshape(len(files), len(keys))
    return Aligned(files=tuple(files), keys=keys, rows=rows)


# ---------------------------------------------------------------------------------------------
# voting on integer codes


@dataclass(frozen=True)
class VoteResult:
    """The outcome of :func:`hard_vote` for ``n`` rows."""

    winners: np.ndarray
    """``(n,)`` int64 codes."""
    votes: np.ndarray
    """``(n,)`` int64: how many files voted for the winner."""
    status: np.ndarray
    """``(n,)`` int8: :data:`UNANIMOUS`, :data:`MAJORITY` (one label has the most votes) or :data:`TIED`."""
    fell_back: np.ndarray
    """``(n,)`` bool: tied rows that ``confidence`` could not decide because a voter had no probability."""
    equal_confidence: np.ndarray
    """``(n,)`` bool: tied rows whose summed probabilities were equal (decided by ``first``)."""


def hard_vote(codes: np.ndarray, n_labels: Optional[int] = None, tie: str = "confidence",
              scores: Optional[np.ndarray] = None) -> VoteResult:
    """Mode of each column of ``codes`` (``(m files, n rows)`` ints in ``[0, n_labels)``).

    ``scores`` (``(m, n)`` float, NaN where unknown) is each file's probability of the code it voted
    for, used by ``tie="confidence"``: among the tied codes, the highest sum of its voters' scores
    wins. A tied row with an unknown score among the tied codes' voters, or with equal sums (within
    :data:`CONFIDENCE_TOLERANCE`), is
    decided by ``first``: the code of the first file (lowest ``m`` index) voting for a candidate.
    """
    if tie not in TIE_RULES:
        raise SpecError(f"tie rule {tie!r}: expected one of {', '.join(TIE_RULES)}")
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[0] < 1:
        raise ValueError("codes must be a (files, rows) array with at least one file")
    m, n = codes.shape
    if n_labels is None:
        n_labels = int(codes.max()) + 1 if n else 1
    if n and (codes.min() < 0 or codes.max() >= n_labels):
        raise ValueError(f"codes must lie in [0, {n_labels})")
    cols = np.arange(n)
    counts = np.zeros((n, n_labels), dtype=np.int64)
    for f in range(m):
        np.add.at(counts, (cols, codes[f]), 1)
    top = counts.max(axis=1) if n else np.zeros(0, dtype=np.int64)
    is_top = counts == top[:, None]
    tied = is_top.sum(axis=1) > 1
    candidates = is_top
    fell_back = np.zeros(n, dtype=bool)
    equal = np.zeros(n, dtype=bool)
    if tie == "confidence" and tied.any():
        if scores is None:
            fell_back = tied.copy()
        else:
            scores = np.asarray(scores, dtype=np.float64)
            if scores.shape != codes.shape:
                raise ValueError("scores must have the shape of codes")
            in_top = is_top[cols[None, :], codes]  # (m, n): file f voted for a top code
            unknown = (in_top & np.isnan(scores)).any(axis=0)
            fell_back = tied & unknown
            sums = np.zeros((n, n_labels), dtype=np.float64)
            for f in range(m):
                np.add.at(sums, (cols, codes[f]), np.nan_to_num(scores[f], nan=0.0))
            masked = np.where(is_top, sums, -np.inf)
            best = masked.max(axis=1)
            by_confidence = is_top & (masked >= best[:, None] - CONFIDENCE_TOLERANCE)
            use = tied & ~unknown
            equal = use & (by_confidence.sum(axis=1) > 1)
            candidates = np.where(use[:, None], by_confidence, is_top)
    in_candidates = candidates[cols[None, :], codes]  # (m, n)
    first = np.argmax(in_candidates, axis=0)
    winners = codes[first, cols]
    status = np.full(n, MAJORITY, dtype=np.int8)
    status[top == m] = UNANIMOUS
    status[tied] = TIED
    return VoteResult(winners=winners, votes=top.astype(np.int64), status=status, fell_back=fell_back,
                      equal_confidence=equal)


# ---------------------------------------------------------------------------------------------
# split voting


@dataclass(frozen=True)
class Split:
    """A mixed-radix composite label: ``radices`` are the numbers of values, most significant first.

    ``Split(("mask", "gender", "age"), (3, 2, 3))`` decodes ``code = 6*mask + 3*gender + age``.
    """

    names: tuple[str, ...]
    radices: tuple[int, ...]

    @property
    def weights(self) -> tuple[int, ...]:
        """Place values: the product of the radices after each attribute (the last is 1)."""
        out = []
        w = 1
        for r in reversed(self.radices):
            out.append(w)
            w *= r
        return tuple(reversed(out))

    @property
    def size(self) -> int:
        """Number of composite codes (the product of the radices)."""
        return int(np.prod(self.radices))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(..., attributes)`` digits of ``codes``."""
        codes = np.asarray(codes, dtype=np.int64)
        return np.stack([(codes // w) % r for w, r in zip(self.weights, self.radices)], axis=-1)

    def encode(self, digits: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`decode`."""
        digits = np.asarray(digits, dtype=np.int64)
        return (digits * np.asarray(self.weights, dtype=np.int64)).sum(axis=-1)

    def describe(self) -> str:
        return ",".join(f"{n}={r}" for n, r in zip(self.names, self.radices))


def parse_split(text: str) -> Split:
    """``"mask=3,gender=2,age=3"`` or ``"3,2,3"``: numbers of values per attribute, most significant
    first (unnamed attributes are called ``d1``, ``d2``, ...)."""
    items = text.split(",")
    hint = ("each item is the number of values of one attribute, most significant first, not its place "
            "value: class = 6*mask + 3*gender + age (mask 0..2, gender 0..1, age 0..2) is "
            "--split mask=3,gender=2,age=3")
    names: list[str] = []
    radices: list[int] = []
    for pos, item in enumerate(items, start=1):
        m = _SPLIT_ITEM.fullmatch(item)
        if not m:
            raise SpecError(f"--split {text!r}: item {item!r} is not RADIX or NAME=RADIX; {hint}")
        name, radix = m.group(1) or f"d{pos}", int(m.group(2))
        if radix < 2:
            raise SpecError(f"--split {text!r}: attribute {name} has {radix} values (need at least 2); {hint}")
        if name in names:
            raise SpecError(f"--split {text!r}: attribute name {name!r} appears twice")
        names.append(name)
        radices.append(radix)
    if len(radices) < 2:
        raise SpecError(f"--split {text!r}: give at least two attributes (for one, vote without --split); {hint}")
    return Split(tuple(names), tuple(radices))


def split_vote(codes: np.ndarray, split: Split, tie: str = "confidence",
               scores: Optional[Sequence[Optional[np.ndarray]]] = None) -> tuple[np.ndarray, list[VoteResult]]:
    """Vote each attribute of ``codes`` (``(m, n)`` ints in ``[0, split.size)``) and re-encode.

    ``scores[j]`` (``(m, n)``, NaN where unknown) is each file's probability of the value of
    attribute ``j`` it voted for (see :func:`attribute_scores`). Returns the re-encoded codes and
    the per-attribute :class:`VoteResult`.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= split.size):
        raise ValueError(f"codes must lie in [0, {split.size})")
    digits = split.decode(codes)  # (m, n, k)
    results = []
    for j, radix in enumerate(split.radices):
        s = scores[j] if scores is not None else None
        results.append(hard_vote(digits[:, :, j], radix, tie, s))
    winners = split.encode(np.stack([r.winners for r in results], axis=-1))
    return winners, results


def attribute_scores(split: Split, codes: np.ndarray, probabilities: np.ndarray, class_codes: np.ndarray,
                     ) -> list[np.ndarray]:
    """One file's probability of each attribute value it voted for.

    ``codes`` ``(n,)``: the file's labels as codes; ``probabilities`` ``(n, c)`` its class
    probabilities, whose columns are the codes ``class_codes`` ``(c,)``. The probability of value
    ``v`` of attribute ``j`` is the sum of the probabilities of the classes whose digit ``j`` is ``v``.
    Returns one ``(n,)`` array per attribute.
    """
    col_digits = split.decode(class_codes)  # (c, k)
    digits = split.decode(codes)  # (n, k)
    out = []
    for j in range(len(split.radices)):
        match = col_digits[None, :, j] == digits[:, None, j]  # (n, c)
        out.append((probabilities * match).sum(axis=1))
    return out


# ---------------------------------------------------------------------------------------------
# files in, table out


@dataclass
class VoteOutcome:
    """What :func:`vote_files` produced, ready to write and log."""

    paths: tuple[str, ...]
    tie: str
    split: Optional[Split]
    keys: tuple[str, ...]
    labels: list[str]
    label_index: np.ndarray
    votes: np.ndarray
    status: np.ndarray
    label_order: str
    """Where ``label_index`` comes from, in words."""
    classes: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    attribute_ties: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    key_columns: tuple[str, ...] = ("key",)
    """The key column of each input file (``id_idx`` for ``--format ajou`` submissions)."""

    def counts(self) -> dict[str, int]:
        """Rows per status: unanimous, majority, tied."""
        return {name: int((self.status == i).sum()) for i, name in enumerate(STATUS_NAMES)}


def _shared_classes(files: Sequence[PredictionFile]) -> Optional[tuple[str, ...]]:
    """The first file's probability columns when every file has the same set of them, else None."""
    first = files[0].classes
    if first is None:
        return None
    for pf in files[1:]:
        if pf.classes is None or set(pf.classes) != set(first):
            return None
    return first


def _natural_sorted(values: Sequence[str]) -> list[str]:
    values = list(values)
    return [values[i] for i in natural_order(values)]


def _tie_notes(results: Sequence[tuple[str, VoteResult]], tie: str, files: Sequence[PredictionFile]) -> list[str]:
    notes: list[str] = []
    if tie != "confidence" or all(pf.label_probabilities() is None for pf in files):
        return notes  # vote_files already noted that no file has probabilities
    for what, res in results:
        n_fell = int(res.fell_back.sum())
        n_equal = int(res.equal_confidence.sum())
        if n_fell:
            lacking = [pf.path for pf in files if pf.label_probabilities() is None]
            why = (f"files without probability columns ({', '.join(lacking)})" if lacking
                   else "files whose probability columns cannot be mapped to the labels")
            notes.append(f"{what}{n_fell} tied rows fell back to the 'first' rule: {why} voted for a tied label")
        if n_equal:
            notes.append(f"{what}{n_equal} tied rows had equal summed probabilities; the 'first' rule decided them")
    return notes


def vote_files(paths: Sequence[str | os.PathLike[str]], tie: str = "confidence",
               split: Optional[Split] = None) -> VoteOutcome:
    """Read, validate, join by key and hard-vote prediction CSVs.

    Plain voting compares labels as strings. ``label_index`` follows the probability columns of the
    first file when every file has the same set of them (the classify order), otherwise the natural
    sort order of all labels seen. With ``split``, labels must be integers (the composite code) or,
    when every file has the same probability columns, class names whose position in the first
    file's columns is the code (there must then be ``split.size`` of them); ``label_index`` is the
    re-encoded code.
    """
    start = time.perf_counter()
    if tie not in TIE_RULES:
        raise SpecError(f"--ties {tie!r}: expected one of {', '.join(TIE_RULES)}")
    if len(paths) < 2:
        raise SpecError("give at least two prediction files to vote on")
    files = [read_predictions(p) for p in paths]
    aligned = align(files)
    labels = aligned.labels()
    m, n = len(files), len(aligned.keys)
    shared = _shared_classes(files)
    notes: list[str] = []
    if tie == "confidence" and all(pf.label_probabilities() is None for pf in files):
        notes.append("no file has probability columns: ties use the 'first' rule")
    if split is None:
        outcome = _plain(aligned, labels, tie, shared, notes)
    else:
        outcome = _split(aligned, labels, tie, split, shared, notes)
    outcome.seconds = time.perf_counter() - start
    outcome.key_columns = tuple(pf.key_column for pf in files)
    for note in outcome.notes:
        log.info("vote: %s", note)
    log.info("vote: %d files, %d keys: %s", m, n, outcome.counts())
    return outcome


def _plain(aligned: Aligned, labels: list[list[str]], tie: str, shared: Optional[tuple[str, ...]],
           notes: list[str]) -> VoteOutcome:
    files = aligned.files
    if shared is not None:
        classes = shared
        order = f"the probability columns of {files[0].path}"
    else:
        classes = tuple(_natural_sorted({label for row in labels for label in row}))
        order = "natural sort of the labels"
    index = {c: i for i, c in enumerate(classes)}
    codes = np.array([[index[label] for label in row] for row in labels], dtype=np.int64).reshape(len(files), -1)
    scores = np.full(codes.shape, np.nan)
    for f, pf in enumerate(files):
        own = pf.label_probabilities()
        if own is not None:
            scores[f] = own[aligned.rows[f]]
    res = hard_vote(codes, len(classes), tie, scores)
    notes.extend(_tie_notes([("", res)], tie, files))
    return VoteOutcome(
        paths=tuple(pf.path for pf in files), tie=tie, split=None, keys=aligned.keys,
        labels=[classes[i] for i in res.winners.tolist()], label_index=res.winners, votes=res.votes,
        status=res.status, label_order=order, classes=classes, notes=notes,
    )


def _split(aligned: Aligned, labels: list[list[str]], tie: str, split: Split, shared: Optional[tuple[str, ...]],
           notes: list[str]) -> VoteOutcome:
    files = aligned.files
    all_int = all(_INT.fullmatch(label) for row in labels for label in row)
    class_codes: list[Optional[np.ndarray]] = []
    if all_int:
        codes = np.array([[int(label) for label in row] for row in labels], dtype=np.int64).reshape(len(files), -1)
        for f, pf in enumerate(files):
            bad = np.flatnonzero((codes[f] < 0) | (codes[f] >= split.size))
            if bad.size:
                i = int(bad[0])
                raise SpecError(
                    f"prediction file {pf.path}: key {aligned.keys[i]!r} has label {labels[f][i]!r}, outside "
                    f"0..{split.size - 1} of --split {split.describe()}"
                )
            if pf.classes is not None and all(_INT.fullmatch(c) and 0 <= int(c) < split.size for c in pf.classes):
                class_codes.append(np.array([int(c) for c in pf.classes], dtype=np.int64))
            else:
                class_codes.append(None)
                if pf.classes is not None and tie == "confidence":
                    notes.append(f"{pf.path}: probability columns are not integer labels in 0..{split.size - 1}; "
                                 "its probabilities are not used to break --split ties")
        classes: tuple[str, ...] = tuple(str(i) for i in range(split.size))
        order = "the composite integer label (--split)"
        names = list(classes)
        top_digit_max = int(codes.max()) // split.weights[0]
        if top_digit_max < split.radices[0] - 1:
            notes.append(
                f"the largest label uses only values 0..{top_digit_max} of attribute {split.names[0]} "
                f"(which has {split.radices[0]}): check that --split lists numbers of values, most significant first"
            )
    else:
        if shared is None:
            f, i = next((f, i) for f, row in enumerate(labels) for i, label in enumerate(row) if not _INT.fullmatch(label))
            raise SpecError(
                f"--split needs integer labels: prediction file {files[f].path}, key {aligned.keys[i]!r} has label "
                f"{labels[f][i]!r}; class names are accepted only when every file has the same probability "
                "columns (their order gives the integer code)"
            )
        if len(shared) != split.size:
            raise SpecError(
                f"--split {split.describe()} describes {split.size} classes but the probability columns of "
                f"{files[0].path} name {len(shared)}"
            )
        index = {c: i for i, c in enumerate(shared)}
        codes = np.array([[index[label] for label in row] for row in labels], dtype=np.int64).reshape(len(files), -1)
        for pf in files:
            class_codes.append(np.array([index[c] for c in pf.classes or ()], dtype=np.int64))
        classes = shared
        order = f"the probability columns of {files[0].path} (position = composite code, --split)"
        names = list(shared)
    k = len(split.radices)
    scores = [np.full(codes.shape, np.nan) for _ in range(k)]
    for f, pf in enumerate(files):
        cc = class_codes[f]
        if cc is None or pf.probabilities is None:
            continue
        per_attr = attribute_scores(split, codes[f], pf.probabilities[aligned.rows[f]], cc)
        for j in range(k):
            scores[j][f] = per_attr[j]
    winners, results = split_vote(codes, split, tie, scores)
    notes.extend(_tie_notes([(f"{name}: ", r) for name, r in zip(split.names, results)], tie, files))
    votes = (codes == winners[None, :]).sum(axis=0).astype(np.int64)
    status = np.full(codes.shape[1], MAJORITY, dtype=np.int8)
    status[(codes == codes[:1]).all(axis=0)] = UNANIMOUS
    status[np.any([r.status == TIED for r in results], axis=0)] = TIED
    return VoteOutcome(
        paths=tuple(pf.path for pf in files), tie=tie, split=split, keys=aligned.keys,
        labels=[names[i] for i in winners.tolist()], label_index=winners, votes=votes, status=status,
        label_order=order, classes=classes, notes=notes,
        attribute_ties={name: int((r.status == TIED).sum()) for name, r in zip(split.names, results)},
    )


def output_format(outcome: VoteOutcome, fmt: str = "auto") -> str:
    """``csv`` or ``ajou``; ``auto`` is ``ajou`` when every input was a ``--format ajou`` submission."""
    if fmt not in OUTPUT_FORMATS:
        raise SpecError(f"--format {fmt!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "auto":
        return "ajou" if all(col == "id_idx" for col in outcome.key_columns) else "csv"
    return fmt


def write_votes(outcome: VoteOutcome, path: str | os.PathLike[str], fmt: str = "csv") -> Path:
    """Write the votes atomically, rows in natural key order: ``key,label,label_index,votes``
    (``csv``), or the seed's submission ``id_idx,label`` (``ajou``; keys and labels must be integers).

    Raises:
        SpecError: ``ajou`` with a key or label that is not an integer (named).
    """
    out = Path(path)
    if fmt == "ajou":
        for what, values in (("key", outcome.keys), ("label", outcome.labels)):
            bad = next((v for v in values if not _INT.fullmatch(v)), None)
            if bad is not None:
                raise SpecError(f"--format ajou writes integer id_idx and label columns; {what} {bad!r} is not an "
                                "integer (use --format csv)")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            if fmt == "ajou":
                w.writerow(("id_idx", "label"))
                w.writerows(zip(outcome.keys, outcome.labels))
                return
            w.writerow(OUTPUT_COLUMNS)
            w.writerows(zip(outcome.keys, outcome.labels, outcome.label_index.tolist(), outcome.votes.tolist()))

    atomic_write(out, write)
    return out


def vote_log_entry(outcome: VoteOutcome, run_id: str, outputs: dict[str, str]) -> dict[str, Any]:
    """The run-log record (``kind = "vote"``) of a vote.

    ``resolved.aggregate`` and ``models`` (the input files, equal weights) make ``embedstore runs``
    show a readable row.
    """
    split = outcome.split
    return {
        "run_id": run_id,
        "kind": "vote",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [str(Path(p).resolve()) for p in outcome.paths],
        "tie_rule": outcome.tie,
        "split": None if split is None else {
            "names": list(split.names), "radices": list(split.radices), "weights": list(split.weights),
        },
        "label_order": outcome.label_order,
        "resolved": {"aggregate": f"vote-split {split.describe()}" if split else "vote", "classes": list(outcome.classes)},
        "models": [{"label": Path(p).name, "weight": 1.0 / len(outcome.paths)} for p in outcome.paths],
        "rows": len(outcome.keys),
        "counts": outcome.counts(),
        "attribute_ties": outcome.attribute_ties or None,
        "metrics": None,
        "timings": {"total": outcome.seconds},
        "notes": outcome.notes,
        "outputs": outputs,
    }
