"""``embedstore demo``: the whole flow offline, on a toy model the demo trains itself.

It writes under ``<cache>/demo/``: a folder of synthetic labelled images (six scene classes,
each a colour with noise), a tiny open_clip model in ``local-dir:`` layout trained for a few
seconds on such images (a toy: it knows six colours, not the world), and an experiment file.
Then it encodes the images (twice: the second run finds nothing to do), and runs the seed's
zero-shot recipe (ajou-2024 prompts, prob-mean) from the cache. A later run reuses what the
first made (nothing is trained or encoded again) and never overwrites an edited experiment file.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from embedstore.encode.loop import EncodeOptions, EncodeResult, encode_images
from embedstore.encode.toy import TOY_CLASSES, make_image_folder, train_toy_clip
from embedstore.store.cache import Cache
from embedstore.store.spec import EncoderSpec
from embedstore.util.fsutil import atomic_write, temp_path

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
    reused: tuple[str, ...] = ()      # what an earlier demo run made and this one kept
    kept_experiment: bool = False     # experiment.toml differs from the demo's (edited): left as it is


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


def _made_once(target: Path, make: Callable[[Path], object]) -> bool:
    """Make ``target`` (a folder) by ``make(temp folder)`` and a rename, unless it exists: a demo
    interrupted half-way never leaves a half-trained model or half the images behind. Returns
    whether it already existed."""
    if target.is_dir():
        return True
    tmp = temp_path(target.parent)
    try:
        make(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return False


def prepare_demo(cache: Cache, per_class: int = 20, progress: bool = True) -> DemoSetup:
    """Build (once) the toy model, images and experiment file; encode the images twice.

    A later run reuses the model and images, keeps an edited ``experiment.toml``, and its first
    encode finds nothing to do.
    """
    base = cache.root / "demo"
    base.mkdir(parents=True, exist_ok=True)
    model_dir = base / "toy-clip"
    images = base / "images"
    reused = []
    if _made_once(model_dir, lambda tmp: train_toy_clip(tmp, seed=0, progress=progress)):
        reused.append("toy model")
    if _made_once(images, lambda tmp: make_image_folder(tmp, per_class=per_class, seed=1)):
        reused.append("images")
    experiment_file = base / "experiment.toml"
    text = experiment_toml(model_dir)
    kept = experiment_file.is_file() and experiment_file.read_text(encoding="utf-8") != text
    if not kept:
        atomic_write(experiment_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    spec = EncoderSpec(f"local-dir:{model_dir}")
    options = EncodeOptions(device="cpu", workers=0, batch_size=32, progress=progress)
    first = encode_images(images, spec, cache, dataset=DEMO_DATASET, options=options)
    second = encode_images(images, spec, cache, dataset=DEMO_DATASET, options=options)
    return DemoSetup(model_dir, images, experiment_file, spec, first, second, tuple(reused), kept)
