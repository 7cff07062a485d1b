"""FAISS on arrays (embedstore.search.ann) and kNN voting (embedstore.score.knn) against brute-force numpy oracles."""
from __future__ import annotations

import numpy as np
import pytest

from embedstore.errors import SpecError
from embedstore.score import knn
from embedstore.score.metrics import label_ids
from embedstore.search import ann as search


def clustered(n: int, d: int = 32, clusters: int = 20, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def oracle(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ db.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_exact_index_equals_the_numpy_oracle():
    x = clustered(3000)
    ids = np.arange(3000) + 1000  # ids need not be row numbers
    index = search.build(x, ids, "Flat")
    queries = clustered(50, seed=5)
    scores, found = search.search(index, queries, 10)
    o_scores, o_ids = oracle(x, queries, 10)
    np.testing.assert_allclose(scores, o_scores, atol=1e-5)
    # ties aside, the same rows in the same order
    assert (found == o_ids + 1000).mean() > 0.99


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW32"])
def test_approximate_index_reaches_the_recall_it_reports(factory):
    x = clustered(6000, spread=0.9)
    ids = np.arange(len(x))
    index = search.build(x, ids, factory)
    tuning = search.tune(index, x, ids, target=0.95, k=10, sample=300, seed=1)
    assert tuning.parameter in ("nprobe", "efSearch") and tuning.recall >= 0.95
    # an independent sample of rows (other seed), each row's own id excluded, as tune does
    rows = np.random.default_rng(99).choice(len(x), 300, replace=False)
    _, truth = oracle(x, x[rows], 11)
    _, found = search.search(index, x[rows], 11)
    truth = [[i for i in t if i != r][:10] for t, r in zip(truth, rows)]
    found = [[i for i in f if i != r][:10] for f, r in zip(found, rows)]
    measured = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert measured >= tuning.recall - 0.03


def test_tuning_stops_at_the_first_setting_that_reaches_the_target():
    x = clustered(4000, spread=0.9)
    ids = np.arange(len(x))
    index = search.build(x, ids, "IVF64,Flat")
    loose = search.tune(index, x, ids, target=0.5, sample=200)
    strict = search.tune(index, x, ids, target=0.99, sample=200)
    assert loose.value < strict.value
    assert search.unwrap(index).nprobe == strict.value  # the chosen value is left set


def test_removal_and_additions_keep_the_oracle():
    x = clustered(2000)
    index = search.build(x[:1500], np.arange(1500), "Flat")
    assert search.supports_removal(index)
    assert search.remove(index, np.arange(0, 1500, 2)) == 750
    search.add(index, x[1500:], np.arange(1500, 2000))
    live = np.r_[np.arange(1, 1500, 2), np.arange(1500, 2000)]
    _, found = search.search(index, x[:20], 5)
    _, o = oracle(x[live], x[:20], 5)
    np.testing.assert_array_equal(found, live[o])


def test_hnsw_cannot_remove_rows():
    index = search.build(clustered(500), np.arange(500), "HNSW32")
    assert not search.supports_removal(index)


def test_query_width_mismatch_names_both_widths():
    index = search.build(clustered(100), np.arange(100), "Flat")
    with pytest.raises(SpecError, match="query width 16 does not match the index width 32"):
        search.search(index, np.zeros((1, 16), dtype=np.float32), 3)


@pytest.mark.parametrize("n, budget, expected", [
    (5_000, None, "Flat"),
    (100_000, None, "Flat"),
    (100_001, None, "IVF1024,Flat"),
    (1_000_000, None, "IVF4096,Flat"),
    (1_000_000, 1 << 30, "IVF4096,PQ64x8"),        # 3 GB of vectors do not fit 1 GiB
    (1_000_000, 40 * (1 << 20), "IVF4096,PQ16x8"),  # the most bytes per vector that fit
])
def test_auto_kind_follows_rows_and_memory(n, budget, expected):
    assert search.choose_factory("auto", n, 768, budget) == expected


def test_auto_with_a_budget_nothing_fits_is_a_clear_error():
    with pytest.raises(SpecError, match="--max-memory .* too small for 1,000,000 rows"):
        search.choose_factory("auto", 1_000_000, 768, 1 << 20)


def test_unknown_kind_is_named():
    with pytest.raises(SpecError, match="--kind 'IVFbogus'"):
        search.choose_factory("IVFbogus", 1000, 32)
    assert search.choose_factory("IVF16,SQ8", 1000, 32) == "IVF16,SQ8"  # any factory string FAISS accepts


def test_memory_estimate_matches_faiss_within_a_quarter():
    faiss = search.faiss_module()
    x = clustered(20_000, d=64)
    for factory in ("Flat", "IVF64,Flat", "HNSW32"):
        index = search.build(x, np.arange(len(x)), factory)
        actual = len(faiss.serialize_index(index))
        estimate = search.memory_estimate(factory, len(x), 64)
        assert 0.75 * actual <= estimate <= 1.25 * actual, (factory, actual, estimate)


def test_gpu_device_is_refused_clearly_without_faiss_gpu():
    if search.gpu_available():
        pytest.skip("faiss-gpu with a GPU is present")
    assert search.resolve_device("auto", "IVF64,Flat") == "cpu"
    with pytest.raises(SpecError, match="--device cuda: faiss has no GPU"):
        search.resolve_device("cuda", "Flat")


# ---- kNN voting --------------------------------------------------------------------------------
def test_uniform_vote_is_a_majority_and_ignores_missing_neighbours():
    labels = np.array([[0, 1, 1, -1], [2, 2, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.4, 0.0], [0.3, 0.2, 0.9, 0.8]])
    p = knn.class_votes(labels, scores, 3, "uniform")
    np.testing.assert_allclose(p, [[1 / 3, 2 / 3, 0], [0.5, 0, 0.5]], atol=1e-6)


def test_weighted_votes_follow_similarity():
    labels = np.array([[0, 1, 1]])
    scores = np.array([[0.95, 0.5, 0.5]])
    assert knn.class_votes(labels, scores, 2, "uniform").argmax() == 1
    assert knn.class_votes(labels, scores, 2, "distance").argmax() == 0       # 1/0.05 > 2/0.5
    sim = knn.class_votes(labels, scores, 2, "similarity", temperature=0.07)
    expected = np.exp(0.95 / 0.07) / (np.exp(0.95 / 0.07) + 2 * np.exp(0.5 / 0.07))
    assert sim[0, 0] == pytest.approx(expected, rel=1e-5)


def test_labels_outside_the_classes_are_named():
    with pytest.raises(SpecError, match="'Lake'"):
        label_ids(["Sea", "Lake"], ["Sea", "Street"], "models[1]")


def test_best_prompt_match_fast_path_equals_the_per_class_loop():
    from embedstore.score.query import ClassVectors

    rng = np.random.default_rng(3)
    prompts = rng.standard_normal((9, 8)).astype(np.float32)
    feats = rng.standard_normal((20, 8)).astype(np.float32)
    grouped = ClassVectors(("a", "b", "c"), "best", prompts, np.array([0, 0, 1, 1, 1, 1, 2, 2, 2]), 100.0)
    shuffled = ClassVectors(("a", "b", "c"), "best", prompts[[0, 2, 6, 1, 3, 7, 4, 5, 8]],
                            np.array([0, 1, 2, 0, 1, 2, 1, 1, 2]), 100.0)  # not grouped: the loop path
    sims = feats @ prompts.T
    expected = np.stack([sims[:, :2].max(1), sims[:, 2:6].max(1), sims[:, 6:].max(1)], axis=1)
    np.testing.assert_allclose(grouped.similarities(feats), expected, rtol=1e-6)
    np.testing.assert_allclose(shuffled.similarities(feats), expected, rtol=1e-6)


def test_lossy_indexes_without_a_search_parameter_are_measured_not_called_exact():
    from embedstore.search.ann import build_tuned

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, tuning = build_tuned(x, np.arange(3000), "PQ4x4", 0.95, 10, 500)
    assert tuning.parameter is None and tuning.sample == 500
    assert 0 < tuning.recall < 0.95  # 4-bit codes of random vectors lose neighbours: measured, and below target
    _, flat = build_tuned(x, np.arange(3000), "Flat", 0.95, 10, 500)
    assert flat.recall == 1.0 and flat.sample == 0
