"""Stage 2 end to end: experiments from the cache equal the seed's formulas computed directly."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore import EncoderSpec, ViewOptions
from embedstore.cli.main import main
from embedstore.encode.loop import prompt_encoder
from embedstore.encode.toy import TOY_CLASSES
from embedstore.errors import SpecError, StoreNotFoundError
from embedstore.score.experiment import experiment_from_mapping
from embedstore.score.prompts import expand, load_prompt_set
from embedstore.score.session import Session
from embedstore.store.reader import StoreReader

CLASSES = list(TOY_CLASSES)


def experiment(model_dir, **overrides):
    config = {
        "dataset": "scenes",
        "classes": CLASSES,
        "templates": "ajou-2024",
        "aggregate": "prob-mean",
        "scale": 100.0,
        "models": [{"model": f"local-dir:{model_dir}", "weight": 1.0}],
    }
    config.update(overrides)
    return experiment_from_mapping(config)


def direct_scores(model_dir, folder, view, texts, class_index, scale, aggregate):
    """The seed's way, written plainly: encode every image and prompt with the model, then score."""
    import torch
    from PIL import Image

    from embedstore.encode.encoders import load_encoder
    from embedstore.encode.pil_view import PilTransform
    from embedstore.encode.sources import list_source

    enc = load_encoder(EncoderSpec(f"local-dir:{model_dir}"), device="cpu")
    items = list_source(folder).items
    x = torch.stack([PilTransform(view)(Image.open(i.path).convert("RGB")) for i in items])
    with torch.no_grad():
        img = torch.nn.functional.normalize(enc.model.encode_image(x), dim=-1).double()
        txt = torch.nn.functional.normalize(enc.model.encode_text(enc.tokenizer(list(texts))), dim=-1).double()
    n_classes = int(class_index.max()) + 1
    logits = scale * img @ txt.T
    if aggregate == "prob-mean":
        return logits.softmax(-1).numpy()  # per-prompt; grouped by the caller
    if aggregate == "logit-mean":
        z = torch.stack([logits[:, torch.as_tensor(class_index == c)].mean(1) for c in range(n_classes)], 1)
        return z.softmax(-1).numpy()
    w = torch.stack([torch.nn.functional.normalize(txt[torch.as_tensor(class_index == c)], dim=-1).mean(0)
                     for c in range(n_classes)])
    w = torch.nn.functional.normalize(w, dim=-1)
    return (scale * img @ w.T).softmax(-1).numpy()


@pytest.mark.parametrize("aggregate", ["prob-mean", "embed-mean", "logit-mean"])
def test_single_model_equals_direct_computation(aggregate, toy_cache, toy_clip_dir):
    folder = toy_cache.root.parent / "scenes"
    exp = experiment(toy_clip_dir, aggregate=aggregate, templates="openai-imagenet")
    result = Session(toy_cache, prompt_encoder(toy_cache)).run(exp)
    e = expand(load_prompt_set("openai-imagenet"), CLASSES)
    view = toy_cache.resolve_view(exp.models[0].spec, ViewOptions())
    ref = direct_scores(toy_clip_dir, folder, view, e.texts, e.class_index, 100.0, aggregate)
    if aggregate == "prob-mean":
        ref = np.stack([ref[:, e.class_index == c].mean(1) for c in range(6)], 1)
    np.testing.assert_allclose(result.scores, ref, atol=2e-3)
    margin = np.sort(ref, 1)[:, -1] - np.sort(ref, 1)[:, -2]
    sure = margin > 1e-2
    assert sure.sum() > 100
    np.testing.assert_array_equal(result.predictions[sure], ref.argmax(1)[sure])


