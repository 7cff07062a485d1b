"""Search an experiment's ensemble weights, ``scale``, ``drop_below`` and template subset with Optuna.

Trials are scored on the validation split of a labelled dataset (the experiment's
``[validation]``, stratified and optionally grouped; default 20%, seed 0) through the one scoring
rule of :mod:`embedstore.score.scoring`, the one ``classify`` uses: the validation rows' prompt logits
(``prob-mean``) or unit features (``embed-mean``/``logit-mean``) are read once, and a trial is
:func:`embedstore.score.scoring.class_scores` over them.

The study (TPE, seeded) is stored in the cache as an Optuna journal file, so an interrupted or
finished search continues where it stopped: ``--trials N`` means N finished trials in all. The
best trial is written as a ready-to-run experiment TOML only when it is strictly better than the
experiment as written (a tie keeps the experiment); the file says which study, trial and score
it came from.

``--greedy-templates`` applies the greedy-soup rule to prompts: score each template alone, sort
descending, add them one by one, keep one only if the validation metric strictly improves.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError
from embedstore.score.experiment import Experiment, prompt_set_of
from embedstore.score.metrics import label_ids, macro_f1
from embedstore.score.prompts import PromptSet, expand
from embedstore.score.scoring import (
    ArrayPart,
    Rule,
    class_scores,
    predict,
    prompt_logits,
)
from embedstore.score.splits import SplitSpec, split
from embedstore.store.cache import Cache
from embedstore.store.textbank import PromptEncoder
from embedstore.util.budget import Budget
from embedstore.util.progress import progress_bar

log = logging.getLogger(__name__)

METRICS = ("accuracy", "macro-f1")
SMALL_SPLIT = 200  # validation images below which a note says that differences are mostly noise


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
    logits: Optional[np.ndarray]     # (n_val, P) scale-1 prompt logits (prob-mean)
    features: Optional[np.ndarray]   # (n_val, d) features as stored (embed-mean / logit-mean)
    text: np.ndarray                 # (P, d)


class Objective:
    """Validation-split scorer for experiment variants of one labelled dataset (zero-shot members)."""

    def __init__(self, cache: Cache, exp: Experiment, metric: str = "accuracy", full_template_set: bool = False,
                 encode_prompts: Optional[PromptEncoder] = None, budget: Optional[Budget] = None,
                 all_rows: bool = False):
        """``all_rows``: score every row of the dataset instead of the validation split (the
        playground's prompt table, which reports on the rows its metrics cover)."""
        from embedstore.score.session import Session, check_same_images

        if metric not in METRICS:
            raise SpecError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
        kinds = sorted({m.kind for m in exp.models if m.kind != "zero-shot"})
        if kinds:
            raise SpecError(f"tune searches zero-shot members only; this experiment has {', '.join(kinds)} member(s)")
        if exp.scale == "model":
            raise SpecError("tune: scale = \"model\" gives each member its own logit scale, which the search's single "
                            "scale cannot express; set scale to a number (e.g. 100) in the experiment or with --set")
        self.exp, self.metric = exp, metric
        session = Session(cache, encode_prompts, budget, cache_logits=False)
        self.budget = session.budget
        self.prompt_set: PromptSet = (prompt_set_of(exp) if not full_template_set
                                      else prompt_set_of(replace(exp, use_templates=None)))
        with contextlib.ExitStack() as stack:
            members = [session.open_member(exp, entry, entry.weight, stack) for entry in exp.models]
            first = members[0].reader
            check_same_images(exp, members)
            if first.labels is None:
                raise SpecError(f"dataset {exp.dataset!r} has no labels: tune needs a labelled validation split")
            self.data_id = hashlib.sha256(json.dumps([m.reader.commit_id for m in members]).encode()).hexdigest()[:10]
            self.classes = exp.classes or tuple(sorted(set(first.labels)))
            y_all = label_ids(first.labels, self.classes, f"dataset {exp.dataset!r}")
            self.split = exp.validation or SplitSpec()
            self.val = (np.arange(len(first.keys)) if all_rows
                        else split(first.keys, first.labels, self.split)[1])
            self.y = y_all[self.val]
            expansion = expand(self.prompt_set, self.classes)
            self.rule = Rule(exp.aggregate, expansion.class_index, len(self.classes), None, exp.ensemble)
            n_val, width = len(self.val), sum(m.reader.dim for m in members)
            per_member = len(expansion) if self.rule.prompt_level else 0
            self.budget.require(n_val * (4 * per_member * len(members) + 4 * width),
                                f"tune's validation split ({n_val:,} images x {len(expansion):,} prompts)",
                                "use a smaller validation fraction ([validation] fraction)")
            self.members = [self._read(session, m, expansion.texts) for m in members]
        self.template_of = _template_ids(self.prompt_set, self.classes)
        self.n_templates = len(self.prompt_set.templates)
        self.notes: list[str] = []
        if len(self.val) < SMALL_SPLIT and not all_rows:
            self.notes.append(f"the validation split has only {len(self.val)} images: one image moves accuracy by "
                              f"{1 / len(self.val):.4f}, so small differences between trials are mostly noise")

    def _read(self, session: Any, m: Any, texts: Sequence[str]) -> _Member:
        text = session.text(m, texts).features
        rows = m.reader.storage_rows(self.val)
        features = m.reader.features(rows)  # stored dtype; normalised per block as classify does
        if self.rule.prompt_level:
            return _Member(prompt_logits(features, text), None, text)
        return _Member(None, features, text)

    # -- scoring
    def columns(self, templates: Optional[Sequence[int]]) -> np.ndarray:
        """Prompt columns kept when only ``templates`` (indices) are used; class prompts always stay."""
        if templates is None:
            return np.arange(len(self.template_of))
        keep = np.isin(self.template_of, list(templates)) | (self.template_of < 0)
        return np.flatnonzero(keep)

    def class_scores(self, weights: Sequence[float], scale: float, drop: Optional[float],
                     templates: Optional[Sequence[int]] = None) -> np.ndarray:
        """Class scores ``(n_val, c)`` of one variant, by :func:`embedstore.score.scoring.class_scores`."""
        cols = self.columns(templates)
        if np.bincount(self.rule.class_index[cols], minlength=len(self.classes)).min() == 0:
            raise SpecError("the template subset leaves a class without prompts")
        full = len(cols) == len(self.template_of)
        rule = (self.rule if full else self.rule.subset(cols)).with_drop(drop if drop else None)
        sources = []
        for m, w in zip(self.members, weights):
            if not w:
                sources.append(None)
            elif m.logits is not None:
                sources.append(ArrayPart(rule, scale, logits=m.logits, columns=None if full else cols))
            else:
                sources.append(ArrayPart(rule, scale, features=m.features, text=m.text if full else m.text[cols]))
        width = rule.part_width() * (len(self.members) + 3) * 4
        return class_scores(rule, sources, list(weights), len(self.val), block_rows=self.budget.block_rows(width))

    def evaluate(self, weights: Sequence[float], scale: float, drop: Optional[float],
                 templates: Optional[Sequence[int]] = None) -> float:
        """The validation metric of one variant (accuracy, or macro-F1 over all classes)."""
        pred = predict(self.class_scores(weights, scale, drop, templates))
        if self.metric == "accuracy":
            return float((pred == self.y).mean())
        return macro_f1(self.y, pred, len(self.classes))

    def written_templates(self) -> Optional[list[int]]:
        """The experiment's own ``use_templates`` as template indices (None: all)."""
        if self.exp.use_templates is None:
            return None
        chosen = set(self.exp.use_templates)
        return [i for i, t in enumerate(self.prompt_set.templates) if t in chosen]

    def baseline(self) -> float:
        """The experiment as written (its ``use_templates`` included), on the validation split."""
        return self.evaluate([m.weight for m in self.exp.models], float(self.exp.scale), self.exp.drop_below,
                             self.written_templates())


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
    improved: bool = True            # False: no trial beat the experiment as written; best_config is that experiment
    best_trial: Optional[int] = None
    notes: list[str] = field(default_factory=list)


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
              seed: int = 0, study: Optional[str] = None, top: int = 10, encode_prompts: Optional[PromptEncoder] = None,
              budget: Optional[Budget] = None) -> TuneReport:
    """Run (or continue) the study until it has ``trials`` finished trials.

    The report's ``best_config`` is the best trial's experiment when it scores strictly higher
    than the experiment as written, else the experiment as written (``improved`` False).
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    started = time.perf_counter()
    objective = Objective(cache, exp, metric, full_template_set=space.templates, encode_prompts=encode_prompts,
                          budget=budget)
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
        with progress_bar(todo, "trials", unit="trial") as bar:
            st.optimize(trial_fn, n_trials=todo, callbacks=[lambda study, trial: bar.update(1)])
    complete = sorted((t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: (-t.value, t.number))
    if not complete:
        raise SpecError(f"study {name}: no trial finished")
    best = complete[0]
    baseline = objective.baseline()
    improved = float(best.value) > baseline
    config = params_to_config(exp, objective, best.params) if improved else copy.deepcopy(dict(exp.config))
    notes = list(objective.notes)
    if not improved:
        notes.append(f"no trial scored higher than the experiment as written ({baseline:.4f}); it is kept as the best")
    return TuneReport(name, str(path), metric, baseline, float(best.value), config,
                      [TrialRow(t.number, float(t.value), dict(t.params)) for t in complete[:top]],
                      todo, len(complete), time.perf_counter() - started, int(len(objective.val)), setup_seconds,
                      improved, best.number if improved else None, notes)


@dataclass
class GreedyReport:
    """What ``--greedy-templates`` chose: the config, each template's step, the scores."""

    config: dict[str, Any]
    steps: list[dict[str, Any]]
    best: float
    baseline: float
    n_val: int
    notes: list[str] = field(default_factory=list)


