"""Soup evaluation: score a state dict zero-shot on a labelled validation set, all in memory.

This module owns how ``embedstore soup`` scores a candidate, not how candidates are made:

- :class:`LiveOpenClip`: one open_clip model built once from ``--arch`` (no weights loaded) whose
  weights are swapped per candidate; it encodes through the same functions as the open_clip
  adapter (:func:`embedstore.encode.encoders.open_clip.encode_image_batch` and ``encode_text_batch``).
- the validation set: :func:`resolve_validation` (``--val`` -> a cached dataset's source or a
  folder/list) and :func:`load_validation`, which decodes and preprocesses the images once and
  keeps them as uint8 (:class:`ValidationImages`; ``3*S*S`` bytes each: 150 KB at 224 px, so 26k
  images take 3.9 GB). No store is written.
- :class:`ZeroShotEvaluator`: ``evaluate(state_dict) -> Evaluation`` with the experiment's
  classes, templates, aggregation and scale, through the one scoring rule of
  :mod:`embedstore.score.scoring` and :mod:`embedstore.score.metrics`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from embedstore.encode.checkpoints import (
    CONFIG_NAME,
    CheckpointError,
    Layout,
    SoupError,
    StateDict,
    layout_of,
)
from embedstore.errors import SpecError
from embedstore.score.metrics import Metrics, compute_metrics, label_ids
from embedstore.score.prompts import Expansion
from embedstore.score.scoring import ArrayPart, Rule, class_scores, predict
from embedstore.store.cache import Cache, check_dataset_name
from embedstore.store.spec import LOCAL_DIR_PREFIX, EncoderSpec
from embedstore.store.views import View
from embedstore.util.arrays import unit_rows

log = logging.getLogger(__name__)

METRICS = ("accuracy", "macro-f1")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip warns on the root logger that a model built without weights is random."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class LiveOpenClip:
    """An open_clip model built once from ``--arch`` (no weights loaded); :meth:`load` swaps in a
    state dict. Encodes with the functions :class:`embedstore.encode.encoders.open_clip.OpenClipEncoder`
    uses (eval mode, no grad, L2-normalised float32)."""

    def __init__(self, arch: str, device: str = "cpu", precision: str = "fp32"):
        import open_clip
        import torch

        from embedstore.encode.encoders.open_clip import default_view_from_cfg
        from embedstore.encode.encoders.weights import RANDOM_INIT_SEED

        spec = EncoderSpec(arch)
        if spec.kind != "open_clip":
            raise SpecError(f"--arch {arch}: soups are made of open_clip checkpoints (not transformers 'hf:' models)")
        self.arch = spec.model
        self.device = device
        self.precision = precision
        try:
            with _quiet_root_logger(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = open_clip.create_model(self.arch, device=device, precision=precision, load_weights=False)
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as exc:
            raise SpecError(f"--arch {arch}: open_clip could not create it: {exc}") from exc
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.arch)
        self.preprocess_cfg = dict(model.visual.preprocess_cfg)
        self.default_view = default_view_from_cfg(self.preprocess_cfg, f"--arch {arch}")

    def layout(self) -> Layout:
        """The architecture's keys and shapes (what every checkpoint must match)."""
        return layout_of(self.model.state_dict())

    def config(self) -> dict[str, Any]:
        """``open_clip_config.json`` for the soup: a ``local-dir:`` arch's file as it is, else
        the built-in model config and this model's preprocessing."""
        import open_clip

        if self.arch.startswith(LOCAL_DIR_PREFIX):
            path = Path(self.arch[len(LOCAL_DIR_PREFIX):]) / CONFIG_NAME
            return json.loads(path.read_text(encoding="utf-8"))
        pre = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg.items()}
        return {"model_cfg": open_clip.get_model_config(self.arch), "preprocess_cfg": pre}

    def load(self, state_dict: StateDict) -> None:
        """Copy ``state_dict`` into the model (strict: every key, same shapes)."""
        try:
            self.model.load_state_dict(dict(state_dict), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"--arch {self.arch}: the weights do not fit: {exc}") from None

    @property
    def logit_scale(self) -> Optional[float]:
        from embedstore.encode.encoders.open_clip import logit_scale_of

        return logit_scale_of(self.model)

    def encode_images(self, batch: Any) -> np.ndarray:
        """Preprocessed ``(n, 3, H, W)`` tensor -> float32 unit ``(n, d)``."""
        from embedstore.encode.encoders.open_clip import encode_image_batch

        return encode_image_batch(self.model, batch, self.device, self.precision)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Prompt strings -> float32 unit ``(n, d)``."""
        from embedstore.encode.encoders.open_clip import encode_text_batch

        return encode_text_batch(self.model, self.tokenizer, texts, self.device, self.precision)


class _Uint8View:
    """Picklable transform: RGB PIL image -> uint8 tensor ``(3, S, S)`` after the view's geometry,
    RGB conversion and sharpening (normalisation happens per batch, see :meth:`ValidationImages.batches`)."""

    def __init__(self, view: View):
        from embedstore.encode.pil_view import PilTransform

        self.transform = PilTransform(view)

    def __call__(self, image: Any) -> Any:
        import torch

        array = np.asarray(self.transform.to_pil(image), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass
class ValidationImages:
    """A labelled validation set, decoded and preprocessed once (uint8, in memory)."""

    name: str
    location: str
    keys: list[str]
    labels: list[str]
    view: View
    pixels: Any                       # uint8 tensor (n, 3, S, S)
    failures: dict[str, str] = field(default_factory=dict)   # key -> "Kind: message"

    def batches(self, batch_size: int) -> Iterator[Any]:
        """Normalised float32 batches, equal to :class:`embedstore.store.views.PilTransform`'s output."""
        import torch
        from torchvision.transforms import functional as TF

        for start in range(0, len(self.keys), batch_size):
            x = self.pixels[start:start + batch_size].to(torch.float32).div(255)
            yield TF.normalize(x, list(self.view.mean), list(self.view.std))


