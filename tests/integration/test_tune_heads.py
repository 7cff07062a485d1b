"""`embedstore tune`, `heads train|soup`, head and soft-vote members, on synthetic and toy caches."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore import Cache
from embedstore.cli.main import main
from embedstore.encode.loop import prompt_encoder
from embedstore.encode.toy import TOY_CLASSES
from embedstore.errors import SpecError
from embedstore.score.experiment import experiment_from_mapping, load_experiment
from embedstore.score.prompts import load_prompt_set
from embedstore.score.scoring import predict
from embedstore.score.session import Session
from embedstore.score.synthetic import FakeEncoder, write_synthetic_cache
from embedstore.tune.study import Objective, SearchSpace, run_study

CLASSES = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
GOOD, LIAR = FakeEncoder("good", 32, 1.0), FakeEncoder("liar", 24, 1.0, shift=1)


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A labelled dataset seen by an informative encoder and a confidently wrong one."""
    root = tmp_path_factory.mktemp("synthetic")
    cache = Cache(root / "cache")
    write_synthetic_cache(cache, "scene", [GOOD, LIAR], CLASSES, per_class=40, noise=2.5,
                          prompt_set=load_prompt_set("ajou-2024"))
    return cache


def config(**overrides):
    base = {"dataset": "scene", "classes": CLASSES, "templates": "ajou-2024", "aggregate": "prob-mean",
            "scale": 100.0, "validation": {"fraction": 0.25, "seed": 0},
            "models": [{"model": str(GOOD.spec), "weight": 0.5}, {"model": str(LIAR.spec), "weight": 0.5}]}
    base.update(overrides)
    return base


def test_objective_equals_session_on_the_validation_rows(synthetic):
    exp = experiment_from_mapping(config(drop_below=0.002))
    objective = Objective(synthetic, exp)
    scores = objective.class_scores([0.7, 0.3], 50.0, 0.002)
    full = Session(synthetic).run(experiment_from_mapping(config(
        drop_below=0.002, scale=50.0, models=[{"model": str(GOOD.spec), "weight": 0.7},
                                              {"model": str(LIAR.spec), "weight": 0.3}])))
    np.testing.assert_allclose(scores, full.scores[objective.val], rtol=1e-5, atol=1e-7)
    subset = objective.class_scores([1, 1], 100.0, None, templates=[0, 3])
    exp_sub = experiment_from_mapping(config(use_templates=[objective.prompt_set.templates[i] for i in (0, 3)]))
    np.testing.assert_allclose(subset, Session(synthetic).run(exp_sub).scores[objective.val],
                               rtol=1e-5, atol=1e-7)


def test_tune_recovers_the_informative_model_and_resumes(synthetic):
    exp = experiment_from_mapping(config())
    report = run_study(synthetic, exp, trials=30, space=SearchSpace(drop_below=None), seed=0)
    weights = [m["weight"] for m in report.best_config["models"]]
    assert weights[0] > 0.6, weights          # the liar's weight is pushed down
    assert report.best_value > report.baseline
    assert report.trials_total == 30 and report.trials_run == 30
    again = run_study(synthetic, exp, trials=40, space=SearchSpace(drop_below=None), seed=0)
    assert again.trials_run == 10 and again.trials_total == 40  # the stored study continued
    assert again.best_value >= report.best_value


def test_tune_cli_writes_a_runnable_best_config(synthetic, tmp_path):
    exp_file = tmp_path / "exp.toml"
    import tomli_w

    exp_file.write_text(tomli_w.dumps(config()))
    out = run("tune", str(exp_file), "--cache", str(synthetic.root), "--trials", "15", "--metric", "macro-f1",
              "--templates")
    best_file = tmp_path / "exp.best.toml"
    assert best_file.is_file() and "best macro-f1" in out.output and "trial" in out.output
    best = load_experiment(best_file)
    assert best.use_templates is not None and best.use_templates
    result = Session(synthetic).run(best)
    assert result.metrics is not None
    entries = [json.loads(line) for line in (synthetic.root / "runs.jsonl").read_text().splitlines()]
    assert entries[-1]["kind"] == "tune" and entries[-1]["outputs"]["config"] == str(best_file)
    assert "tune" in run("runs", "--cache", str(synthetic.root)).output


def test_greedy_templates_keeps_only_strict_improvements(synthetic, tmp_path):
    exp_file = tmp_path / "exp.toml"
    import tomli_w

    exp_file.write_text(tomli_w.dumps(config(models=[{"model": str(GOOD.spec)}])))
    out = run("tune", str(exp_file), "--cache", str(synthetic.root), "--greedy-templates", "--out",
              str(tmp_path / "g.toml"))
    entry = [json.loads(line) for line in (synthetic.root / "runs.jsonl").read_text().splitlines()][-1]
    steps = entry["steps"]
    best = steps[0]["with"]
    for step in steps[1:]:
        assert step["kept"] == (step["with"] > best)
        best = max(best, step["with"]) if step["kept"] else best
    kept = [s["template"] for s in steps if s["kept"]]
    assert sorted(load_experiment(tmp_path / "g.toml").use_templates) == sorted(kept)
    assert f"kept {len(kept)} of 49 templates" in out.output


