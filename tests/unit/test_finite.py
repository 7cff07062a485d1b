"""Issue 10 item 7: every number read from a user is finite; the run log is strict JSON."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from embedstore.errors import SpecError
from embedstore.score.experiment import experiment_from_mapping, load_experiment
from embedstore.store.views import View, ViewOptions, parse_triplet

BASE = {"dataset": "d", "classes": ["a", "b"], "aggregate": "prob-mean",
        "models": [{"model": "ViT-B-32", "pretrained": "openai"}]}


@pytest.mark.parametrize("override, where", [
    ("scale=nan", "scale"),
    ("scale=inf", "scale"),
    ("scale=-inf", "scale"),
    ("drop_below=nan", "drop_below"),
    ("models.0.weight=nan", "models[0].weight"),
    ("models.0.weight=inf", "models[0].weight"),
    ("models.0.sharpness=nan", "sharpness"),
    ("models.0.mean=[nan, 0.5, 0.5]", "mean"),
])
def test_set_refuses_non_finite_numbers(tmp_path, override, where):
    path = tmp_path / "exp.toml"
    path.write_text('dataset = "d"\nclasses = ["a", "b"]\naggregate = "prob-mean"\n'
                    '[[models]]\nmodel = "ViT-B-32"\npretrained = "openai"\n')
    with pytest.raises(SpecError, match="finite") as err:
        load_experiment(path, [override])
    assert where in str(err.value)


def test_file_values_refused_too(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('dataset = "d"\nclasses = ["a", "b"]\nscale = nan\n[[models]]\nmodel = "ViT-B-32"\n')
    with pytest.raises(SpecError, match=r"scale: expected a finite number"):
        load_experiment(path)
    knn = {**BASE, "models": [{"model": "m", "kind": "knn", "temperature": math.inf}]}
    with pytest.raises(SpecError, match=r"temperature: expected a finite number"):
        experiment_from_mapping(knn)
    head = {**BASE, "models": [{"model": "m", "kind": "head", "head": "h", "alpha": math.nan}]}
    with pytest.raises(SpecError, match=r"alpha: expected a finite number"):
        experiment_from_mapping(head)
    with pytest.raises(SpecError, match="fraction"):
        experiment_from_mapping({**BASE, "validation": {"fraction": math.nan}})


def test_views_refuse_non_finite_numbers():
    with pytest.raises(SpecError, match="sharpness"):
        ViewOptions(sharpness=math.nan)
    with pytest.raises(SpecError, match="sharpness"):
        View(sharpness=math.inf)
    with pytest.raises(SpecError, match="mean"):
        View(mean=(math.nan, 0.5, 0.5))
    with pytest.raises(SpecError, match="finite"):
        parse_triplet("0.5,inf,0.5", "--std")
    assert ViewOptions(sharpness=2.3).sharpness == 2.3


def test_cli_refuses_sharpness_nan_before_creating_anything(tmp_path, image_folder):
    from embedstore.cli.main import main

    cache = tmp_path / "c"
    result = CliRunner().invoke(main, ["encode", str(image_folder), "--model", "ViT-B-32", "--random-weights",
                                       "--cache", str(cache), "--sharpness", "nan"])
    assert result.exit_code == 1 and "sharpness" in result.output and "finite" in result.output
    assert not cache.exists()


def test_cli_number_lists_refuse_nan():
    from embedstore.cli.train import _floats

    with pytest.raises(SpecError, match="finite"):
        _floats("0.1,nan", "--C")


def test_run_log_is_strict_json(tmp_path):
    import numpy as np

    from embedstore.report.predictions import append_log, read_log, write_json

    append_log(tmp_path, {"run_id": "x", "metrics": {"accuracy": float("nan"), "f1": np.float32("inf"),
                                                     "ok": np.float32(0.5), "n": np.int64(3)}})
    line = (tmp_path / "runs.jsonl").read_text().strip()

    def refuse(token: str) -> None:
        raise AssertionError(f"non-JSON token {token}")

    entry = json.loads(line, parse_constant=refuse)
    assert entry["metrics"] == {"accuracy": None, "f1": None, "ok": 0.5, "n": 3}
    assert read_log(tmp_path)[0]["run_id"] == "x"
    out = write_json(tmp_path / "m.json", {"v": [1.0, float("-inf")]})
    assert json.loads(out.read_text(), parse_constant=refuse) == {"v": [1.0, None]}
