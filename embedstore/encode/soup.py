"""Checkpoint soups: average full open_clip checkpoints that share an architecture.

Two recipes (model soups, Wortsman et al. 2022; the seed's ``--greedy-soup``, see seed B3/C):

``uniform``
    the plain mean of all state dicts, ``sum_i theta_i * (1/N)`` over every key.
``greedy``
    evaluate every ingredient on a validation set, sort by score (descending; ties keep the
    command-line order), start the soup with the best one and its score, then for each next
    ingredient try ``soup * n/(n+1) + model * 1/(n+1)`` over every key (head, logit scale and
    all) and keep the candidate only if its score is *strictly* greater than the best so far.

This module owns the averaging, the saving and the run; the pieces it combines live apart:

- averaging (:func:`uniform_soup`, :func:`greedy_soup`) is plain logic over state dicts: it
  takes a ``load(name)`` and an ``evaluate(state_dict) -> float`` callable, so it runs in tests
  without any model. Ingredients are loaded one at a time (at most the soup, one candidate and
  one ingredient are in memory). Float tensors are averaged in float32 and saved in the
  ingredients' dtype (float32 when they differ); integer and bool tensors must be equal in every
  ingredient and are kept.
- saving (:func:`save_soup`) writes the result atomically in open_clip's ``local-dir:`` layout
  (``open_clip_config.json``, ``open_clip_model.safetensors``) plus ``soup.json``, so
  ``local-dir:OUT`` is an encoder like any other.
- :func:`run_soup` ties together, for ``embedstore soup``, the checkpoints
  (:mod:`embedstore.encode.checkpoints`: parsing, safe loading, key/shape checks), the in-memory
  zero-shot evaluation (:mod:`embedstore.encode.soup_eval`), the averaging and the saving;
  :func:`log_entry` is its run-log record.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, SupportsFloat

from embedstore.encode.checkpoints import (
    CONFIG_NAME,
    CheckpointError,
    SoupError,
    StateDict,
    check_checkpoints,
    check_same_layout,
    parse_checkpoint,
)
from embedstore.encode.soup_eval import (
    METRICS,
    Evaluation,
    LiveOpenClip,
    ZeroShotEvaluator,
    load_validation,
    resolve_validation,
)
from embedstore.errors import SpecError
from embedstore.score.experiment import Experiment, prompt_set_of
from embedstore.score.prompts import PromptSet, expand
from embedstore.store.cache import Cache
from embedstore.store.spec import LOCAL_DIR_PREFIX
from embedstore.store.views import View
from embedstore.util.fsutil import fsync_dir, fsync_file, temp_path
from embedstore.util.progress import progress_bar
from embedstore.util.system import default_workers

log = logging.getLogger(__name__)

MODES = ("greedy", "uniform")
WEIGHTS_NAME = "open_clip_model.safetensors"
SOUP_JSON = "soup.json"


# --------------------------------------------------------------------------------------------
# averaging (pure logic over state dicts)


@dataclass(frozen=True)
class Trial:
    """One ingredient's turn: its own score, the score of the soup tried with it, and the verdict.

    For the first (best) ingredient of a greedy soup, ``soup_score`` is its own score. In a
    uniform soup every ingredient is accepted and ``soup_score`` is the final soup's score.
    ``own`` and ``soup`` are what ``evaluate`` returned (floats, or objects with ``__float__``).
    """

    name: str
    own: Optional[SupportsFloat]
    soup: Optional[SupportsFloat]
    accepted: bool
    size: int   # ingredients in the soup after this trial

    @property
    def own_score(self) -> Optional[float]:
        return None if self.own is None else float(self.own)

    @property
    def soup_score(self) -> Optional[float]:
        return None if self.soup is None else float(self.soup)


@dataclass
class SoupResult:
    """The averaged state dict and how it was made."""

    mode: str
    state_dict: dict[str, Any]
    trials: list[Trial]
    final: Optional[SupportsFloat] = None   # evaluation of the soup (None when not evaluated)

    @property
    def ingredients(self) -> list[str]:
        """Names of the accepted ingredients, in the order they joined."""
        return [t.name for t in self.trials if t.accepted]

    @property
    def score(self) -> Optional[float]:
        return None if self.final is None else float(self.final)


class _Dtypes:
    """The dtype each key is saved in: the ingredients' shared dtype, float32 when they differ."""

    def __init__(self) -> None:
        self.dtypes: dict[str, Any] = {}

    def see(self, state: StateDict) -> None:
        import torch

        for key, value in state.items():
            known = self.dtypes.setdefault(key, value.dtype)
            if known != value.dtype and value.is_floating_point():
                self.dtypes[key] = torch.float32

    def cast(self, state: StateDict) -> dict[str, Any]:
        return {k: v.to(self.dtypes.get(k, v.dtype)).contiguous() for k, v in state.items()}


