"""Validation splits (stratified, grouped) and linear heads (training, WiSE-FT, soups, storage)."""
from __future__ import annotations

import numpy as np
import pytest

from embedstore.errors import SpecError, StoreNotFoundError
from embedstore.score.heads import (
    Head,
    interpolate,
    load_head,
    load_zero_shot,
    save_head,
    uniform_soup,
    zero_shot_head,
)
from embedstore.score.splits import SplitSpec, split
from embedstore.tune.head_fit import greedy_soup, sample_weights, train_head


def labelled(n_per: int = 20, classes: int = 3, persons: int = 0):
    keys, labels = [], []
    for c in range(classes):
        for i in range(n_per):
            person = f"p{(c * n_per + i) % persons:03d}" if persons else f"x{c}-{i}"
            keys.append(f"{person}/img{c}-{i}.jpg")
            labels.append(f"c{c}")
    return keys, labels


def test_plain_split_is_stratified_and_deterministic():
    keys, labels = labelled(50, 4)
    train, val = split(keys, labels, SplitSpec(0.2, seed=3))
    assert len(val) == 40 and len(set(train) | set(val)) == 200 and not set(train) & set(val)
    assert sorted(np.unique([labels[i] for i in val], return_counts=True)[1].tolist()) == [10, 10, 10, 10]
    again = split(keys, labels, SplitSpec(0.2, seed=3))
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, split(keys, labels, SplitSpec(0.2, seed=4))[1])


def test_grouped_split_never_puts_a_group_on_both_sides(tmp_path):
    keys, labels = labelled(40, 3, persons=30)
    spec = SplitSpec(0.2, seed=0, group_regex=r"^([^/]+)/")
    train, val = split(keys, labels, spec)
    group = [k.split("/")[0] for k in keys]
    assert not {group[i] for i in train} & {group[i] for i in val}
    assert 0.1 < len(val) / len(keys) < 0.3
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("key,group\n" + "".join(f"{k},{g}\n" for k, g in zip(keys, group)))
    t2, v2 = split(keys, labels, SplitSpec(0.2, seed=0, groups=str(csv_path)))
    np.testing.assert_array_equal(v2, val)  # the same groups whichever way they are given


def test_split_errors_are_named(tmp_path):
    keys, labels = labelled(5, 2)
    with pytest.raises(SpecError, match="does not match key"):
        split(keys, labels, SplitSpec(0.2, group_regex=r"^(zzz)/"))
    with pytest.raises(SpecError, match="needs one capture group"):
        SplitSpec(0.2, group_regex="x")
    with pytest.raises(SpecError, match="fraction"):
        SplitSpec(1.5)
    with pytest.raises(SpecError, match="unknown key"):
        SplitSpec.from_mapping({"fraction": 0.2, "sead": 1})
    csv_path = tmp_path / "g.csv"
    csv_path.write_text("key,group\nnope.jpg,a\n")
    with pytest.raises(SpecError, match="no group for key"):
        split(keys, labels, SplitSpec(0.2, groups=str(csv_path)))


def separable(n: int = 600, d: int = 16, c: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d)) * 3
    y = rng.integers(0, c, n)
    x = centres[y] + rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y, centres


def test_head_on_separable_features_is_accurate():
    x, y, _ = separable()
    head = train_head(x, y, ["a", "b", "c", "d"], c_reg=10.0)
    x2, y2, _ = separable(seed=0)  # same distribution, same centres
    assert (head.logits(x2).argmax(1) == y2).mean() >= 0.99


def test_zero_shot_init_pulls_the_head_towards_it():
    x, y, centres = separable()
    noisy = centres + 8 * np.random.default_rng(5).standard_normal(centres.shape)  # an imperfect zero-shot head
    text = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    zs = zero_shot_head(text, np.arange(4), ["a", "b", "c", "d"], 100.0)
    np.testing.assert_allclose(np.linalg.norm(zs.weight, axis=1), 100.0, rtol=1e-5)
    assert (zs.logits(x).argmax(1) == y).mean() < 0.95
    strong = train_head(x, y, zs.classes, zs, c_reg=1e-4)   # heavy pull: stays near the zero-shot head
    weak = train_head(x, y, zs.classes, zs, c_reg=10.0)
    moved_strong = np.abs(strong.weight - zs.weight).max()
    assert 0 < moved_strong < np.abs(weak.weight - zs.weight).max()
    assert (weak.logits(x).argmax(1) == y).mean() > (zs.logits(x).argmax(1) == y).mean()


