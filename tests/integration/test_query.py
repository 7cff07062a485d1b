"""`embedstore index` / `query` on the toy model's cache, and kNN members in experiments."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore import EncoderSpec
from embedstore.cli.main import main
from embedstore.encode.loop import prompt_encoder
from embedstore.encode.toy import TOY_CLASSES
from embedstore.errors import SpecError
from embedstore.score.experiment import experiment_from_mapping
from embedstore.score.session import Session
from embedstore.util.arrays import unit_rows

CLASSES = list(TOY_CLASSES)


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def common(toy_cache, toy_clip_dir) -> list[str]:
    return ["--cache", str(toy_cache.root), "--dataset", "scenes", "--model", f"local-dir:{toy_clip_dir}"]


def store_rows(toy_cache, toy_clip_dir):
    store = toy_cache.open_image_store("scenes", EncoderSpec(f"local-dir:{toy_clip_dir}"))
    return store, store.read()


def test_query_text_key_and_image_from_the_cli(toy_cache, toy_clip_dir):
    args = common(toy_cache, toy_clip_dir)
    out = run("index", "build", *args)
    assert "built Flat over 150 rows" in out.output and "recall@10 1.000 (exact)" in out.output
    assert "Flat" in run("index", "info", "--cache", str(toy_cache.root)).output

    # a text query finds images of its class (the toy model learnt colours per class)
    res = json.loads(run("query", *args, "--text", "a photo of a Forests.", "-k", "10", "--json").output)
    hits = res["queries"][0]["hits"]
    assert res["index"] == "Flat" and len(hits) == 10
    assert sum(h["label"] == "Forests" for h in hits) >= 7

    # a key query leaves the row itself out and equals the brute-force oracle
    store, rows = store_rows(toy_cache, toy_clip_dir)
    key = rows.keys[30]
    res = json.loads(run("query", *args, "--key", key, "-k", "5", "--json").output)
    found = [h["key"] for h in res["queries"][0]["hits"]]
    f = unit_rows(rows.features)
    sims = f @ f[30]
    order = [rows.keys[i] for i in np.argsort(-sims, kind="stable") if i != 30][:5]
    assert found == order

    # an image file is encoded exactly as the store was: its nearest row is itself
    folder = toy_cache.root.parent / "scenes"
    res = json.loads(run("query", *args, "--image", str(folder / key), "-k", "1", "--json").output)
    hit = res["queries"][0]["hits"][0]
    assert hit["key"] == key and hit["score"] == pytest.approx(1.0, abs=2e-3)

    table = run("query", *args, "--text", "a photo of a Sea.", "-k", "3").output
    assert "key" in table and "score" in table


def test_query_without_an_index_is_exact_and_says_so(toy_cache, toy_clip_dir):
    out = run("query", *common(toy_cache, toy_clip_dir), "--text", "Sea", "-k", "2")
    assert "exact search (no index built)" in out.output


def test_stale_index_is_reported(toy_cache, toy_clip_dir):
    args = common(toy_cache, toy_clip_dir)
    run("index", "build", *args)
    store, rows = store_rows(toy_cache, toy_clip_dir)
    with store.writer(store.manifest()["fingerprint"], rows.features.shape[1], "float16") as w:
        w.drop(rows.keys[:2])
    out = run("query", *args, "--text", "Sea", "-k", "2")  # output holds stdout and stderr (click >= 8.2)
    assert "the index is stale" in out.output and "0 rows added, 0 re-encoded, 2 removed" in out.output
    out = run("index", "build", *args)
    assert "updated Flat: +0 / -2 rows" in out.output


def test_query_errors(toy_cache, toy_clip_dir):
    args = common(toy_cache, toy_clip_dir)
    out = run("query", *args, "--text", "Sea", "-k", "151", ok=False)
    assert out.exit_code == 1 and "-k 151 is larger than the store" in out.output
    out = run("query", *args, "--key", "nope.jpg", ok=False)
    assert out.exit_code == 1 and "nope.jpg" in out.output
    out = run("query", *args, ok=False)
    assert out.exit_code == 2 and "--text, --image or --key" in out.output
    out = run("index", "build", *args, "--kind", "IVFbogus", ok=False)
    assert out.exit_code == 1 and "--kind 'IVFbogus'" in out.output
    out = run("index", "build", *args, "--max-memory", "lots", ok=False)
    assert out.exit_code == 1 and "--max-memory 'lots'" in out.output


def test_nearest_classes_over_the_dataset_agree_with_embed_mean(toy_cache, toy_clip_dir, tmp_path):
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(f'dataset = "scenes"\nclasses = {json.dumps(CLASSES)}\ntemplates = "ajou-2024"\n'
                        f'aggregate = "embed-mean"\n[[models]]\nmodel = "local-dir:{toy_clip_dir}"\n')
    csv_path = tmp_path / "ranks.csv"
    out = run("query", *common(toy_cache, toy_clip_dir), "--classes", str(exp_file), "-k", "3",
              "--out", str(csv_path), "--limit", "5")
    assert "145 more rows" in out.output and "top-1 counts" in out.output
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("key,class_1,similarity_1,probability_1,class_2") and len(lines) == 151
    top1 = {line.split(",")[0]: line.split(",")[1] for line in lines[1:]}

    from embedstore.score.experiment import load_experiment

    result = Session(toy_cache, prompt_encoder(toy_cache)).run(load_experiment(exp_file))
    expected = {k: CLASSES[p] for k, p in zip(result.keys, result.predictions)}
    assert top1 == expected  # nearest prompt-averaged class vector == embed-mean argmax

    best = json.loads(run("query", *common(toy_cache, toy_clip_dir), "--classes", str(exp_file), "--match", "best",
                          "--key", result.keys[0], "-k", "6", "--json").output)
    sims = [c["similarity"] for c in best["results"][0]["classes"]]
    assert sims == sorted(sims, reverse=True) and len(sims) == 6


def knn_experiment(toy_clip_dir, **knn):
    return experiment_from_mapping({
        "dataset": "scenes", "classes": CLASSES, "templates": "ajou-2024", "aggregate": "prob-mean",
        "models": [{"model": f"local-dir:{toy_clip_dir}", "kind": "knn", **knn}],
    })


def test_knn_leave_one_out_equals_the_oracle(toy_cache, toy_clip_dir):
    _, rows = store_rows(toy_cache, toy_clip_dir)
    f = unit_rows(rows.features)
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)  # a row never votes for itself
    nearest = sims.argmax(axis=1)
    expected = [rows.labels[i] for i in nearest]
    result = Session(toy_cache, prompt_encoder(toy_cache)).run(knn_experiment(toy_clip_dir, k=1, weighting="uniform"))
    assert [CLASSES[p] for p in result.predictions] == expected
    # with the own row allowed, k=1 would be 100% accurate; leave-one-out is not
    assert result.metrics.accuracy < 1.0


def test_knn_uses_a_saved_index_and_ensembles_with_zero_shot(toy_cache, toy_clip_dir):
    args = common(toy_cache, toy_clip_dir)
    run("index", "build", *args, "--kind", "hnsw")
    knn_only = Session(toy_cache, prompt_encoder(toy_cache)).run(knn_experiment(toy_clip_dir, k=5))
    zs = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment_from_mapping({
        "dataset": "scenes", "classes": CLASSES, "templates": "ajou-2024", "aggregate": "prob-mean",
        "models": [{"model": f"local-dir:{toy_clip_dir}"}]}))
    both = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment_from_mapping({
        "dataset": "scenes", "classes": CLASSES, "templates": "ajou-2024", "aggregate": "prob-mean",
        "models": [{"model": f"local-dir:{toy_clip_dir}", "weight": 3.0},
                   {"model": f"local-dir:{toy_clip_dir}", "kind": "knn", "k": 5, "weight": 1.0}]}))
    zs_norm = zs.scores / zs.scores.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(both.scores, 0.75 * zs_norm + 0.25 * knn_only.scores, atol=1e-5)
    assert knn_only.metrics.accuracy > 0.5  # labels of similar images carry signal


def test_knn_errors_are_clear(toy_cache, toy_clip_dir):
    with pytest.raises(SpecError, match="k = 500 but dataset 'scenes' has only 149 rows"):
        Session(toy_cache, prompt_encoder(toy_cache)).run(knn_experiment(toy_clip_dir, k=500))
    with pytest.raises(SpecError, match="are not among the classes"):
        exp = experiment_from_mapping({
            "dataset": "scenes", "classes": CLASSES[:3], "templates": "ajou-2024",
            "models": [{"model": f"local-dir:{toy_clip_dir}", "kind": "knn"}]})
        Session(toy_cache, prompt_encoder(toy_cache)).run(exp)
    with pytest.raises(SpecError, match="weighting"):
        knn_experiment(toy_clip_dir, weighting="cosine")
    with pytest.raises(SpecError, match="only apply to kind"):
        experiment_from_mapping({"dataset": "scenes", "models": [{"model": "x", "k": 3}]})


def test_image_query_refuses_a_view_it_cannot_reproduce(toy_cache, toy_clip_dir):
    store, rows = store_rows(toy_cache, toy_clip_dir)
    manifest_path = store.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"]["decoder"] = "some-other-decoder"
    manifest_path.write_text(json.dumps(manifest))
    from embedstore.encode.image_query import image_vectors

    folder = toy_cache.root.parent / "scenes"
    with pytest.raises(SpecError, match="cannot encode images the way .* was encoded .*decoder"):
        image_vectors(toy_cache, EncoderSpec(f"local-dir:{toy_clip_dir}"), store, [folder / rows.keys[0]], "cpu")
