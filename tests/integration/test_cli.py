"""The command line end to end: encode, prompts, info, verify, demo; exit codes and messages."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore import Cache, ViewOptions
from embedstore.cli.main import main


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_encode_with_workers_equals_in_process(tmp_path, image_folder, open_clip_spec, tiny_open_clip_dir):
    model = f"local-dir:{tiny_open_clip_dir}"
    a, b = tmp_path / "a", tmp_path / "b"
    out = run("encode", str(image_folder), "--model", model, "--cache", str(a), "--device", "cpu",
              "--workers", "2", "--batch-size", "8", "--no-progress")
    assert "24 encoded, 0 already cached, 0 failed" in out.output
    # same batch size: CPU BLAS results can depend on how many rows share a batch (last bits)
    run("encode", str(image_folder), "--model", model, "--cache", str(b), "--device", "cpu",
        "--workers", "0", "--batch-size", "8", "--no-progress", "--dataset", "other")
    ra = Cache(a).open_image_store("scenes", open_clip_spec).read(as_float32=False)
    rb = Cache(b).open_image_store("other", open_clip_spec).read(as_float32=False)
    assert ra.keys == rb.keys
    np.testing.assert_array_equal(ra.features, rb.features)
    again = run("encode", str(image_folder), "--model", model, "--cache", str(a), "--device", "cpu", "--no-progress")
    assert "0 encoded, 24 already cached" in again.output


def test_cache_from_environment(tmp_path, image_folder, tiny_open_clip_dir, monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_CACHE", str(tmp_path / "envcache"))
    run("encode", str(image_folder), "--model", f"local-dir:{tiny_open_clip_dir}",
        "--workers", "0", "--no-progress", "--sharpness", "2")  # --device/--precision left at auto
    manifests = list((tmp_path / "envcache" / "datasets" / "scenes").glob("*/*sharp2*/manifest.json"))
    assert len(manifests) == 1
    # provenance records what actually ran, never the unresolved "auto"
    import json

    import torch
    shards = json.loads(manifests[0].read_text())["shards"]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {s["versions"]["device"] for s in shards} == {expected}
    assert {s["versions"]["precision"] for s in shards} == {"fp16" if expected == "cuda" else "fp32"}
    info = run("info")
    assert "scenes" in info.output and "sharp2" in info.output


def test_prompts_command(tmp_path, tiny_open_clip_dir):
    cache = str(tmp_path / "c")
    model = f"local-dir:{tiny_open_clip_dir}"
    out = run("prompts", "--model", model, "--cache", cache, "--device", "cpu", "a photo of a Sea.", "Sea")
    assert out.output.startswith("2 new prompts encoded, 0 already")
    listing = tmp_path / "prompts.txt"
    listing.write_text("Sea\na photo of a Glacier.\n\n")
    out = run("prompts", "--model", model, "--cache", cache, "--device", "cpu", "--file", str(listing))
    assert out.output.startswith("1 new prompts encoded, 1 already")
    out = run("prompts", "--model", model, "--cache", cache, ok=False)
    assert out.exit_code == 2 and "--file" in out.output


def test_verify_names_damaged_shard(tmp_path, image_folder, tiny_open_clip_dir):
    cache = tmp_path / "c"
    run("encode", str(image_folder), "--model", f"local-dir:{tiny_open_clip_dir}", "--cache", str(cache),
        "--device", "cpu", "--workers", "0", "--no-progress")
    assert "0 problems" in run("verify", "--cache", str(cache)).output
    shard = next(cache.glob("datasets/*/*/*/shards/*.h5"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = run("verify", "--cache", str(cache), ok=False)
    assert out.exit_code == 1 and shard.name in out.output and "checksum" in out.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "{missing}", "--model", "ViT-B-32"], "does not exist"),
        (["encode", "{missing}.tar", "--model", "ViT-B-32"], "no such shard"),
        (["encode", "{folder}", "--model", "ViT-B-32", "--image-column", "img"], "for shard sources"),
        (["encode", "{folder}", "--model", "{model}", "--mean", "0.5,0.5"], "--mean"),
        (["encode", "{folder}", "--model", "{model}", "--dataset", "bad/name"], "--dataset"),
        (["encode", "{folder}", "--model", "{model}", "--pretrained", "openai"], "--pretrained"),
        (["encode", "{folder}", "--model", "local-dir:{missing}"], "open_clip_config.json"),
        (["export", "--dataset", "nope", "--model", "{model}", "--out", "{out}"], "embedstore encode"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, image_folder, tiny_open_clip_dir, args, message):
    values = {"missing": str(tmp_path / "missing"), "folder": str(image_folder), "out": str(tmp_path / "out"),
              "model": f"local-dir:{tiny_open_clip_dir}"}
    full = [a.format(**values) for a in args] + ["--cache", str(tmp_path / "c")]
    out = run(*full, ok=False)
    assert out.exit_code in (1, 2)
    assert message in out.output
    assert "Traceback" not in out.output


def test_demo_runs_offline_and_says_the_model_is_a_toy(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_PROGRESS", "always")  # bars even though stderr is not a terminal
    out = run("demo", "--cache", str(tmp_path / "c"))
    assert "TOY model" in out.output and "Nothing is downloaded" in out.output
    assert "120 encoded" in out.output and "0 encoded, 120 already cached" in out.output
    assert "demo-scenes" in out.output and "unchanged" in out.output
    assert "312 prompts (312 newly encoded)" in out.output and "confusion matrix" in out.output
    accuracy = float(out.stdout.split("accuracy ")[1].split()[0])
    assert accuracy > 0.4  # the toy model learned something; chance is 1/6
    from embedstore import EncoderSpec

    spec = EncoderSpec(f"local-dir:{tmp_path / 'c' / 'demo' / 'toy-clip'}")
    rows = Cache(tmp_path / "c").open_image_store("demo-scenes", spec, ViewOptions()).read()
    assert len(rows) == 120 and sorted(set(rows.labels)) == ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
    again = run("classify", str(tmp_path / "c" / "demo" / "experiment.toml"), "--cache", str(tmp_path / "c"))
    assert "(0 newly encoded)" in again.output
    # issue 10: a second demo keeps an edited experiment, trains and encodes nothing, shows progress
    assert "training the toy model" in out.stderr and "prompts" in out.stderr  # bars on stderr
    exp = tmp_path / "c" / "demo" / "experiment.toml"
    edited = exp.read_text().replace('aggregate = "prob-mean"', 'aggregate = "embed-mean"') + "# mine\n"
    exp.write_text(edited)
    model_file = tmp_path / "c" / "demo" / "toy-clip" / "open_clip_model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    rerun = run("--no-progress", "demo", "--cache", str(tmp_path / "c"))
    assert exp.read_text() == edited and "kept your edited" in rerun.output
    assert "reused from an earlier demo run: toy model, images" in rerun.output
    assert "120 encoded" not in rerun.output and rerun.output.count("0 encoded, 120 already cached") == 2
    assert "aggregate embed-mean" in rerun.output and model_file.stat().st_mtime_ns == mtime
    assert rerun.stderr == ""  # --no-progress hides every bar
