"""Adapter for transformers CLIP-family models (``hf:REPO_OR_DIR``).

``CLIPModel`` checkpoints load directly; other architectures (e.g. EVA-CLIP-18B) load through
``AutoModel`` and need ``trust_remote_code``, which is only passed when the user asked for it.
Text is tokenised with the model's tokenizer, padded to the longest prompt and truncated at the
model's maximum length. Models with ``get_text_features`` get the attention mask too; remote-code
models that only expose ``encode_text`` get the input ids alone, as their own examples (and the
seed) call them. The choice is recorded in the encoder card's tokenizer settings.
"""
from __future__ import annotations

import logging
import pickle
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.encode.encoders.torch_utils import (
    as_features,
    autocast,
    inference_mode,
    library_versions,
    to_unit_numpy,
)
from embedstore.errors import SpecError
from embedstore.store.card import EncoderCard, WeightsFile
from embedstore.store.spec import EncoderSpec
from embedstore.store.views import View
from embedstore.util.progress import progress_enabled

log = logging.getLogger(__name__)

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def default_view_from_processor(processor: Any, where: str) -> View:
    """transformers image processor settings -> :class:`View`."""
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    do_crop = bool(getattr(processor, "do_center_crop", False))
    resample = getattr(processor, "resample", 3)
    interpolation = _PIL_RESAMPLE.get(int(getattr(resample, "value", resample)), "bicubic")
    if "shortest_edge" in size:
        side = int(size["shortest_edge"])
        if do_crop and crop and (crop.get("height"), crop.get("width")) != (side, side):
            raise SpecError(f"{where}: resize {side} with crop {crop} is not a supported view")
        mode = "shortest"
    elif "height" in size and size["height"] == size.get("width"):
        side, mode = int(size["height"]), "squash"
    else:
        raise SpecError(f"{where}: image processor size {size} is not a supported view")
    return View(
        resize_mode=mode,
        size=side,
        interpolation=interpolation,
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
    )


class HFEncoder:
    """A transformers CLIP-family model in eval mode on one device."""

    def __init__(
        self,
        spec: EncoderSpec,
        weights: tuple[str, tuple[WeightsFile, ...]],
        device: str = "cpu",
        precision: str = "fp32",
        card: Optional[EncoderCard] = None,
        text_only: bool = False,
    ):
        import torch
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            AutoTokenizer,
            CLIPModel,
            CLIPTextModelWithProjection,
        )

        self.spec = spec
        self.device = device
        self.precision = precision
        remote = spec.trust_remote_code
        where = f"--model {spec.model}"
        if not progress_enabled():  # transformers' own "Loading weights" bar follows ours
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(spec.target, trust_remote_code=remote)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
            self._text_tower_only = text_only and config.model_type == "clip"
            if self._text_tower_only:
                cls = CLIPTextModelWithProjection
            else:
                cls = CLIPModel if config.model_type == "clip" else AutoModel
            extra: dict[str, Any] = {}
            if self._text_tower_only:
                text_config = config.text_config
                text_config.projection_dim = config.projection_dim  # lives on the joint config
                extra["config"] = text_config
            model = cls.from_pretrained(spec.target, trust_remote_code=remote, dtype=dtype, **extra)
            self.tokenizer = AutoTokenizer.from_pretrained(spec.target, trust_remote_code=remote)
            self.processor = None if card is not None else AutoImageProcessor.from_pretrained(
                spec.target, trust_remote_code=remote)
        except (ValueError, OSError, pickle.UnpicklingError) as exc:
            from embedstore.encode.checkpoints import refusal

            refused = refusal(exc, where, spec.target)  # a pickled .bin: the guard's one-line refusal
            if refused is not None:
                raise refused from None
            if not isinstance(exc, ValueError):
                raise SpecError(f"{where}: transformers could not load it: {exc}") from exc
            if "trust_remote_code" in str(exc) and not remote:
                raise SpecError(
                    f"{where}: this model runs code from its repository; pass --trust-remote-code "
                    f"if you trust it ({exc})"
                ) from exc
            raise SpecError(f"{where}: transformers could not load it: {exc}") from exc
        self.model = model.to(device).eval()
        self.max_length = int(getattr(self.tokenizer, "model_max_length", 77))
        if self.max_length > 4096:  # tokenizers without a limit report a huge sentinel
            self.max_length = int(getattr(getattr(config, "text_config", config), "max_position_embeddings", 77))
        self._weights = weights
        self._card = card if card is not None else self._make_card()

    def _make_card(self) -> EncoderCard:
        logit_scale = getattr(self.model, "logit_scale", None)
        return EncoderCard(
            spec=self.spec,
            weights_digest=self._weights[0],
            weights_files=self._weights[1],
            default_view=default_view_from_processor(self.processor, f"--model {self.spec.model}"),
            dim=int(self.encode_texts(["a"]).shape[1]),
            logit_scale=float(logit_scale.exp().item()) if logit_scale is not None else None,
            tokenizer={
                "type": type(self.tokenizer).__name__,
                "padding": "longest",
                "max_length": self.max_length,
                "attention_mask": self._text_uses_mask,
            },
            versions=library_versions(),
        )

    @property
    def card(self) -> EncoderCard:
        """See :class:`EncoderCard`."""
        return self._card

    def _image_features(self, pixel_values: Any) -> Any:
        fn = getattr(self.model, "get_image_features", None)
        if fn is not None:
            return fn(pixel_values=pixel_values)
        if hasattr(self.model, "encode_image"):  # remote-code models such as EVA-CLIP
            return self.model.encode_image(pixel_values)
        raise SpecError(f"--model {self.spec.model}: model has neither get_image_features nor encode_image")

    @property
    def _text_uses_mask(self) -> bool:
        return self._text_tower_only or hasattr(self.model, "get_text_features")

    def _text_features(self, input_ids: Any, attention_mask: Any) -> Any:
        if self._text_tower_only:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        if self._text_uses_mask:
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        if hasattr(self.model, "encode_text"):  # remote-code models take input ids only, as their examples do
            return self.model.encode_text(input_ids)
        raise SpecError(f"--model {self.spec.model}: model has neither get_text_features nor encode_text")

    def encode_images(self, batch: Any) -> np.ndarray:
        """Preprocessed ``(n, 3, H, W)`` tensor -> float32 unit ``(n, d)``."""
        with inference_mode(), autocast(self.device, self.precision):
            x = batch.to(self.device, dtype=self.model.dtype, non_blocking=True)
            return to_unit_numpy(as_features(self._image_features(x), "image features"))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Prompt strings -> float32 unit ``(n, d)`` (padded to the longest prompt)."""
        tokens = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with inference_mode(), autocast(self.device, self.precision):
            out = self._text_features(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
            return to_unit_numpy(as_features(out, "text features"))
