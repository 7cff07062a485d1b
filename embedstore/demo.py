"""``embedstore demo``: the whole flow offline, on a toy model the demo trains itself.

It writes under ``<cache>/demo/``: a folder of synthetic labelled images (six scene classes,
each a colour with noise), a tiny open_clip model in ``local-dir:`` layout trained for a few
seconds on such images (a toy: it knows six colours, not the world), and an experiment file.
Then it encodes the images (twice: the second run finds nothing to do), and runs the seed's
zero-shot recipe (ajou-2024 prompts, prob-mean) from the cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from embedstore.cache import Cache
from embedstore.encode import EncodeOptions, EncodeResult, encode_images
from embedstore.encoders.spec import EncoderSpec
from embedstore.toy import TOY_CLASSES, make_image_folder, train_toy_clip

DEMO_DATASET = "demo-scenes"


@dataclass
class DemoSetup:
    """What the demo built and encoded."""

    model_dir: Path
    images_dir: Path
    experiment_file: Path
    spec: EncoderSpec
    first: EncodeResult
    second: EncodeResult


def experiment_toml(model_dir: Path) -> str:
    """The demo's experiment file: the seed's prompts and scoring on the toy model."""
    return "\n".join([
        "# embedstore demo experiment: edit and re-run with `embedstore classify <this file>`",
        f'dataset = "{DEMO_DATASET}"',
        f"classes = {json.dumps(list(TOY_CLASSES))}",
        'templates = "ajou-2024"',
        'aggregate = "prob-mean"',
        "scale = 100.0",
        "",
        "[[models]]",
        f"model = {json.dumps('local-dir:' + str(model_dir.resolve()))}",
        "weight = 1.0",
        "",
    ])


def prepare_demo(cache: Cache, per_class: int = 20, progress: bool = True) -> DemoSetup:
    """Build (once) the toy model, images and experiment file; encode the images twice."""
    base = cache.root / "demo"
    model_dir = base / "toy-clip"
    if not (model_dir / "open_clip_model.safetensors").is_file():
        train_toy_clip(model_dir, seed=0)
    images = base / "images"
    if not images.is_dir():
        make_image_folder(images, per_class=per_class, seed=1)
    experiment_file = base / "experiment.toml"
    experiment_file.write_text(experiment_toml(model_dir), encoding="utf-8")
    spec = EncoderSpec(f"local-dir:{model_dir}")
    options = EncodeOptions(device="cpu", workers=0, batch_size=32, progress=progress)
    first = encode_images(images, spec, cache, dataset=DEMO_DATASET, options=options)
    second = encode_images(images, spec, cache, dataset=DEMO_DATASET, options=options)
    return DemoSetup(model_dir, images, experiment_file, spec, first, second)
