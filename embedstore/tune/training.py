"""Train, sweep and soup linear heads for an experiment's member, on its validation split.

Features come from the cache (the member's encoder and view on the experiment's dataset); the
split is the experiment's ``[validation]`` (stratified, optionally grouped; default 20%, seed 0).
Every head is scored on the validation rows only; nothing here re-encodes an image.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError
from embedstore.score.experiment import Experiment, prompt_set_of
from embedstore.score.heads import (
    Head,
    interpolate,
    load_head,
    load_zero_shot,
    save_head,
    uniform_soup,
    zero_shot_head,
)
from embedstore.score.metrics import compute_metrics, label_ids
from embedstore.score.prompts import expand
from embedstore.score.scoring import predict
from embedstore.score.splits import SplitSpec, split
from embedstore.store.cache import Cache
from embedstore.store.reader import StoreReader
from embedstore.store.store import StoreRows
from embedstore.store.textbank import PromptEncoder, text_features, weights_digest
from embedstore.tune.head_fit import SoupStep, greedy_soup, train_head
from embedstore.util.arrays import unit_rows
from embedstore.util.budget import Budget

log = logging.getLogger(__name__)

ALPHAS = tuple(round(a, 1) for a in np.linspace(0, 1, 11))


@dataclass
class LabelledFeatures:
    """Unit features of one member with class ids, and the train/validation rows."""

    keys: list[str]
    features: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    train: np.ndarray
    val: np.ndarray
    member: int
    meta: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # the store commit the features were read at


def read_relabel(path: Path) -> dict[str, str]:
    """``key,label`` overrides (the seed's relabelling). Raises SpecError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"key", "label"} <= set(reader.fieldnames):
                raise SpecError(f"{path}: needs 'key' and 'label' columns, has {reader.fieldnames}")
            return {row["key"]: row["label"] for row in reader}
    except OSError as exc:
        raise SpecError(f"--relabel {path}: cannot read ({exc})") from exc


def labelled_features(cache: Cache, exp: Experiment, member: int = 0, relabel: Optional[Path] = None,
                      budget: Optional[Budget] = None) -> LabelledFeatures:
    """Unit features (float32), labels and the validation split for ``exp.models[member]``.

    The features of every row are held in memory (training passes over them hundreds of times);
    a dataset whose features do not fit the memory budget is refused before they are read.

    Raises:
        SpecError: unlabelled dataset, labels outside the classes, an unknown relabel key.
        BudgetError: the features do not fit the memory budget.
    """
    if not 0 <= member < len(exp.models):
        raise SpecError(f"--member {member}: the experiment has {len(exp.models)} model(s)")
    entry = exp.models[member]
    store = cache.open_image_store(exp.dataset, entry.spec, entry.view)
    budget = budget or Budget.default()
    with StoreReader(store) as reader:
        n, d = len(reader.keys), reader.dim
        budget.require(n * d * 4 * 2, f"heads train on {n:,} images x {d} features (float32, plus a working copy)",
                       "train on a smaller dataset (encode a subset under another --dataset)")
        features = np.empty((n, d), dtype=np.float32)
        step = budget.block_rows(d * 6)
        for start in range(0, n, step):
            stop = min(n, start + step)
            features[start:stop] = unit_rows(reader.features(reader.rows(start, stop)), copy=False)
        rows = StoreRows(list(reader.keys), features, reader.labels)
        manifest = reader.manifest
    if rows.labels is None:
        raise SpecError(f"dataset {exp.dataset!r} has no labels to train or validate with")
    labels = list(rows.labels)
    changed = 0
    if relabel is not None:
        overrides = read_relabel(relabel)
        position = {k: i for i, k in enumerate(rows.keys)}
        unknown = [k for k in overrides if k not in position]
        if unknown:
            raise SpecError(f"--relabel {relabel}: key {unknown[0]!r} is not in dataset {exp.dataset!r}")
        for key, label in overrides.items():
            changed += labels[position[key]] != label
            labels[position[key]] = label
    classes = exp.classes or tuple(sorted(set(labels)))
    y = label_ids(labels, classes, f"dataset {exp.dataset!r}")
    spec = exp.validation or SplitSpec()
    train, val = split(rows.keys, labels, spec)
    meta = {"dataset": exp.dataset, "encoder_id": entry.spec.id, "model": str(entry.spec), "store": str(store.path),
            "weights_digest": weights_digest(manifest),
            "store_generation": manifest["generation"], "store_commit_id": manifest.get("commit_id"),
            "validation": spec.to_dict(), "relabelled": changed,
            "validation_keys_sha256": hashlib.sha256("\n".join(rows.keys[i] for i in val).encode()).hexdigest(),
            "view_key": store.path.name}
    return LabelledFeatures(rows.keys, rows.features, y, tuple(classes), train, val, member, meta, manifest)


def zero_shot_for(cache: Cache, exp: Experiment, data: LabelledFeatures,
                  encode_prompts: Optional[PromptEncoder] = None) -> Head:
    """The member's zero-shot head from the experiment's prompts, with text features of the
    weights the store was encoded with (missing prompts encoded by ``encode_prompts``)."""
    entry = exp.models[data.member]
    expansion = expand(prompt_set_of(exp), data.classes)
    text = text_features(cache, entry.spec, data.manifest, expansion.texts, encode_prompts).features
    scale = cache.require_card(entry.spec).logit_scale if exp.scale == "model" else float(exp.scale)
    if scale is None:
        raise SpecError(f"scale = \"model\": {entry.label} has no logit_scale; give a number")
    head = zero_shot_head(text, expansion.class_index, data.classes, scale)
    head.meta.update(templates=exp.templates, prompts=len(expansion))
    return head


def score(head: Head, data: LabelledFeatures, rows: np.ndarray, metric: str = "accuracy") -> float:
    """``accuracy`` or ``macro-f1`` of ``head`` on ``rows``."""
    m = compute_metrics(data.y[rows], predict(head.logits(data.features[rows])), data.classes)
    if metric == "accuracy":
        return float(m.accuracy)
    if metric == "macro-f1":
        return float(m.macro_f1)
    raise SpecError(f"--metric {metric!r}: expected accuracy or macro-f1")


@dataclass
class TrainedHead:
    name: str
    head: Head
    accuracy: float
    macro_f1: float
    wise: list[tuple[float, float, float]]  # (alpha, accuracy, macro-F1) on validation


@dataclass
class TrainReport:
    zero_shot_accuracy: float
    zero_shot_macro_f1: float
    heads: list[TrainedHead]
    n_train: int
    n_val: int
    meta: dict[str, Any]


def wise_sweep(zs: Head, trained: Head, data: LabelledFeatures, alphas: Sequence[float] = ALPHAS) -> list[tuple[float, float, float]]:
    """Validation accuracy and macro-F1 of ``interpolate(zs, trained, a)`` for each ``a``."""
    return [(float(a), score(interpolate(zs, trained, a), data, data.val, "accuracy"),
             score(interpolate(zs, trained, a), data, data.val, "macro-f1")) for a in alphas]


def default_name(exp: Experiment, data: LabelledFeatures) -> str:
    base = exp.name or exp.dataset
    return f"{base}-m{data.member}"


def train_heads(cache: Cache, exp: Experiment, c_values: Sequence[float] = (1.0,), seeds: Sequence[int] = (0,),
                balance: str = "class-weight", init: str = "zero-shot", relabel: Optional[Path] = None,
                member: int = 0, name: Optional[str] = None, encode_prompts: Optional[PromptEncoder] = None,
                budget: Optional[Budget] = None) -> TrainReport:
    """Train one head per (C, seed), save each, and report validation metrics and WiSE-FT sweeps."""
    if init not in ("zero-shot", "zeros"):
        raise SpecError(f"--init {init!r}: expected zero-shot or zeros")
    data = labelled_features(cache, exp, member, relabel, budget)
    zs = zero_shot_for(cache, exp, data, encode_prompts)
    base = name or default_name(exp, data)
    many = len(c_values) * len(seeds) > 1
    out = []
    for c in c_values:
        for seed in seeds:
            head = train_head(data.features[data.train], data.y[data.train], data.classes,
                              zs if init == "zero-shot" else None, c, balance, seed)
            head_name = f"{base}-C{c:g}-s{seed}" if many else base
            head.meta.update(data.meta, name=head_name, train_rows=int(len(data.train)), val_rows=int(len(data.val)),
                             templates=exp.templates, zero_shot_scale=zs.meta["scale"],
                             val_accuracy=score(head, data, data.val), val_macro_f1=score(head, data, data.val, "macro-f1"))
            save_head(cache.root, head_name, head, zs)
            out.append(TrainedHead(head_name, head, head.meta["val_accuracy"], head.meta["val_macro_f1"],
                                   wise_sweep(zs, head, data)))
    return TrainReport(score(zs, data, data.val), score(zs, data, data.val, "macro-f1"), out,
                       int(len(data.train)), int(len(data.val)), data.meta)


@dataclass
class SoupReport:
    name: str
    mode: str
    steps: list[SoupStep]
    accuracy: float
    macro_f1: float
    ingredients: list[str]


def soup_heads(cache: Cache, exp: Experiment, names: Sequence[str], mode: str = "greedy", out_name: str = "soup",
               metric: str = "accuracy", member: int = 0, relabel: Optional[Path] = None,
               budget: Optional[Budget] = None) -> SoupReport:
    """Uniform or greedy soup of saved heads, scored on the experiment's validation split; saved as ``out_name``.

    Raises:
        SpecError: fewer than two heads, heads for other features or classes, or an unknown mode.
    """
    if mode not in ("greedy", "uniform"):
        raise SpecError(f"--mode {mode!r}: expected greedy or uniform")
    if len(names) < 2:
        raise SpecError("soup: give at least two heads")
    data = labelled_features(cache, exp, member, relabel, budget)
    heads = [load_head(cache.root, n) for n in names]
    for n, h in zip(names, heads):
        check_head_fits(h, n, data)
    zs = load_zero_shot(cache.root, names[0])
    if mode == "uniform":
        soup = uniform_soup(heads)
        steps = [SoupStep(n, score(h, data, data.val, metric), float("nan"), True) for n, h in zip(names, heads)]
    else:
        soup, steps = greedy_soup(heads, names, lambda h: score(h, data, data.val, metric))
    soup.meta.update(data.meta, name=out_name, metric=metric, ingredients=[s.name for s in steps if s.accepted],
                     steps=[s.__dict__ for s in steps])
    save_head(cache.root, out_name, soup, zs)
    return SoupReport(out_name, mode, steps, score(soup, data, data.val), score(soup, data, data.val, "macro-f1"),
                      [s.name for s in steps if s.accepted])


def check_head_fits(head: Head, name: str, data: LabelledFeatures) -> None:
    """Refuse a head trained on another encoder/view, or for other classes (named in the message)."""
    if head.classes != data.classes:
        raise SpecError(f"head {name!r} has classes {list(head.classes)}, the experiment {list(data.classes)}")
    for key in ("encoder_id", "view_key", "weights_digest"):
        if head.meta.get(key) not in (None, data.meta[key]):
            raise SpecError(f"head {name!r} was trained on {key} {head.meta.get(key)!r}, "
                            f"this member reads {data.meta[key]!r}")
    if head.weight.shape[1] != data.features.shape[1]:
        raise SpecError(f"head {name!r} takes width {head.weight.shape[1]}, the features have {data.features.shape[1]}")
    trained_on = head.meta.get("validation_keys_sha256")
    if trained_on is not None and trained_on != data.meta["validation_keys_sha256"]:
        raise SpecError(f"head {name!r} was trained with another validation split (its training rows would be "
                        f"scored here): use the [validation] table and --relabel it was trained with "
                        f"({head.meta.get('validation')}), or retrain it")
