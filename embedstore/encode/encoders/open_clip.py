"""Adapter for open_clip models (built-in names with a pretrained tag or file, hf-hub:, local-dir:)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from embedstore.encode.encoders.torch_utils import (
    as_features,
    autocast,
    inference_mode,
    library_versions,
    to_unit_numpy,
)
from embedstore.encode.encoders.weights import RANDOM_INIT_SEED
from embedstore.errors import SpecError
from embedstore.store.card import EncoderCard, WeightsFile
from embedstore.store.spec import EncoderSpec
from embedstore.store.views import View

log = logging.getLogger(__name__)


def default_view_from_cfg(cfg: dict[str, Any], where: str) -> View:
    """open_clip ``preprocess_cfg`` -> :class:`View` (square sizes only)."""
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise SpecError(f"{where}: non-square input size {tuple(size)} is not supported")
        size = size[0]
    return View(
        resize_mode=cfg.get("resize_mode", "shortest"),
        size=int(size),
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def encode_image_batch(model: Any, batch: Any, device: str, precision: str) -> np.ndarray:
    """Preprocessed ``(n, 3, H, W)`` tensor -> float32 unit ``(n, d)`` through an open_clip model
    already built and in eval mode (no grad, autocast for ``precision`` on ``device``)."""
    with inference_mode(), autocast(device, precision):
        x = batch.to(device, non_blocking=True)
        if precision != "fp32":
            x = x.half() if precision == "fp16" else x.bfloat16()
        return to_unit_numpy(as_features(model.encode_image(x), "encode_image"))


def encode_text_batch(model: Any, tokenizer: Any, texts: Sequence[str], device: str, precision: str) -> np.ndarray:
    """Prompt strings -> float32 unit ``(n, d)`` through an open_clip model and its tokenizer."""
    with inference_mode(), autocast(device, precision):
        tokens = tokenizer(list(texts)).to(device)
        return to_unit_numpy(as_features(model.encode_text(tokens), "encode_text"))


def logit_scale_of(model: Any) -> Optional[float]:
    """``exp(model.logit_scale)``, or None for a model without one."""
    logit_scale = getattr(model, "logit_scale", None)
    return float(logit_scale.exp().item()) if logit_scale is not None else None


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip warns "No pretrained weights loaded ... initialized randomly" when it is told not
    to load them; embedstore loads them right after, so the warning would be false."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root, drop = logging.getLogger(), Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class OpenClipEncoder:
    """An open_clip model in eval mode on one device."""

    def __init__(
        self,
        spec: EncoderSpec,
        weights: tuple[str, tuple[WeightsFile, ...]],
        device: str = "cpu",
        precision: str = "fp32",
        card: Optional[EncoderCard] = None,
        text_only: bool = False,
    ):
        import open_clip
        import torch

        self.spec = spec
        self.device = device
        self.precision = precision
        kwargs: dict[str, Any] = {"device": device, "precision": "fp32" if device == "cpu" else precision}
        if spec.pretrained is not None:
            kwargs["pretrained"] = spec.pretrained  # still sets the tag's preprocessing and options
        try:
            with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
                torch.manual_seed(RANDOM_INIT_SEED)  # models without weights stay reproducible
                model = open_clip.create_model(spec.target, load_weights=False, **kwargs)
        except (RuntimeError, ValueError, FileNotFoundError) as exc:
            text = str(exc).split(" Available: ")[0]  # not the list of every built-in model name
            if text != str(exc):
                text += " (open_clip.list_models() lists the names)"
            raise SpecError(f"--model {spec}: open_clip could not create it: {text}") from exc
        # the weights digested for the card, read through embedstore's guard (never open_clip's
        # own torch.load, whose refusal advises allow-listing the global that was refused)
        from embedstore.encode.checkpoints import load_into_open_clip

        for weights_file in weights[1]:
            load_into_open_clip(model, Path(weights_file.path), f"--model {spec}")
        if text_only:
            model.visual = torch.nn.Identity()  # free the image tower; encode_text does not use it
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(spec.target)
        self._weights = weights
        self._card = card if card is not None else self._make_card()

    def _make_card(self) -> EncoderCard:
        view = default_view_from_cfg(dict(self.model.visual.preprocess_cfg), f"--model {self.spec}")
        dim = int(self.encode_texts(["a"]).shape[1])
        return EncoderCard(
            spec=self.spec,
            weights_digest=self._weights[0],
            weights_files=self._weights[1],
            default_view=view,
            dim=dim,
            logit_scale=logit_scale_of(self.model),
            tokenizer={
                "type": type(self.tokenizer).__name__,
                "context_length": int(getattr(self.tokenizer, "context_length", 77)),
            },
            versions=library_versions(),
        )

    @property
    def card(self) -> EncoderCard:
        """See :class:`EncoderCard`."""
        return self._card

    def encode_images(self, batch: Any) -> np.ndarray:
        """Preprocessed ``(n, 3, H, W)`` tensor -> float32 unit ``(n, d)``."""
        return encode_image_batch(self.model, batch, self.device, self.precision)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Prompt strings -> float32 unit ``(n, d)`` (open_clip tokenizer, its context length)."""
        return encode_text_batch(self.model, self.tokenizer, texts, self.device, self.precision)