def test_tune_refuses_unlabelled_and_knn(synthetic):
    with pytest.raises(SpecError, match="zero-shot members only"):
        Objective(synthetic, experiment_from_mapping(config(models=[{"model": str(GOOD.spec), "kind": "knn"}])))


def test_soft_vote_is_min_max_of_member_log_scores(synthetic):
    from embedstore.score.ensemble import minmax_rows

    a = Session(synthetic).run(experiment_from_mapping(config(models=[{"model": str(GOOD.spec)}])))
    b = Session(synthetic).run(experiment_from_mapping(config(models=[{"model": str(LIAR.spec)}])))
    soft = Session(synthetic).run(experiment_from_mapping(config(
        ensemble="soft-vote", models=[{"model": str(GOOD.spec), "weight": 3}, {"model": str(LIAR.spec), "weight": 1}])))
    def log(p):  # probabilities that underflowed to 0 count as 1e-30, as in the implementation
        return np.log(np.maximum(p, 1e-30))

    expected = 0.75 * minmax_rows(log(a.scores)) + 0.25 * minmax_rows(log(b.scores))
    np.testing.assert_allclose(soft.scores, expected, atol=1e-5)
    assert (minmax_rows(np.ones((2, 3))) == 0).all()  # a constant row abstains instead of dividing by zero


# ---- heads on the toy model ---------------------------------------------------------------------
def toy_config(toy_clip_dir, **overrides):
    base = {"dataset": "scenes", "classes": list(TOY_CLASSES), "templates": "ajou-2024", "aggregate": "embed-mean",
            "validation": {"fraction": 0.3, "seed": 1}, "models": [{"model": f"local-dir:{toy_clip_dir}"}]}
    base.update(overrides)
    return base


def test_heads_train_soup_and_use_as_members(toy_cache, toy_clip_dir, tmp_path):
    import tomli_w

    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(tomli_w.dumps(toy_config(toy_clip_dir)))
    cache = ["--cache", str(toy_cache.root)]
    out = run("heads", "train", str(exp_file), *cache, "--C", "0.1,1,10", "--name", "toy")
    assert "WiSE-FT toy-C1-s0" in out.output and "alpha" in out.output
    for name in ("toy-C0.1-s0", "toy-C1-s0", "toy-C10-s0"):
        assert (toy_cache.root / "heads" / name / "head.safetensors").is_file()
    entry = [json.loads(line) for line in (toy_cache.root / "runs.jsonl").read_text().splitlines()][-1]
    wise = entry["heads"][1]["wise"]
    assert wise[0][1] == pytest.approx(entry["zero_shot"]["accuracy"])  # alpha 0 = the zero-shot head
    assert wise[-1][1] == pytest.approx(entry["heads"][1]["accuracy"])  # alpha 1 = the trained head

    out = run("heads", "soup", str(exp_file), "toy-C0.1-s0", "toy-C1-s0", "toy-C10-s0", *cache, "--name", "souped")
    assert "greedy soup souped" in out.output
    soup_entry = [json.loads(line) for line in (toy_cache.root / "runs.jsonl").read_text().splitlines()][-1]
    accepted = [s for s in soup_entry["steps"] if s["accepted"]]
    best = accepted[0]["soup_score"]
    for step in soup_entry["steps"][1:]:
        assert step["accepted"] == (step["soup_score"] > best)
        if step["accepted"]:
            best = step["soup_score"]

    def member(**kw):
        return toy_config(toy_clip_dir, models=[{"model": f"local-dir:{toy_clip_dir}", "kind": "head", **kw}])

    session = Session(toy_cache, prompt_encoder(toy_cache))
    trained = session.run(experiment_from_mapping(member(head="toy-C10-s0")))
    zs = session.run(experiment_from_mapping(toy_config(toy_clip_dir)))
    at_zero = session.run(experiment_from_mapping(member(head="toy-C10-s0", alpha=0.0)))
    np.testing.assert_allclose(at_zero.probabilities, zs.probabilities, atol=2e-4)  # WiSE-FT alpha 0 = zero-shot
    assert trained.metrics.accuracy >= zs.metrics.accuracy
    assert any("trained on" in n for n in trained.notes)  # says the head saw these images
    with pytest.raises(SpecError, match="only apply to kind"):
        experiment_from_mapping(toy_config(toy_clip_dir, models=[{"model": "x", "alpha": 0.5}]))
    other = experiment_from_mapping(toy_config(toy_clip_dir, models=[
        {"model": f"local-dir:{toy_clip_dir}", "kind": "head", "head": "toy-C10-s0", "sharpness": 2.0,
         "resize_mode": "squash"}]))
    with pytest.raises(SpecError, match="view_key"):
        session.run(other)


