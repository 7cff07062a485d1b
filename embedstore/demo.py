"""``embedstore demo``: the whole stage-1 flow offline, on a tiny random-weight model.

It writes a tiny open_clip model in ``local-dir:`` layout and a small labelled folder of
synthetic images under ``<cache>/demo/``, encodes the images and a few prompts into the cache,
and returns what ``info`` would show. The model has random weights: its features carry no
meaning, the run only shows the machinery.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedstore.cache import Cache
from embedstore.encode import EncodeOptions, EncodeResult, PromptResult, encode_images, encode_prompts
from embedstore.encoders.spec import EncoderSpec
from embedstore.toy import TOY_CLASSES, make_image_folder, make_tiny_open_clip

DEMO_DATASET = "demo-scenes"


@dataclass
class DemoResult:
    """What the demo did."""

    model_dir: Path
    images_dir: Path
    spec: EncoderSpec
    first: EncodeResult
    second: EncodeResult
    prompts: PromptResult


def run_demo(cache: Cache, per_class: int = 10, progress: bool = True) -> DemoResult:
    """Build the toy model and images (once), encode them twice (the second run is all cached)."""
    base = cache.root / "demo"
    model_dir = base / "tiny-clip"
    if not (model_dir / "open_clip_model.safetensors").is_file():
        make_tiny_open_clip(model_dir, seed=0)
    images = base / "images"
    if not images.is_dir():
        make_image_folder(images, per_class=per_class, seed=0)
    spec = EncoderSpec(f"local-dir:{model_dir}")
    options = EncodeOptions(device="cpu", workers=0, batch_size=32, progress=progress)
    first = encode_images(images, spec, cache, dataset=DEMO_DATASET, options=options)
    second = encode_images(images, spec, cache, dataset=DEMO_DATASET, options=options)
    prompts = [f"a photo of a {c}." for c in TOY_CLASSES] + [f"a blurry photo of a {c}." for c in TOY_CLASSES]
    prompt_result = encode_prompts(prompts, spec, cache, device="cpu")
    return DemoResult(model_dir, images, spec, first, second, prompt_result)