def resolve_validation(val: str, cache: Cache) -> tuple[str, str]:
    """``--val`` -> (name, image source location).

    A dataset name cached in ``cache`` (any encoder or view) is resolved to the source it was
    encoded from (the stores' manifest ``source.location``); otherwise ``val`` may be a folder
    with one subfolder per class, or a ``.txt``/``.csv`` list file.

    Raises:
        SpecError: neither a cached dataset nor an existing path, stores of the dataset that were
            encoded from different sources, or a source that no longer exists.
    """
    from embedstore.store.store import Store

    name_ok = True
    try:
        check_dataset_name(val)
    except SpecError:
        name_ok = False
    locations: dict[str, str] = {}
    cached = False
    if name_ok:
        for loc in cache.stores():
            if loc.dataset == val:
                cached = True
                source = (Store(loc.path).manifest().get("source") or {}).get("location")
                if source:
                    locations.setdefault(source, str(loc.path))
    if len(locations) > 1:
        raise SpecError(f"--val {val}: the dataset's stores were encoded from different sources "
                        f"({', '.join(sorted(locations))}); pass the folder to use instead")
    if locations:
        location = next(iter(locations))
        if not Path(location).exists():
            raise SpecError(f"--val {val}: the dataset was encoded from {location}, which no longer exists; "
                            "pass the image folder itself as --val")
        return val, location
    path = Path(val).expanduser()
    if path.exists():
        return (path.stem if path.is_file() else path.resolve().name), str(path.resolve())
    if cached:
        raise SpecError(f"--val {val}: the dataset's stores record no source folder; pass the image folder itself")
    datasets = sorted({loc.dataset for loc in cache.stores()})
    raise SpecError(f"--val {val}: no dataset of that name in the cache {cache.root} "
                    f"(datasets: {', '.join(datasets) or 'none'}) and no such folder or list file")


