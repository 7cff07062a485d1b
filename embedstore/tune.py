"""Search an experiment's ensemble weights, ``scale``, ``drop_below`` and template subset with Optuna.

Trials are scored on the validation split of a labelled dataset (the experiment's
``[validation]``, stratified and optionally grouped; default 20%, seed 0) with exactly the
arithmetic of :class:`embedstore.classify.Session`, from per-model prompt logits computed once
(``img @ txt.T`` of the validation rows): a trial is a softmax and a few sums, not a matmul.

The study (TPE, seeded) is stored in the cache as an Optuna journal file, so an interrupted or
finished search continues where it stopped: ``--trials N`` means N finished trials in all. The
best trial is written as a ready-to-run experiment TOML.

``--greedy-templates`` applies the greedy-soup rule to prompts: score each template alone, sort
descending, add them one by one, keep one only if the validation metric strictly improves.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.cache import Cache
from embedstore.errors import SpecError
from embedstore.experiment import Experiment, prompt_set_of
from embedstore.metrics import label_ids, macro_f1
from embedstore.prompts import PromptSet, expand
from embedstore.splits import SplitSpec, split
from embedstore.zeroshot import class_embeddings, class_means, drop_below, prompt_logits, softmax

log = logging.getLogger(__name__)

METRICS = ("accuracy", "macro-f1")


@dataclass(frozen=True)
class SearchSpace:
    """What a study varies. Ranges are inclusive; ``scale`` is searched on a log scale."""

    weights: bool = True
    scale: Optional[tuple[float, float]] = (10.0, 200.0)
    drop_below: Optional[tuple[float, float]] = (0.0, 0.02)
    templates: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "scale": self.scale, "drop_below": self.drop_below, "templates": self.templates}


@dataclass
class _Member:
    logits: np.ndarray      # (n_val, P) unscaled img @ txt.T
    image: np.ndarray       # (n_val, d) as Session reads it
    text: np.ndarray        # (P, d)
    buffer: np.ndarray      # (n_val, P) scratch for the scaled logits / probabilities of a trial


class Objective:
    """Validation-split scorer for experiment variants of one labelled dataset (zero-shot members)."""

    def __init__(self, cache: Cache, exp: Experiment, metric: str = "accuracy", full_template_set: bool = False,
                 device: str = "cpu"):
        from embedstore.classify import Session

        if metric not in METRICS:
            raise SpecError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
        kinds = sorted({m.kind for m in exp.models if m.kind != "zero-shot"})
        if kinds:
            raise SpecError(f"tune searches zero-shot members only; this experiment has {', '.join(kinds)} member(s)")
        if exp.scale == "model":
            raise SpecError("tune: scale = \"model\" gives each member its own logit scale, which the search's single "
                            "scale cannot express; set scale to a number (e.g. 100) in the experiment or with --set")
        self.exp, self.metric = exp, metric
        session = Session(cache, device)
        stores = [cache.open_image_store(exp.dataset, m.spec, m.view) for m in exp.models]
        commits = [s.manifest()["commit_id"] for s in stores]
        rows = [session._image_rows(s, c) for s, c in zip(stores, commits)]
        self.data_id = hashlib.sha256(json.dumps(commits).encode()).hexdigest()[:10]  # what the trials scored
        first = rows[0]
        if any(r.keys != first.keys for r in rows[1:]):
            raise SpecError(f"models disagree on the images of dataset {exp.dataset!r}; re-encode them on the same folder")
        if first.labels is None:
            raise SpecError(f"dataset {exp.dataset!r} has no labels: tune needs a labelled validation split")
        self.classes = exp.classes or tuple(sorted(set(first.labels)))
        y_all = label_ids(first.labels, self.classes, f"dataset {exp.dataset!r}")
        self.split = exp.validation or SplitSpec()
        _, self.val = split(first.keys, first.labels, self.split)
        self.y = y_all[self.val]
        self.prompt_set: PromptSet = (prompt_set_of(exp) if not full_template_set
                                      else prompt_set_of(_without_subset(exp)))
        expansion = expand(self.prompt_set, self.classes)
        self.class_index = expansion.class_index
        self.template_of = _template_ids(self.prompt_set, self.classes)
        self.members = []
        for entry, r in zip(exp.models, rows):
            text, _ = session._text_features(entry, expansion.texts)
            image = np.ascontiguousarray(r.features[self.val])
            logits = prompt_logits(image, text, 1.0)
            self.members.append(_Member(logits, image, text, np.empty_like(logits)))
        self.n_templates = len(self.prompt_set.templates)

    # -- scoring
    def columns(self, templates: Optional[Sequence[int]]) -> np.ndarray:
        """Prompt columns kept when only ``templates`` (indices) are used; class prompts always stay."""
        if templates is None:
            return np.arange(len(self.template_of))
        keep = np.isin(self.template_of, list(templates)) | (self.template_of < 0)
        return np.flatnonzero(keep)

    def class_scores(self, weights: Sequence[float], scale: float, drop: Optional[float],
                     templates: Optional[Sequence[int]] = None) -> np.ndarray:
        """Class scores ``(n_val, c)``, computed as :meth:`Session.run` computes them."""
        from embedstore.ensemble import normalise_weights, weighted_average

        cols = self.columns(templates)
        class_index = self.class_index[cols]
        if np.bincount(class_index, minlength=len(self.classes)).min() == 0:
            raise SpecError("the template subset leaves a class without prompts")
        w = normalise_weights(weights)
        aggregate = self.exp.aggregate
        per = []
        for m, wi in zip(self.members, w):
            if not wi and len(self.members) > 1:
                per.append(None)
                continue
            if aggregate == "prob-mean":
                full = len(cols) == m.logits.shape[1]
                z = np.multiply(m.logits if full else m.logits[:, cols], np.float32(scale), out=m.buffer[:, :len(cols)])
                per.append(softmax(z))  # in place, in the member's buffer
            elif aggregate == "logit-mean":
                per.append(softmax(class_means(m.logits[:, cols] * np.float32(scale), class_index, len(self.classes))))
            else:
                per.append(softmax(prompt_logits(m.image, class_embeddings(m.text[cols], class_index, len(self.classes)),
                                                 scale)))
        used = [(p, wi) for p, wi in zip(per, w) if p is not None]
        combined = weighted_average([p for p, _ in used], [wi for _, wi in used]) if len(used) > 1 else used[0][0]
        if aggregate == "prob-mean":
            if drop:
                combined = drop_below(combined, drop)
            return class_means(combined, class_index, len(self.classes))
        return combined

    def evaluate(self, weights: Sequence[float], scale: float, drop: Optional[float],
                 templates: Optional[Sequence[int]] = None) -> float:
        """The validation metric of one variant (accuracy, or macro-F1 over all classes)."""
        pred = self.class_scores(weights, scale, drop, templates).argmax(axis=1)
        if self.metric == "accuracy":
            return float((pred == self.y).mean())
        return macro_f1(self.y, pred, len(self.classes))

    def baseline(self) -> float:
        """The experiment as written (its ``use_templates`` included), on the validation split."""
        templates = None
        if self.exp.use_templates is not None:
            chosen = set(self.exp.use_templates)
            templates = [i for i, t in enumerate(self.prompt_set.templates) if t in chosen]
        return self.evaluate([m.weight for m in self.exp.models], float(self.exp.scale), self.exp.drop_below, templates)


def _without_subset(exp: Experiment) -> Experiment:
    from dataclasses import replace

    return replace(exp, use_templates=None)


def _template_ids(prompt_set: PromptSet, classes: Sequence[str]) -> np.ndarray:
    """Template index of each prompt of ``expand(prompt_set, classes)``; -1 for class prompts."""
    out: list[int] = []
    for cls in classes:
        out.extend(range(len(prompt_set.templates)))
        out.extend([-1] * len(prompt_set.class_prompts.get(cls, ())))
    return np.asarray(out, dtype=np.int64)


# ---- the study ----------------------------------------------------------------------------------
@dataclass
class TrialRow:
    number: int
    value: float
    params: dict[str, Any]


@dataclass
class TuneReport:
    study: str
    storage: str
    metric: str
    baseline: float
    best_value: float
    best_config: dict[str, Any]
    top: list[TrialRow]
    trials_run: int
    trials_total: int
    seconds: float
    n_val: int
    setup_seconds: float = 0.0
    greedy_log: list[dict[str, Any]] = field(default_factory=list)


def study_name(exp: Experiment, space: SearchSpace, metric: str, seed: int, data_id: str = "") -> str:
    """A name that changes whenever the experiment, the space, the metric, the seed or the stores'
    commits (``data_id``) do, so a study never mixes trials scored on other data."""
    blob = json.dumps({"config": exp.config, "space": space.to_dict(), "metric": metric, "seed": seed,
                       "data": data_id}, sort_keys=True, default=str)
    return f"{exp.name or exp.dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def params_to_config(exp: Experiment, objective: Objective, params: dict[str, Any]) -> dict[str, Any]:
    """The experiment config with a trial's parameters applied (what the best TOML holds)."""
    config = copy.deepcopy(dict(exp.config))
    weights = [params.get(f"w{i}", m.weight) for i, m in enumerate(exp.models)]
    total = sum(weights) or 1.0
    for model, w in zip(config["models"], weights):
        model["weight"] = round(float(w) / total, 6)
    if "scale" in params:
        config["scale"] = round(float(params["scale"]), 4)
    if "drop_below" in params:
        if params["drop_below"] > 0 and exp.aggregate == "prob-mean":
            config["drop_below"] = round(float(params["drop_below"]), 6)
        else:
            config.pop("drop_below", None)
    chosen = _chosen_templates(objective, params)
    if chosen is not None:
        config["use_templates"] = [objective.prompt_set.templates[i] for i in chosen]
    return config


