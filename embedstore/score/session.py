"""Stage 2: run an experiment on cached features and return predictions, in bounded memory.

A :class:`Session` opens every member's image store at one commit (:class:`embedstore.store.reader.StoreReader`),
takes the prompts' features from the text bank of the weights each store was encoded with
(:mod:`embedstore.store.textbank`), and scores the rows in blocks through the one scoring rule of
:mod:`embedstore.score.scoring`. Only what the outputs need leaves a block: predictions, the top-k
classes with their probabilities, and the full ``images x classes`` scores while they fit the
memory budget (:class:`embedstore.util.budget.Budget`); ``probabilities_out`` writes the full
probability matrix to a ``.npy`` file block by block whatever its size.

Where the work comes from, per zero-shot member:

- ``embed-mean`` / ``logit-mean``: one ``classes x d`` matrix and a product per block; never
  ``images x prompts``.
- ``prob-mean``: per block, the scale-1 prompt logits: read from the on-disk logit cache
  (:mod:`embedstore.store.logit_cache`) for the prompts it holds, computed from the features for the
  others (and appended to the cache while it has room), then the softmax over all prompts.

A session keeps members' per-block results for the whole dataset between runs while they fit
half the memory budget (from the second run that needs them on: filling them costs a one-off
copy that a single ``embedstore classify`` would never use), so a run that changes only ensemble
weights or ``drop_below`` is a weighted average and a few sums. kNN members (:mod:`embedstore.score.knn`) and linear heads
(:mod:`embedstore.score.heads`) contribute class probabilities.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError, StoreChangedError
from embedstore.score.experiment import Experiment, ModelEntry, prompt_set_of
from embedstore.score.heads import interpolate, load_head, load_zero_shot
from embedstore.score.knn_member import knn_probabilities
from embedstore.score.metrics import Metrics, compute_metrics
from embedstore.score.prompts import Expansion, expand
from embedstore.score.scoring import (
    Rule,
    class_matrix,
    member_part,
    predict,
    score_blocks,
    sum_to_one,
    top_k,
    unit_logits,
    unit_rows,
)
from embedstore.store.cache import Cache
from embedstore.store.card import EncoderCard
from embedstore.store.logit_cache import ChunkWriter, Columns, DamagedChunk, LogitCache
from embedstore.store.npy_writer import NpyWriter
from embedstore.store.reader import Layout, StoreReader
from embedstore.store.store import Store
from embedstore.store.textbank import (
    PromptEncoder,
    TextFeatures,
    text_features,
    weights_digest,
)
from embedstore.util.budget import Budget, human

log = logging.getLogger(__name__)

TOP_K = 5
KEEP_CLASSES = 20  # full score matrices are kept by default up to this many classes


@dataclass
class ModelRun:
    """What one ensemble member contributed (for the log and the report)."""

    label: str
    encoder_id: str
    store: str
    generation: int
    commit_id: str
    fingerprint: dict[str, Any]
    weight: float
    scale: float
    dim: int
    new_prompts: int


@dataclass
class ClassifyResult:
    """Predictions of one experiment run (rows in natural key order)."""

    experiment: Experiment
    classes: tuple[str, ...]
    keys: list[str]
    true_labels: Optional[list[str]]
    predictions: np.ndarray           # (n,) class indices
    top: np.ndarray                   # (n, k) best classes, best first (top[:, 0] == predictions)
    top_probabilities: np.ndarray     # (n, k) their probabilities (scores scaled to sum to 1 per row)
    scores: Optional[np.ndarray]      # (n, c) raw class scores, or None when they exceed the budget
    expansion: Expansion
    models: list[ModelRun]
    metrics: Optional[Metrics]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    source_location: Optional[str] = None
    failed: int = 0                   # images of the dataset that failed to encode (no prediction)
    probabilities_file: Optional[Path] = None

    @property
    def new_prompts(self) -> int:
        """Prompts encoded during this run (0 when every prompt was cached)."""
        return sum(m.new_prompts for m in self.models)

    @property
    def probabilities(self) -> Optional[np.ndarray]:
        """``(n, c)`` scores scaled to sum to 1 per row (None when the scores were not kept)."""
        return None if self.scores is None else sum_to_one(self.scores)


def _digest(texts: Sequence[str]) -> str:
    """A digest of a string list that no other list shares (JSON keeps the boundaries)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


