"""Small torch helpers shared by the adapters: device choice, autocast, normalisation, versions."""
from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Any, Iterator

import numpy as np

from embedstore.errors import SpecError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"--device {device}: no CUDA GPU is visible (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise SpecError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> fp16 on GPU, fp32 on CPU. Half precision on CPU is refused (slow, inexact)."""
    if precision not in PRECISIONS:
        raise SpecError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if device == "cpu" and precision != "fp32":
        raise SpecError(f"--precision {precision}: only fp32 is supported on the CPU")
    return precision


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for half precision on GPU; a no-op for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def to_unit_numpy(features: Any) -> np.ndarray:
    """float tensor ``(n, d)`` -> float32 numpy, L2-normalised row-wise (computed in fp32)."""
    import torch

    features = features.float()
    features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def as_features(output: Any, what: str) -> Any:
    """Accept a tensor or a transformers output object (``pooler_output``/``*_embeds``)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"{what} returned {type(output).__name__}, which holds no feature tensor")


@contextlib.contextmanager
def inference_mode() -> Iterator[None]:
    """``torch.inference_mode`` as a plain context manager."""
    import torch

    with torch.inference_mode():
        yield


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose updates may change encoded numbers slightly."""
    versions = {}
    for name in ("torch", "torchvision", "open_clip_torch", "transformers", "pillow", "embedstore"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