def greedy_templates(cache: Cache, exp: Experiment, metric: str = "accuracy",
                     encode_prompts: Optional[PromptEncoder] = None, budget: Optional[Budget] = None) -> GreedyReport:
    """Greedy-soup rule over templates (each template alone, best first, kept on strict improvement)."""
    objective = Objective(cache, exp, metric, full_template_set=True, encode_prompts=encode_prompts, budget=budget)
    if not objective.n_templates:
        raise SpecError("--greedy-templates: the prompt set has no templates")
    scale = float(exp.scale)
    weights = [m.weight for m in exp.models]
    bar = progress_bar(2 * objective.n_templates - 1, "templates", unit="score")
    alone = []
    for i in range(objective.n_templates):
        alone.append((objective.evaluate(weights, scale, exp.drop_below, [i]), i))
        bar.update()
    order = sorted(alone, key=lambda t: (-t[0], t[1]))
    best, chosen = order[0][0], [order[0][1]]
    steps = [{"template": objective.prompt_set.templates[order[0][1]], "alone": order[0][0], "with": best, "kept": True}]
    for own, i in order[1:]:
        value = objective.evaluate(weights, scale, exp.drop_below, chosen + [i])
        bar.update()
        kept = value > best
        steps.append({"template": objective.prompt_set.templates[i], "alone": own, "with": value, "kept": kept})
        if kept:
            best, chosen = value, chosen + [i]
    bar.close()
    config = copy.deepcopy(dict(exp.config))
    config["use_templates"] = [objective.prompt_set.templates[i] for i in sorted(chosen)]
    return GreedyReport(config, steps, best, objective.baseline(), int(len(objective.val)), objective.notes)


