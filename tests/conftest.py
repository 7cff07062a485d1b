"""Shared fixtures: tiny random-weight models built once per session, synthetic image folders.

Nothing is downloaded: the open_clip model is saved in ``local-dir:`` layout and the
transformers model with ``save_pretrained`` (tokenizer built offline from open_clip's BPE).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Fixtures that load or build a model (stage 1): a test that uses one is marked ``torch``.
MODEL_FIXTURES = {"tiny_open_clip_dir", "tiny_hf_dir", "open_clip_spec", "hf_spec", "image_folder", "fast_options",
                  "toy_clip_dir", "toy_cache_template", "toy_cache"}
# A test module that names one of these needs stage 1 (torch, PIL or a model library).
STAGE_1 = re.compile(r"^\s*(?:import|from)\s+(?:torch|torchvision|open_clip|transformers|PIL|embedstore\.encode)\b"
                     r"|\bembedstore\.encode\b|\bencode_images\b|\bencode_prompts\b|\bcli\((?:\"|')encode\b", re.M)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a finder that refuses the name (tests/no_torch blocks stage 1 this way)
        return False


HAVE_TORCH = _installed("torch")
TOP_LEVEL_STAGE_1 = re.compile(r"^(?:import|from)\s+(?:torch|torchvision|open_clip|transformers|PIL|embedstore\.encode)\b", re.M)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without torch, modules that import stage 1 at their top cannot even be collected: leave them out."""
    if HAVE_TORCH or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return bool(TOP_LEVEL_STAGE_1.search(collection_path.read_text(encoding="utf-8"))) or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apply the ``torch`` marker (tests that need stage 1) and skip those tests where torch is
    not installed, so ``pytest -m "not torch"`` runs the stage-2 tests in an environment without it."""
    needs: dict[Path, bool] = {}
    skip = pytest.mark.skip(reason="needs torch (stage 1); install embedstore with its model libraries")
    for item in items:
        path = Path(str(item.fspath))
        if path not in needs:
            needs[path] = bool(STAGE_1.search(path.read_text(encoding="utf-8")))
        if needs[path] or MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.torch)
            if not HAVE_TORCH:
                item.add_marker(skip)


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
