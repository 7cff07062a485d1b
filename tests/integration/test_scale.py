"""Stage 2 in row blocks under a memory budget: equal to plain float64 numpy oracles at any block
height (sizes that are not a multiple of the block, one row, no rows), and refusals that say
what a request needs."""
from __future__ import annotations

import numpy as np
import pytest

from embedstore import Cache
from embedstore.errors import BudgetError
from embedstore.score.experiment import experiment_from_mapping
from embedstore.score.prompts import expand, load_prompt_set
from embedstore.score.scoring import predict
from embedstore.score.session import Session
from embedstore.score.synthetic import FakeEncoder, write_synthetic_cache
from embedstore.store.reader import StoreReader
from embedstore.store.textbank import text_features
from embedstore.util.budget import Budget

CLASSES = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
A, B = FakeEncoder("a", 24, 1.0), FakeEncoder("b", 16, 0.7, shift=2)


def make(root, n_per_class):
    cache = Cache(root / "cache")
    write_synthetic_cache(cache, "scene", [A, B], CLASSES, per_class=n_per_class, noise=3.0,
                          prompt_set=load_prompt_set("ajou-2024"))
    return cache


def config(**overrides):
    base = {"dataset": "scene", "classes": CLASSES, "templates": "ajou-2024", "aggregate": "prob-mean",
            "scale": 60.0, "models": [{"model": str(A.spec), "weight": 0.6}, {"model": str(B.spec), "weight": 0.4}]}
    base.update(overrides)
    return experiment_from_mapping(base)


def oracle(cache, exp):
    """The formulas in float64 on whole arrays, as written in the README."""
    expansion = expand(load_prompt_set(exp.templates), exp.classes)
    index = expansion.class_index
    w = np.asarray([m.weight for m in exp.models], dtype=np.float64)
    w /= w.sum()
    parts = []
    for m in exp.models:
        store = cache.open_image_store(exp.dataset, m.spec, m.view)
        with StoreReader(store) as r:
            x = np.asarray(r.features(r.rows(0, len(r.keys))), dtype=np.float64)
            manifest = r.manifest
        t = text_features(cache, m.spec, manifest, expansion.texts).features.astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if exp.aggregate == "prob-mean":
            z = exp.scale * x @ t.T
        else:
            if exp.aggregate == "embed-mean":
                t /= np.linalg.norm(t, axis=1, keepdims=True)
            c = np.stack([t[index == k].mean(0) for k in range(len(exp.classes))])
            if exp.aggregate == "embed-mean":
                c /= np.linalg.norm(c, axis=1, keepdims=True)
            z = exp.scale * x @ c.T
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        parts.append(p / p.sum(axis=1, keepdims=True))
    mix = sum(wi * p for wi, p in zip(w, parts))
    if exp.aggregate != "prob-mean":
        return mix
    if exp.drop_below is not None:
        mix = np.where(mix > exp.drop_below, mix, 0.0)
    return np.stack([mix[:, index == k].mean(1) for k in range(len(exp.classes))], 1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make(tmp_path_factory.mktemp("scale"), 25)  # 150 rows


@pytest.mark.parametrize("aggregate", ["prob-mean", "embed-mean", "logit-mean"])
@pytest.mark.parametrize("block", [None, 1, 16, 149])
def test_block_heights_do_not_change_the_scores(cache, aggregate, block, monkeypatch):
    exp = config(aggregate=aggregate, drop_below=0.004 if aggregate == "prob-mean" else None)
    budget = Budget(256 << 20, logit_cache=0)
    if block is not None:  # exactly ``block`` rows per block: 1000 bytes a row, 1000 x block bytes a block
        budget = Budget(256 << 20, logit_cache=0, block=1000 * block)
        monkeypatch.setattr("embedstore.score.session._bytes_per_row", lambda rule, members: 1000)
        seen = []
        import embedstore.score.scoring as scoring

        original = scoring.combine
        monkeypatch.setattr("embedstore.score.scoring.combine", lambda rule, parts, *a: seen.append(len(parts[0])) or
                            original(rule, parts, *a))
    result = Session(cache, budget=budget, cache_logits=False).run(exp)
    if block is not None:
        assert seen[0] == block and sum(seen) == 150
    expected = oracle(cache, exp)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=2e-6)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    np.testing.assert_array_equal(result.predictions[clear], expected.argmax(axis=1)[clear])
    np.testing.assert_array_equal(result.top[:, 0], result.predictions)


def test_the_logit_cache_gives_the_same_scores_as_computing_them(cache, tmp_path):
    exp = config(drop_below=0.003)
    cold = Session(cache, budget=Budget(256 << 20)).run(exp)      # computes, writes the cache
    warm = Session(cache, budget=Budget(256 << 20)).run(exp)      # reads it
    np.testing.assert_array_equal(warm.scores, cold.scores)
    np.testing.assert_allclose(warm.scores, oracle(cache, exp), rtol=1e-4, atol=2e-6)


def test_one_row_and_no_rows(tmp_path):
    one = Cache(tmp_path / "one" / "cache")
    write_synthetic_cache(one, "scene", [A, B], CLASSES, per_class=1, keys=["x.jpg"], labels=["Sea"],
                          prompt_set=load_prompt_set("ajou-2024"))
    result = Session(one).run(config())
    np.testing.assert_allclose(result.scores, oracle(one, config()), rtol=1e-4, atol=2e-6)
    assert result.predictions.shape == (1,) and result.metrics is not None and result.metrics.n == 1
    empty = Cache(tmp_path / "empty" / "cache")
    write_synthetic_cache(empty, "scene", [A, B], CLASSES, per_class=0, keys=[], labels=[],
                          prompt_set=load_prompt_set("ajou-2024"))
    none = Session(empty).run(config())
    assert none.scores.shape == (0, 6) and none.predictions.shape == (0,) and none.top.shape == (0, 5)


def test_a_run_that_cannot_fit_says_what_it_needs(tmp_path):
    wide = FakeEncoder("wide", 256)
    classes = [f"c{i:04d}" for i in range(1000)]  # x 80 templates: 80,000 prompts of 256 floats = 82 MB
    big = Cache(tmp_path / "cache")
    write_synthetic_cache(big, "scene", [wide], classes, per_class=1, prompt_set=load_prompt_set("openai-imagenet"))
    exp = config(templates="openai-imagenet", classes=classes, models=[{"model": str(wide.spec)}])
    with pytest.raises(BudgetError, match=r"needs .* more than the memory budget of 64\.0 MiB.*--max-memory"):
        Session(big, budget=Budget(64 << 20)).run(exp)
    assert Session(big, budget=Budget(512 << 20)).run(exp).predictions.shape == (1000,)


def test_ties_follow_the_documented_rule_everywhere(cache):
    """Scores within the tie tolerance go to the lowest class index in classify as in predict."""
    result = Session(cache).run(config(drop_below=0.5))  # drops (almost) everything: all-zero rows
    zero = result.scores.max(axis=1) == 0
    assert zero.any() and (result.predictions[zero] == 0).all()
    np.testing.assert_array_equal(result.predictions, predict(result.scores))
