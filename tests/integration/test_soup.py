"""Checkpoint soups: uniform mean, greedy selection (strict >), checkpoint checks, saving, CLI.

The averaging tests use tiny state dicts and copies of the tiny open_clip model with known
perturbations, so every expected soup is computed by hand; the end-to-end tests soup the toy
model with noisier copies of itself and check the result against `embedstore classify`.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from embedstore import EncoderSpec
from embedstore.cli.main import main
from embedstore.encode.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    check_checkpoints,
    parse_checkpoint,
)
from embedstore.encode.soup import SoupError, greedy_soup, save_soup, uniform_soup
from embedstore.encode.soup_eval import LiveOpenClip, ZeroShotEvaluator, load_validation
from embedstore.encode.toy import TOY_CLASSES

TEMPLATES = "a photo of a {}.\n{}\na blurry photo of a {}.\n"


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g),
            "ids": torch.arange(4)}  # an integer buffer: equal everywhere, kept as is


class Scripted:
    """evaluate(): returns the next scripted score and remembers what it was given."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.seen = []

    def __call__(self, state):
        self.seen.append({k: v.clone() for k, v in state.items()})
        return self.scores.pop(0)


# ---------------------------------------------------------------- greedy and uniform, no model

def test_greedy_accepts_only_strict_improvements_and_rejects_a_tie():
    sd = {name: _tensors(i) for i, name in enumerate("ABCD")}
    # own scores A .5, B .8, C .6, D .7 -> order B, D, C, A; candidates: +D .85 (accept),
    # +C .85 (a tie with the best: reject), +A .9 (accept)
    evaluate = Scripted([0.5, 0.8, 0.6, 0.7, 0.85, 0.85, 0.9])
    result = greedy_soup(list("ABCD"), sd.__getitem__, evaluate)

    assert [t.name for t in result.trials] == ["B", "D", "C", "A"]
    assert [t.accepted for t in result.trials] == [True, True, False, True]
    assert [t.size for t in result.trials] == [1, 2, 2, 3]
    assert [t.own_score for t in result.trials] == [0.8, 0.7, 0.6, 0.5]
    assert [t.soup_score for t in result.trials] == [0.8, 0.85, 0.85, 0.9]
    assert result.ingredients == ["B", "D", "A"] and result.score == 0.9
    assert evaluate.scores == []  # 4 ingredients + 3 candidates, nothing more

    w = {k: {n: sd[n][k].double() for n in "ABCD"} for k in ("w", "b")}
    for k in ("w", "b"):  # each candidate is soup*n/(n+1) + model/(n+1)
        np.testing.assert_allclose(evaluate.seen[4][k], (w[k]["B"] + w[k]["D"]) / 2, atol=1e-6)
        np.testing.assert_allclose(evaluate.seen[5][k], (w[k]["B"] + w[k]["D"] + w[k]["C"]) / 3, atol=1e-6)
        np.testing.assert_allclose(evaluate.seen[6][k], (w[k]["B"] + w[k]["D"] + w[k]["A"]) / 3, atol=1e-6)
        np.testing.assert_allclose(result.state_dict[k], (w[k]["B"] + w[k]["D"] + w[k]["A"]) / 3, atol=1e-6)
    assert torch.equal(result.state_dict["ids"], torch.arange(4))


def test_greedy_without_improvement_is_the_best_ingredient_exactly():
    sd = {n: {k: v.half() if v.is_floating_point() else v for k, v in _tensors(i).items()}
          for i, n in enumerate("ABC")}
    result = greedy_soup(list("ABC"), sd.__getitem__, Scripted([0.6, 0.6, 0.7, 0.7, 0.1]))
    assert [t.name for t in result.trials] == ["C", "A", "B"]  # ties keep the given order: A before B
    assert result.ingredients == ["C"]
    for k, v in sd["C"].items():
        assert result.state_dict[k].dtype == v.dtype and torch.equal(result.state_dict[k], v)


def test_uniform_is_the_plain_mean_and_evaluates_each_ingredient_and_the_soup():
    sd = {n: _tensors(i) for i, n in enumerate("ABC")}
    evaluate = Scripted([0.1, 0.2, 0.3, 0.4])
    result = uniform_soup(list("ABC"), sd.__getitem__, evaluate)
    for k in ("w", "b"):
        mean = sum(sd[n][k].double() for n in "ABC") / 3
        np.testing.assert_allclose(result.state_dict[k], mean, atol=1e-6)
        np.testing.assert_allclose(evaluate.seen[3][k], mean, atol=1e-6)
    assert result.ingredients == list("ABC") and result.score == 0.4
    assert [t.own_score for t in result.trials] == [0.1, 0.2, 0.3]


