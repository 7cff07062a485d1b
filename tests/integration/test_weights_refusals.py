"""Issue 10 item 5 and the offline bullet: no silent random weights, clear offline messages, and
``info`` shows which weights every store and text bank was encoded with."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from embedstore import Cache, EncoderSpec
from embedstore.cli.main import main
from embedstore.encode.loop import encode_images
from embedstore.errors import SpecError


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_model_without_pretrained_is_refused_and_nothing_is_created(tmp_path, image_folder):
    cache = tmp_path / "c"
    result = run("encode", str(image_folder), "--model", "ViT-B-32", "--cache", str(cache), "--no-progress")
    assert result.exit_code == 1, result.output
    assert "random weights" in result.output and "--random-weights" in result.output
    assert "--pretrained TAG" in result.output and "laion2b_s34b_b79k" in result.output  # known tags listed
    assert not (cache / "datasets").exists() and not (cache / "encoders").exists()
    assert "Traceback" not in result.output


def test_local_dir_without_checkpoint_needs_random_weights(tmp_path, image_folder, tiny_open_clip_dir, fast_options):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_open_clip_dir / "open_clip_config.json", bare)
    cache = Cache(tmp_path / "c")
    with pytest.raises(SpecError, match="no checkpoint.*--random-weights"):
        encode_images(image_folder, EncoderSpec(f"local-dir:{bare}"), cache, options=fast_options)
    assert not (cache.root / "datasets").exists()
    # asked for explicitly: encoded, and `info` says the weights are random
    out = run("encode", str(image_folder), "--model", f"local-dir:{bare}", "--random-weights", "--cache",
              str(cache.root), "--device", "cpu", "--workers", "0", "--no-progress")
    assert out.exit_code == 0, out.output
    # the card records the explicit choice: later commands on the same encoder need no flag again
    out = run("prompts", "--model", f"local-dir:{bare}", "--cache", str(cache.root), "--device", "cpu", "a sea")
    assert out.exit_code == 0, out.output
    info = run("info", "--cache", str(cache.root))
    assert info.exit_code == 0
    assert info.output.count("RANDOM (seed 0)") == 2  # the store and the text bank
    # ... but a new store of random features needs the flag again
    out = run("encode", str(image_folder), "--dataset", "another", "--model", f"local-dir:{bare}", "--cache",
              str(cache.root), "--device", "cpu", "--workers", "0", "--no-progress")
    assert out.exit_code == 1 and "--random-weights" in out.output, out.output
    assert not (cache.root / "datasets" / "another").exists()


def test_info_names_the_weights_file_and_digest(tmp_path, image_folder, open_clip_spec, fast_options):
    cache = Cache(tmp_path / "c")
    encode_images(image_folder, open_clip_spec, cache, options=fast_options)
    digest = cache.load_card(open_clip_spec).weights_digest
    info = run("info", "--cache", str(cache.root))
    assert f"open_clip_model.safetensors sha256:{digest.split(':')[1][:12]}" in info.output
    assert "RANDOM" not in info.output


def test_offline_pretrained_tag_gets_one_clear_message(tmp_path, image_folder):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "embedstore", "encode", str(image_folder), "--model", "ViT-B-32", "--pretrained",
         "laion2b_s34b_b79k", "--cache", str(tmp_path / "c"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert "--pretrained laion2b_s34b_b79k" in err and "could not be downloaded" in err
    assert "--pretrained /path/to/checkpoint" in err