def test_two_model_prob_mean_with_drop_equals_the_seed(toy_cache, toy_clip_dir):
    """Two views, weights 0.7/0.3, drop 0.002 after the ensemble and before grouping (seed A6)."""
    folder = toy_cache.root.parent / "scenes"
    models = [
        {"model": f"local-dir:{toy_clip_dir}", "weight": 0.7},
        {"model": f"local-dir:{toy_clip_dir}", "resize_mode": "squash", "sharpness": 2.0, "weight": 0.3},
    ]
    exp = experiment(toy_clip_dir, models=models, drop_below=0.002)
    result = Session(toy_cache, prompt_encoder(toy_cache)).run(exp)
    e = expand(load_prompt_set("ajou-2024"), CLASSES)
    spec = exp.models[0].spec
    p1 = direct_scores(toy_clip_dir, folder, toy_cache.resolve_view(spec, ViewOptions()), e.texts, e.class_index, 100.0, "prob-mean")
    p2 = direct_scores(toy_clip_dir, folder, toy_cache.resolve_view(spec, models_view := ViewOptions(resize_mode="squash", sharpness=2.0)),
                       e.texts, e.class_index, 100.0, "prob-mean")
    assert models_view.sharpness == 2.0
    p = 0.7 * p1 + 0.3 * p2
    p = np.where(p > 0.002, p, 0.0)
    ref = p.reshape(len(p), 6, 52).mean(-1)  # equal counts here, so the seed's reshape is right
    np.testing.assert_allclose(result.scores, ref, atol=2e-3)
    assert [m.weight for m in result.models] == pytest.approx([0.7, 0.3])
    assert not np.allclose(p1, p2, atol=1e-3)  # the two views really differ


def test_embed_mean_weights_equal_open_clip_zero_shot_classifier(toy_cache, toy_clip_dir):
    import open_clip
    import torch
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from embedstore.score.scoring import Rule, class_matrix

    spec = EncoderSpec(f"local-dir:{toy_clip_dir}")
    templates = load_prompt_set("openai-imagenet").templates
    e = expand(load_prompt_set("openai-imagenet"), CLASSES)
    Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir, templates="openai-imagenet", aggregate="embed-mean"))
    ours = class_matrix(Rule("embed-mean", e.class_index, 6), toy_cache.text_bank(spec).features_of(list(e.texts)))
    model = open_clip.create_model(f"local-dir:{toy_clip_dir}").eval()
    with torch.no_grad():
        theirs = build_zero_shot_classifier(
            model, open_clip.get_tokenizer(f"local-dir:{toy_clip_dir}"), CLASSES,
            [lambda c, t=t: t.replace("{}", c) for t in templates], num_classes_per_batch=3, device="cpu",
            use_tqdm=False,
        )
    np.testing.assert_allclose(ours, theirs.numpy().T, atol=1e-5)


def test_accuracy_has_signal_and_moves_with_prompts_and_weights(toy_cache, toy_clip_dir):
    session = Session(toy_cache, prompt_encoder(toy_cache))
    base = session.run(experiment(toy_clip_dir, templates="openai-imagenet", aggregate="embed-mean"))
    assert base.metrics.accuracy > 0.45  # chance is 1/6
    accs = []
    for template in ["a photo of a {}.", "art of the {}.", "a tattoo of the {}.", "itap of my {}."]:
        ps_file = toy_cache.root / f"t{len(accs)}.txt"
        ps_file.write_text(template + "\n")
        accs.append(session.run(experiment(toy_clip_dir, templates=str(ps_file), aggregate="embed-mean")).metrics.accuracy)
    assert max(accs) - min(accs) > 0.02
    models = [{"model": f"local-dir:{toy_clip_dir}", "weight": 1.0},
              {"model": f"local-dir:{toy_clip_dir}", "resize_mode": "squash", "sharpness": 2.0, "weight": 0.0}]
    a = session.run(experiment(toy_clip_dir, models=models))
    models[0]["weight"], models[1]["weight"] = 0.0, 1.0
    b = session.run(experiment(toy_clip_dir, models=models))
    assert not np.array_equal(a.probabilities, b.probabilities)


def test_prompts_are_encoded_once_and_only_new_ones(toy_cache, toy_clip_dir, tmp_path):
    first = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir))
    assert first.new_prompts == 312
    again = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir))
    assert again.new_prompts == 0
    np.testing.assert_array_equal(first.scores, again.scores)
    extended = tmp_path / "plus-one.toml"
    ajou = load_prompt_set("ajou-2024")
    extended.write_text(json.dumps({"templates": list(ajou.templates) + ["a low-contrast photo of a {}."],
                                    "class_prompts": {k: list(v) for k, v in ajou.class_prompts.items()}}))
    extended = extended.rename(extended.with_suffix(".json"))
    plus = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir, templates=str(extended)))
    assert plus.new_prompts == 6 and len(plus.expansion) == 318


