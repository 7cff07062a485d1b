"""Experiment files: a TOML description of a zero-shot classification run on cached features.

Example::

    dataset = "scene"
    classes = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]  # or a file path
    templates = "ajou-2024"        # built-in set or a templates file
    aggregate = "prob-mean"        # prob-mean | embed-mean | logit-mean
    scale = 100.0                  # or "model": each encoder's own logit_scale
    drop_below = 0.002             # optional, prob-mean only
    [[models]]
    model = "ViT-bigG-14-quickgelu"
    pretrained = "metaclip_fullcc"
    resize_mode = "squash"
    sharpness = 2.3                # view options select the cached view
    weight = 0.5
    [[models]]                     # a kNN member votes with the labels of the nearest cached images
    kind = "knn"
    model = "ViT-bigG-14-quickgelu"
    pretrained = "metaclip_fullcc"
    k = 10
    weighting = "similarity"       # uniform | distance | similarity (exp(sim / temperature))
    temperature = 0.07
    reference = "scene-train"      # labelled dataset to vote from (default: this dataset, leave-one-out)
    weight = 0.2

Optional keys: ``use_templates = [...]`` keeps only these templates of the set (class prompts
stay); ``ensemble = "soft-vote"`` min-max scales each member's class log-scores per image and sums
them with the weights (the seed's soft voting; ``"weighted"``, the default, averages
probabilities); ``[validation]`` (``fraction``, ``seed``, ``group_regex`` or ``groups``) is the split
that ``embedstore tune`` and ``embedstore heads`` hold out (see :mod:`embedstore.score.splits`).

Zero-shot members are combined as ``aggregate`` says; kNN members' class probabilities are then
mixed in with their weights (see :mod:`embedstore.score.session`).

Any key can be overridden from the command line (``--set aggregate=embed-mean``,
``--set models.0.weight=0.7``); values are parsed as TOML values, falling back to strings.
Unknown keys are an error naming the key, so a typo never silently changes a run.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from embedstore.errors import SpecError
from embedstore.score.knn import KnnOptions
from embedstore.score.prompts import PromptSet, load_classes, load_prompt_set, load_toml
from embedstore.score.scoring import AGGREGATES, ENSEMBLES
from embedstore.score.splits import SplitSpec
from embedstore.store.spec import EncoderSpec
from embedstore.store.views import ViewOptions

VIEW_KEYS = ("resize_mode", "size", "interpolation", "mean", "std", "sharpness")
KNN_KEYS = ("k", "weighting", "temperature", "reference")
HEAD_KEYS = ("head", "alpha")
MODEL_KEYS = {"model", "pretrained", "trust_remote_code", "weight", "name", "kind", *VIEW_KEYS, *KNN_KEYS, *HEAD_KEYS}
MODEL_KINDS = ("zero-shot", "knn", "head")


@dataclass(frozen=True)
class HeadRef:
    """A ``kind = "head"`` member: a saved linear head, WiSE-FT-interpolated with its zero-shot head."""

    name: str
    alpha: float = 1.0

    def describe(self) -> str:
        return f"head {self.name}" + (f" (WiSE-FT alpha {self.alpha:g})" if self.alpha != 1.0 else "")
TOP_KEYS = {"name", "dataset", "classes", "templates", "use_templates", "aggregate", "scale", "drop_below", "ensemble",
            "validation", "models"}


@dataclass(frozen=True)
class ModelEntry:
    """One ensemble member: an encoder, the cached view to read, and its weight."""

    spec: EncoderSpec
    view: ViewOptions
    weight: float = 1.0
    name: str = ""
    knn: Optional[KnnOptions] = None   # set for ``kind = "knn"`` members
    head: Optional[HeadRef] = None     # set for ``kind = "head"`` members

    @property
    def kind(self) -> str:
        return "knn" if self.knn is not None else "head" if self.head is not None else "zero-shot"

    @property
    def label(self) -> str:
        """Display name: ``name`` or the model spec plus view options that are set."""
        if self.name:
            return self.name
        opts = [f"{k}={getattr(self.view, k)}" for k in VIEW_KEYS if getattr(self.view, k) is not None]
        text = str(self.spec) + (f" [{', '.join(opts)}]" if opts else "")
        if self.knn is not None:
            return f"{self.knn.describe()}: {text}"
        return f"{self.head.describe()}: {text}" if self.head is not None else text


@dataclass(frozen=True)
class Experiment:
    """A validated experiment (see the module docstring for the file format)."""

    dataset: str
    classes: Optional[tuple[str, ...]]
    templates: str
    aggregate: str
    scale: Union[float, str]
    drop_below: Optional[float]
    models: tuple[ModelEntry, ...]
    name: str = ""
    source: Optional[str] = None
    config: Mapping[str, Any] = field(default_factory=dict)
    ensemble: str = "weighted"
    use_templates: Optional[tuple[str, ...]] = None
    validation: Optional[SplitSpec] = None


def prompt_set_of(exp: Experiment) -> PromptSet:
    """The experiment's prompt set, restricted to ``use_templates`` when given.

    Raises:
        SpecError: a template in ``use_templates`` that the set does not have (named).
    """
    prompt_set = load_prompt_set(exp.templates)
    if exp.use_templates is None:
        return prompt_set
    unknown = [t for t in exp.use_templates if t not in prompt_set.templates]
    if unknown:
        raise SpecError(f"use_templates: {unknown[0]!r} is not a template of {prompt_set.name}")
    return prompt_set.subset([t for t in prompt_set.templates if t in set(exp.use_templates)])


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (number, bool, string, list) or else the raw string."""
    try:
        return load_toml(f"v = {text}", "--set")["v"]
    except SpecError:
        return text


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys; list items by index: ``models.0.weight``)."""
    out = copy.deepcopy(dict(config))
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                try:
                    idx = int(part)
                    node[idx]
                except (ValueError, IndexError):
                    raise SpecError(f"--set {key}: {part!r} is not an index of a list of {len(node)}") from None
                if last:
                    node[idx] = parse_value(value)
                else:
                    node = node[idx]
            else:
                if last:
                    node[part] = parse_value(value)
                else:
                    if part not in node:
                        raise SpecError(f"--set {key}: no {part!r} in the experiment")
                    node = node[part]
    return out


def _number(value: Any, where: str) -> float:
    """A finite number from an experiment key or ``--set`` value (NaN and infinities are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _model(entry: Any, i: int, base: Optional[Path]) -> ModelEntry:
    where = f"models[{i}]"
    if not isinstance(entry, Mapping):
        raise SpecError(f"{where}: expected a table with at least 'model'")
    unknown = set(entry) - MODEL_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(MODEL_KEYS))})")
    if "model" not in entry:
        raise SpecError(f"{where}: missing 'model'")
    weight = _number(entry.get("weight", 1.0), f"{where}.weight")
    if weight < 0:
        raise SpecError(f"{where}.weight: must be >= 0, got {weight}")
    model = str(entry["model"])
    for prefix in ("local-dir:", "hf:"):  # relative model folders are relative to the experiment file
        target = model[len(prefix):]
        if model.startswith(prefix) and base is not None and not os.path.isabs(target) and (base / target).exists():
            model = prefix + str(base / target)
    spec = EncoderSpec(model, entry.get("pretrained"), bool(entry.get("trust_remote_code", False)))
    view = ViewOptions.from_mapping({k: entry[k] for k in VIEW_KEYS if k in entry}, where)
    kind = str(entry.get("kind", "zero-shot"))
    if kind not in MODEL_KINDS:
        raise SpecError(f"{where}.kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
    knn = None
    if kind == "knn":
        k = entry.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int):
            raise SpecError(f"{where}.k: expected an integer, got {k!r}")
        try:
            knn = KnnOptions(k, str(entry.get("weighting", "similarity")),
                             _number(entry.get("temperature", 0.07), f"{where}.temperature"),
                             str(entry["reference"]) if "reference" in entry else None)
        except SpecError as exc:
            raise SpecError(f"{where}.{exc}") from None
    else:
        stray = sorted(set(entry) & set(KNN_KEYS))
        if stray:
            raise SpecError(f"{where}: {', '.join(stray)} only apply to kind = \"knn\"")
    head = None
    if kind == "head":
        if "head" not in entry:
            raise SpecError(f"{where}: kind = \"head\" needs head = NAME (see `embedstore heads train`)")
        alpha = _number(entry.get("alpha", 1.0), f"{where}.alpha")
        if not 0 <= alpha <= 1:
            raise SpecError(f"{where}.alpha: must be in [0, 1], got {alpha}")
        head = HeadRef(str(entry["head"]), alpha)
    else:
        stray = sorted(set(entry) & set(HEAD_KEYS))
        if stray:
            raise SpecError(f"{where}: {', '.join(stray)} only apply to kind = \"head\"")
    return ModelEntry(spec, view, weight, str(entry.get("name", "")), knn, head)


