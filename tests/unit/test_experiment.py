"""Experiment files: parsing, validation, --set overrides, the ajou-2024 recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from embedstore.errors import SpecError
from embedstore.score.experiment import (
    apply_overrides,
    experiment_from_mapping,
    load_experiment,
    parse_value,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
BASE = {"dataset": "d", "classes": ["a", "b"], "models": [{"model": "ViT-B-32", "pretrained": "openai"}]}


def test_ajou_recipe_states_the_seed():
    exp = load_experiment(RECIPES / "ajou-2024.toml")
    assert exp.templates == "ajou-2024" and exp.aggregate == "prob-mean" and exp.scale == 100.0
    assert exp.classes == ("Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street")
    meta, eva = exp.models
    assert (meta.spec.model, meta.spec.pretrained) == ("ViT-bigG-14-quickgelu", "metaclip_fullcc")
    assert eva.spec.kind == "hf" and eva.spec.trust_remote_code
    assert (meta.view.resize_mode, meta.view.size, meta.view.sharpness) == ("squash", 224, 2.3)
    assert (eva.view.resize_mode, eva.view.sharpness) == ("squash", 2.0)
    assert meta.weight == eva.weight == 0.5
    dropped = load_experiment(RECIPES / "ajou-2024.toml", ["drop_below=0.002", "models.0.weight=0.55"])
    assert dropped.drop_below == 0.002 and dropped.models[0].weight == 0.55


def test_defaults_and_overrides():
    exp = experiment_from_mapping(BASE)
    assert exp.aggregate == "embed-mean" and exp.scale == 100.0 and exp.templates == "openai-imagenet"
    over = apply_overrides(BASE, ["aggregate=logit-mean", "scale=model", "models.0.sharpness=2", "name=x y"])
    exp = experiment_from_mapping(over)
    assert exp.aggregate == "logit-mean" and exp.scale == "model" and exp.models[0].view.sharpness == 2.0
    assert exp.name == "x y"
    assert BASE["models"][0] == {"model": "ViT-B-32", "pretrained": "openai"}  # not mutated
    assert parse_value("[1, 2]") == [1, 2] and parse_value("true") is True and parse_value("abc") == "abc"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"aggregate": "mean"}, "aggregate"),
        ({"scale": -1}, "scale"),
        ({"scale": "big"}, "scale"),
        ({"drop_below": 0.1}, "prob-mean"),
        ({"models": []}, "at least one"),
        ({"models": [{"pretrained": "openai"}]}, "missing 'model'"),
        ({"models": [{"model": "ViT-B-32", "wieght": 1}]}, "wieght"),
        ({"models": [{"model": "ViT-B-32", "weight": 0}]}, "all weights are zero"),
        ({"models": [{"model": "ViT-B-32", "mean": [1, 2]}]}, "mean"),
        ({"colour": 1}, "colour"),
    ],
)
def test_invalid_experiments_name_the_key(change, message):
    with pytest.raises(SpecError, match=message):
        experiment_from_mapping({**BASE, **change})


def test_bad_overrides():
    with pytest.raises(SpecError, match="KEY=VALUE"):
        apply_overrides(BASE, ["aggregate"])
    with pytest.raises(SpecError, match="index"):
        apply_overrides(BASE, ["models.3.weight=1"])


def test_bad_file(tmp_path):
    bad = tmp_path / "e.toml"
    bad.write_text("dataset = \n")
    with pytest.raises(SpecError, match="e.toml"):
        load_experiment(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_experiment(tmp_path / "missing.toml")
