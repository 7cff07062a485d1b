"""Tiny models and synthetic images for the demo, the tests and the benchmarks (no downloads).

:func:`make_tiny_open_clip` saves a random-weight open_clip model in ``local-dir:`` layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``); :func:`make_tiny_hf_clip` saves a
random-weight transformers ``CLIPModel`` with an offline ``CLIPTokenizer`` built from open_clip's
bundled BPE merges (the same token ids as open_clip's tokenizer) and a ``CLIPImageProcessor``.
:func:`make_image_folder` writes a labelled folder of class-coloured JPEGs.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

TOY_CLASSES = ("Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street")
# mean RGB of each toy class's images, so a trained toy model has something to learn
TOY_COLOURS = {
    "Buildings": (150, 120, 100),
    "Forests": (40, 140, 50),
    "Glacier": (200, 230, 250),
    "Mountains": (120, 110, 140),
    "Sea": (30, 80, 200),
    "Street": (90, 90, 90),
}


def tiny_open_clip_config(embed_dim: int = 32, width: int = 32, image_size: int = 32) -> dict:
    """An open_clip config with 1-layer towers (a few million parameters, mostly token embeddings)."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": 1, "width": width, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def make_tiny_open_clip(folder: str | os.PathLike[str], seed: int = 0, **config: int) -> Path:
    """Save a seeded random-weight tiny open_clip model in ``local-dir:`` layout; return the folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_open_clip_config(**config)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns (on the root logger) that the folder has no weights yet
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    finally:
        root.setLevel(level)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def _bpe_merges() -> list[str]:
    import open_clip.tokenizer as oct

    path = Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]  # the slice open_clip's SimpleTokenizer uses


def save_offline_clip_tokenizer(folder: str | os.PathLike[str]) -> None:
    """Write vocab.json/merges.txt for a ``CLIPTokenizer`` that matches open_clip's token ids."""
    from open_clip.tokenizer import bytes_to_unicode

    merges = _bpe_merges()
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m.split()) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def make_tiny_hf_clip(folder: str | os.PathLike[str], seed: int = 0, image_size: int = 32) -> Path:
    """Save a seeded random-weight tiny transformers ``CLIPModel`` with tokenizer and processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    save_offline_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 49407,
                     "bos_token_id": 49406, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(folder)
    return folder


TOY_JITTER = 30.0  # std of a per-image colour shift: makes neighbouring classes overlap


def toy_image(label: str, rng: np.random.Generator, size: tuple[int, int] = (48, 40),
              jitter: float = TOY_JITTER) -> np.ndarray:
    """An RGB uint8 array: the class colour shifted by a random per-image offset (so classes
    overlap and accuracy stays below 100%), pixel noise and a random bright square."""
    w, h = size
    base = np.array(TOY_COLOURS.get(label, (128, 128, 128)), dtype=np.float64) + rng.normal(0, jitter, size=3)
    img = base + rng.normal(0, 25, size=(h, w, 3))
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y:y + h // 3, x:x + w // 3] += 60
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(folder: str | os.PathLike[str], classes: Sequence[str] = TOY_CLASSES,
                      per_class: int = 8, seed: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    """Write ``folder/<class>/img<i>.jpg`` synthetic images; return the folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for label in classes:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(toy_image(label, rng, size)).save(folder / label / f"img{i}.jpg", quality=90)
    return folder


TOY_TRAIN_TEMPLATES = ("a photo of a {}.", "{}", "a blurry photo of a {}.")


def train_toy_clip(folder: str | os.PathLike[str], classes: Sequence[str] = TOY_CLASSES, steps: int = 300,
                   seed: int = 0, per_class: int = 64, batch_size: int = 96, progress: bool = False) -> Path:
    """Train a tiny open_clip model contrastively on class-coloured synthetic images, in seconds.

    Images come from :func:`toy_image`; each batch's texts are the class names in one of
    :data:`TOY_TRAIN_TEMPLATES`. The result (saved in ``local-dir:`` layout) classifies toy
    images zero-shot well above chance, and its accuracy moves with prompts and weights, which
    random-weight towers cannot show. It is a toy: it knows six colours, not the world.
    ``progress`` shows a bar of the training steps on stderr (about a minute on 2 CPU cores).
    """
    import open_clip
    import torch
    from PIL import Image

    from embedstore.encode.encoders.open_clip import default_view_from_cfg
    from embedstore.encode.pil_view import PilTransform

    folder = make_tiny_open_clip(folder, seed=seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    transform = PilTransform(default_view_from_cfg(dict(model.visual.preprocess_cfg), "toy"))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    images = torch.stack([transform(Image.fromarray(toy_image(classes[c], rng))) for c in labels])
    labels_t = torch.as_tensor(labels)
    tokens = [tokenizer([t.format(c) for c in classes]) for t in TOY_TRAIN_TEMPLATES]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        model.train()
        from embedstore.util.progress import progress_bar

        bar = progress_bar(steps, "training the toy model", "step", progress)
        for step in range(steps):
            idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
            img = torch.nn.functional.normalize(model.encode_image(images[idx]), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(tokens[step % len(tokens)]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            loss = torch.nn.functional.cross_entropy(logits, labels_t[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
        bar.close()
    model.eval()
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder
