"""Stage 2: run an experiment on cached features (numpy, float32) and return predictions.

Zero-shot members are scored and combined as the experiment's ``aggregate`` says (for
``prob-mean``: weighted average of per-prompt probabilities, ``drop_below``, per-class mean, as
the Ajou 2024 seed does). kNN members (:mod:`embedstore.knn`) give class probabilities; when an
experiment has any, the final scores are ``W_zs * normalise(zero-shot scores) + sum_j w_j * P_j``
with all weights normalised together and ``W_zs`` the zero-shot members' share. Without kNN
members the scores are exactly the zero-shot ones.

A :class:`Session` keeps what it has read and computed in memory, keyed by everything it was
computed from (store path and commit id, prompt texts, scale, aggregation), so a second run that
only changes ensemble weights or ``drop_below`` reuses the per-prompt probabilities and takes
milliseconds. Prompts missing from an encoder's text bank are encoded on the fly (on the CPU by
default) and cached; nothing else ever touches a model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.cache import Cache
from embedstore.encode import text_bank_features
from embedstore.ensemble import normalise_weights, soft_vote, weighted_average
from embedstore.errors import SpecError, StoreChangedError
from embedstore.experiment import Experiment, ModelEntry, prompt_set_of
from embedstore.export import unit_rows
from embedstore.metrics import Metrics, compute_metrics, label_ids
from embedstore.prompts import Expansion, expand
from embedstore.knn import vote
from embedstore.logit_cache import LogitCache
from embedstore.store import Store, StoreRows
from embedstore.zeroshot import averaging_matrix, class_means, drop_below, normalise_rows, prompt_logits, softmax

log = logging.getLogger(__name__)


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
    """Predictions of one experiment run."""

    experiment: Experiment
    classes: tuple[str, ...]
    keys: list[str]
    true_labels: Optional[list[str]]
    scores: np.ndarray          # (n, c) raw class scores (argmax gives the prediction)
    probabilities: np.ndarray   # (n, c) scores normalised to sum to 1 per row
    predictions: np.ndarray     # (n,) class indices
    expansion: Expansion
    models: list[ModelRun]
    metrics: Optional[Metrics]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    source_location: Optional[str] = None

    @property
    def new_prompts(self) -> int:
        """Prompts encoded during this run (0 when every prompt was cached)."""
        return sum(m.new_prompts for m in self.models)


def _digest(texts: Sequence[str]) -> str:
    """A digest of a string list that no other list shares (JSON keeps the boundaries)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


class Session:
    """Runs experiments against one cache, reusing loaded features and computed probabilities."""

    def __init__(self, cache: Cache, device: str = "cpu", encode_missing: bool = True, cache_logits: bool = True):
        self.cache = cache
        self.device = device
        self.encode_missing = encode_missing
        self.logit_cache = LogitCache(cache.root) if cache_logits else None
        self._rows: dict[tuple[str, str], StoreRows] = {}
        self._index: dict[tuple[str, str], StoreRows] = {}
        self._texts: dict[tuple[str, str], np.ndarray] = {}
        self._logits: dict[tuple[str, str, str], np.ndarray] = {}
        self._scores: dict[tuple[Any, ...], np.ndarray] = {}

    # -- inputs
    def _image_rows(self, store: Store, commit_id: str) -> StoreRows:
        """Keys, labels and features in their stored dtype (float16 by default; read once per store
        commit). Consumers convert to float32 in blocks: a float32 copy of 100k x 1280 rows costs
        more than the matrix product that uses it."""
        key = (str(store.path), commit_id)
        if key not in self._rows:
            self._rows = {k: v for k, v in self._rows.items() if k[0] != key[0]}  # drop stale generations
            self._rows[key] = store.read(as_float32=False, expect_commit=commit_id)
        return self._rows[key]

    def _image_index(self, store: Store, commit_id: str) -> StoreRows:
        """Keys and labels only (features are read when a member needs them)."""
        key = (str(store.path), commit_id)
        if key in self._rows:
            return self._rows[key]
        if key not in self._index:
            self._index = {k: v for k, v in self._index.items() if k[0] != key[0]}
            self._index[key] = store.read_index(expect_commit=commit_id)
        return self._index[key]

    def _logit_key(self, entry: ModelEntry, store: Store, manifest: dict[str, Any],
                   texts: tuple[str, ...]) -> Optional[tuple[str, str, str]]:
        """(store, commit, text bank fingerprint + prompt list) or None when the bank does not exist yet."""
        bank = self.cache.text_bank(entry.spec)
        if not bank.exists():
            return None
        return (str(store.path), manifest["commit_id"],
                json.dumps(bank.manifest()["fingerprint"], sort_keys=True) + "\n" + _digest(texts))

    def _prompt_logits(self, entry: ModelEntry, store: Store, manifest: dict[str, Any], n_rows: int,
                       texts: tuple[str, ...]) -> tuple[np.ndarray, int]:
        """``img @ txt.T`` (float32, scale 1) from memory, the disk cache, or computed (and then
        cached); with the number of prompts newly encoded for it."""
        key = self._logit_key(entry, store, manifest, texts)
        if key is not None and key in self._logits:
            return self._logits[key], 0
        logits = None
        if key is not None and self.logit_cache is not None:
            logits = self.logit_cache.load(store.path, key[1], key[2], (n_rows, len(texts)))
        new = 0
        if logits is None:
            rows = self._image_rows(store, manifest["commit_id"])
            text, new = self._text_features(entry, texts)
            if text.shape[1] != rows.features.shape[1]:
                raise SpecError(f"{entry.label}: image width {rows.features.shape[1]} != text width {text.shape[1]}")
            logits = prompt_logits(rows.features, text, 1.0)
            key = self._logit_key(entry, store, manifest, texts)
            assert key is not None  # the prompts are in the bank now
            if self.logit_cache is not None:
                self.logit_cache.save(store.path, key[1], key[2], logits)
        self._logits = {k: v for k, v in self._logits.items() if k[0] != key[0]}  # one prompt list per store
        self._logits[key] = logits
        return logits, new

    def _text_features(self, entry: ModelEntry, texts: tuple[str, ...]) -> tuple[np.ndarray, int]:
        key = (entry.spec.id, _digest(texts))
        if key in self._texts:
            return self._texts[key], 0
        features, new = text_bank_features(texts, entry.spec, self.cache, self.device, self.encode_missing)
        self._texts[key] = features
        return features, new

    def _knn_probabilities(self, exp: Experiment, entry: ModelEntry, store: Store, manifest: dict[str, Any],
                           rows: StoreRows, classes: tuple[str, ...], notes: list[str]) -> np.ndarray:
        """Class probabilities ``(n, c)`` of a kNN member (leave-one-out when it votes from its own store)."""
        from embedstore.index import StoreIndex, open_index

        assert entry.knn is not None
        options = entry.knn
        ref_name = options.reference or exp.dataset
        ref_store = self.cache.open_image_store(ref_name, entry.spec, entry.view)
        ref_manifest = ref_store.manifest()
        key = ("knn", str(store.path), manifest["commit_id"], str(ref_store.path), ref_manifest["commit_id"],
               options, _digest(classes))
        if key in self._scores:
            return self._scores[key]
        if not ref_manifest.get("labelled"):
            raise SpecError(f"{entry.label}: dataset {ref_name!r} has no labels to vote with")
        index, staleness = open_index(ref_store)
        if staleness.stale:
            notes.append(f"{entry.label}: {staleness.describe()}; used exact search over the current rows instead")
            index = StoreIndex.exact(ref_store)
        same = ref_store.path == store.path
        n_ref = index.rows.n_live - (1 if same else 0)
        if options.k > n_ref:
            raise SpecError(f"{entry.label}: k = {options.k} but dataset {ref_name!r} has only {n_ref} rows to vote")
        live = np.flatnonzero(index.rows.live)
        ref_class = np.full(len(index.rows), -1, dtype=np.int64)
        ref_class[live] = label_ids([index.rows.labels[i] for i in live], classes, entry.label)
        scores, ids = index.search(unit_rows(rows.features), options.k + (1 if same else 0))
        if same:  # leave-one-out: drop each row's own id, keep the first k others
            own = index.rows.live_ids()
            self_id = np.asarray([own.get(k, -2) for k in rows.keys], dtype=np.int64)
            order = np.argsort(ids == self_id[:, None], axis=1, kind="stable")[:, :options.k]
            scores = np.take_along_axis(scores, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        labels = np.where(ids >= 0, ref_class[np.clip(ids, 0, None)], -1)
        probs = vote(labels, scores, len(classes), options.weighting, options.temperature)
        self._scores[key] = probs
        return probs

    def _head_probabilities(self, exp: Experiment, entry: ModelEntry, store: Store, rows: StoreRows,
                            classes: tuple[str, ...], notes: list[str]) -> np.ndarray:
        """Class probabilities of a saved linear head (WiSE-FT interpolated when ``alpha < 1``)."""
        from embedstore.heads import interpolate, load_head, load_zero_shot

        assert entry.head is not None
        head = load_head(self.cache.root, entry.head.name)
        if head.classes != tuple(classes):
            raise SpecError(f"{entry.label}: the head's classes {list(head.classes)} differ from the experiment's")
        for field_name, mine in (("encoder_id", entry.spec.id), ("view_key", store.path.name)):
            if head.meta.get(field_name) not in (None, mine):
                raise SpecError(f"{entry.label}: head trained on {field_name} {head.meta.get(field_name)!r}, "
                                f"this member reads {mine!r}")
        if entry.head.alpha < 1:
            zs = load_zero_shot(self.cache.root, entry.head.name)
            if zs is None:
                raise SpecError(f"{entry.label}: alpha < 1 needs the zero-shot head, and this head was trained from zeros")
            head = interpolate(zs, head, entry.head.alpha)
        if head.meta.get("dataset") == exp.dataset:
            notes.append(f"{entry.label}: trained on {head.meta.get('train_rows', '?')} images of this dataset; "
                         "metrics over the whole dataset include them")
        return head.probabilities(unit_rows(rows.features))

    def _aggregate(self, entry: ModelEntry, logits: np.ndarray, expansion: Expansion, n_classes: int, scale: float,
                   aggregate: str) -> np.ndarray:
        """Per-prompt probabilities (``prob-mean``) or class probabilities, from scale-1 logits.

        ``embed-mean``: ``img . normalise(mean_j t_j/|t_j|)`` equals the class mean of
        ``img . t_j / |t_j|`` divided by the norm of the class's mean unit prompt vector.
        """
        z = np.multiply(logits, np.float32(scale), dtype=np.float32)
        if aggregate == "prob-mean":
            return softmax(z)
        if aggregate == "logit-mean":
            return softmax(class_means(z, expansion.class_index, n_classes))
        text, _ = self._text_features(entry, expansion.texts)
        norms = np.linalg.norm(text, axis=1).astype(np.float32)
        unit = text / norms[:, None]
        class_norm = np.linalg.norm(averaging_matrix(expansion.class_index, n_classes).T @ unit, axis=1)
        z /= norms[None, :]
        return softmax(class_means(z, expansion.class_index, n_classes) / class_norm.astype(np.float32)[None, :])

    @staticmethod
    def _member_class_scores(scores: np.ndarray, exp: Experiment, expansion: Expansion, n_classes: int) -> np.ndarray:
        """One zero-shot member's class scores on its own (soft voting): per-prompt probabilities
        are dropped (``drop_below``) and grouped per member."""
        if exp.aggregate != "prob-mean":
            return scores
        if exp.drop_below is not None:
            scores = drop_below(scores, exp.drop_below)
        return class_means(scores, expansion.class_index, n_classes)

    # -- the run
    def run(self, exp: Experiment) -> ClassifyResult:
        """Score ``exp`` and return a :class:`ClassifyResult` (metrics when the dataset is labelled).

        Every store is read at one commit; when a concurrent writer commits in between, the run
        starts again (up to three times) so keys and scores never come from different commits.

        Raises:
            StoreNotFoundError: a model's store or encoder is not in the cache.
            StoreChangedError: stores kept changing during three attempts.
            SpecError: inconsistent stores, classes or prompts.
        """
        for attempt in range(3):
            try:
                return self._run(exp)
            except StoreChangedError:
                if attempt == 2:
                    raise
                log.info("a store changed while it was read; running again")
        raise AssertionError("unreachable")

    def _run(self, exp: Experiment) -> ClassifyResult:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        notes: list[str] = []
        weights = normalise_weights([m.weight for m in exp.models])
        inputs = []
        source_location = None
        for entry in exp.models:
            card = self.cache.require_card(entry.spec)
            store = self.cache.open_image_store(exp.dataset, entry.spec, entry.view)
            manifest = store.manifest()
            rows = self._image_index(store, manifest["commit_id"])
            source_location = source_location or (manifest.get("source") or {}).get("location")
            inputs.append((entry, card, store, manifest, rows))
        timings["load_features"] = time.perf_counter() - t0

        first = inputs[0][4]
        for entry, _, store, _, rows in inputs[1:]:
            if rows.keys != first.keys:
                only_a = sorted(set(first.keys) - set(rows.keys))
                only_b = sorted(set(rows.keys) - set(first.keys))
                example = (only_a or only_b or ["(same keys, other order)"])[0]
                raise SpecError(
                    f"models disagree on the images of dataset {exp.dataset!r}: {exp.models[0].label} has "
                    f"{len(first.keys)} rows, {entry.label} has {len(rows.keys)} (e.g. {example!r}); "
                    "re-run `embedstore encode` for both on the same folder"
                )
        classes = exp.classes
        if classes is None:
            if first.labels is None:
                raise SpecError(f"classes: not given, and dataset {exp.dataset!r} has no labels to take them from")
            classes = tuple(sorted(set(first.labels)))
            notes.append(f"classes taken from the dataset's labels: {', '.join(classes)}")
        expansion = expand(prompt_set_of(exp), classes)

        t1 = time.perf_counter()
        runs: list[ModelRun] = []
        per_model, knn_probs = [], []
        zs_weights, knn_weights = [], []
        for (entry, card, store, manifest, rows), w in zip(inputs, weights):
            dim = int(manifest["dim"])
            if entry.knn is not None or entry.head is not None:
                full = self._image_rows(store, manifest["commit_id"])
                knn_probs.append(self._knn_probabilities(exp, entry, store, manifest, full, classes, notes)
                                 if entry.knn is not None else
                                 self._head_probabilities(exp, entry, store, full, classes, notes))
                knn_weights.append(float(w))
                runs.append(ModelRun(entry.label, entry.spec.id, str(store.path), int(manifest["generation"]),
                                     manifest["commit_id"], manifest["fingerprint"], float(w), 0.0, dim, 0))
                continue
            zs_weights.append(float(w))
            scale = card.logit_scale if exp.scale == "model" else float(exp.scale)
            if scale is None:
                raise SpecError(f"scale = \"model\": {entry.label} has no logit_scale; give a number")
            mode = "prompt-probs" if exp.aggregate == "prob-mean" else exp.aggregate
            key = (str(store.path), manifest["commit_id"], _digest(expansion.texts), _digest(classes),
                   hashlib.sha256(expansion.class_index.tobytes()).hexdigest(), scale, mode)
            new = 0
            if key not in self._scores:
                logits, new = self._prompt_logits(entry, store, manifest, len(rows.keys), expansion.texts)
                self._scores[key] = self._aggregate(entry, logits, expansion, len(classes), scale, exp.aggregate)
            per_model.append(self._scores[key])
            runs.append(ModelRun(entry.label, entry.spec.id, str(store.path), int(manifest["generation"]),
                                 manifest["commit_id"], manifest["fingerprint"], float(w), float(scale), dim, new))
        timings["score_models"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        scores = None
        if exp.ensemble == "soft-vote":
            members = [self._member_class_scores(p, exp, expansion, len(classes)) for p in per_model] + knn_probs
            scores = soft_vote(members, zs_weights + knn_weights)
        elif per_model and sum(zs_weights) > 0:
            combined = weighted_average(per_model, zs_weights) if len(per_model) > 1 else per_model[0]
            if exp.aggregate == "prob-mean":
                if exp.drop_below is not None:  # in place only on a fresh average, never on a memoised array
                    combined = drop_below(combined, exp.drop_below, in_place=len(per_model) > 1)
                scores = class_means(combined, expansion.class_index, len(classes))
            else:
                scores = combined
        if knn_probs and exp.ensemble == "weighted":
            mixed = weighted_average(knn_probs, knn_weights) if sum(knn_weights) > 0 else None
            w_knn = sum(knn_weights)
            if scores is None:
                scores = mixed
            elif mixed is not None:
                scores = np.float32(1 - w_knn) * normalise_rows(scores) + np.float32(w_knn) * mixed
        assert scores is not None  # weights are validated: at least one member has a positive weight
        predictions = scores.argmax(axis=1)
        zero_rows = int((scores.max(axis=1) <= 0).sum())
        if zero_rows and exp.drop_below is not None and exp.ensemble == "weighted":
            notes.append(f"{zero_rows} image(s) had every prompt dropped (all scores 0); predicted {classes[0]!r} "
                         "(the first class), as argmax does")
        probabilities = normalise_rows(scores)
        timings["ensemble"] = time.perf_counter() - t2

        metrics = None
        true = first.labels
        if true is None:
            notes.append(f"dataset {exp.dataset!r} has no labels: metrics skipped, predictions written")
        else:
            unknown = sorted(set(true) - set(classes))
            if unknown:
                notes.append(f"metrics skipped: dataset labels not among the classes: {', '.join(unknown[:5])}")
            else:
                index = {c: i for i, c in enumerate(classes)}
                t3 = time.perf_counter()
                metrics = compute_metrics(np.asarray([index[t] for t in true]), predictions, classes)
                timings["metrics"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t0
        return ClassifyResult(exp, tuple(classes), first.keys, true, scores, probabilities, predictions,
                              expansion, runs, metrics, notes, timings, source_location)