def load_validation(name: str, location: str, view: View, workers: int = 4, batch_size: int = 64) -> ValidationImages:
    """List, decode and preprocess the labelled images at ``location`` (bad images are left out).

    Raises:
        SourceError: the location cannot be listed.
        SpecError: the images have no labels, or none could be read.
    """
    import torch
    from torch.utils.data import DataLoader

    from embedstore.encode.loop import ImageDataset, collate_samples
    from embedstore.encode.sources import list_source

    source = list_source(location)
    if not source.labelled:
        raise SpecError(f"--val {name}: the images at {location} have no labels "
                        "(a folder with one subfolder per class, or a list file with a label column, is needed)")
    items = list(source.items)
    workers = max(0, min(workers, len(items) // max(1, batch_size) + 1))
    dataset: Any = ImageDataset(items, _Uint8View(view))
    if any(item.shard is not None for item in items):  # images inside tars / Parquet / Arrow files
        from embedstore.encode.shard_loader import ShardDataset

        dataset = ShardDataset(items, _Uint8View(view))
        workers = min(workers, len(dataset.groups))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_samples, prefetch_factor=4 if workers else None)
    good: list[tuple[int, Any]] = []
    failures: dict[str, str] = {}
    for samples in loader:
        for i, tensor, _, _, _, kind, message in samples:
            if tensor is None:
                failures[items[i].key] = f"{kind}: {message}"
            else:
                good.append((i, tensor))
    if not good:
        raise SpecError(f"--val {name}: none of the {len(items)} images at {location} could be read")
    good.sort(key=lambda pair: pair[0])
    pixels = torch.stack([t for _, t in good])
    keys = [items[i].key for i, _ in good]
    labels = [str(items[i].label) for i, _ in good]
    log.info("validation %s: %d images (%.1f MB as uint8), %d unreadable", name, len(keys),
             pixels.numel() / 1e6, len(failures))
    return ValidationImages(name, str(source.location), keys, labels, view, pixels, failures)


@dataclass(frozen=True)
class Evaluation:
    """The score of one state dict on the validation set (``float(evaluation)`` is the score)."""

    score: float
    metrics: Metrics
    seconds: float

    def __float__(self) -> float:
        return self.score


class ZeroShotEvaluator:
    """``evaluate(state_dict) -> Evaluation``: load the weights into ``model``, encode the
    validation images and the prompts, and score zero-shot as ``embedstore classify`` does for
    a single model (``prob-mean``: per-prompt probabilities, ``drop_below``, class means;
    ``embed-mean``/``logit-mean``: class probabilities)."""

    def __init__(self, model: LiveOpenClip, images: ValidationImages, expansion: Expansion,
                 aggregate: str, scale: float | str, drop_below: Optional[float] = None,
                 metric: str = "accuracy", batch_size: int = 64, text_batch_size: int = 256):
        if metric not in METRICS:
            raise SoupError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
        y_true = label_ids(images.labels, expansion.classes, f"--val {images.name}")
        self.model = model
        self.images = images
        self.expansion = expansion
        self.aggregate = aggregate
        self.scale = scale
        self.drop_below = drop_below
        self.metric = metric
        self.batch_size = batch_size
        self.text_batch_size = text_batch_size
        self.y_true = y_true
        self.calls = 0

    def scores(self, state_dict: StateDict) -> np.ndarray:
        """Class scores ``(n, c)`` of the validation images under ``state_dict``."""
        from embedstore.encode.loop import AdaptiveBatcher

        self.model.load(state_dict)
        encode = AdaptiveBatcher(self.model)  # type: ignore[arg-type]  # has encode_images, as the protocol asks
        image = np.concatenate([encode(x) for x in self.images.batches(self.batch_size)])
        texts = list(self.expansion.texts)
        text = np.concatenate([self.model.encode_texts(texts[i:i + self.text_batch_size])
                               for i in range(0, len(texts), self.text_batch_size)])
        scale = self.model.logit_scale if self.scale == "model" else float(self.scale)
        if scale is None:
            raise SpecError(f"scale = \"model\": --arch {self.model.arch} has no logit_scale; give a number")
        rule = Rule(self.aggregate, self.expansion.class_index, len(self.expansion.classes), self.drop_below)
        source = ArrayPart(rule, scale, features=unit_rows(image, copy=False), text=text)
        return class_scores(rule, [source], [1.0], len(image), block_rows=max(1, (64 << 20) // (12 * len(texts))))

    def __call__(self, state_dict: StateDict) -> Evaluation:
        started = time.perf_counter()
        predictions = predict(self.scores(state_dict))
        metrics = compute_metrics(self.y_true, predictions, self.expansion.classes)
        self.calls += 1
        score = metrics.accuracy if self.metric == "accuracy" else metrics.macro_f1
        return Evaluation(float(score), metrics, time.perf_counter() - started)