def test_integer_tensors_that_differ_and_nan_scores_are_refused():
    a, b = _tensors(0), _tensors(1)
    b["ids"] = torch.arange(4) + 1
    with pytest.raises(CheckpointError, match="integer tensor 'ids'"):
        uniform_soup(["a", "b"], {"a": a, "b": b}.__getitem__)
    with pytest.raises(SoupError, match="NaN"):
        greedy_soup(["a", "c"], {"a": a, "c": _tensors(2)}.__getitem__, Scripted([0.5, float("nan")]))


# ---------------------------------------------------------------- checkpoint files

OFFSETS = (0.0, 0.3, -0.6)   # copy i = base + OFFSETS[i] on every float tensor: the mean is base - 0.1


@pytest.fixture()
def three_copies(tmp_path, tiny_open_clip_dir):
    """The tiny model as a local-dir: folder, a .safetensors file and a wrapped .pt state dict."""
    base = load_file(str(tiny_open_clip_dir / "open_clip_model.safetensors"))
    copies = [{k: v + off for k, v in base.items()} for off in OFFSETS]
    folder = tmp_path / "copy0"
    folder.mkdir()
    shutil.copy(tiny_open_clip_dir / "open_clip_config.json", folder)
    save_file(copies[0], str(folder / "open_clip_model.safetensors"))
    save_file(copies[1], str(tmp_path / "copy1.safetensors"))
    # a training-style checkpoint: {"state_dict": ...} with DataParallel's "module." prefix
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in copies[2].items()}}, tmp_path / "copy2.pt")
    return base, [f"local-dir:{folder}", str(tmp_path / "copy1.safetensors"), str(tmp_path / "copy2.pt")]


def test_uniform_soup_of_files_equals_the_hand_computed_mean(three_copies):
    base, names = three_copies
    ckpts = {n: parse_checkpoint(n) for n in names}
    check_checkpoints(list(ckpts.values()))
    result = uniform_soup(names, lambda n: ckpts[n].load())
    assert set(result.state_dict) == set(base)
    for k, v in base.items():
        np.testing.assert_allclose(result.state_dict[k].numpy(), v.double().numpy() - 0.1, atol=2e-6, err_msg=k)


def test_mismatched_keys_and_shapes_are_refused_naming_the_first_mismatch(tmp_path, three_copies):
    base, names = three_copies
    keys = list(base)
    extra = dict(base, **{"visual.extra": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    missing = {k: v for k, v in base.items() if k != keys[3]}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    reshaped = dict(base)
    reshaped[keys[5]] = torch.zeros(*base[keys[5]].shape[:-1], base[keys[5]].shape[-1] + 1)
    torch.save(reshaped, tmp_path / "reshaped.pt")

    def refuse(other: str) -> CheckpointMismatchError:
        with pytest.raises(CheckpointMismatchError) as info:
            check_checkpoints([parse_checkpoint(names[0]), parse_checkpoint(names[1]), parse_checkpoint(other)])
        assert str(info.value).startswith(f"{other}: ")
        return info.value

    assert "visual.extra" in str(refuse(str(tmp_path / "extra.safetensors")))
    err = refuse(str(tmp_path / "missing.safetensors"))
    assert err.key == keys[3] and f"has no key {keys[3]!r}" in str(err)
    err = refuse(str(tmp_path / "reshaped.pt"))
    assert err.key == keys[5] and err.found == tuple(reshaped[keys[5]].shape)
    assert err.expected == tuple(base[keys[5]].shape) and str(err.expected) in str(err)


def test_bad_checkpoints_are_refused_and_pickled_code_never_runs(tmp_path, three_copies):
    _, names = three_copies
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        parse_checkpoint(str(tmp_path / "evil.pt")).load()
    assert not marker.exists()
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="'step'"):
        parse_checkpoint(str(tmp_path / "mixed.pt")).load()
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind"):
        parse_checkpoint(str(tmp_path / "weights.npz"))
    with pytest.raises(CheckpointError, match="no such folder"):
        parse_checkpoint(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(CheckpointError, match="at least two"):
        check_checkpoints([parse_checkpoint(names[0])])
    with pytest.raises(CheckpointError, match="same weights file"):
        check_checkpoints([parse_checkpoint(names[1]), parse_checkpoint(names[1])])


def test_saved_soup_loads_as_local_dir_and_encodes(tmp_path, three_copies, tiny_open_clip_dir, image_folder, cache,
                                                   fast_options):
    from embedstore import encode_images
    from embedstore.encode.encoders import load_encoder

    base, names = three_copies
    ckpts = {n: parse_checkpoint(n) for n in names}
    result = uniform_soup(names, lambda n: ckpts[n].load())
    config = json.loads((tiny_open_clip_dir / "open_clip_config.json").read_text())
    out = tmp_path / "soups" / "s1"
    save_soup(result.state_dict, out, config, {"mode": "uniform"})
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors", "soup.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(SoupError, match="not empty"):
        save_soup(base, out, config, {})
    save_soup(base, out, config, {"mode": "again"}, overwrite=True)
    assert json.loads((out / "soup.json").read_text()) == {"mode": "again"}
    save_soup(result.state_dict, out, config, {"mode": "uniform"}, overwrite=True)

    spec = EncoderSpec(f"local-dir:{out}")
    encoder = load_encoder(spec, device="cpu")
    for k, v in encoder.model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), base[k].double().numpy() - 0.1, atol=2e-6, err_msg=k)
    encoded = encode_images(image_folder, spec, cache, options=fast_options)
    assert encoded.encoded == 24 and encoded.failed == 0
    features = cache.open_image_store("scenes", spec).read().features
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-2)