@dataclass(frozen=True)
class TemplateEffect:
    """One template's score alone (with the class prompts) and the change when only it is left out."""

    template: str
    alone: float
    without: float
    delta: float          # without - with all: positive when leaving the template out helps


def template_effects(objective: Objective, weights: Sequence[float], scale: float, drop: Optional[float],
                     on_step: Optional[Any] = None) -> tuple[float, list[TemplateEffect]]:
    """The metric with every template of ``objective.prompt_set``, and each template's
    :class:`TemplateEffect` (``2 x templates`` evaluations through the one scoring rule).
    ``on_step(done, total)`` is called after each evaluation. A template whose removal leaves a
    class without prompts gets ``without`` = NaN.
    """
    n = objective.n_templates
    if not n:
        raise SpecError("the prompt set has no templates (class prompts only)")
    every = list(range(n))
    total = 2 * n + 1
    full = objective.evaluate(weights, scale, drop, every)
    done = 1
    effects = []
    for i in range(n):
        alone = objective.evaluate(weights, scale, drop, [i]) if _covers(objective, [i]) else float("nan")
        rest = [j for j in every if j != i]
        without = objective.evaluate(weights, scale, drop, rest) if _covers(objective, rest) else float("nan")
        effects.append(TemplateEffect(objective.prompt_set.templates[i], alone, without, without - full))
        done += 2
        if on_step is not None:
            on_step(done, total)
    return full, effects


def _covers(objective: Objective, templates: Sequence[int]) -> bool:
    """Whether every class keeps a prompt with only ``templates`` (and the class prompts)."""
    cols = objective.columns(templates)
    return bool(np.bincount(objective.rule.class_index[cols], minlength=len(objective.classes)).min() > 0)


def write_config(path: Path, config: dict[str, Any], header: Sequence[str] = ()) -> Path:
    """Write an experiment config as TOML, atomically; ``header`` lines become ``#`` comments on top."""
    import tomli_w

    from embedstore.util.fsutil import atomic_write

    text = "".join(f"# {line}\n" for line in header) + tomli_w.dumps(config)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
