"""The one scoring rule (embedstore.score.scoring) against plain float64 numpy oracles written here."""
from __future__ import annotations

import numpy as np
import pytest

from embedstore.errors import SpecError
from embedstore.score.ensemble import normalise_weights, weighted_average
from embedstore.score.scoring import (
    TIE_RTOL,
    ArrayPart,
    Rule,
    class_matrix,
    class_scores,
    combine,
    member_part,
    predict,
    softmax,
    sum_to_one,
    top_k,
)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def oracle_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def oracle(img, texts, index, n_classes, scale, aggregate, weights, drop=None):
    """The seed's arithmetic in float64, member by member, then the weighted ensemble."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    per = []
    for x, t in zip(img, texts):
        x, t = x.astype(np.float64), t.astype(np.float64)
        if aggregate == "prob-mean":
            per.append(oracle_softmax(scale * x @ t.T))
        elif aggregate == "embed-mean":
            cw = unit(np.stack([unit(t[index == c]).mean(0) for c in range(n_classes)]))
            per.append(oracle_softmax(scale * x @ cw.T))
        else:
            z = scale * x @ t.T
            per.append(oracle_softmax(np.stack([z[:, index == c].mean(1) for c in range(n_classes)], 1)))
    mix = sum(wi * p for wi, p in zip(w, per))
    if aggregate != "prob-mean":
        return mix
    if drop is not None:
        mix = np.where(mix > drop, mix, 0.0)
    return np.stack([mix[:, index == c].mean(1) for c in range(n_classes)], 1)


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    img = [unit(rng.normal(size=(37, 16))).astype(np.float32), unit(rng.normal(size=(37, 12))).astype(np.float32)]
    index = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])  # unequal counts, 9 prompts
    texts = [unit(rng.normal(size=(9, 16))).astype(np.float32), unit(rng.normal(size=(9, 12))).astype(np.float32)]
    return img, texts, index


def test_softmax_matches_definition():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(softmax(x.copy()), oracle_softmax(x.astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("aggregate", ["prob-mean", "embed-mean", "logit-mean"])
@pytest.mark.parametrize("block", [1, 5, 36, 37, 1000])
def test_class_scores_equal_the_oracle_at_any_block_height(data, aggregate, block):
    img, texts, index = data
    drop = 0.02 if aggregate == "prob-mean" else None
    rule = Rule(aggregate, index, 3, drop)
    sources = [ArrayPart(rule, 30.0, features=x, text=t) for x, t in zip(img, texts)]
    got = class_scores(rule, sources, [0.7, 0.3], len(img[0]), block_rows=block)
    np.testing.assert_allclose(got, oracle(img, texts, index, 3, 30.0, aggregate, [0.7, 0.3], drop), atol=2e-6)


def test_one_row_and_no_rows(data):
    img, texts, index = data
    rule = Rule("prob-mean", index, 3)
    one = class_scores(rule, [ArrayPart(rule, 10.0, features=img[0][:1], text=texts[0])], [1.0], 1)
    np.testing.assert_allclose(one, oracle([img[0][:1]], texts[:1], index, 3, 10.0, "prob-mean", [1]), atol=1e-6)
    none = class_scores(rule, [ArrayPart(rule, 10.0, features=img[0][:0], text=texts[0])], [1.0], 0)
    assert none.shape == (0, 3) and predict(none).shape == (0,) and top_k(none, 2).shape == (0, 2)


def test_prompt_logits_and_column_subsets_give_the_same_scores(data):
    img, texts, index = data
    rule = Rule("prob-mean", index, 3)
    logits = img[0] @ texts[0].T
    cols = np.array([0, 2, 3, 5, 6])
    sub = rule.subset(cols)
    from_logits = class_scores(sub, [ArrayPart(sub, 20.0, logits=logits, columns=cols)], [1.0], len(logits), block_rows=7)
    from_text = class_scores(sub, [ArrayPart(sub, 20.0, features=img[0], text=texts[0][cols])], [1.0], len(logits))
    np.testing.assert_allclose(from_logits, from_text, atol=1e-6)
    np.testing.assert_allclose(from_text, oracle(img[:1], [texts[0][cols]], index[cols], 3, 20.0, "prob-mean", [1]),
                               atol=1e-6)
    np.testing.assert_array_equal(logits, img[0] @ texts[0].T)  # the logits given were not modified


def test_class_means_for_grouped_and_interleaved_prompts():
    rng = np.random.default_rng(5)
    values = rng.random((11, 7)).astype(np.float32)
    for index in (np.array([0, 0, 1, 1, 1, 2, 2]), np.array([2, 0, 1, 0, 2, 1, 1])):
        expected = np.stack([values[:, index == c].mean(1) for c in range(3)], 1)
        np.testing.assert_allclose(Rule("prob-mean", index, 3).class_means(values), expected, atol=1e-6)


def test_class_matrix_definitions(data):
    _, texts, index = data
    t = texts[0]
    embed = class_matrix(Rule("embed-mean", index, 3), t)
    np.testing.assert_allclose(embed, unit(np.stack([unit(t[index == c]).mean(0) for c in range(3)])), atol=1e-6)
    logit = class_matrix(Rule("logit-mean", index, 3), t)
    np.testing.assert_allclose(logit, np.stack([t[index == c].mean(0) for c in range(3)]), atol=1e-6)
    with pytest.raises(SpecError):
        class_matrix(Rule("prob-mean", index, 3), t)


def test_drop_is_strict_and_does_not_renormalise():
    rule = Rule("prob-mean", np.array([0, 1, 2, 3]), 4, drop_below=0.002)
    p = np.array([[0.002, 0.0021, 0.5, 0.4959]], dtype=np.float32)
    out = combine(rule, [p], [1.0])
    assert out[0, 0] == 0.0 and out[0, 1] == np.float32(0.0021)
    assert out.sum() < 1.0
    assert p[0, 0] == np.float32(0.002)  # the part itself is not modified


def test_sum_to_one_keeps_zero_rows_zero():
    out = sum_to_one(np.array([[1.0, 3.0], [0.0, 0.0]], dtype=np.float32))
    assert out.tolist() == [[0.25, 0.75], [0.0, 0.0]]


def test_class_without_prompt_is_an_error():
    with pytest.raises(SpecError, match=r"\[1\]"):
        Rule("prob-mean", np.array([0, 0, 2]), 3)
    with pytest.raises(SpecError, match="drop_below"):
        Rule("embed-mean", np.array([0, 1]), 2, drop_below=0.1)


def test_weights():
    assert normalise_weights([1, 3]).tolist() == [0.25, 0.75]
    for bad in ([], [-1, 2], [0, 0], [float("nan")]):
        with pytest.raises(SpecError):
            normalise_weights(bad)
    a = np.ones((2, 2), dtype=np.float32)
    np.testing.assert_allclose(weighted_average([a, 3 * a], [1, 1]), 2 * a)
    with pytest.raises(ValueError, match="shapes"):
        weighted_average([a, np.ones((2, 3))], [1, 1])


def test_extras_mix_with_normalised_zero_shot_scores():
    rule = Rule("embed-mean", np.array([0, 1]), 2)
    zs = np.array([[0.2, 0.6]], dtype=np.float32)      # sums to 0.8: normalised before mixing
    knn = np.array([[1.0, 0.0]], dtype=np.float32)
    out = combine(rule, [zs], [3.0], [knn], [1.0])
    np.testing.assert_allclose(out, 0.75 * np.array([[0.25, 0.75]]) + 0.25 * knn, atol=1e-7)
    only_knn = combine(rule, [None], [0.0], [knn], [1.0])
    np.testing.assert_allclose(only_knn, knn)


def test_soft_vote_is_weighted_minmax_of_log_scores():
    rule = Rule("embed-mean", np.array([0, 1, 2]), 3, ensemble="soft-vote")
    a = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    b = np.array([[0.1, 0.3, 0.6]], dtype=np.float32)

    def mm(p):
        lp = np.log(p.astype(np.float64))
        return (lp - lp.min()) / (lp.max() - lp.min())

    np.testing.assert_allclose(combine(rule, [a, b], [0.5, 0.5]), 0.5 * mm(a) + 0.5 * mm(b), atol=1e-6)


def test_ties_go_to_the_lowest_class_index_within_the_tolerance():
    s = np.array([[0.0625, 0.0625 + 3.7e-8, 0.01],     # a tie in float32 noise: class 0
                  [0.1, 0.3, 0.3],                    # an exact tie: class 1
                  [0.0, 0.0, 0.0],                    # everything dropped: class 0
                  [0.5, 0.5 * (1 + 10 * TIE_RTOL), 0.0]], dtype=np.float32)  # a real difference: class 1
    assert predict(s).tolist() == [0, 1, 0, 1]
    top = top_k(s, 2)
    assert top[:, 0].tolist() == predict(s).tolist()
    assert top.tolist() == [[0, 1], [1, 2], [0, 1], [1, 0]]


def test_top_k_orders_by_score_and_agrees_with_predict():
    rng = np.random.default_rng(3)
    s = rng.random((200, 50)).astype(np.float32)
    ref = np.argsort(-s, axis=1, kind="stable")
    for k in (5, 20, 49, 50):  # argmax passes up to 16, a partial sort above
        np.testing.assert_array_equal(top_k(s, k), ref[:, :k])
    assert top_k(s, 100).shape == (200, 50)
    tied = np.zeros((2, 30), dtype=np.float32)
    tied[:, [4, 9, 2]] = 0.5
    tied[:, 7] = 0.7
    for k in (5, 20):  # equal scores by class index, in both ways of ranking
        assert top_k(tied, k).tolist()[0] == ([7, 2, 4, 9] + [i for i in range(30) if i not in (2, 4, 7, 9)])[:k]


def test_member_part_never_changes_its_input_unless_asked():
    rule = Rule("prob-mean", np.array([0, 1]), 2)
    logits = np.array([[0.1, 0.2]], dtype=np.float32)
    member_part(rule, 10.0, logits=logits)
    assert logits.tolist() == [[pytest.approx(0.1), pytest.approx(0.2)]]
    member_part(rule, 10.0, logits=logits, in_place=True)
    assert logits.sum() == pytest.approx(1.0)