def test_relabel_overrides_labels(toy_cache, toy_clip_dir, tmp_path):
    from embedstore.tune.training import labelled_features

    exp = experiment_from_mapping(toy_config(toy_clip_dir))
    base = labelled_features(toy_cache, exp)
    key = base.keys[0]
    new_label = next(c for c in TOY_CLASSES if TOY_CLASSES.index(c) != base.y[0])
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(f"key,label\n{key},{new_label}\n")
    changed = labelled_features(toy_cache, exp, relabel=relabel)
    assert changed.y[0] == list(TOY_CLASSES).index(new_label) and changed.meta["relabelled"] == 1
    relabel.write_text("key,label\nnope.jpg,Sea\n")
    with pytest.raises(SpecError, match="nope.jpg"):
        labelled_features(toy_cache, exp, relabel=relabel)


def test_tune_refuses_model_scale_and_restarts_its_study_when_the_data_changes(synthetic, tmp_path):
    with pytest.raises(SpecError, match='scale = "model"'):
        Objective(synthetic, experiment_from_mapping(config(scale="model")))
    cache = Cache(tmp_path / "own")
    write_synthetic_cache(cache, "scene", [GOOD, LIAR], CLASSES, per_class=10, prompt_set=load_prompt_set("ajou-2024"))
    exp = experiment_from_mapping(config())
    before = Objective(cache, exp).data_id
    store = cache.open_image_store("scene", GOOD.spec)
    with store.writer(store.manifest()["fingerprint"], GOOD.dim, "float16") as w:
        w.drop([store.read().keys[0]])  # the dataset changed: a study must not continue on it
    store2 = cache.open_image_store("scene", LIAR.spec)
    with store2.writer(store2.manifest()["fingerprint"], LIAR.dim, "float16") as w:
        w.drop([store2.read().keys[0]])
    assert Objective(cache, exp).data_id != before


def assert_same_predictions(scores_a, scores_b, atol=1e-6):
    """Two computations of the same formula: class scores within ``atol``, and the same
    prediction wherever the best two classes are not within a few ``atol`` of each other
    (closer than that, the last float32 bits decide, on any machine)."""
    np.testing.assert_allclose(scores_a, scores_b, rtol=1e-5, atol=atol)
    top2 = np.sort(scores_b, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 4 * atol + 1e-5 * np.abs(top2[:, 1])
    np.testing.assert_array_equal(predict(scores_a)[clear], predict(scores_b)[clear])
    return clear


@pytest.mark.parametrize("k", [5, 41, 49])
def test_tune_baseline_is_the_experiment_as_written_with_its_template_subset(synthetic, k):
    prompt_set = load_prompt_set("ajou-2024")
    exp = experiment_from_mapping(config(use_templates=list(prompt_set.templates[:k])))
    objective = Objective(synthetic, exp, full_template_set=True)
    written = Session(synthetic).run(exp)
    ours = objective.class_scores([m.weight for m in exp.models], float(exp.scale), exp.drop_below,
                                  objective.written_templates())
    clear = assert_same_predictions(ours, written.scores[objective.val])
    assert clear.sum() >= 20  # the comparison is not vacuous (saturated members tie many rows)
    # exact ties (two saturated members, one prompt each: 0.5 / 8 per class) go to the lowest class
    # index in both, so the accuracies agree too
    assert objective.baseline() == pytest.approx(float((written.predictions[objective.val] == objective.y).mean()))


def test_tune_keeps_the_experiment_as_written_unless_a_trial_is_strictly_better(synthetic, tmp_path):
    exp = experiment_from_mapping(config(models=[{"model": str(GOOD.spec), "weight": 1.0}]))
    report = run_study(synthetic, exp, trials=5, space=SearchSpace(weights=False, scale=None, drop_below=(0.0, 0.0)))
    assert report.best_value == pytest.approx(report.baseline)  # nothing varied: every trial ties
    assert not report.improved and report.best_config == dict(exp.config)
    assert any("no trial scored higher" in n for n in report.notes)


def test_head_soup_refuses_heads_trained_on_another_split(toy_cache, toy_clip_dir, tmp_path):
    import tomli_w

    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(tomli_w.dumps(toy_config(toy_clip_dir)))
    run("heads", "train", str(exp_file), "--cache", str(toy_cache.root), "--C", "1,10", "--name", "h")
    out = run("heads", "soup", str(exp_file), "h-C1-s0", "h-C10-s0", "--cache", str(toy_cache.root), "--name", "s",
              "--set", "validation.seed=7", ok=False)
    assert out.exit_code == 1 and "another validation split" in out.output
    run("heads", "soup", str(exp_file), "h-C1-s0", "h-C10-s0", "--cache", str(toy_cache.root), "--name", "s")