def _float32_copy(state: StateDict) -> dict[str, Any]:
    import torch

    return {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}


def _same_integer(key: str, a: Any, b: Any, name: str) -> None:
    import torch

    if not torch.equal(a, b):
        raise CheckpointError(f"{name}: integer tensor {key!r} differs from the soup's; "
                              "only floating point tensors can be averaged")


def add_to_average(soup: StateDict, model: StateDict, n: int, name: str = "model") -> dict[str, Any]:
    """``soup * n/(n+1) + model * 1/(n+1)`` over every key (the greedy soup's candidate).

    ``soup`` is the float32 average of ``n`` ingredients; the result is a new float32 state dict
    (``soup`` is not modified). Integer tensors must be equal and are kept.
    """
    import torch

    if set(soup) != set(model):
        raise CheckpointError(f"{name}: keys differ from the soup's")
    keep, add = n / (n + 1.0), 1.0 / (n + 1)
    out = {}
    for key, value in soup.items():
        other = model[key]
        if value.is_floating_point():
            out[key] = value * keep + other.to(torch.float32) * add
        else:
            _same_integer(key, value, other, name)
            out[key] = value
    return out


def _check_score(value: SupportsFloat, name: str) -> SupportsFloat:
    if math.isnan(float(value)):
        raise SoupError(f"{name}: the evaluation returned NaN")
    return value


def uniform_soup(ingredients: Sequence[str], load: Callable[[str], StateDict],
                 evaluate: Optional[Callable[[StateDict], SupportsFloat]] = None) -> SoupResult:
    """The plain mean of all ingredients: ``sum_i theta_i * (1/N)`` (float32), loaded one at a time.

    With ``evaluate``, each ingredient and the soup are scored (for the report; nothing is
    selected): ``evaluate`` is called once per ingredient, in order, then once on the soup.
    """
    import torch

    if not ingredients:
        raise SoupError("a soup needs at least one ingredient")
    weight = 1.0 / len(ingredients)
    dtypes = _Dtypes()
    total: Optional[dict[str, Any]] = None
    own: dict[str, Optional[SupportsFloat]] = {}
    for name in ingredients:
        state = load(name)
        dtypes.see(state)
        own[name] = _check_score(evaluate(state), name) if evaluate is not None else None
        if total is None:
            total = {k: (v.to(torch.float32) * weight if v.is_floating_point() else v.clone()) for k, v in state.items()}
        else:
            if set(state) != set(total):
                raise CheckpointError(f"{name}: keys differ from {ingredients[0]}'s")
            for key, value in state.items():
                if value.is_floating_point():
                    total[key] += value.to(torch.float32) * weight
                else:
                    _same_integer(key, total[key], value, name)
        del state
    assert total is not None
    final = _check_score(evaluate(total), "uniform soup") if evaluate is not None else None
    trials = [Trial(name, own[name], final, True, len(ingredients)) for name in ingredients]
    return SoupResult("uniform", dtypes.cast(total), trials, final)