@dataclass
class _Member:
    """One experiment member opened for a run."""

    entry: ModelEntry
    card: EncoderCard
    store: Store
    reader: StoreReader
    weight: float

    @property
    def manifest(self) -> dict[str, Any]:
        return self.reader.manifest

    def run_record(self, scale: float, new: int) -> ModelRun:
        m = self.manifest
        return ModelRun(self.entry.label, self.entry.spec.id, str(self.store.path), int(m["generation"]),
                        m["commit_id"], m["fingerprint"], self.weight, scale, int(m["dim"]), new)


class _Memo:
    """Whole-dataset arrays a session keeps between runs, least recently used dropped first,
    within a byte budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[Any, np.ndarray] = OrderedDict()

    def get(self, key: Any) -> Optional[np.ndarray]:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def room(self, nbytes: int) -> bool:
        return nbytes <= self.budget

    def put(self, key: Any, value: np.ndarray) -> None:
        if value.nbytes > self.budget:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while sum(v.nbytes for v in self._items.values()) > self.budget:
            self._items.popitem(last=False)


class _ZeroShotSource:
    """A zero-shot member's parts, row block by row block (natural order)."""

    def __init__(self, rule: Rule, scale: float, reader: StoreReader, text: np.ndarray,
                 columns: Optional[Columns], chunk: Optional[ChunkWriter], fill: Optional[np.ndarray]):
        self.rule, self.scale, self.reader, self.text = rule, scale, reader, text
        self.matrix = None if rule.prompt_level else class_matrix(rule, text)
        self.columns = columns
        self.chunk = chunk
        self.fill = fill  # the whole-dataset array being filled for the session's memo, or None
        self.missing = (np.arange(len(text)) if columns is None else columns.missing) if rule.prompt_level else None
        self.every = self.missing is not None and self.missing.size == len(text)
        self.missing_t = np.ascontiguousarray(text[self.missing].T) if self.missing is not None else None

    def part(self, start: int, stop: int) -> np.ndarray:
        rows = self.reader.rows(start, stop)
        if self.rule.prompt_level:
            out = self.logits(rows, stop - start)
            part = member_part(self.rule, self.scale, logits=out, in_place=True)
        else:
            part = member_part(self.rule, self.scale, features=self.reader.features(rows), matrix=self.matrix)
        if self.fill is not None:
            self.fill[start:stop] = part
        return part

    def logits(self, rows: Any, n: int) -> np.ndarray:
        """Scale-1 logits ``(n, P)`` of the storage ``rows``: cached columns read, the others computed."""
        assert self.missing is not None and self.missing_t is not None
        if self.every:  # nothing cached: one product, no column scatter
            out = unit_logits(self.reader.features(rows), self.missing_t)
            if self.chunk is not None:
                self.chunk.write(rows.start, out)
            return out
        out = np.empty((n, len(self.text)), dtype=np.float32)
        if self.columns is not None:
            self.columns.read(rows, out)
        if self.missing.size:
            new = unit_logits(self.reader.features(rows), self.missing_t)
            out[:, self.missing] = new
            if self.chunk is not None:
                self.chunk.write(rows.start, new)
        return out