def test_wise_ft_endpoints_and_linearity():
    x, y, centres = separable()
    text = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    zs = zero_shot_head(text, np.arange(4), ["a", "b", "c", "d"], 100.0)
    ft = train_head(x, y, zs.classes, zs, c_reg=1.0)
    np.testing.assert_allclose(interpolate(zs, ft, 0.0).logits(x), zs.logits(x), atol=1e-4)
    np.testing.assert_allclose(interpolate(zs, ft, 1.0).logits(x), ft.logits(x), atol=1e-4)
    mid = interpolate(zs, ft, 0.3).logits(x)
    np.testing.assert_allclose(mid, 0.7 * zs.logits(x) + 0.3 * ft.logits(x), rtol=1e-4, atol=1e-3)
    with pytest.raises(SpecError, match="alpha"):
        interpolate(zs, ft, 1.5)


def test_sample_weights_balance_classes():
    y = np.array([0] * 8 + [1] * 2)
    w = sample_weights(y, 2, "class-weight")
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum())
    o = sample_weights(y, 2, "oversample", seed=1)
    assert o[y == 0].sum() == o[y == 1].sum() == 8 and (o == np.round(o)).all()


def heads_for_soup():
    w = [np.full((2, 3), v, dtype=np.float32) for v in (1.0, 2.0, 4.0)]
    return [Head(wi, np.zeros(2, np.float32), ("a", "b")) for wi in w]


def test_uniform_soup_is_the_mean():
    soup = uniform_soup(heads_for_soup())
    np.testing.assert_allclose(soup.weight, np.full((2, 3), 7 / 3), rtol=1e-6)


def test_greedy_soup_accepts_only_strict_improvements():
    heads = heads_for_soup()
    # scores by the mean weight value: own 1.0 -> 0.5, 2.0 -> 0.9, 4.0 -> 0.7; soup(2,4)=3.0 -> 0.9 (a tie: rejected),
    # soup(2,1)=1.5 -> 0.95 (accepted)
    table = {1.0: 0.5, 2.0: 0.9, 4.0: 0.7, 3.0: 0.9, 1.5: 0.95}
    soup, steps = greedy_soup(heads, ["one", "two", "four"], lambda h: table[round(float(h.weight.mean()), 3)])
    assert [(s.name, s.accepted) for s in steps] == [("two", True), ("four", False), ("one", True)]
    np.testing.assert_allclose(soup.weight, 1.5)
    assert soup.meta["ingredients"] == ["two", "one"]


def test_heads_round_trip_through_safetensors(tmp_path):
    x, y, centres = separable()
    text = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    zs = zero_shot_head(text, np.arange(4), ["a", "b", "c", "d"], 100.0)
    ft = train_head(x, y, zs.classes, zs)
    save_head(tmp_path, "h1", ft, zs)
    back = load_head(tmp_path, "h1")
    np.testing.assert_array_equal(back.weight, ft.weight)
    assert back.classes == ft.classes
    np.testing.assert_array_equal(load_zero_shot(tmp_path, "h1").weight, zs.weight)
    assert not list((tmp_path / "heads" / "h1").glob("*.pkl"))
    with pytest.raises(StoreNotFoundError, match="heads train"):
        load_head(tmp_path, "missing")
    with pytest.raises(SpecError, match="head name"):
        save_head(tmp_path, "../escape", ft)
    (tmp_path / "heads" / "h1" / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpecError, match="cannot read the head"):
        load_head(tmp_path, "h1")


def test_too_small_a_split_is_a_clear_error():
    keys, labels = labelled(2, 3)  # 6 images, 3 classes: 20% is one image for three classes
    with pytest.raises(SpecError, match="cannot make a stratified 20% split"):
        split(keys, labels, SplitSpec(0.2))