def greedy_soup(ingredients: Sequence[str], load: Callable[[str], StateDict],
                evaluate: Callable[[StateDict], SupportsFloat]) -> SoupResult:
    """The greedy soup of seed B3 / model soups.

    ``evaluate`` is called once per ingredient (in the given order), then once per candidate.
    Ingredients are sorted by score, descending (ties keep the given order); the soup starts with
    the best one and its score; each next ingredient is tried as ``soup * n/(n+1) + model *
    1/(n+1)`` and accepted only if the candidate's score is strictly greater than the best so far
    (a tie is rejected).
    """
    if not ingredients:
        raise SoupError("a soup needs at least one ingredient")
    dtypes = _Dtypes()
    own: dict[str, SupportsFloat] = {}
    for name in ingredients:
        state = load(name)
        dtypes.see(state)
        own[name] = _check_score(evaluate(state), name)
        log.info("ingredient %s: %.6g", name, float(own[name]))
        del state
    order = sorted(ingredients, key=lambda n: -float(own[n]))   # stable: ties keep the given order
    first = order[0]
    soup = _float32_copy(load(first))
    best: SupportsFloat = own[first]
    size = 1
    trials = [Trial(first, own[first], best, True, size)]
    for name in order[1:]:
        candidate = add_to_average(soup, load(name), size, name)
        result = _check_score(evaluate(candidate), f"soup + {name}")
        accepted = float(result) > float(best)
        if accepted:
            soup, best, size = candidate, result, size + 1
        del candidate
        log.info("%s %s: soup score %.6g (best %.6g)", "accepted" if accepted else "rejected", name,
                 float(result), float(best))
        trials.append(Trial(name, own[name], result, accepted, size))
    return SoupResult("greedy", dtypes.cast(soup), trials, best)


# --------------------------------------------------------------------------------------------
# saving


def check_output(out: Path, overwrite: bool) -> None:
    """Fail early (before any evaluation) when ``out`` is in the way.

    Raises:
        SoupError: ``out`` is a file, or a non-empty folder and ``overwrite`` is not set.
    """
    if out.is_file():
        raise SoupError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SoupError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")


def save_soup(state_dict: StateDict, out: Path, config: Mapping[str, Any], info: Mapping[str, Any],
              overwrite: bool = False) -> Path:
    """Write ``out/`` atomically: ``open_clip_config.json``, ``open_clip_model.safetensors``, ``soup.json``.

    Everything is written into a hidden temp folder beside ``out``, fsynced, then renamed to
    ``out``; an existing ``out`` (only with ``overwrite``, or when empty) is first renamed away
    and removed afterwards. A crash leaves either the old folder or the new one (at worst the old
    one under a hidden ``.tmp-`` name), never a half-written soup.
    """
    from safetensors.torch import save_file

    out = Path(out).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out.parent)
    tmp.mkdir()
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1), encoding="utf-8")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / SOUP_JSON).write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
        for path in tmp.iterdir():
            fsync_file(path)
        fsync_dir(tmp)
        old = None
        if out.exists():
            old = temp_path(out.parent)
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# --------------------------------------------------------------------------------------------
# the whole run (what `embedstore soup` does)


@dataclass(frozen=True)
class SoupOptions:
    """How ``embedstore soup`` runs."""

    mode: str = "greedy"
    metric: str = "accuracy"
    device: str = "auto"
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)  # the usable cores, at most 8
    progress: bool = True  # a bar on stderr while candidates are scored (see embedstore.util.progress)
    overwrite: bool = False


@dataclass
class SoupRun:
    """Everything a soup run produced (the CLI prints it and logs :attr:`info`)."""

    result: SoupResult
    out: Path
    info: dict[str, Any]
    notes: list[str]
    timings: dict[str, float]


def _evaluation_dict(value: Optional[SupportsFloat]) -> Optional[dict[str, float]]:
    if value is None:
        return None
    if isinstance(value, Evaluation):
        return {"score": value.score, "accuracy": value.metrics.accuracy, "macro_f1": value.metrics.macro_f1}
    return {"score": float(value)}