class _MemoSource:
    """Parts kept from an earlier run."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def part(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


class Session:
    """Runs experiments against one cache, reusing what it has read and computed.

    ``encode_prompts``: called for prompts missing from a text bank (the CLI passes
    :func:`embedstore.encode.loop.prompt_encoder`); without it missing prompts are an error naming the
    command that adds them. ``budget``: memory and logit-cache bytes (default:
    :meth:`Budget.default`). ``cache_logits=False`` neither reads nor writes the logit cache.
    """

    def __init__(self, cache: Cache, encode_prompts: Optional[PromptEncoder] = None, budget: Optional[Budget] = None,
                 cache_logits: bool = True):
        self.cache = cache
        self.encode_prompts = encode_prompts
        self.budget = budget or Budget.default()
        self.logit_cache = LogitCache(cache.root, self.budget.logit_cache) if cache_logits else None
        self._memo = _Memo(self.budget.memo_bytes)
        self._seen: dict[Any, None] = {}  # parts computed once: kept in memory when asked for a second time
        self._layouts: dict[str, Layout] = {}
        self._texts: dict[tuple[str, str, str], TextFeatures] = {}

    # -- opening
    def open_member(self, exp: Experiment, entry: ModelEntry, weight: float, stack: contextlib.ExitStack) -> _Member:
        """Open ``entry``'s image store of ``exp.dataset`` at its current commit."""
        card = self.cache.require_card(entry.spec)
        store = self.cache.open_image_store(exp.dataset, entry.spec, entry.view)
        key = str(store.path)
        reader = stack.enter_context(StoreReader(store, layout=self._layouts.get(key)))
        self._layouts = {k: v for k, v in self._layouts.items() if k != key}
        self._layouts[key] = reader.layout
        return _Member(entry, card, store, reader, weight)

    def text(self, member: _Member, texts: Sequence[str]) -> TextFeatures:
        """Prompt features for ``member``'s store (same weights), encoding missing ones once."""
        key = (member.entry.spec.id, weights_digest(member.manifest), _digest(texts))
        if key not in self._texts:
            self._texts[key] = text_features(self.cache, member.entry.spec, member.manifest, texts,
                                             self.encode_prompts, what=str(member.store.path))
        else:
            self._texts[key] = TextFeatures(self._texts[key].features, 0, self._texts[key].bank_id)
        return self._texts[key]

    # -- the run
    def run(self, exp: Experiment, probabilities_out: Optional[Path] = None, top: int = TOP_K,
            keep_scores: Optional[bool] = None) -> ClassifyResult:
        """Score ``exp`` and return a :class:`ClassifyResult` (metrics when the dataset is labelled).

        The result always holds predictions and the ``top`` classes with their probabilities.
        ``keep_scores``: also the full ``images x classes`` scores; None keeps them up to
        :data:`KEEP_CLASSES` classes when they fit a quarter of the memory budget, True keeps
        them whenever they fit half of it. ``probabilities_out``: write the full probability
        matrix to this ``.npy`` file, block by block, whatever its size.

        Every store is read at one commit. A concurrent writer's commit in the short window
        while the stores are opened, or a damaged logit-cache file, makes the run start again
        (up to five times; the damaged file is removed).

        Raises:
            StoreNotFoundError: a model's store or encoder is not in the cache, or prompts are
                missing and nothing may encode them.
            WeightsChangedError / FingerprintMismatchError: text and image features of other weights.
            StoreChangedError: stores kept changing.
            BudgetError: the run cannot fit the memory budget at all.
            SpecError: inconsistent stores, classes or prompts.
        """
        for attempt in range(5):
            try:
                return self._run(exp, probabilities_out, top, keep_scores)
            except StoreChangedError:
                if attempt == 4:
                    raise
                log.info("a store changed while it was opened; running again")
            except DamagedChunk as exc:
                if attempt == 4 or self.logit_cache is None:
                    raise SpecError(f"logit cache: {exc}") from exc
                self.logit_cache.drop(exc.path)
        raise AssertionError("unreachable")

    def _run(self, exp: Experiment, probabilities_out: Optional[Path], k: int,
             keep_scores: Optional[bool]) -> ClassifyResult:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        notes: list[str] = []
        with contextlib.ExitStack() as stack:
            members = [self.open_member(exp, entry, entry.weight, stack) for entry in exp.models]
            first = members[0].reader
            check_same_images(exp, members)
            timings["open_stores"] = time.perf_counter() - t0
            classes = _classes(exp, first, notes)
            expansion = expand(prompt_set_of(exp), classes)
            rule = Rule(exp.aggregate, expansion.class_index, len(classes), exp.drop_below, exp.ensemble)
            n, c = len(first.keys), len(classes)
            k = max(1, min(k, c))
            self._check_fits(n, c, k, len(expansion), members)

            t1 = time.perf_counter()
            plan = self._plan(exp, members, rule, expansion, classes, notes)
            timings["texts"] = time.perf_counter() - t1

            t2 = time.perf_counter()
            keep = (self.budget.fits(n * c * 4, 0.5) if keep_scores
                    else keep_scores is None and c <= KEEP_CLASSES and self.budget.fits(n * c * 4, 0.25))
            collector = _Collector(n, c, k, keep, probabilities_out)
            self._score(plan, collector, self.budget.block_rows(_bytes_per_row(rule, members)))
            timings["score"] = time.perf_counter() - t2
            if not keep and keep_scores is not False and (keep_scores or c <= KEEP_CLASSES):
                notes.append(f"the {n:,} x {c} score matrix ({human(n * c * 4)}) does not fit the memory budget: "
                             "only the top classes are kept (--probs all writes the full matrix as .npy)")
            failed = len(set().union(*(set(m.manifest.get("failures") or {}) for m in members)))
            notes.extend(_outcome_notes(exp, classes, failed, int((collector.best <= 0).sum())))
            t3 = time.perf_counter()
            metrics = _metrics(exp, first, classes, collector, notes)
            timings["metrics"] = time.perf_counter() - t3
            source_location = next(((m.manifest.get("source") or {}).get("location") for m in members
                                    if (m.manifest.get("source") or {}).get("location")), None)
            keys, true = list(first.keys), first.labels
        timings["total"] = time.perf_counter() - t0
        return ClassifyResult(exp, tuple(classes), keys, true, collector.predictions, collector.top,
                              collector.top_probs, collector.scores, expansion, plan.runs, metrics, notes, timings,
                              source_location, failed, collector.path)

    def _plan(self, exp: Experiment, members: Sequence[_Member], rule: Rule, expansion: Expansion,
              classes: tuple[str, ...], notes: list[str]) -> "_Plan":
        """Where every member's contribution comes from (zero-shot sources, kNN/head probabilities)."""
        plan = _Plan(rule)
        for m in members:
            if m.entry.kind != "zero-shot":
                plan.extras.append(self._extra(exp, m, classes, notes))
                plan.extra_weights.append(m.weight)
                plan.runs.append(m.run_record(0.0, 0))
                continue
            scale = _scale(exp, m)
            plan.weights.append(m.weight)
            if m.weight == 0:  # contributes nothing (the experiment has a positive weight somewhere)
                plan.sources.append(None)
                plan.runs.append(m.run_record(scale, 0))
                continue
            text = self.text(m, expansion.texts)
            plan.runs.append(m.run_record(scale, text.new))
            plan.sources.append(self._source(m, rule, expansion, scale, text, plan.chunks, plan.fills))
        return plan

    def _score(self, plan: "_Plan", collector: "_Collector", step: int) -> None:
        """Score every row block into ``collector``; then keep what the plan computed for later
        (logit-cache chunks, memo arrays), or, on any failure, nothing."""
        try:
            for start, scores in score_blocks(plan.rule, plan.sources, plan.weights, len(collector.predictions),
                                              plan.extras, plan.extra_weights, step):
                collector.add(start, scores)
            for chunk in plan.chunks:
                chunk.commit()
            for key, array in plan.fills:
                self._memo.put(key, array)
        except BaseException:
            for chunk in plan.chunks:
                chunk.abort()
            collector.abort()
            raise
        collector.finish()

    def _check_fits(self, n: int, c: int, k: int, prompts: int, members: Sequence[_Member]) -> None:
        """Refuse a run whose fixed needs (keys, outputs, kNN/head scores, prompt features, one
        block) exceed the memory budget, before any scoring."""
        keys = 80 * n
        outputs = n * (12 + 12 * k)
        extras = sum(1 for m in members if m.entry.kind != "zero-shot") * n * c * 4
        text = sum(prompts * m.reader.dim * 4 for m in members if m.entry.kind == "zero-shot")
        block = 16 * 4 * (prompts + c) * (len(members) + 3)
        self.budget.require(keys + outputs + extras + text + block,
                            f"scoring {n:,} images x {c} classes x {prompts:,} prompts",
                            "classify a smaller dataset or fewer prompts")

    def _source(self, m: _Member, rule: Rule, expansion: Expansion, scale: float, text: TextFeatures,
                chunks: list[ChunkWriter], fills: list[tuple[Any, np.ndarray]]) -> Any:
        """Where a zero-shot member's parts come from: the session's memo, or computed (prompt logits
        from the logit cache where it holds them)."""
        reader = m.reader
        n = len(reader.keys)
        class_key = hashlib.sha256(rule.class_index.tobytes()).hexdigest() if not rule.prompt_level else ""
        key = ("part", str(m.store.path), reader.commit_id, text.bank_id, _digest(expansion.texts), class_key,
               rule.aggregate, float(scale))
        kept = self._memo.get(key)
        if kept is not None:
            return _MemoSource(kept)
        fill = None
        if key in self._seen and self._memo.room(n * rule.part_width() * 4):  # asked for again: keep it
            fill = np.empty((n, rule.part_width()), dtype=np.float32)
            fills.append((key, fill))
        self._seen[key] = None
        while len(self._seen) > 64:
            self._seen.pop(next(iter(self._seen)))
        columns = chunk = None
        if rule.prompt_level and self.logit_cache is not None:
            columns = self.logit_cache.columns(m.store.path, reader.commit_id, n, text.bank_id, expansion.texts)
            missing = [expansion.texts[j] for j in columns.missing]
            new_texts = list(dict.fromkeys(missing))
            if new_texts and len(new_texts) == len(missing) and reader.contiguous \
                    and self.logit_cache.fits(n * len(new_texts) * 4):
                chunk = self.logit_cache.writer(m.store.path, reader.commit_id, n, text.bank_id, new_texts)
                chunks.append(chunk)
        return _ZeroShotSource(rule, scale, reader, text.features, columns, chunk, fill)

    def _extra(self, exp: Experiment, m: _Member, classes: tuple[str, ...], notes: list[str]) -> np.ndarray:
        """Class probabilities ``(n, c)`` of a kNN or head member (kept between runs)."""
        key = ("extra", str(m.store.path), m.reader.commit_id, m.entry, _digest(classes))
        kept = self._memo.get(key)
        if kept is not None:
            return kept
        if m.entry.knn is not None:
            probs = knn_probabilities(self.cache, exp, m.entry, m.store, m.reader, classes, notes, self.budget)
        else:
            probs = self._head_probabilities(exp, m, classes, notes)
        self._memo.put(key, probs)
        return probs

    def _head_probabilities(self, exp: Experiment, m: _Member, classes: tuple[str, ...], notes: list[str]) -> np.ndarray:
        """Class probabilities of a saved linear head (WiSE-FT interpolated when ``alpha < 1``)."""
        entry = m.entry
        assert entry.head is not None
        head = load_head(self.cache.root, entry.head.name)
        if head.classes != tuple(classes):
            raise SpecError(f"{entry.label}: the head's classes {list(head.classes)} differ from the experiment's")
        mine = {"encoder_id": entry.spec.id, "view_key": m.store.path.name, "weights_digest": weights_digest(m.manifest)}
        for field_name, value in mine.items():
            if head.meta.get(field_name) not in (None, value):
                raise SpecError(f"{entry.label}: head trained on {field_name} {head.meta.get(field_name)!r}, "
                                f"this member reads {value!r}")
        if entry.head.alpha < 1:
            zs = load_zero_shot(self.cache.root, entry.head.name)
            if zs is None:
                raise SpecError(f"{entry.label}: alpha < 1 needs the zero-shot head, and this head was trained from zeros")
            head = interpolate(zs, head, entry.head.alpha)
        if head.meta.get("dataset") == exp.dataset:
            notes.append(f"{entry.label}: trained on {head.meta.get('train_rows', '?')} images of this dataset; "
                         "metrics over the whole dataset include them")
        reader = m.reader
        n = len(reader.keys)
        out = np.empty((n, len(classes)), dtype=np.float32)
        step = self.budget.block_rows(reader.dim * 6 + len(classes) * 8)
        for start in range(0, n, step):
            stop = min(n, start + step)
            out[start:stop] = head.probabilities(unit_rows(reader.features(reader.rows(start, stop)), copy=False))
        return out


