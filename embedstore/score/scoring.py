"""The one scoring rule of stage 2: members' outputs -> class scores -> predictions (numpy, float32).

Everything that turns cached features into class scores goes through these functions:
``classify`` (:class:`embedstore.score.session.Session`), ``tune``, ``query --classes``, kNN and head
members, and the checkpoint-soup evaluation. Nothing else implements ``prob-mean`` /
``embed-mean`` / ``logit-mean``, ``drop_below``, template subsets, the ensemble or the tie rule.

Every function acts on each image row on its own, so callers apply them to row blocks of any
height and memory stays bounded whatever the number of images.

A zero-shot member's *part* (:func:`member_part`):

``prob-mean`` (the Ajou 2024 seed)
    per-prompt probabilities ``softmax(scale * img . txt)`` over *all* prompts ``(b, P)``.
``embed-mean`` (CLIP paper, open_clip, CLIP_benchmark)
    class probabilities ``softmax(scale * img . W)`` with ``W`` from :func:`class_matrix`:
    normalise each prompt, average per class, renormalise ``(b, c)``.
``logit-mean``
    class probabilities ``softmax(mean of the class's prompt logits)``; the mean of the logits is
    one dot product with the mean prompt vector (:func:`class_matrix`), ``(b, c)``.

:func:`combine` turns the parts (and the class probabilities of kNN or head members) into class
scores: for ``ensemble = "weighted"`` the weighted average of the parts, then for ``prob-mean``
``drop_below`` (entries not strictly above it become 0, no renormalisation) and the per-class
mean over each class's prompts; kNN/head members mix in as ``(1 - W) * normalise(zero-shot) +
sum_j w_j P_j``. ``ensemble = "soft-vote"`` scores each member on its own and sums their
min-max-scaled log scores (the seed's soft voting).

**Ties** (:func:`predict`): class scores within :data:`TIE_RTOL` (relative to the row's best
score) of the best are tied, and the lowest class index wins. float32 arithmetic cannot order
such scores the same way on every machine (the last bits depend on the BLAS kernel), so a tie
rule on exact equality would let two computations of the same formula disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np

from embedstore.errors import SpecError
from embedstore.score.ensemble import normalise_weights, soft_vote, weighted_average
from embedstore.util.arrays import as_f32 as as_f32
from embedstore.util.arrays import unit_rows as unit_rows

AGGREGATES = ("prob-mean", "embed-mean", "logit-mean")
ENSEMBLES = ("weighted", "soft-vote")
TIE_RTOL = 1e-5

def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32 (modifies a float32 input in place and returns it)."""
    x = as_f32(logits)
    if x.size == 0:
        return x
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def unit_logits(features: np.ndarray, matrix_t: np.ndarray) -> np.ndarray:
    """``unit_rows(features) @ matrix_t`` ``(b, m)`` for a row block of stored features (float16 or
    float32), computed as ``features @ matrix_t`` divided by the row norms: the same numbers
    within float32 rounding, without a normalised copy of the block."""
    x = as_f32(features)
    z = x @ matrix_t
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.divide(z, norms, out=z, where=norms > 0)
    return z