def test_weight_change_reuses_per_prompt_probabilities(toy_cache, toy_clip_dir, monkeypatch):
    models = [{"model": f"local-dir:{toy_clip_dir}", "weight": 0.5},
              {"model": f"local-dir:{toy_clip_dir}", "resize_mode": "squash", "sharpness": 2.0, "weight": 0.5}]
    session = Session(toy_cache, prompt_encoder(toy_cache))
    session.run(experiment(toy_clip_dir, models=models))  # a one-off run keeps nothing in memory,
    session.run(experiment(toy_clip_dir, models=models))  # a second one keeps the members' parts

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although only weights changed")

    monkeypatch.setattr("embedstore.score.session.member_part", boom)
    monkeypatch.setattr("embedstore.score.session.text_features", boom)
    monkeypatch.setattr(StoreReader, "features", boom)
    models[0]["weight"] = 0.9
    rerun = session.run(experiment(toy_clip_dir, models=models, drop_below=0.001))
    monkeypatch.undo()
    fresh = Session(toy_cache, prompt_encoder(toy_cache), cache_logits=False).run(
        experiment(toy_clip_dir, models=models, drop_below=0.001))
    np.testing.assert_allclose(rerun.scores, fresh.scores, atol=1e-6)


def _chunks(cache):
    return sorted((cache.root / "logits").glob("*/*/c-*.npy"))


def test_logit_cache_serves_a_new_process_other_scales_and_new_prompts(toy_cache, toy_clip_dir, monkeypatch, tmp_path):
    first = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir))
    chunks = _chunks(toy_cache)
    assert len(chunks) == 1 and np.load(chunks[0]).shape == (150, 312)

    original = StoreReader.features

    def boom(self, rows):
        assert "datasets" not in self.store.path.parts, "read image features although the logits were cached"
        return original(self, rows)  # text banks may be read

    fresh = Session(toy_cache, prompt_encoder(toy_cache))  # as a new process: nothing in memory
    monkeypatch.setattr(StoreReader, "features", boom)
    again = fresh.run(experiment(toy_clip_dir))
    np.testing.assert_array_equal(again.scores, first.scores)
    other = fresh.run(experiment(toy_clip_dir, scale=50.0, drop_below=0.001))  # another scale: the same logits
    monkeypatch.undo()
    direct = Session(toy_cache, prompt_encoder(toy_cache), cache_logits=False).run(
        experiment(toy_clip_dir, scale=50.0, drop_below=0.001))
    np.testing.assert_allclose(other.scores, direct.scores, rtol=1e-5, atol=1e-7)

    # one more template: only its 6 prompts are computed and appended as a chunk of their own
    extended = tmp_path / "plus-one.json"
    ajou = load_prompt_set("ajou-2024")
    extended.write_text(json.dumps({"templates": list(ajou.templates) + ["a low-contrast photo of a {}."],
                                    "class_prompts": {k: list(v) for k, v in ajou.class_prompts.items()}}))
    plus = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir, templates=str(extended)))
    shapes = sorted(np.load(c).shape for c in _chunks(toy_cache))
    assert shapes == [(150, 6), (150, 312)]
    plus_direct = Session(toy_cache, prompt_encoder(toy_cache), cache_logits=False).run(
        experiment(toy_clip_dir, templates=str(extended)))
    np.testing.assert_allclose(plus.scores, plus_direct.scores, rtol=1e-5, atol=1e-7)

    damaged = next(c for c in _chunks(toy_cache) if np.load(c).shape[1] == 312)  # the chunk the run below reads
    damaged.write_bytes(b"not an npy file")  # damaged: removed, recomputed, same result
    np.testing.assert_array_equal(Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir)).scores,
                                  first.scores)
    assert not damaged.exists()
    assert sorted(np.load(c).shape for c in _chunks(toy_cache)) == [(150, 6), (150, 312)]  # written again


def test_a_logit_cache_over_its_budget_is_not_written(toy_cache, toy_clip_dir):
    from embedstore.util.budget import Budget

    tiny = Budget(256 << 20, logit_cache=1000)  # far below 150 x 312 x 4 bytes
    result = Session(toy_cache, prompt_encoder(toy_cache), budget=tiny).run(experiment(toy_clip_dir))
    assert _chunks(toy_cache) == []
    again = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir))
    np.testing.assert_allclose(result.scores, again.scores, atol=1e-7)