@dataclass
class _Plan:
    """What a run combines: zero-shot sources with their weights, kNN/head probabilities with
    theirs, the log records, and the derived data it produces on the way."""

    rule: Rule
    sources: list[Any] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    extras: list[np.ndarray] = field(default_factory=list)
    extra_weights: list[float] = field(default_factory=list)
    runs: list[ModelRun] = field(default_factory=list)
    chunks: list[ChunkWriter] = field(default_factory=list)
    fills: list[tuple[Any, np.ndarray]] = field(default_factory=list)


def _classes(exp: Experiment, first: StoreReader, notes: list[str]) -> tuple[str, ...]:
    """The experiment's classes, or the dataset's labels (sorted) when it gives none."""
    if exp.classes is not None:
        return tuple(exp.classes)
    if first.labels is None:
        raise SpecError(f"classes: not given, and dataset {exp.dataset!r} has no labels to take them from")
    classes = tuple(sorted(set(first.labels)))
    notes.append(f"classes taken from the dataset's labels: {', '.join(classes)}")
    return classes


def _outcome_notes(exp: Experiment, classes: Sequence[str], failed: int, zero_rows: int) -> list[str]:
    notes = []
    if failed:
        notes.append(f"{failed} image(s) of dataset {exp.dataset!r} failed to encode and have no prediction "
                     "(`embedstore info --failures` lists them)")
    if zero_rows and exp.drop_below is not None and exp.ensemble == "weighted":
        notes.append(f"{zero_rows} image(s) had every prompt dropped (all scores 0); predicted {classes[0]!r} "
                     "(the first class), as ties go to the lowest class index")
    return notes


