"""Linear heads on cached features: training, the zero-shot head, WiSE-FT and head soups.

A head maps L2-normalised features ``x`` to logits ``W x + b``. The zero-shot head is
``W = scale * class_embeddings`` (prompt-averaged, renormalised), ``b = 0`` — the head model-soups
and WiSE-FT start from. Training is multinomial logistic regression (L-BFGS on the exact
gradient, CPU, float64) with

* an L2 penalty ``||W - W0||^2 / (2C)`` towards the initial head ``W0`` (the zero-shot head by
  default, so the trained head keeps a comparable logit scale and WiSE-FT interpolation is
  meaningful; towards zero with ``init="zeros"``);
* class imbalance handled by ``balance="class-weight"`` (sample weights ``n / (c * n_class)``) or
  ``"oversample"`` (minority rows drawn with replacement up to the largest class, seeded, as
  integer sample weights: the same loss as replicated rows, without copying features).

For cached features WiSE-FT is exactly logit interpolation: ``(1-a) * z_zs + a * z_ft``, i.e. the
head with ``(1-a) W_zs + a W_ft`` (:func:`interpolate`). Soups average heads that share classes
and features (:func:`uniform_soup`, :func:`greedy_soup`: sorted by validation score, an
ingredient is kept only if the soup's score strictly improves).

Heads are saved as safetensors plus a JSON description in ``cache/heads/<name>/``.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError, StoreNotFoundError
from embedstore.util.fsutil import atomic_write, atomic_write_json, read_json

log = logging.getLogger(__name__)

BALANCES = ("none", "class-weight", "oversample")
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
        from embedstore.score.scoring import softmax

        return softmax(self.logits(features))


def zero_shot_head(text: np.ndarray, class_index: np.ndarray, classes: Sequence[str], scale: float) -> Head:
    """``scale * class_embeddings`` with zero bias (the head CLIP, model-soups and WiSE-FT use)."""
    from embedstore.score.scoring import Rule, class_matrix

    w = np.float32(scale) * class_matrix(Rule("embed-mean", class_index, len(classes)), text)
    return Head(w.astype(np.float32), np.zeros(len(classes), dtype=np.float32), tuple(classes),
                {"kind": "zero-shot", "scale": float(scale)})


def sample_weights(y: np.ndarray, n_classes: int, balance: str, seed: int = 0) -> np.ndarray:
    """Per-row weights for ``balance`` (see the module docstring)."""
    if balance not in BALANCES:
        raise SpecError(f"--balance {balance!r}: expected one of {', '.join(BALANCES)}")
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=n_classes)
    if balance == "none":
        return np.ones(len(y))
    present = counts > 0
    if balance == "class-weight":
        per_class = np.zeros(n_classes)
        per_class[present] = len(y) / (present.sum() * counts[present])
        return per_class[y]
    rng = np.random.default_rng(seed)
    weights = np.ones(len(y))
    target = counts.max()
    for c in np.flatnonzero(present):
        rows = np.flatnonzero(y == c)
        extra = rng.choice(rows, target - len(rows), replace=True) if target > len(rows) else np.zeros(0, np.int64)
        np.add.at(weights, extra, 1.0)
    return weights


def train_head(features: np.ndarray, y: np.ndarray, classes: Sequence[str], init: Optional[Head] = None,
               c_reg: float = 1.0, balance: str = "class-weight", seed: int = 0, max_iter: int = 500) -> Head:
    """Multinomial logistic regression from ``init`` (zeros when None) with an L2 pull towards it.

    ``features`` are unit rows ``(n, d)``; ``y`` class indices. Deterministic for the same inputs.
    """
    from scipy.optimize import minimize

    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    n, d = x.shape
    c = len(classes)
    if c_reg <= 0:
        raise SpecError(f"C: must be positive, got {c_reg}")
    if n == 0:
        raise SpecError("no training rows")
    w0 = init.weight.astype(np.float64) if init is not None else np.zeros((c, d))
    b0 = init.bias.astype(np.float64) if init is not None else np.zeros(c)
    s = sample_weights(y, c, balance, seed)
    lam = 1.0 / c_reg
    step = max(1, (16 << 20) // (8 * (d + 2 * c)))  # float64 row blocks of ~16 MB: memory stays bounded

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: c * d].reshape(c, d)
        b = theta[c * d:]
        loss = 0.5 * lam * ((w - w0) ** 2).sum()
        gw = lam * (w - w0)
        gb = np.zeros(c)
        for start in range(0, n, step):  # float32 gradients stall L-BFGS's line search: float64 per block
            xb = x[start:start + step].astype(np.float64)
            yb, sb = y[start:start + step], s[start:start + step]
            z = xb @ w.T + b
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            rows = np.arange(len(yb))
            loss -= (sb * logp[rows, yb]).sum()
            g = np.exp(logp)
            g[rows, yb] -= 1.0
            g *= sb[:, None]
            gw += g.T @ xb
            gb += g.sum(axis=0)
        return float(loss), np.concatenate([gw.ravel(), gb])

    started = time.perf_counter()
    res = minimize(loss_grad, np.concatenate([w0.ravel(), b0]), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter})
    theta = res.x
    log.info("head trained in %.2f s, %d iterations (%s)", time.perf_counter() - started, res.nit, res.message)
    return Head(theta[: c * d].reshape(c, d).astype(np.float32), theta[c * d:].astype(np.float32), tuple(classes),
                {"kind": "trained", "C": c_reg, "balance": balance, "seed": seed, "init": init.meta.get("kind") if init else "zeros",
                 "iterations": int(res.nit), "converged": bool(res.success)})


def _check_compatible(heads: Sequence[Head]) -> None:
    first = heads[0]
    for h in heads[1:]:
        if h.classes != first.classes or h.weight.shape != first.weight.shape:
            raise SpecError(f"heads differ: classes {list(h.classes)} / shape {h.weight.shape} vs "
                            f"{list(first.classes)} / {first.weight.shape}")


def interpolate(zero_shot: Head, trained: Head, alpha: float) -> Head:
    """WiSE-FT: ``(1-alpha) * zero_shot + alpha * trained`` (weights and bias)."""
    if not 0 <= alpha <= 1:
        raise SpecError(f"alpha: must be in [0, 1], got {alpha}")
    _check_compatible([zero_shot, trained])
    a = np.float32(alpha)
    return Head((1 - a) * zero_shot.weight + a * trained.weight, (1 - a) * zero_shot.bias + a * trained.bias,
                trained.classes, {**trained.meta, "kind": "wise-ft", "alpha": float(alpha)})


def uniform_soup(heads: Sequence[Head]) -> Head:
    """The plain mean of the heads' weights and biases."""
    if not heads:
        raise SpecError("soup: no ingredients")
    _check_compatible(heads)
    return Head(np.mean([h.weight for h in heads], axis=0).astype(np.float32),
                np.mean([h.bias for h in heads], axis=0).astype(np.float32), heads[0].classes,
                {"kind": "uniform-soup", "ingredients": len(heads)})