def sum_to_one(scores: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (rows summing to 0, e.g. everything dropped, stay 0)."""
    s = as_f32(scores)
    total = s.sum(axis=1, keepdims=True)
    out = np.empty_like(s)  # not zeros_like: a calloc'd array faults a page per 4 KB on first write
    np.divide(s, total, out=out, where=total > 0)
    out[(total <= 0).ravel()] = 0
    return out


@dataclass(frozen=True, eq=False)
class Rule:
    """How one experiment turns members' outputs into class scores.

    ``class_index`` maps every prompt to its class (explicit, never ``reshape(n_classes, -1)``),
    so classes may have different prompt counts.
    """

    aggregate: str
    class_index: np.ndarray
    n_classes: int
    drop_below: Optional[float] = None
    ensemble: str = "weighted"
    _order: Optional[np.ndarray] = field(init=False, repr=False)
    _starts: np.ndarray = field(init=False, repr=False)
    _inverse_counts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise SpecError(f"aggregate: {self.aggregate!r} is not one of {', '.join(AGGREGATES)}")
        if self.ensemble not in ENSEMBLES:
            raise SpecError(f"ensemble: {self.ensemble!r} is not one of {', '.join(ENSEMBLES)}")
        if self.drop_below is not None and self.aggregate != "prob-mean":
            raise SpecError("drop_below: applies to per-prompt probabilities, i.e. aggregate = \"prob-mean\"")
        index = np.asarray(self.class_index, dtype=np.int64)
        counts = np.bincount(index, minlength=self.n_classes)
        if index.size and (index.min() < 0 or index.max() >= self.n_classes):
            raise SpecError(f"class_index: values must lie in 0..{self.n_classes - 1}")
        if (counts == 0).any():
            raise SpecError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no prompt")
        # segment sums over prompts sorted by class (expand() gives them class by class already:
        # then no reordering); no dense prompts x classes matrix, which is 320 MB for ImageNet-1k
        grouped = bool((np.diff(index) >= 0).all())
        order = None if grouped else np.argsort(index, kind="stable")
        starts = np.r_[0, np.cumsum(counts)[:-1]] if self.n_classes else np.zeros(0, dtype=np.int64)
        object.__setattr__(self, "class_index", index)
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_starts", starts.astype(np.int64))
        object.__setattr__(self, "_inverse_counts", (1.0 / np.maximum(counts, 1)).astype(np.float32))

    @property
    def prompt_level(self) -> bool:
        """True when members contribute per-prompt probabilities (``prob-mean``)."""
        return self.aggregate == "prob-mean"

    @property
    def n_prompts(self) -> int:
        return int(self.class_index.size)

    def part_width(self) -> int:
        """Columns of a zero-shot member's part: prompts for ``prob-mean``, classes otherwise."""
        return self.n_prompts if self.prompt_level else self.n_classes

    def subset(self, columns: np.ndarray) -> "Rule":
        """The same rule over a subset of the prompts (a template subset)."""
        return Rule(self.aggregate, self.class_index[np.asarray(columns, dtype=np.int64)], self.n_classes,
                    self.drop_below, self.ensemble)

    def with_drop(self, drop_below: Optional[float]) -> "Rule":
        """The same rule with another ``drop_below``."""
        return Rule(self.aggregate, self.class_index, self.n_classes, drop_below, self.ensemble)

    def class_means(self, values: np.ndarray, axis: int = 1, row_weights: Optional[np.ndarray] = None) -> np.ndarray:
        """Per-class mean over prompts along ``axis``: ``(b, P) -> (b, c)`` (axis 1), or
        ``(P, d) -> (c, d)`` (axis 0; each prompt row first multiplied by ``row_weights``): a
        segment mean, never a reshape."""
        v = as_f32(values)
        w = None if row_weights is None else as_f32(row_weights)
        if self._order is not None:
            v = np.take(v, self._order, axis=axis)
            w = None if w is None else w[self._order]
        if axis == 1:
            out = np.add.reduceat(v, self._starts, axis=1)
            out *= self._inverse_counts
            return out
        # along rows, reduceat is strided and slow: one contiguous sum per class instead
        ends = np.r_[self._starts[1:], v.shape[0]]
        out = np.stack([v[a:b].sum(axis=0) if w is None else w[a:b] @ v[a:b]
                        for a, b in zip(self._starts.tolist(), ends.tolist())])
        out *= self._inverse_counts[:, None]
        return out

    def drop(self, probs: np.ndarray, in_place: bool) -> np.ndarray:
        """Zero the probabilities not strictly above ``drop_below`` (no renormalisation)."""
        if self.drop_below is None:
            return probs
        out = probs if in_place and probs.dtype == np.float32 else np.array(probs, dtype=np.float32)
        np.putmask(out, out <= np.float32(self.drop_below), np.float32(0))
        return out


def class_matrix(rule: Rule, text: np.ndarray) -> np.ndarray:
    """Class weights ``(c, d)`` of a class-level aggregate from prompt features ``(P, d)``.

    ``embed-mean``: normalise each prompt, average per class, renormalise (CLIP's zero-shot
    classifier). ``logit-mean``: the mean prompt vector of each class, so that
    ``img . W[c]`` is the mean of the class's prompt logits.
    """
    t = as_f32(text)
    if rule.aggregate == "embed-mean":  # the prompts' unit rows, without a normalised copy of them all
        norms = np.sqrt(np.einsum("ij,ij->i", t, t))
        inverse = np.divide(np.float32(1), norms, out=np.zeros_like(norms), where=norms > 0)
        return unit_rows(rule.class_means(t, axis=0, row_weights=inverse), copy=False)
    if rule.aggregate == "logit-mean":
        return rule.class_means(t, axis=0)
    raise SpecError("class_matrix: prob-mean scores every prompt; it has no class matrix")


def prompt_logits(features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Scale-1 similarities ``unit(img) . txt`` ``(b, P)`` of a row block (features may be float16)."""
    return unit_logits(features, as_f32(text).T)


def member_part(rule: Rule, scale: float, *, logits: Optional[np.ndarray] = None,
                features: Optional[np.ndarray] = None, matrix: Optional[np.ndarray] = None,
                class_logits: Optional[np.ndarray] = None, in_place: bool = False) -> np.ndarray:
    """One zero-shot member's part for a row block (see the module docstring).

    ``prob-mean`` takes the block's scale-1 prompt ``logits`` ``(b, P)``; the class-level
    aggregates take image ``features`` ``(b, d)`` (normalised here) and the member's
    :func:`class_matrix` ``(c, d)``, or the unit rows' product with it, ``class_logits``
    ``(b, c)``, when the caller has it already. With ``in_place`` the logits array given is
    overwritten.
    """
    if rule.prompt_level:
        z = logits
        if z is None:
            raise ValueError("prob-mean needs the block's prompt logits")
    elif class_logits is not None:
        z = class_logits
    elif features is not None and matrix is not None:
        z, in_place = unit_logits(features, matrix.T), True
    else:
        raise ValueError(f"{rule.aggregate} needs the block's features and the class matrix (or class logits)")
    z = z if in_place and z.dtype == np.float32 else np.array(z, dtype=np.float32)
    z *= np.float32(scale)
    return softmax(z)


def member_class_scores(rule: Rule, part: np.ndarray, fresh: bool = False) -> np.ndarray:
    """A zero-shot member's class scores on its own (soft voting): ``prob-mean`` parts are
    dropped and grouped per member; class-level parts are already class scores."""
    if not rule.prompt_level:
        return part
    return rule.class_means(rule.drop(part, in_place=fresh))


def combine(rule: Rule, parts: Sequence[Optional[np.ndarray]], weights: Sequence[float],
            extras: Sequence[np.ndarray] = (), extra_weights: Sequence[float] = ()) -> np.ndarray:
    """Class scores ``(b, c)`` of a row block from the zero-shot members' ``parts`` and the class
    probabilities of kNN/head members (``extras``).

    ``weights`` and ``extra_weights`` are normalised together. A part may be None when its
    weight is 0 (it was not computed). Parts are never modified.
    """
    w = normalise_weights(list(weights) + list(extra_weights))
    w_zs, w_x = w[:len(parts)], w[len(parts):]
    if len(parts) != len(weights) or len(extras) != len(extra_weights):
        raise ValueError("one weight per part and per extra")
    used = [(p, float(wi)) for p, wi in zip(parts, w_zs) if wi > 0]
    if any(p is None for p, _ in used):
        raise ValueError("a part with a positive weight is missing")
    if rule.ensemble == "soft-vote":
        members = [member_class_scores(rule, p) for p, _ in used] + [x for x, wi in zip(extras, w_x) if wi > 0]
        return soft_vote(members, [wi for _, wi in used] + [float(wi) for wi in w_x if wi > 0])
    scores = None
    if used:
        fresh = len(used) > 1
        combined = weighted_average([p for p, _ in used], [wi for _, wi in used]) if fresh else used[0][0]
        scores = rule.class_means(rule.drop(combined, in_place=fresh)) if rule.prompt_level else combined
    mixed_terms = [(x, float(wi)) for x, wi in zip(extras, w_x) if wi > 0]
    if mixed_terms:
        mixed = weighted_average([x for x, _ in mixed_terms], [wi for _, wi in mixed_terms])
        share = np.float32(sum(wi for _, wi in mixed_terms))
        scores = mixed if scores is None else (np.float32(1) - share) * sum_to_one(scores) + share * mixed
    assert scores is not None  # normalise_weights refuses all-zero weights
    return as_f32(scores)


def predict(scores: np.ndarray) -> np.ndarray:
    """The predicted class of each row: the best score, ties (within :data:`TIE_RTOL` of the
    best, relative) to the lowest class index."""
    s = as_f32(scores)
    if s.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    best = s.max(axis=1, keepdims=True)
    return np.argmax(s >= best - np.float32(TIE_RTOL) * np.abs(best), axis=1)


def top_k(scores: np.ndarray, k: int, predictions: Optional[np.ndarray] = None) -> np.ndarray:
    """The ``k`` best classes of each row ``(b, k)``, best first; the first column is
    :func:`predict`'s choice (so top-1 always agrees with the prediction), the rest follow by
    score, equal scores by class index."""
    s = as_f32(scores)
    n, c = s.shape
    k = max(1, min(int(k), c))
    pred = predict(s) if predictions is None else np.asarray(predictions, dtype=np.int64)
    out = np.empty((n, k), dtype=np.int64)
    out[:, 0] = pred
    if k == 1 or n == 0:
        return out
    rows = np.arange(n)
    if k <= 16:  # a few argmax passes (fast, vectorised) instead of a partial sort of every row
        work = s.copy()
        work[rows, pred] = -np.inf
        for j in range(1, k):
            best = work.argmax(axis=1)  # the first of equal scores: the lowest class index
            out[:, j] = best
            work[rows, best] = -np.inf
        return out
    take = min(c, k + 1)  # k + 1 candidates: the prediction may be among them or not
    cand = np.sort(np.argpartition(-s, take - 1, axis=1)[:, :take], axis=1) if take < c else \
        np.broadcast_to(np.arange(c), (n, c))  # sorted: equal scores keep class order
    order = np.take_along_axis(cand, np.argsort(-np.take_along_axis(s, cand, axis=1), axis=1, kind="stable"), axis=1)
    keep = order != pred[:, None]
    keep &= np.cumsum(keep, axis=1) <= k - 1
    out[:, 1:] = order[keep].reshape(n, k - 1)
    return out


class ArrayPart:
    """A zero-shot member's parts from arrays in memory (rows in output order).

    Either scale-1 prompt ``logits`` ``(n, P)`` (``prob-mean``), optionally restricted to
    ``columns`` (a template subset), or unit image ``features`` ``(n, d)`` with the prompt
    ``text`` ``(P, d)`` (any aggregate; ``prob-mean`` computes the block's logits).
    """

    def __init__(self, rule: Rule, scale: float, *, logits: Optional[np.ndarray] = None,
                 columns: Optional[np.ndarray] = None, features: Optional[np.ndarray] = None,
                 text: Optional[np.ndarray] = None):
        self.rule, self.scale = rule, float(scale)
        self.logits, self.columns, self.features = logits, columns, features
        self.text = None if text is None else as_f32(text)
        if logits is None and (features is None or text is None):
            raise ValueError("ArrayPart needs logits, or features and text")
        if logits is not None and not rule.prompt_level:
            raise ValueError(f"{rule.aggregate} is scored from features and text, not prompt logits")
        self.matrix = None if rule.prompt_level or self.text is None else class_matrix(rule, self.text)

    def part(self, start: int, stop: int) -> np.ndarray:
        """The part of rows ``start:stop``."""
        if self.logits is not None:
            block = self.logits[start:stop]
            fresh = block[:, self.columns] if self.columns is not None else np.array(block, dtype=np.float32)
            return member_part(self.rule, self.scale, logits=fresh, in_place=True)
        assert self.features is not None and self.text is not None
        if self.rule.prompt_level:
            return member_part(self.rule, self.scale, logits=prompt_logits(self.features[start:stop], self.text),
                               in_place=True)
        return member_part(self.rule, self.scale, features=self.features[start:stop], matrix=self.matrix)


class PartSource(Protocol):
    """Anything that gives a zero-shot member's part of rows ``start:stop`` (output order)."""

    def part(self, start: int, stop: int) -> np.ndarray: ...


def score_blocks(rule: Rule, sources: Sequence[Optional[PartSource]], weights: Sequence[float], n_rows: int,
                 extras: Sequence[np.ndarray] = (), extra_weights: Sequence[float] = (),
                 block_rows: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, class scores of rows start:start+b)`` for consecutive row blocks: :func:`combine`
    of the members' parts (``sources``; None where a weight is 0) and of kNN/head class
    probabilities ``extras`` ``(n_rows, c)``."""
    for start in range(0, n_rows, max(1, block_rows)):
        stop = min(n_rows, start + block_rows)
        parts = [s.part(start, stop) if s is not None else None for s in sources]
        yield start, combine(rule, parts, weights, [x[start:stop] for x in extras], extra_weights)


def class_scores(rule: Rule, sources: Sequence[Optional[PartSource]], weights: Sequence[float], n_rows: int,
                 extras: Sequence[np.ndarray] = (), extra_weights: Sequence[float] = (),
                 block_rows: int = 4096) -> np.ndarray:
    """All class scores ``(n_rows, c)`` of :func:`score_blocks` in one array (arrays in, arrays out)."""
    out = np.empty((n_rows, rule.n_classes), dtype=np.float32)
    for start, block in score_blocks(rule, sources, weights, n_rows, extras, extra_weights, block_rows):
        out[start:start + len(block)] = block
    return out
