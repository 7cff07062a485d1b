"""Image files as query vectors: encoded exactly as a store's rows were (same encoder, view, decoder).

Stage 1 (it loads the model); the query itself is :mod:`embedstore.score.query`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from embedstore.encode.loop import EncoderHandle
from embedstore.encode.pil_view import PilTransform
from embedstore.encode.sources import ImageLoadError, decode_image, read_bytes
from embedstore.errors import SpecError
from embedstore.store.cache import Cache
from embedstore.store.fingerprint import image_fingerprint
from embedstore.store.spec import EncoderSpec
from embedstore.store.store import Store, fingerprint_differences
from embedstore.store.views import View
from embedstore.util.arrays import unit_rows

__all__ = ["image_vectors"]


def image_vectors(cache: Cache, spec: EncoderSpec, store: Store, paths: Sequence[str | os.PathLike[str]],
                  device: str = "auto") -> np.ndarray:
    """Encode image files exactly as the store's rows were encoded (same encoder, view, decoder).

    Raises:
        SpecError: the store's settings cannot be reproduced (weights changed, other decoder), or
            an image cannot be read (the message names the file).
    """
    manifest = store.manifest()
    handle = EncoderHandle(spec, cache, device)
    view = View.from_dict(manifest["fingerprint"]["view"])
    diffs = fingerprint_differences(manifest["fingerprint"], image_fingerprint(handle.card, view, manifest["dtype"]))
    if diffs:
        lines = "; ".join(f"{f}: store has {a!r}, now {b!r}" for f, a, b in diffs[:5])
        raise SpecError(f"--image: cannot encode images the way {store.what} was encoded ({lines})")
    transform = PilTransform(view)
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(decode_image(read_bytes(str(path)))))
        except ImageLoadError as exc:
            raise SpecError(f"--image {path}: {exc}") from None
    return unit_rows(handle.get().encode_images(torch.stack(tensors)))