def test_everything_dropped_predicts_first_class_with_a_note(toy_cache, toy_clip_dir):
    session = Session(toy_cache, prompt_encoder(toy_cache))
    plain = session.run(experiment(toy_clip_dir))
    dropped = session.run(experiment(toy_clip_dir, drop_below=0.2))
    all_gone = dropped.scores.max(axis=1) <= 0
    assert 0 < all_gone.sum() < len(all_gone)
    assert (dropped.predictions[all_gone] == 0).all()
    assert any(f"{all_gone.sum()} image(s) had every prompt dropped" in n for n in dropped.notes)
    assert not any("dropped" in n for n in plain.notes)


def test_bad_input(toy_cache, toy_clip_dir, tmp_path):
    with pytest.raises(SpecError, match="not found"):
        experiment(toy_clip_dir, classes=str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SpecError, match="no templates"):
        Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir, templates=str(empty)))
    other = EncoderSpec("ViT-B-32", "laion2b_s34b_b79k")
    exp = experiment(toy_clip_dir, models=[{"model": other.model, "pretrained": other.pretrained}])
    with pytest.raises(StoreNotFoundError, match="embedstore encode IMAGES --model ViT-B-32 --pretrained laion2b_s34b_b79k"):
        Session(toy_cache, prompt_encoder(toy_cache)).run(exp)
    with pytest.raises(StoreNotFoundError, match="embedstore encode"):
        Session(toy_cache, prompt_encoder(toy_cache)).run(experiment(toy_clip_dir, models=[{"model": f"local-dir:{toy_clip_dir}", "sharpness": 3.0}]))
    with pytest.raises(SpecError, match="agregate"):
        experiment(toy_clip_dir, agregate="embed-mean")
    with pytest.raises(SpecError, match="drop_below"):
        experiment(toy_clip_dir, aggregate="embed-mean", drop_below=0.1)