def experiment_from_mapping(config: Mapping[str, Any], base: Optional[Path] = None, source: Optional[str] = None) -> Experiment:
    """Validate a parsed experiment. ``base`` resolves relative file paths (the file's folder).

    Raises:
        SpecError: a missing or unknown key, or a value of the wrong kind (named in the message).
    """
    unknown = set(config) - TOP_KEYS
    if unknown:
        raise SpecError(f"experiment: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(TOP_KEYS))})")
    if "dataset" not in config:
        raise SpecError("experiment: missing 'dataset'")
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise SpecError("experiment: needs at least one [[models]] table")
    aggregate = str(config.get("aggregate", "embed-mean"))
    if aggregate not in AGGREGATES:
        raise SpecError(f"aggregate: {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    scale = config.get("scale", 100.0)
    if scale != "model":
        scale = _number(scale, "scale")
        if scale <= 0:
            raise SpecError(f"scale: must be positive, got {scale}")
    drop = config.get("drop_below")
    if drop is not None:
        drop = _number(drop, "drop_below")
        if aggregate != "prob-mean":
            raise SpecError(f"drop_below: applies to per-prompt probabilities, i.e. aggregate = \"prob-mean\" (not {aggregate})")
        if not 0 <= drop < 1:
            raise SpecError(f"drop_below: must be in [0, 1), got {drop}")
    classes = config.get("classes")
    class_list = tuple(load_classes(classes, base)) if classes is not None else None
    templates = str(config.get("templates", "openai-imagenet"))
    if base is not None and not os.path.isabs(templates) and (base / templates).is_file():
        templates = str(base / templates)
    ensemble = str(config.get("ensemble", "weighted"))
    if ensemble not in ENSEMBLES:
        raise SpecError(f"ensemble: {ensemble!r} is not one of {', '.join(ENSEMBLES)}")
    use = config.get("use_templates")
    if use is not None and (not isinstance(use, list) or not all(isinstance(t, str) for t in use)):
        raise SpecError("use_templates: expected a list of template strings from the prompt set")
    validation = config.get("validation")
    if validation is not None and not isinstance(validation, Mapping):
        raise SpecError("validation: expected a table (fraction, seed, group_regex or groups)")
    split_spec = SplitSpec.from_mapping(validation, base) if validation is not None else None
    entries = tuple(_model(m, i, base) for i, m in enumerate(models))

    if sum(m.weight for m in entries) == 0:
        raise SpecError("models: all weights are zero")
    return Experiment(
        dataset=str(config["dataset"]),
        classes=class_list,
        templates=templates,
        aggregate=aggregate,
        scale=scale,
        drop_below=drop,
        models=entries,
        name=str(config.get("name", "")),
        source=source,
        config=copy.deepcopy(dict(config)),
        ensemble=ensemble,
        use_templates=tuple(use) if use is not None else None,
        validation=split_spec,
    )


def load_experiment(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Experiment:
    """Read an experiment TOML file and apply ``--set`` overrides."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: cannot read experiment file ({exc})") from exc
    config = apply_overrides(load_toml(text, str(p)), overrides)
    try:
        return experiment_from_mapping(config, base=p.resolve().parent, source=str(p))
    except SpecError as exc:
        raise SpecError(f"{p}: {exc}") from exc