# ---------------------------------------------------------------- evaluation on the toy model

def _experiment(path, model_dir, **extra):
    (path.parent / "templates.txt").write_text(TEMPLATES)
    lines = ['dataset = "scenes"', f"classes = {json.dumps(list(TOY_CLASSES))}", 'templates = "templates.txt"',
             'aggregate = "embed-mean"', "scale = 100.0", *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
             "[[models]]", f'model = "local-dir:{model_dir}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluator_scores_like_classify_from_the_cache(tmp_path, toy_cache, toy_clip_dir):
    from embedstore.encode.loop import prompt_encoder
    from embedstore.encode.pil_view import PilTransform
    from embedstore.encode.sources import decode_image, list_source, read_bytes
    from embedstore.score.experiment import load_experiment
    from embedstore.score.prompts import expand, load_prompt_set
    from embedstore.score.session import Session

    exp = load_experiment(_experiment(tmp_path / "exp.toml", toy_clip_dir))
    model = LiveOpenClip(f"local-dir:{toy_clip_dir}", "cpu")
    folder = toy_cache.root.parent / "scenes"
    images = load_validation("scenes", str(folder), model.default_view, workers=0)
    assert len(images.keys) == 150 and not images.failures
    # the uint8 cache + per-batch normalisation is exactly the encoder's own transform
    items = list_source(folder).items[:8]
    ref = torch.stack([PilTransform(model.default_view)(decode_image(read_bytes(i.path))) for i in items])
    assert torch.equal(next(images.batches(8)), ref)

    expansion = expand(load_prompt_set(exp.templates), list(TOY_CLASSES))
    evaluator = ZeroShotEvaluator(model, images, expansion, "embed-mean", 100.0)
    own = evaluator(load_file(str(toy_clip_dir / "open_clip_model.safetensors")))
    cached = Session(toy_cache, prompt_encoder(toy_cache)).run(exp).metrics
    assert own.score > 0.4  # well above chance (1/6)
    assert abs(own.score - cached.accuracy) <= 2 / 150  # cached features are float16
    macro = ZeroShotEvaluator(model, images, expansion, "embed-mean", 100.0, metric="macro-f1")
    assert float(macro(load_file(str(toy_clip_dir / "open_clip_model.safetensors")))) == pytest.approx(own.metrics.macro_f1)


@pytest.fixture()
def toy_ingredients(tmp_path, toy_clip_dir):
    """The toy model and two noisier copies (.safetensors and .pt): small and large noise."""
    base = load_file(str(toy_clip_dir / "open_clip_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    paths = {}
    for name, sigma in (("noisy-small", 0.05), ("noisy-large", 1.0)):
        noisy = {k: v + sigma * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v.clone()
                 for k, v in base.items()}
        paths[name] = noisy
    save_file(paths["noisy-small"], str(tmp_path / "noisy-small.safetensors"))
    torch.save(paths["noisy-large"], tmp_path / "noisy-large.pt")
    names = [f"local-dir:{toy_clip_dir}", str(tmp_path / "noisy-small.safetensors"), str(tmp_path / "noisy-large.pt")]
    states = {names[0]: base, names[1]: paths["noisy-small"], names[2]: paths["noisy-large"]}
    return names, states


def test_cli_greedy_soup_end_to_end(tmp_path, toy_cache, toy_clip_dir, toy_ingredients):
    from embedstore import encode_images
    from embedstore.encode.loop import EncodeOptions, prompt_encoder
    from embedstore.report.predictions import read_log
    from embedstore.score.experiment import experiment_from_mapping, load_experiment
    from embedstore.score.session import Session

    names, states = toy_ingredients
    exp_file = _experiment(tmp_path / "exp.toml", toy_clip_dir)
    out = tmp_path / "soup-greedy"
    res = run("soup", *names, "--val", "scenes", "--experiment", str(exp_file), "--out", str(out),
              "--cache", str(toy_cache.root), "--device", "cpu", "--workers", "0")
    assert "accepted" in res.output and f"saved local-dir:{out}" in res.output
    assert "are selection scores" in res.output  # --val is the experiment's own dataset

    info = json.loads((out / "soup.json").read_text())
    trials = info["ingredients"]
    assert len(trials) == 3 and trials[0]["accepted"] and info["mode"] == "greedy"
    own = {t["name"]: t["own"]["score"] for t in trials}
    assert [t["name"] for t in trials] == sorted(own, key=lambda n: -own[n])
    assert trials[0]["name"] == names[0] or own[trials[0]["name"]] > own[names[0]]
    assert own[names[2]] < own[names[0]]  # heavy noise hurts
    best = trials[0]["soup"]["score"]
    for t in trials[1:]:  # strict improvement decides, and the best so far only grows
        assert t["accepted"] == (t["soup"]["score"] > best)
        best = max(best, t["soup"]["score"])
    assert info["soup"]["score"] == best >= max(own.values())

    # the saved weights are the incremental mean of the accepted ingredients, by hand
    accepted = [t["name"] for t in trials if t["accepted"]]
    soup = {k: v.double() for k, v in states[accepted[0]].items()}
    for n, name in enumerate(accepted[1:], start=1):
        soup = {k: v * n / (n + 1) + states[name][k].double() / (n + 1) for k, v in soup.items()}
    saved = load_file(str(out / "open_clip_model.safetensors"))
    for k, v in soup.items():
        np.testing.assert_allclose(saved[k].numpy(), v.numpy(), atol=1e-6, err_msg=k)

    # the log entry, listed by `embedstore runs`
    entry = read_log(toy_cache.root)[-1]
    assert entry["kind"] == "soup" and entry["metrics"]["accuracy"] == pytest.approx(info["soup"]["accuracy"])
    assert [m["label"] for m in entry["models"]] == accepted
    assert [(i["name"], i["accepted"]) for i in entry["ingredients"]] == [(t["name"], t["accepted"]) for t in trials]
    listing = run("runs", "--cache", str(toy_cache.root)).output
    assert entry["run_id"] in listing and " soup " in listing

    # local-dir:OUT is an encoder like any other: encode the folder, classify from the cache
    spec = EncoderSpec(f"local-dir:{out}")
    encode_images(toy_cache.root.parent / "scenes", spec, toy_cache,
                  options=EncodeOptions(device="cpu", workers=0, batch_size=64, progress=False))
    config = dict(load_experiment(exp_file).config, models=[{"model": f"local-dir:{out}"}])
    result = Session(toy_cache, prompt_encoder(toy_cache)).run(experiment_from_mapping(config, base=tmp_path))
    assert abs(result.metrics.accuracy - info["soup"]["accuracy"]) <= 2 / 150


def test_cli_uniform_soup_with_a_folder_as_validation(tmp_path, toy_cache, toy_clip_dir, toy_ingredients,
                                                      monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_PROGRESS", "always")
    names, states = toy_ingredients
    exp_file = _experiment(tmp_path / "exp.toml", toy_clip_dir)
    out = tmp_path / "soup-uniform"
    folder = toy_cache.root.parent / "scenes"
    res = run("soup", *names, "--val", str(folder), "--experiment", str(exp_file), "--out", str(out),
              "--mode", "uniform", "--metric", "macro-f1", "--cache", str(toy_cache.root), "--device", "cpu",
              "--workers", "0")
    assert "own macro-f1" in res.output
    assert "soup (uniform): scoring" in res.stderr and "4/4" in res.stderr  # 3 ingredients and the soup
    info = json.loads((out / "soup.json").read_text())
    assert info["mode"] == "uniform" and info["metric"] == "macro-f1"
    assert info["validation"]["location"] == str(folder.resolve())
    assert info["soup"]["ingredients"] == names and info["soup"]["score"] == info["soup"]["macro_f1"]
    saved = load_file(str(out / "open_clip_model.safetensors"))
    for k, v in saved.items():
        mean = sum(states[n][k].double() for n in names) / 3
        np.testing.assert_allclose(v.numpy(), mean.numpy(), atol=1e-6, err_msg=k)

    again = run("soup", *names, "--val", str(folder), "--experiment", str(exp_file), "--out", str(out),
                "--mode", "uniform", "--cache", str(toy_cache.root), "--device", "cpu", ok=False)
    assert again.exit_code == 1 and "not empty" in again.output


def test_cli_errors_name_the_checkpoint_key_and_validation_set(tmp_path, toy_cache, toy_clip_dir, toy_ingredients,
                                                              tiny_open_clip_dir):
    names, states = toy_ingredients
    exp_file = _experiment(tmp_path / "exp.toml", toy_clip_dir)
    args = ["--experiment", str(exp_file), "--out", str(tmp_path / "o"), "--cache", str(toy_cache.root),
            "--device", "cpu", "--workers", "0"]
    bad = dict(states[names[1]])
    bad["text_projection"] = bad["text_projection"][:, :16].contiguous()
    save_file(bad, str(tmp_path / "narrow.safetensors"))
    res = run("soup", names[0], str(tmp_path / "narrow.safetensors"), "--val", "scenes", *args, ok=False)
    assert res.exit_code == 1
    assert f"{tmp_path / 'narrow.safetensors'}: key 'text_projection' has shape (32, 16)" in res.output
    assert "(32, 32)" in res.output

    res = run("soup", *names[1:], "--arch", "RN50", "--val", "scenes", *args, ok=False)
    assert res.exit_code == 1 and "--arch RN50" in res.output and names[1] in res.output
    res = run("soup", *names[1:], "--val", "scenes", *args, ok=False)
    assert res.exit_code == 1 and "--arch: needed" in res.output
    res = run("soup", *names, "--val", "no-such-set", *args, ok=False)
    assert res.exit_code == 1 and "no-such-set" in res.output and "datasets: scenes" in res.output
    assert not (tmp_path / "o").exists()



def test_validation_set_from_a_cached_dataset_or_a_folder(tmp_path, toy_cache):
    from embedstore import Cache
    from embedstore.encode.soup_eval import resolve_validation
    from embedstore.errors import SpecError

    folder = toy_cache.root.parent / "scenes"
    assert resolve_validation("scenes", toy_cache) == ("scenes", str(folder))
    assert resolve_validation(str(folder), Cache(tmp_path / "empty")) == ("scenes", str(folder.resolve()))
    manifests = sorted(toy_cache.root.glob("datasets/scenes/*/*/manifest.json"))
    assert len(manifests) == 2
    data = json.loads(manifests[0].read_text())
    data["source"]["location"] = str(tmp_path / "elsewhere")
    manifests[0].write_text(json.dumps(data))
    with pytest.raises(SpecError, match="different sources"):
        resolve_validation("scenes", toy_cache)
    manifests[1].write_text(json.dumps(data))
    with pytest.raises(SpecError, match="no longer exists; pass the image folder"):
        resolve_validation("scenes", toy_cache)


def test_builtin_arch_config_is_a_loadable_local_dir_config(tmp_path):
    import open_clip

    model = LiveOpenClip("RN50", "cpu")
    config = model.config()
    assert config["model_cfg"] == open_clip.get_model_config("RN50")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    again = LiveOpenClip(f"local-dir:{tmp_path}", "cpu")
    assert again.layout() == model.layout() and again.default_view == model.default_view