def _write_exp(path, model_dir, **extra):
    lines = ['dataset = "scenes"', f"classes = {json.dumps(CLASSES)}", 'templates = "ajou-2024"',
             'aggregate = "prob-mean"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["[[models]]", f'model = "local-dir:{model_dir}"', "weight = 1.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_classify_outputs_log_and_report(toy_cache, toy_clip_dir, tmp_path):
    exp = _write_exp(tmp_path / "exp.toml", toy_clip_dir)
    out = tmp_path / "pred.csv"
    runner = CliRunner()
    res = runner.invoke(main, ["classify", str(exp), "--cache", str(toy_cache.root), "--out", str(out),
                               "--report", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "confusion matrix" in res.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["key", "label", "label_index", *CLASSES]
    assert len(rows) == 150 and rows[0]["key"] == "Buildings/img0.jpg"
    assert all(abs(sum(float(r[c]) for c in CLASSES) - 1) < 1e-4 for r in rows)
    assert all(r["label"] == CLASSES[int(r["label_index"])] for r in rows)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["metrics"]["confusion"] and metrics["prompts_per_class"] == [52] * 6
    page = (tmp_path / "report" / "index.html").read_text()
    assert (tmp_path / "report" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    import re

    srcs = re.findall(r"<img src='([^']+\.jpg)'", page)
    assert srcs and all((tmp_path / "report" / s).resolve().is_file() for s in srcs)

    ajou = tmp_path / "sub.csv"
    res = runner.invoke(main, ["classify", str(exp), "--cache", str(toy_cache.root), "--out", str(ajou),
                               "--format", "ajou", "--set", "aggregate=embed-mean"])
    assert res.exit_code == 0, res.output
    sub = list(csv.reader(ajou.open()))
    assert sub[0] == ["id_idx", "label"] and sub[1][0] == "0" and len(sub) == 151
    assert {r[1] for r in sub[1:]} <= {str(i) for i in range(6)}

    log = [json.loads(line) for line in (toy_cache.root / "runs.jsonl").read_text().splitlines()]
    assert [e["resolved"]["aggregate"] for e in log] == ["prob-mean", "embed-mean"]
    assert log[0]["models"][0]["fingerprint"]["encoder"]["weights_digest"].startswith("sha256:")
    assert log[1]["new_prompts"] == 0
    listing = runner.invoke(main, ["runs", "--cache", str(toy_cache.root)])
    assert listing.exit_code == 0 and "embed-mean" in listing.output and log[0]["run_id"] in listing.output


def test_unlabelled_dataset_skips_metrics_and_writes_predictions(tmp_path, toy_clip_dir):
    from embedstore import Cache, encode_images
    from embedstore.encode.loop import EncodeOptions
    from embedstore.encode.toy import make_image_folder

    folder = make_image_folder(tmp_path / "imgs", per_class=2, seed=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in folder.rglob("*.jpg"):
        p.rename(flat / f"{p.parent.name}-{p.name}")
    cache = Cache(tmp_path / "c")
    encode_images(flat, EncoderSpec(f"local-dir:{toy_clip_dir}"), cache,
                  options=EncodeOptions(device="cpu", workers=0, progress=False))
    exp = _write_exp(tmp_path / "exp.toml", toy_clip_dir)
    exp.write_text(exp.read_text().replace('"scenes"', '"flat"'))
    res = CliRunner().invoke(main, ["classify", str(exp), "--cache", str(cache.root), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert "no labels: metrics skipped" in res.output
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 12


def test_templates_command():
    runner = CliRunner()
    listing = runner.invoke(main, ["templates"])
    assert "ajou-2024" in listing.output and "openai-imagenet" in listing.output
    out = runner.invoke(main, ["templates", "ajou-2024", "--classes", ",".join(CLASSES)])
    lines = out.stdout.splitlines()
    assert len(lines) == 312 and lines[0] == "Buildings" and lines[-1] == "An urban street with buildings and cars"


def test_logit_cache_stays_within_its_byte_budget_least_recently_used_first(toy_cache, toy_clip_dir):
    from embedstore.util.budget import Budget

    one = 128 + 150 * 6 * 4  # a chunk of one template: 150 rows x 6 prompts, float32, .npy header
    session = Session(toy_cache, prompt_encoder(toy_cache), budget=Budget(256 << 20, logit_cache=2 * one + 100))
    for templates in (["a photo of a {}."], ["a {}."], ["the {}."]):
        session.run(experiment(toy_clip_dir, templates=_templates_file(toy_cache.root, templates)))
    cache = session.logit_cache
    assert cache.size() <= 2 * one + 100 and len(cache.chunks()) == 2
    kept = {tuple(t) for c in json.loads((_chunks(toy_cache)[0].parent / "index.json").read_text())["chunks"]
            for t in [c["texts"]]}
    assert not any("a photo of a Buildings." in t for t in kept)  # the oldest went first


def _templates_file(root, templates):
    import hashlib

    path = root / f"t-{hashlib.sha1(repr(templates).encode()).hexdigest()[:8]}.txt"
    path.write_text("\n".join(templates) + "\n")
    return str(path)


def test_a_compaction_during_a_run_never_mixes_commits(toy_cache, toy_clip_dir, monkeypatch):
    """The reader pins the commit it opened: a writer that commits and compacts meanwhile (deleting
    the old shard file) changes nothing in the running experiment."""
    from embedstore.store.store import Store

    plain = Session(toy_cache, prompt_encoder(toy_cache), cache_logits=False).run(experiment(toy_clip_dir))
    real = StoreReader.features
    state = {"done": False}

    def commit_then_read(self, rows):
        if not state["done"] and "datasets" in self.store.path.parts:
            state["done"] = True
            store = Store(self.store.path)
            keys = self.keys
            with store.writer(store.manifest()["fingerprint"], self.dim, "float16") as w:
                w.drop(keys[:1])
                w.compact(order=keys)
            assert not any((self.store.path / "shards" / s["file"]).exists() for s in self.manifest["shards"])
        return real(self, rows)

    monkeypatch.setattr(StoreReader, "features", commit_then_read)
    result = Session(toy_cache, prompt_encoder(toy_cache), cache_logits=False).run(experiment(toy_clip_dir))
    assert state["done"] and len(result.keys) == 150
    np.testing.assert_array_equal(result.scores, plain.scores)
    monkeypatch.undo()
    after = Session(toy_cache, prompt_encoder(toy_cache), cache_logits=False).run(experiment(toy_clip_dir))
    assert len(after.keys) == 149
    np.testing.assert_allclose(after.scores, plain.scores[1:], rtol=1e-5, atol=1e-7)  # other block heights


def test_text_and_image_features_of_other_weights_are_never_mixed(tmp_path, toy_clip_dir):
    """Weights swapped under the same `local-dir:` spec: classify and query refuse to combine the new
    model's prompts with the old model's images; the new weights get a text bank of their own."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from embedstore import Cache, encode_images
    from embedstore.encode.loop import EncodeOptions, encode_prompts
    from embedstore.encode.toy import make_image_folder

    model = tmp_path / "model"
    shutil.copytree(toy_clip_dir, model)
    folder = make_image_folder(tmp_path / "flat", per_class=2, seed=3)
    cache = Cache(tmp_path / "cache")
    spec = EncoderSpec(f"local-dir:{model}")
    encode_images(folder, spec, cache, options=EncodeOptions(device="cpu", workers=0, progress=False))
    encode_prompts(["a photo of a red thing."], spec, cache, device="cpu")  # the old weights' text bank
    old_bank = cache.text_bank(spec)
    weights = model / "open_clip_model.safetensors"
    state = load_file(str(weights))
    rng = np.random.default_rng(0)
    save_file({k: np.ascontiguousarray(v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
               for k, v in state.items()}, str(weights))

    exp = tmp_path / "exp.toml"
    exp.write_text(f'dataset = "flat"\nclasses = {json.dumps(CLASSES)}\ntemplates = "ajou-2024"\n'
                   f'aggregate = "prob-mean"\n[[models]]\nmodel = "local-dir:{model}"\n')
    runner = CliRunner()
    out = runner.invoke(main, ["classify", str(exp), "--cache", str(cache.root), "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 1 and "refusing to combine features of different weights" in out.output, out.output
    assert not (tmp_path / "p.csv").exists()
    out = runner.invoke(main, ["query", "--dataset", "flat", "--model", f"local-dir:{model}", "--cache",
                               str(cache.root), "--text", "a photo of a blue thing."])
    assert out.exit_code == 1 and "different weights" in out.output, out.output
    # a text already in the old weights' bank still works with the old images: nothing of the new model is used
    out = runner.invoke(main, ["query", "--dataset", "flat", "--model", f"local-dir:{model}", "--cache",
                               str(cache.root), "--text", "a photo of a red thing."])
    assert out.exit_code == 0, out.output
    # the new weights' prompts go to a bank of their own
    encode_prompts(["a photo of a red thing."], spec, cache, device="cpu")
    new_bank = cache.text_bank(spec)
    assert new_bank.path != old_bank.path and new_bank.exists() and old_bank.exists()
    old = old_bank.features_of(["a photo of a red thing."])
    assert not np.allclose(new_bank.features_of(["a photo of a red thing."]), old, atol=1e-4)


def test_members_from_other_sources_or_file_versions_are_refused(toy_cache, toy_clip_dir, tmp_path):
    """Two views of one dataset combine row by row: refused when one view was re-encoded from
    another folder (`--replace` of that view only) or from changed files."""
    import os
    import shutil

    from embedstore import encode_images
    from embedstore.encode.loop import EncodeOptions
    from embedstore.store.views import ViewOptions

    models = [{"model": f"local-dir:{toy_clip_dir}"},
              {"model": f"local-dir:{toy_clip_dir}", "resize_mode": "squash", "sharpness": 2.0}]
    both = experiment(toy_clip_dir, models=models)
    Session(toy_cache, prompt_encoder(toy_cache)).run(both)  # the toy cache: both views from one folder
    folder = toy_cache.root.parent / "scenes"
    touched = sorted(folder.rglob("*.jpg"))[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    options = EncodeOptions(device="cpu", workers=0, progress=False)
    spec = EncoderSpec(f"local-dir:{toy_clip_dir}")
    encode_images(folder, spec, toy_cache, options=options)  # only the default view sees the new version
    with pytest.raises(SpecError, match="another version of the file"):
        Session(toy_cache, prompt_encoder(toy_cache)).run(both)
    copy = tmp_path / "elsewhere" / "scenes"
    shutil.copytree(folder, copy)
    encode_images(copy, spec, toy_cache, dataset="scenes", options=replace_options(options),
                  view_options=ViewOptions(resize_mode="squash", sharpness=2.0))
    with pytest.raises(SpecError, match="was encoded from"):
        Session(toy_cache, prompt_encoder(toy_cache)).run(both)


def replace_options(options):
    from dataclasses import replace

    return replace(options, replace=True)
