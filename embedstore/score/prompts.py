"""Prompt sets: templates with a ``{}`` placeholder plus optional class-specific prompts.

Built-in sets live as TOML data in ``embedstore/templates/`` (``openai-imagenet``: the 80 CLIP
ImageNet templates; ``ajou-2024``: the seed's 49 templates and its 3 class-specific prompts for
each of the six scene classes). User sets are TOML, JSON or plain-text files (plain text: one
template per line); they are parsed as data, never executed.

:func:`expand` turns a set and a class list into the prompt texts and an explicit
prompt-to-class index, so classes may have different prompt counts (never
``reshape(n_classes, -1)``).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PLACEHOLDER = "{}"


def load_toml(text: str, where: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error is a :class:`SpecError` naming ``where``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: not valid TOML ({exc})") from exc


@dataclass(frozen=True)
class PromptSet:
    """Templates applied to every class, plus extra prompts for some classes (by exact name)."""

    name: str
    templates: tuple[str, ...]
    class_prompts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.templates and not self.class_prompts:
            raise SpecError(f"prompt set {self.name}: no templates and no class prompts")
        for template in self.templates:
            if not isinstance(template, str):
                raise SpecError(f"prompt set {self.name}: template {template!r} is not a string")
            if PLACEHOLDER not in template:
                raise SpecError(f"prompt set {self.name}: template {template!r} has no '{{}}' placeholder for the class name")
        for cls, prompts in self.class_prompts.items():
            if not all(isinstance(p, str) and p for p in prompts):
                raise SpecError(f"prompt set {self.name}: class_prompts.{cls} must be a list of non-empty strings")

    def subset(self, templates: Sequence[str]) -> "PromptSet":
        """The same set restricted to ``templates`` (class prompts kept)."""
        return PromptSet(self.name, tuple(templates), self.class_prompts, self.description)


@dataclass(frozen=True)
class Expansion:
    """Prompt texts in class order and, for each, the index of its class."""

    classes: tuple[str, ...]
    texts: tuple[str, ...]
    class_index: np.ndarray  # int64 (n_prompts,)

    @property
    def counts(self) -> np.ndarray:
        """Prompts per class."""
        return np.bincount(self.class_index, minlength=len(self.classes))

    def __len__(self) -> int:
        return len(self.texts)


def builtin_sets() -> list[str]:
    """Names of the built-in prompt sets."""
    folder = resources.files("embedstore.score") / "templates"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _from_mapping(data: Mapping[str, Any], name: str, where: str) -> PromptSet:
    unknown = set(data) - {"templates", "class_prompts", "description", "name"}
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected templates, class_prompts)")
    templates = data.get("templates", [])
    if not isinstance(templates, list):
        raise SpecError(f"{where}: 'templates' must be a list of strings")
    class_prompts = data.get("class_prompts", {})
    if not isinstance(class_prompts, Mapping):
        raise SpecError(f"{where}: 'class_prompts' must map class names to lists of prompts")
    extra = {}
    for cls, prompts in class_prompts.items():
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list):
            raise SpecError(f"{where}: class_prompts.{cls} must be a list of strings")
        extra[str(cls)] = tuple(prompts)
    try:
        return PromptSet(str(data.get("name", name)), tuple(templates), extra, str(data.get("description", "")))
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def load_prompt_set(name_or_path: str | os.PathLike[str]) -> PromptSet:
    """A built-in set by name, or a ``.toml``/``.json``/``.txt`` file.

    Raises:
        SpecError: unknown name, unreadable file, or invalid content (named in the message).
    """
    ref = str(name_or_path)
    if ref in builtin_sets():
        text = (resources.files("embedstore.score") / "templates" / f"{ref}.toml").read_text(encoding="utf-8")
        return _from_mapping(load_toml(text, ref), ref, f"built-in prompt set {ref}")
    path = Path(ref).expanduser()
    if not path.is_file():
        raise SpecError(
            f"templates: {ref!r} is neither a built-in prompt set ({', '.join(builtin_sets())}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read ({exc})") from exc
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _from_mapping(load_toml(text, str(path)), path.stem, str(path))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpecError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(data, list):
            data = {"templates": data}
        if not isinstance(data, Mapping):
            raise SpecError(f"{path}: expected a JSON list of templates or an object with 'templates'")
        return _from_mapping(data, path.stem, str(path))
    lines = [line.strip() for line in text.splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    try:
        return PromptSet(path.stem, tuple(templates))
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc


def expand(prompt_set: PromptSet, classes: Sequence[str]) -> Expansion:
    """Prompts class by class, in class order: each template with the class name, then the
    class's own prompts (exact name match).

    Raises:
        SpecError: no classes, duplicate classes, or a class that ends up with no prompt.
    """
    if not classes:
        raise SpecError("classes: the class list is empty")
    dupes = sorted({c for c in classes if list(classes).count(c) > 1})
    if dupes:
        raise SpecError(f"classes: listed more than once: {', '.join(dupes)}")
    texts: list[str] = []
    index: list[int] = []
    for ci, cls in enumerate(classes):
        own = [t.replace(PLACEHOLDER, cls) for t in prompt_set.templates] + list(prompt_set.class_prompts.get(cls, ()))
        if not own:
            raise SpecError(f"prompt set {prompt_set.name}: class {cls!r} gets no prompt (no templates, no class prompts)")
        texts.extend(own)
        index.extend([ci] * len(own))
    return Expansion(tuple(classes), tuple(texts), np.asarray(index, dtype=np.int64))


def load_classes(value: Any, base: Optional[Path] = None) -> list[str]:
    """Classes from a list, or from a file (one per line, or a JSON list).

    Raises:
        SpecError: the file is missing or the list is empty or malformed.
    """
    if isinstance(value, (list, tuple)):
        classes = [str(c).strip() for c in value]
    elif isinstance(value, str):
        path = Path(value).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise SpecError(f"classes: file {path} not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise SpecError(f"classes: {path} is not valid JSON ({exc})") from exc
            if not isinstance(data, list):
                raise SpecError(f"classes: {path} must hold a JSON list of class names")
            classes = [str(c).strip() for c in data]
        else:
            classes = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    else:
        raise SpecError(f"classes: expected a list of names or a file path, got {type(value).__name__}")
    if not classes or any(not c for c in classes):
        raise SpecError("classes: the class list is empty or has an empty name")
    return classes
