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

Zero-shot members are combined as ``aggregate`` says; kNN members' class probabilities are then
mixed in with their weights (see :mod:`embedstore.classify`).

Any key can be overridden from the command line (``--set aggregate=embed-mean``,
``--set models.0.weight=0.7``); values are parsed as TOML values, falling back to strings.
Unknown keys are an error naming the key, so a typo never silently changes a run.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from embedstore.encoders.spec import EncoderSpec
from embedstore.errors import SpecError
from embedstore.knn import KnnOptions
from embedstore.prompts import _load_toml, load_classes
from embedstore.views import ViewOptions
from embedstore.zeroshot import AGGREGATES

VIEW_KEYS = ("resize_mode", "size", "interpolation", "mean", "std", "sharpness")
KNN_KEYS = ("k", "weighting", "temperature", "reference")
MODEL_KEYS = {"model", "pretrained", "trust_remote_code", "weight", "name", "kind", *VIEW_KEYS, *KNN_KEYS}
MODEL_KINDS = ("zero-shot", "knn")
TOP_KEYS = {"name", "dataset", "classes", "templates", "aggregate", "scale", "drop_below", "models"}


@dataclass(frozen=True)
class ModelEntry:
    """One ensemble member: an encoder, the cached view to read, and its weight."""

    spec: EncoderSpec
    view: ViewOptions
    weight: float = 1.0
    name: str = ""
    knn: Optional[KnnOptions] = None   # set for ``kind = "knn"`` members

    @property
    def kind(self) -> str:
        return "knn" if self.knn is not None else "zero-shot"

    @property
    def label(self) -> str:
        """Display name: ``name`` or the model spec plus view options that are set."""
        if self.name:
            return self.name
        opts = [f"{k}={getattr(self.view, k)}" for k in VIEW_KEYS if getattr(self.view, k) is not None]
        text = str(self.spec) + (f" [{', '.join(opts)}]" if opts else "")
        return f"{self.knn.describe()}: {text}" if self.knn is not None else text


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


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (number, bool, string, list) or else the raw string."""
    try:
        return _load_toml(f"v = {text}", "--set")["v"]
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: expected a number, got {value!r}")
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
    return ModelEntry(spec, view, weight, str(entry.get("name", "")), knn)


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
    )


def load_experiment(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Experiment:
    """Read an experiment TOML file and apply ``--set`` overrides."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: cannot read experiment file ({exc})") from exc
    config = apply_overrides(_load_toml(text, str(p)), overrides)
    try:
        return experiment_from_mapping(config, base=p.resolve().parent, source=str(p))
    except SpecError as exc:
        raise SpecError(f"{p}: {exc}") from exc
