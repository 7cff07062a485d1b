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
    from embedstore.toy import make_tiny_open_clip

    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers CLIPModel folder (usable as ``hf:<path>``)."""
    from embedstore.toy import make_tiny_hf_clip

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
    from embedstore.toy import make_image_folder

    return make_image_folder(tmp_path / "scenes", per_class=4, seed=1)


@pytest.fixture()
def cache(tmp_path: Path):
    from embedstore import Cache

    return Cache(tmp_path / "cache")


@pytest.fixture()
def fast_options():
    """Encode options for tests: CPU, in-process decoding, no progress bar."""
    from embedstore.encode import EncodeOptions

    return EncodeOptions(device="cpu", workers=0, batch_size=8, progress=False)