def _chosen_templates(objective: Objective, params: dict[str, Any]) -> Optional[list[int]]:
    if not any(k.startswith("t") and k[1:].isdigit() for k in params):
        return None
    return [i for i in range(objective.n_templates) if params.get(f"t{i}", True)]


def run_study(cache: Cache, exp: Experiment, trials: int, space: SearchSpace = SearchSpace(), metric: str = "accuracy",
              seed: int = 0, study: Optional[str] = None, top: int = 10, device: str = "cpu") -> TuneReport:
    """Run (or continue) the study until it has ``trials`` finished trials; return the best config."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    started = time.perf_counter()
    objective = Objective(cache, exp, metric, full_template_set=space.templates, device=device)
    setup_seconds = time.perf_counter() - started
    if exp.aggregate != "prob-mean" and space.drop_below is not None:
        space = SearchSpace(space.weights, space.scale, None, space.templates)
    name = study or study_name(exp, space, metric, seed, objective.data_id)
    folder = cache.root / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.journal"
    storage = JournalStorage(JournalFileBackend(str(path)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                             sampler=optuna.samplers.TPESampler(seed=seed))
    n_models = len(exp.models)
    default_scale = float(exp.scale)

    def trial_fn(trial: Any) -> float:
        weights = ([trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(n_models)]
                   if space.weights and n_models > 1 else [m.weight for m in exp.models])
        if sum(weights) == 0:
            weights = [1.0] * n_models
        scale = trial.suggest_float("scale", *space.scale, log=True) if space.scale else default_scale
        drop = trial.suggest_float("drop_below", *space.drop_below) if space.drop_below else exp.drop_below
        templates = None
        if space.templates:
            templates = [i for i in range(objective.n_templates) if trial.suggest_categorical(f"t{i}", [True, False])]
            if not templates and not any(objective.prompt_set.class_prompts.get(c) for c in objective.classes):
                raise optuna.TrialPruned("no template chosen")
        try:
            return objective.evaluate(weights, scale, drop, templates)
        except SpecError as exc:
            raise optuna.TrialPruned(str(exc)) from None

    done = len([t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE])
    todo = max(0, trials - done)
    if todo:
        st.optimize(trial_fn, n_trials=todo)
    complete = sorted((t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: (-t.value, t.number))
    if not complete:
        raise SpecError(f"study {name}: no trial finished")
    best = complete[0]
    return TuneReport(name, str(path), metric, objective.baseline(), float(best.value),
                      params_to_config(exp, objective, best.params),
                      [TrialRow(t.number, float(t.value), dict(t.params)) for t in complete[:top]],
                      todo, len(complete), time.perf_counter() - started, int(len(objective.val)), setup_seconds)


def greedy_templates(cache: Cache, exp: Experiment, metric: str = "accuracy", device: str = "cpu") -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Greedy-soup rule over templates: returns (config, log of each template, best score)."""
    objective = Objective(cache, exp, metric, full_template_set=True, device=device)
    scale = float(exp.scale)
    weights = [m.weight for m in exp.models]
    alone = [(objective.evaluate(weights, scale, exp.drop_below, [i]), i) for i in range(objective.n_templates)]
    order = sorted(alone, key=lambda t: (-t[0], t[1]))
    if not order:
        raise SpecError("--greedy-templates: the prompt set has no templates")
    best, chosen = order[0][0], [order[0][1]]
    steps = [{"template": objective.prompt_set.templates[order[0][1]], "alone": order[0][0], "with": best, "kept": True}]
    for own, i in order[1:]:
        value = objective.evaluate(weights, scale, exp.drop_below, chosen + [i])
        kept = value > best
        steps.append({"template": objective.prompt_set.templates[i], "alone": own, "with": value, "kept": kept})
        if kept:
            best, chosen = value, chosen + [i]
    config = copy.deepcopy(dict(exp.config))
    config["use_templates"] = [objective.prompt_set.templates[i] for i in sorted(chosen)]
    return config, steps, best


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write an experiment config as TOML, atomically."""
    import tomli_w

    from embedstore.fsutil import atomic_write

    text = tomli_w.dumps(config)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