def _metrics(exp: Experiment, first: StoreReader, classes: Sequence[str], collector: "_Collector",
             notes: list[str]) -> Optional[Metrics]:
    """Metrics of a labelled dataset whose labels are all among the classes (else a note)."""
    ids = first.label_ids(classes)
    if ids is None:
        notes.append(f"dataset {exp.dataset!r} has no labels: metrics skipped, predictions written")
        return None
    if (ids < 0).any():
        unknown = sorted({t for t, i in zip(first.labels or [], ids) if i < 0})
        notes.append(f"metrics skipped: dataset labels not among the classes: {', '.join(unknown[:5])}")
        return None
    return compute_metrics(ids, collector.predictions, classes, top=collector.top)


def _scale(exp: Experiment, m: _Member) -> float:
    if exp.scale != "model":
        return float(exp.scale)
    if m.card.logit_scale is None:
        raise SpecError(f"scale = \"model\": {m.entry.label} has no logit_scale; give a number")
    return float(m.card.logit_scale)


def check_same_images(exp: Experiment, members: Sequence[_Member]) -> None:
    """Members combine row by row, so their stores must hold the same images: the same keys, from
    the same source, encoded from the same file versions (a store re-encoded from other files
    under the same keys, e.g. after `encode --replace` of one view only, is refused)."""
    first = members[0]
    source = (first.manifest.get("source") or {}).get("location")
    for m in members[1:]:
        other = (m.manifest.get("source") or {}).get("location")
        if source and other and other != source:
            raise SpecError(
                f"models disagree on the images of dataset {exp.dataset!r}: {first.entry.label} was encoded from "
                f"{source}, {m.entry.label} from {other}; encode both views from the same folder (or remove the "
                f"outdated store: `embedstore rm --dataset {exp.dataset} --model ...`)")
        if m.reader.keys != first.reader.keys:
            a, b = first.reader.keys, m.reader.keys
            only_a = sorted(set(a) - set(b))
            only_b = sorted(set(b) - set(a))
            example = (only_a or only_b or ["(same keys, other order)"])[0]
            raise SpecError(
                f"models disagree on the images of dataset {exp.dataset!r}: {first.entry.label} has {len(a)} rows, "
                f"{m.entry.label} has {len(b)} (e.g. {example!r}); re-run `embedstore encode` for both on the same folder"
            )
        ours, theirs = first.reader.file_states(), m.reader.file_states()
        differ = np.flatnonzero((ours != theirs).any(axis=1))
        if differ.size:
            raise SpecError(
                f"models disagree on the images of dataset {exp.dataset!r}: {differ.size} image(s), e.g. "
                f"{first.reader.keys[int(differ[0])]!r}, were encoded from another version of the file for "
                f"{m.entry.label} than for {first.entry.label}; re-run `embedstore encode` for both on the same folder")