@dataclass
class SoupStep:
    """One ingredient considered by the greedy soup."""

    name: str
    own_score: float
    soup_score: float
    accepted: bool


def greedy_soup(heads: Sequence[Head], names: Sequence[str], evaluate: Callable[[Head], float]) -> tuple[Head, list[SoupStep]]:
    """Model-soups' greedy soup: sort by own score, keep an ingredient only on strict improvement.

    The soup is the running uniform mean of accepted ingredients (``soup * n/(n+1) + h/(n+1)``).
    """
    if not heads:
        raise SpecError("soup: no ingredients")
    _check_compatible(heads)
    scored = sorted(((evaluate(h), i) for i, h in enumerate(heads)), key=lambda t: (-t[0], t[1]))
    best_score, first = scored[0]
    soup_w, soup_b, n = heads[first].weight.copy(), heads[first].bias.copy(), 1
    steps = [SoupStep(names[first], best_score, best_score, True)]
    for own, i in scored[1:]:
        cand = Head(soup_w * (n / (n + 1)) + heads[i].weight / (n + 1), soup_b * (n / (n + 1)) + heads[i].bias / (n + 1),
                    heads[0].classes)
        score = evaluate(cand)
        accepted = score > best_score
        steps.append(SoupStep(names[i], own, score, accepted))
        if accepted:
            soup_w, soup_b, n, best_score = cand.weight, cand.bias, n + 1, score
    accepted_names = [s.name for s in steps if s.accepted]
    return Head(soup_w.astype(np.float32), soup_b.astype(np.float32), heads[0].classes,
                {"kind": "greedy-soup", "ingredients": accepted_names, "score": best_score}), steps


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
    from safetensors.numpy import save_file

    folder = head_dir(cache_root, name)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": np.ascontiguousarray(head.weight, dtype=np.float32),
               "bias": np.ascontiguousarray(head.bias, dtype=np.float32)}
    if zero_shot is not None:
        _check_compatible([head, zero_shot])
        tensors["zs_weight"] = np.ascontiguousarray(zero_shot.weight, dtype=np.float32)
        tensors["zs_bias"] = np.ascontiguousarray(zero_shot.bias, dtype=np.float32)
    atomic_write(folder / HEAD_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / META_FILE, {**head.meta, "classes": list(head.classes), "name": name,
                                           "shape": list(head.weight.shape), "has_zero_shot": zero_shot is not None})
    return folder


def load_zero_shot(cache_root: Path, name: str) -> Optional[Head]:
    """The zero-shot head saved with head ``name`` (None when it was trained from zeros)."""
    from safetensors.numpy import load_file

    head = load_head(cache_root, name)
    if not head.meta.get("has_zero_shot"):
        return None
    tensors = load_file(str(head_dir(cache_root, name) / HEAD_FILE))
    return Head(tensors["zs_weight"], tensors["zs_bias"], head.classes, {"kind": "zero-shot"})


def load_head(cache_root: Path, name: str) -> Head:
    """A saved head. Raises StoreNotFoundError / SpecError naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = head_dir(cache_root, name)
    try:
        meta = read_json(folder / META_FILE)
    except ValueError as exc:
        raise SpecError(f"{folder / META_FILE}: not valid JSON ({exc})") from exc
    if meta is None:
        raise StoreNotFoundError(f"head {name!r} is not in {Path(cache_root) / 'heads'}; train it with "
                                 "`embedstore heads train`")
    from embedstore.store import schemas

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