def run_soup(checkpoints: Sequence[str], val: str, experiment: Experiment, out: Path, cache: Cache,
             arch: Optional[str] = None, options: SoupOptions = SoupOptions(), run_id: str = "") -> SoupRun:
    """Check the checkpoints, evaluate them on ``val`` as ``experiment`` says, make the soup and save it.

    ``arch`` defaults to the first checkpoint when that is a ``local-dir:`` folder. The view
    (resize mode, sharpness, ...) is the architecture's default with the view options of the
    experiment's first zero-shot member; that member's model is what the candidates replace.

    Raises:
        CheckpointError, CheckpointMismatchError: unusable or incompatible checkpoints.
        SpecError: bad arch, validation set, classes or prompts. SoupError: bad options or ``out``.
    """
    from embedstore.encode.encoders.torch_utils import resolve_device, resolve_precision

    started = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    out = Path(out).absolute()
    inputs = _check_inputs(checkpoints, val, experiment, out, cache, arch, options, notes)
    ckpts = inputs.checkpoints

    device = resolve_device(options.device)
    precision = resolve_precision("auto", device)
    t0 = time.perf_counter()
    model = LiveOpenClip(inputs.arch, device, precision)
    check_same_layout(inputs.reference, ckpts[0].name, model.layout(), f"--arch {model.arch}")
    view = inputs.member.view.apply(model.default_view)
    timings["build_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images, classes, expansion = _validation(inputs, view, experiment, options, notes)
    timings["load_validation"] = time.perf_counter() - t0

    evaluator = ZeroShotEvaluator(model, images, expansion, experiment.aggregate, experiment.scale,
                                  experiment.drop_below, options.metric, options.batch_size)
    t0 = time.perf_counter()
    result = _make_soup(ckpts, evaluator, options)
    timings["evaluate"] = time.perf_counter() - t0

    info = _soup_info(run_id, options, model.arch, device, precision, evaluator.calls, inputs.val_name, images, view,
                      experiment, classes, len(expansion), ckpts, result, notes)
    t0 = time.perf_counter()
    save_soup(result.state_dict, out, model.config(), info, options.overwrite)
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    info["timings"] = timings
    return SoupRun(result, out, info, notes, timings)


class _Inputs(NamedTuple):
    """What the checks before the model loads found."""

    checkpoints: list[Any]
    reference: Any          # the first checkpoint's layout, which the architecture must match
    arch: str
    member: Any             # the experiment's zero-shot member whose view options are used
    val_name: str
    location: Any
    prompt_set: PromptSet


def _check_inputs(checkpoints: Sequence[str], val: str, experiment: Experiment, out: Path, cache: Cache,
                  arch: Optional[str], options: SoupOptions, notes: list[str]) -> _Inputs:
    """The cheap checks, before any model loads: options, output, checkpoints, validation set,
    prompt set, architecture and the zero-shot member whose view is used."""
    if options.mode not in MODES:
        raise SoupError(f"--mode {options.mode}: expected one of {', '.join(MODES)}")
    if options.metric not in METRICS:
        raise SoupError(f"--metric {options.metric}: expected one of {', '.join(METRICS)}")
    check_output(out, options.overwrite)
    ckpts = [parse_checkpoint(c) for c in checkpoints]
    val_name, location = resolve_validation(val, cache)
    prompt_set = prompt_set_of(experiment)  # a bad prompt set is refused before the model loads
    reference = check_checkpoints(ckpts)
    if arch is None:
        if ckpts[0].config is None:
            raise SpecError("--arch: needed unless the first checkpoint is a local-dir: folder "
                            "(an open_clip model name such as ViT-B-32, or local-dir:FOLDER)")
        arch = LOCAL_DIR_PREFIX + str(ckpts[0].config.parent)
    zero_shot = [m for m in experiment.models if m.kind == "zero-shot"]
    if not zero_shot:
        raise SpecError(f"{experiment.source or 'experiment'}: no zero-shot [[models]] member whose view to use")
    if len(experiment.models) > 1:
        notes.append(f"only the view options of the experiment's first zero-shot member ({zero_shot[0].label}) "
                     "are used; the soup candidates replace its model")
    return _Inputs(ckpts, reference, arch, zero_shot[0], val_name, location, prompt_set)


def _validation(inputs: _Inputs, view: View, experiment: Experiment, options: SoupOptions,
                notes: list[str]) -> tuple[Any, tuple[str, ...], Any]:
    """The decoded validation images, the classes and the expanded prompts."""
    val_name = inputs.val_name
    images = load_validation(val_name, inputs.location, view, options.workers, options.batch_size)
    if images.failures:
        first = next(iter(images.failures.items()))
        notes.append(f"{len(images.failures)} validation image(s) could not be read and were left out, "
                     f"e.g. {first[0]} ({first[1]})")
    if val_name == experiment.dataset:
        notes.append(f"the validation set is the experiment's dataset {val_name!r}: scores of the soup on it "
                     "are selection scores, not held-out ones")
    classes = experiment.classes or tuple(sorted(set(images.labels)))
    if experiment.classes is None:
        notes.append(f"classes taken from the validation labels: {', '.join(classes)}")
    return images, classes, expand(inputs.prompt_set, classes)


def _make_soup(ckpts: Sequence[Any], evaluator: ZeroShotEvaluator, options: SoupOptions) -> Any:
    """Score the candidates and make the uniform or greedy soup, with a progress bar."""
    by_name = {c.name: c for c in ckpts}
    names = [c.name for c in ckpts]
    evaluations = 2 * len(names) - 1 if options.mode == "greedy" else len(names) + 1
    with progress_bar(evaluations, f"soup ({options.mode}): scoring", "model", options.progress) as bar:
        def scored(state: StateDict) -> SupportsFloat:
            value = evaluator(state)
            bar.update(1)
            return value

        soup = greedy_soup if options.mode == "greedy" else uniform_soup
        return soup(names, lambda n: by_name[n].load(), scored)


def _soup_info(run_id: str, options: SoupOptions, arch: str, device: str, precision: str, evaluations: int,
               val_name: str, images: Any, view: View, experiment: Experiment, classes: tuple[str, ...],
               prompts: int, ckpts: Sequence[Any], result: Any, notes: list[str]) -> dict[str, Any]:
    """The soup's description saved beside its weights (and logged)."""
    by_name = {c.name: c for c in ckpts}
    return {
        "kind": "embedstore-soup",
        "run_id": run_id,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": options.mode,
        "metric": options.metric,
        "arch": arch,
        "device": device,
        "precision": precision,
        "evaluations": evaluations,
        "validation": {"name": val_name, "location": images.location, "images": len(images.keys),
                       "unreadable": len(images.failures), "view": view.to_dict(), "view_key": view.key},
        "experiment": {"file": experiment.source, "classes": list(classes), "templates": experiment.templates,
                       "prompts": prompts, "aggregate": experiment.aggregate, "scale": experiment.scale,
                       "drop_below": experiment.drop_below, "config": dict(experiment.config)},
        "ingredients": [
            {"name": t.name, "path": str(by_name[t.name].path), "bytes": by_name[t.name].path.stat().st_size,
             "mtime_ns": by_name[t.name].path.stat().st_mtime_ns, "order": i, "own": _evaluation_dict(t.own),
             "soup": _evaluation_dict(t.soup), "accepted": t.accepted, "soup_size": t.size}
            for i, t in enumerate(result.trials)
        ],
        "soup": {"ingredients": result.ingredients, **(_evaluation_dict(result.final) or {})},
        "notes": notes,
    }


def log_entry(run: SoupRun, experiment: Experiment) -> dict[str, Any]:
    """The run-log record (``kind = "soup"``) in the shape ``embedstore runs`` lists."""
    info = run.info
    final = info["soup"]
    accepted = run.result.ingredients
    return {
        "run_id": info["run_id"],
        "kind": "soup",
        "time": info["time"],
        "experiment_file": experiment.source,
        "config": dict(experiment.config),
        "resolved": {"dataset": info["validation"]["name"], **{k: v for k, v in info["experiment"].items()
                                                                if k not in ("file", "config")},
                     "mode": info["mode"], "metric": info["metric"], "arch": info["arch"]},
        "models": [{"label": name, "weight": 1.0 / len(accepted)} for name in accepted],
        "ingredients": info["ingredients"],
        "rows": info["validation"]["images"],
        "timings": run.timings,
        "metrics": {"accuracy": final["accuracy"], "macro_f1": final["macro_f1"]} if "accuracy" in final else None,
        "notes": run.notes,
        "outputs": {"soup": str(run.out), "soup_json": str(run.out / SOUP_JSON)},
    }