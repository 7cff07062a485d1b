"""Training linear heads on cached features, and the greedy head soup.

Training is multinomial logistic regression (L-BFGS on the exact gradient, CPU, float64) with

* an L2 penalty ``||W - W0||^2 / (2C)`` towards the initial head ``W0`` (the zero-shot head by
  default, so the trained head keeps a comparable logit scale and WiSE-FT interpolation is
  meaningful; towards zero with ``init="zeros"``);
* class imbalance handled by ``balance="class-weight"`` (sample weights ``n / (c * n_class)``) or
  ``"oversample"`` (minority rows drawn with replacement up to the largest class, seeded, as
  integer sample weights: the same loss as replicated rows, without copying features).

Soups average heads that share classes and features (:func:`embedstore.score.heads.uniform_soup`,
:func:`greedy_soup`: sorted by validation score, an ingredient is kept only if the soup's score
strictly improves). The head format and its use in scoring are :mod:`embedstore.score.heads`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError
from embedstore.score.heads import Head, check_compatible

log = logging.getLogger(__name__)

BALANCES = ("none", "class-weight", "oversample")


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
    check_compatible(heads)
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
