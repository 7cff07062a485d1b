"""Shared fixtures: tiny random-weight models built once per session, synthetic image folders.

Nothing is downloaded: the open_clip model is saved in ``local-dir:`` layout and the
transformers model with ``save_pretrained`` (tokenizer built offline from open_clip's BPE).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip model folder (usable as ``local-dir:<path>``)."""
    from embedstore.encode.toy import make_tiny_open_clip

    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers CLIPModel folder (usable as ``hf:<path>``)."""
    from embedstore.encode.toy import make_tiny_hf_clip

    return make_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf"), seed=0)


@pytest.fixture(scope="session")
def open_clip_spec(tiny_open_clip_dir: Path):
    from embedstore import EncoderSpec

    return EncoderSpec(f"local-dir:{tiny_open_clip_dir}")


@pytest.fixture(scope="session")
def hf_spec(tiny_hf_dir: Path):
    from embedstore import EncoderSpec

    return EncoderSpec(f"hf:{tiny_hf_dir}")


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """A labelled folder: 6 classes x 4 synthetic JPEGs (48x40)."""
    from embedstore.encode.toy import make_image_folder

    return make_image_folder(tmp_path / "scenes", per_class=4, seed=1)


@pytest.fixture()
def cache(tmp_path: Path):
    from embedstore import Cache

    return Cache(tmp_path / "cache")


@pytest.fixture()
def fast_options():
    """Encode options for tests: CPU, in-process decoding, no progress bar."""
    from embedstore.encode.loop import EncodeOptions

    return EncodeOptions(device="cpu", workers=0, batch_size=8, progress=False)


@pytest.fixture(scope="session")
def toy_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip model trained for a few seconds on class-coloured synthetic images:
    zero-shot accuracy is well above chance and moves with prompts and weights."""
    from embedstore.encode.toy import train_toy_clip

    return train_toy_clip(tmp_path_factory.mktemp("toy_clip"), steps=300, seed=0)


@pytest.fixture(scope="session")
def toy_cache_template(tmp_path_factory: pytest.TempPathFactory, toy_clip_dir: Path) -> Path:
    """A cache with dataset 'scenes' (6 classes x 25 images) encoded by the toy model in two
    views: the default and squash+sharpness 2. Tests copy it (see ``toy_cache``)."""
    from embedstore import Cache, EncoderSpec, ViewOptions, encode_images
    from embedstore.encode.loop import EncodeOptions
    from embedstore.encode.toy import make_image_folder

    root = tmp_path_factory.mktemp("toy_cache")
    folder = make_image_folder(root / "scenes", per_class=25, seed=7)
    cache = Cache(root / "cache")
    spec = EncoderSpec(f"local-dir:{toy_clip_dir}")
    options = EncodeOptions(device="cpu", workers=0, batch_size=64, progress=False)
    encode_images(folder, spec, cache, options=options)
    encode_images(folder, spec, cache, options=options, view_options=ViewOptions(resize_mode="squash", sharpness=2.0))
    return root


@pytest.fixture()
def toy_cache(tmp_path: Path, toy_cache_template: Path):
    """A private copy of the toy cache (and its image folder, so source paths stay valid)."""
    import json
    import shutil

    from embedstore import Cache

    root = tmp_path / "toy"
    shutil.copytree(toy_cache_template, root)
    for manifest in (root / "cache").glob("datasets/*/*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        data["source"]["location"] = str(root / "scenes")
        manifest.write_text(json.dumps(data))
    return Cache(root / "cache")


@pytest.fixture(scope="session")
def playground_files(tmp_path_factory: pytest.TempPathFactory, toy_cache_template: Path,
                     toy_clip_dir: Path) -> tuple[Path, Path]:
    """A copy of the toy cache and an experiment on it for ``embedstore serve`` tests: two
    members (the two cached views), 4 templates and a class prompt, prob-mean with drop_below.
    Returns ``(cache root, experiment file)``."""
    import json
    import shutil

    from embedstore.encode.toy import TOY_CLASSES

    root = tmp_path_factory.mktemp("serve") / "toy"
    shutil.copytree(toy_cache_template, root)
    for manifest in (root / "cache").glob("datasets/*/*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        data["source"]["location"] = str(root / "scenes")
        manifest.write_text(json.dumps(data))
    spec = f"local-dir:{toy_clip_dir}"
    (root / "prompts.toml").write_text(
        'templates = ["a photo of a {}.", "a {} scene.", "{}", "a blurry photo of the {}."]\n'
        '[class_prompts]\nGlacier = ["white and blue ice"]\n', encoding="utf-8")
    experiment = root / "exp.toml"
    experiment.write_text("\n".join([
        'dataset = "scenes"',
        f"classes = {json.dumps(list(TOY_CLASSES))}",
        'templates = "prompts.toml"',
        'aggregate = "prob-mean"',
        "scale = 100.0",
        "drop_below = 0.002",
        "[[models]]",
        f"model = {json.dumps(spec)}",
        "weight = 0.5",
        "[[models]]",
        f"model = {json.dumps(spec)}",
        'resize_mode = "squash"',
        "sharpness = 2.0",
        "weight = 0.5",
        "",
    ]), encoding="utf-8")
    return root / "cache", experiment