def _bytes_per_row(rule: Rule, members: Sequence[_Member]) -> int:
    """Temporaries of one row in a block: members' logits or parts, features, the ensemble."""
    width = rule.part_width()
    zero_shot = sum(1 for m in members if m.entry.kind == "zero-shot")
    dims = sum(m.reader.dim for m in members)
    return 4 * width * (zero_shot + 3) + 6 * dims + 16 * rule.n_classes


class _Collector:
    """What the outputs need from each block of class scores: predictions, top-k, and the scores
    themselves when ``keep`` (else only the best score per row); the probabilities go to a
    ``.npy`` file block by block when ``path`` is given."""

    def __init__(self, n: int, c: int, k: int, keep: bool, path: Optional[Path]):
        self.predictions = np.empty(n, dtype=np.int64)
        self.top = np.empty((n, k), dtype=np.int64)
        self.top_probs = np.empty((n, k), dtype=np.float32)
        self.best = np.empty(n, dtype=np.float32)
        self.kept = keep
        self.scores = np.empty((n, c), dtype=np.float32) if keep else None
        self.k = k
        self.path = Path(path) if path is not None else None
        self._writer = None
        if self.path is not None:
            self._writer = NpyWriter(self.path, (n, c))

    def add(self, start: int, scores: np.ndarray) -> None:
        stop = start + len(scores)
        pred = predict(scores)
        top = top_k(scores, self.k, pred)
        probs = sum_to_one(scores)
        self.predictions[start:stop] = pred
        self.top[start:stop] = top
        self.top_probs[start:stop] = np.take_along_axis(probs, top, axis=1)
        self.best[start:stop] = scores.max(axis=1) if scores.shape[1] else 0
        if self.scores is not None:
            self.scores[start:stop] = scores
        if self._writer is not None:
            self._writer.write(start, probs)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.commit()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
