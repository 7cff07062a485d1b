"""Linear heads on cached features: the format, the zero-shot head, WiSE-FT and uniform soups.

A head maps L2-normalised features ``x`` to logits ``W x + b``. The zero-shot head is
``W = scale * class_embeddings`` (prompt-averaged, renormalised), ``b = 0`` — the head model-soups
and WiSE-FT start from. For cached features WiSE-FT is exactly logit interpolation:
``(1-a) * z_zs + a * z_ft``, i.e. the head with ``(1-a) W_zs + a W_ft`` (:func:`interpolate`).

Heads are saved as safetensors plus a JSON description in ``cache/heads/<name>/``; training them
(and the greedy soup) is :mod:`embedstore.tune.head_fit`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from embedstore.errors import SpecError, StoreNotFoundError
from embedstore.score.scoring import Rule, class_matrix, softmax
from embedstore.store import schemas
from embedstore.util.fsutil import atomic_write, atomic_write_json, read_json

HEAD_FILE = "head.safetensors"
META_FILE = "head.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Head:
    """A linear head: ``logits = features @ weight.T + bias`` over ``classes``."""

    weight: np.ndarray            # (c, d) float32
    bias: np.ndarray              # (c,) float32
    classes: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``(n, c)`` logits of unit-norm ``features``."""
        return np.asarray(features, dtype=np.float32) @ self.weight.T + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """``(n, c)`` softmax of :meth:`logits`."""
        return softmax(self.logits(features))


def zero_shot_head(text: np.ndarray, class_index: np.ndarray, classes: Sequence[str], scale: float) -> Head:
    """``scale * class_embeddings`` with zero bias (the head CLIP, model-soups and WiSE-FT use)."""
    w = np.float32(scale) * class_matrix(Rule("embed-mean", class_index, len(classes)), text)
    return Head(w.astype(np.float32), np.zeros(len(classes), dtype=np.float32), tuple(classes),
                {"kind": "zero-shot", "scale": float(scale)})


def check_compatible(heads: Sequence[Head]) -> None:
    """Refuse heads that do not share classes and feature width (they cannot be mixed)."""
    first = heads[0]
    for h in heads[1:]:
        if h.classes != first.classes or h.weight.shape != first.weight.shape:
            raise SpecError(f"heads differ: classes {list(h.classes)} / shape {h.weight.shape} vs "
                            f"{list(first.classes)} / {first.weight.shape}")


def interpolate(zero_shot: Head, trained: Head, alpha: float) -> Head:
    """WiSE-FT: ``(1-alpha) * zero_shot + alpha * trained`` (weights and bias)."""
    if not 0 <= alpha <= 1:
        raise SpecError(f"alpha: must be in [0, 1], got {alpha}")
    check_compatible([zero_shot, trained])
    a = np.float32(alpha)
    return Head((1 - a) * zero_shot.weight + a * trained.weight, (1 - a) * zero_shot.bias + a * trained.bias,
                trained.classes, {**trained.meta, "kind": "wise-ft", "alpha": float(alpha)})


def uniform_soup(heads: Sequence[Head]) -> Head:
    """The plain mean of the heads' weights and biases."""
    if not heads:
        raise SpecError("soup: no ingredients")
    check_compatible(heads)
    return Head(np.mean([h.weight for h in heads], axis=0).astype(np.float32),
                np.mean([h.bias for h in heads], axis=0).astype(np.float32), heads[0].classes,
                {"kind": "uniform-soup", "ingredients": len(heads)})



# ---- storage ------------------------------------------------------------------------------------
def check_head_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise SpecError(f"head name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    return name


def head_dir(cache_root: Path, name: str) -> Path:
    return Path(cache_root) / "heads" / check_head_name(name)


def save_head(cache_root: Path, name: str, head: Head, zero_shot: Optional[Head] = None) -> Path:
    """Write ``head.safetensors`` (weight, bias; and the zero-shot head it was initialised from,
    for WiSE-FT) and ``head.json`` (classes, provenance), each atomically."""
    folder = head_dir(cache_root, name)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": np.ascontiguousarray(head.weight, dtype=np.float32),
               "bias": np.ascontiguousarray(head.bias, dtype=np.float32)}
    if zero_shot is not None:
        check_compatible([head, zero_shot])
        tensors["zs_weight"] = np.ascontiguousarray(zero_shot.weight, dtype=np.float32)
        tensors["zs_bias"] = np.ascontiguousarray(zero_shot.bias, dtype=np.float32)
    atomic_write(folder / HEAD_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / META_FILE, {**head.meta, "classes": list(head.classes), "name": name,
                                           "shape": list(head.weight.shape), "has_zero_shot": zero_shot is not None})
    return folder


def load_zero_shot(cache_root: Path, name: str) -> Optional[Head]:
    """The zero-shot head saved with head ``name`` (None when it was trained from zeros)."""
    head = load_head(cache_root, name)
    if not head.meta.get("has_zero_shot"):
        return None
    tensors = load_file(str(head_dir(cache_root, name) / HEAD_FILE))
    return Head(tensors["zs_weight"], tensors["zs_bias"], head.classes, {"kind": "zero-shot"})


def load_head(cache_root: Path, name: str) -> Head:
    """A saved head. Raises StoreNotFoundError / SpecError naming the file."""
    folder = head_dir(cache_root, name)
    try:
        meta = read_json(folder / META_FILE)
    except ValueError as exc:
        raise SpecError(f"{folder / META_FILE}: not valid JSON ({exc})") from exc
    if meta is None:
        raise StoreNotFoundError(f"head {name!r} is not in {Path(cache_root) / 'heads'}; train it with "
                                 "`embedstore heads train`")
    schemas.check(meta, "HEAD_META", folder / META_FILE, "train the head again with `embedstore heads train`", SpecError)
    try:
        tensors = load_file(str(folder / HEAD_FILE))
    except (OSError, SafetensorError) as exc:
        raise SpecError(f"{folder / HEAD_FILE}: cannot read the head ({exc})") from exc
    weight, bias = tensors.get("weight"), tensors.get("bias")
    classes = tuple(meta.get("classes", []))
    if weight is None or bias is None or weight.shape != (len(classes), weight.shape[1]) or bias.shape != (len(classes),):
        raise SpecError(f"{folder / HEAD_FILE}: expected weight (c, d) and bias (c,) for {len(classes)} classes")
    return Head(weight, bias, classes, meta)


def describe(meta: dict[str, Any]) -> str:
    return json.dumps({k: meta[k] for k in sorted(meta) if k not in ("classes", "validation_keys")}, default=str)
