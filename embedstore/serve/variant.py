"""What the playground edits, and how it becomes an experiment.

A :class:`Variant` is the editable part of an experiment: aggregate, scale, ``drop_below``,
ensemble rule, one weight per member, and the prompt list (templates and class-specific prompts,
each on or off). Everything else (dataset, classes, models, views, validation split) stays as
the experiment file says.

A variant is scored as an ordinary experiment: :func:`variant_config` writes the experiment
config (the same keys a TOML file has), its prompts go to a prompt-set TOML file
(:func:`prompt_set_toml`), and :func:`embedstore.score.experiment.experiment_from_mapping`
validates the result exactly as it validates a file. So a saved variant is a TOML file that
``embedstore classify`` runs to the same predictions.
"""
from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from embedstore.errors import SpecError
from embedstore.score.experiment import Experiment, prompt_set_of
from embedstore.score.prompts import PromptSet

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the list: a template (``cls`` None, with a ``{}``) or a prompt of class ``cls``."""

    text: str
    cls: Optional[str] = None
    on: bool = True


@dataclass(frozen=True)
class Variant:
    """The editable part of an experiment (see the module docstring)."""

    aggregate: str
    scale: Union[float, str]
    drop_below: Optional[float]
    ensemble: str
    weights: tuple[float, ...]
    prompts: tuple[PromptItem, ...]


def base_variant(exp: Experiment) -> Variant:
    """The variant an experiment file describes (templates outside ``use_templates`` listed, off)."""
    full = prompt_set_of(replace(exp, use_templates=None))
    active = set(exp.use_templates) if exp.use_templates is not None else None
    items = [PromptItem(t, None, active is None or t in active) for t in full.templates]
    items += [PromptItem(p, cls, True) for cls, prompts in full.class_prompts.items() for p in prompts]
    return Variant(exp.aggregate, exp.scale, exp.drop_below, exp.ensemble, tuple(m.weight for m in exp.models),
                   tuple(items))


def prompt_set_of_variant(variant: Variant, name: str = "playground") -> PromptSet:
    """The prompts that are on, as a prompt set (templates in list order, class prompts grouped by class)."""
    templates = [p.text for p in variant.prompts if p.on and p.cls is None]
    by_class: dict[str, list[str]] = {}
    for p in variant.prompts:
        if p.on and p.cls is not None:
            by_class.setdefault(p.cls, []).append(p.text)
    if not templates and not by_class:
        raise SpecError("prompts: every prompt is off; turn one on")
    return PromptSet(name, tuple(templates), {c: tuple(ps) for c, ps in by_class.items()})


def prompt_set_toml(prompt_set: PromptSet) -> str:
    """The prompt set as a templates file (``templates`` and ``[class_prompts]``) that
    :func:`embedstore.score.prompts.load_prompt_set` reads back to the same set."""
    import tomli_w

    data: dict[str, Any] = {"name": prompt_set.name, "templates": list(prompt_set.templates)}
    if prompt_set.class_prompts:
        data["class_prompts"] = {c: list(ps) for c, ps in prompt_set.class_prompts.items()}
    return tomli_w.dumps(data)


def prompt_file(folder: Path, prompt_set: PromptSet) -> Path:
    """A content-addressed prompt-set file in ``folder`` (written once per distinct set)."""
    text = prompt_set_toml(prompt_set)
    path = folder / f"prompts-{hashlib.sha256(text.encode()).hexdigest()[:16]}.toml"
    if not path.exists():
        from embedstore.util.fsutil import atomic_write

        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def same_prompts(a: PromptSet, b: PromptSet) -> bool:
    """True when two sets expand to the same prompts (names and descriptions aside)."""
    return a.templates == b.templates and dict(a.class_prompts) == dict(b.class_prompts)


def variant_config(exp: Experiment, variant: Variant, classes: Sequence[str], templates: str,
                   use_templates: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The experiment config of ``variant`` on top of ``exp``: classes written out, ``templates``
    (a set name or file), members' models resolved and weighted by the variant.

    Raises:
        SpecError: the variant has another number of weights than the experiment has members.
    """
    if len(variant.weights) != len(exp.models):
        raise SpecError(f"weights: {len(variant.weights)} given, the experiment has {len(exp.models)} model(s)")
    config = copy.deepcopy(dict(exp.config))
    config["classes"] = list(classes)
    config["templates"] = templates
    config.pop("use_templates", None)
    if use_templates is not None:
        config["use_templates"] = list(use_templates)
    config["aggregate"] = variant.aggregate
    config["scale"] = variant.scale
    config["ensemble"] = variant.ensemble
    if variant.drop_below is None:
        config.pop("drop_below", None)
    else:
        config["drop_below"] = variant.drop_below
    models = []
    for raw, entry, weight in zip(config["models"], exp.models, variant.weights):
        table = dict(raw)
        table["model"] = entry.spec.model  # local-dir:/hf: folders resolved against the experiment's folder
        table["weight"] = float(weight)
        models.append(table)
    config["models"] = models
    return config


def check_name(name: str) -> str:
    """A file name for a saved experiment: letters, digits, ``._-``, no folder, at most 80 characters.

    Raises:
        SpecError: anything else (a path, ``..``, an empty name).
    """
    stem = name[:-5] if name.endswith(".toml") else name
    if not NAME.fullmatch(stem) or ".." in stem:
        raise SpecError(f"name {name!r}: use letters, digits, '.', '_' and '-' only (a file name, not a path)")
    return stem
