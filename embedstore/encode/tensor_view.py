"""Tensor implementation of a :class:`~embedstore.store.views.View`: the GPU (or any torch device) twin of
:class:`~embedstore.encode.pil_view.PilTransform`.

Input: uint8 RGB tensors ``(3, H, W)`` on any device (what ``torchvision.io.decode_jpeg`` returns);
output: the normalised float32 model input ``(3, size, size)`` on the same device. The steps are
PilTransform's, in its order, with PIL's arithmetic reproduced exactly:

1. **Geometry** (``squash`` / ``shortest`` + centre crop / ``longest`` + zero pad): the output
   sizes, crop offsets and padding are computed with the same formulas torchvision and open_clip
   apply to PIL images (:func:`plan_geometry`).
2. **Resize** (default ``resample="pil"``): PIL's own two-pass resampling. The filter coefficients
   are computed as Pillow's ``precompute_coeffs`` does (float64, then 22-bit fixed point), the two
   passes run in Pillow's order (:func:`pil_vertical_first`) and the first is rounded and clipped to
   uint8 before the second, and the accumulation is done in int32 exactly as Pillow's
   ``ImagingResample*_8bpc`` does. Integer
   arithmetic gives the same bits on every device. Filters: bicubic, bilinear, lanczos, box,
   hamming (``nearest`` is not supported: :func:`supports` says so and callers use the PIL path).
   ``resample="torchvision"`` instead uses ``torch.nn.functional.interpolate(antialias=True)``
   (what ``torchvision.transforms.v2.functional.resize`` runs), one pass per axis with the same
   uint8 rounding between passes; it is only approximately PIL (see the tolerance below).
3. **Sharpness** (when ``view.sharpness`` is set): PIL ``ImageEnhance.Sharpness``: the degenerate
   image is PIL's ``SMOOTH`` filter ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` rounded to uint8 with the
   border pixels copied unfiltered, then ``Image.blend(degenerate, image, factor)``, which computes
   ``degenerate + factor * (image - degenerate)`` in float32 and *truncates* to uint8 after
   clipping to [0, 255] (torchvision's ``adjust_sharpness`` implements the same filter).
4. ``/ 255`` and ``(x - mean) / std`` in float32, as ``to_tensor`` and ``normalize`` do.

Measured tolerance (against PilTransform on the same decoded pixels, CPU, torch 2.14 /
torchvision 0.29 / Pillow 13; ``tests/unit/test_tensor_view.py`` asserts these bounds):

- ``resample="pil"`` (the default, used by ``embedstore encode --decode gpu``): **bit-exact**,
  max abs difference 0 for the uint8 image, the normalised tensor and the model features, over
  synthetic images of 1-640 px per side, every resize mode, bicubic/bilinear/lanczos/box/hamming,
  sharpness none/0.5/2.0/2.3.
- ``resample="torchvision"``: up to 2 uint8 levels apart before sharpening and 5 after sharpness
  2.0/2.3 (0.2-0.4% of values differ at all), i.e. max abs difference 0.075 in the normalised tensor
  (one level is 1/255/std = 0.015), mean abs difference below 2.5e-4; images of 1-700 px per side.

What remains between the GPU path and the CPU path is the JPEG decoder itself: on the CPU,
``torchvision.io.decode_jpeg`` (libjpeg-turbo) gives the same pixels as Pillow; on a CUDA device it
is nvJPEG, whose IDCT and chroma upsampling differ from libjpeg-turbo by a few levels
(torchvision's own test bounds the mean absolute difference by 2).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from embedstore.store.views import View

log = logging.getLogger(__name__)

RESAMPLERS = ("pil", "torchvision")
PIL_FILTERS = ("bicubic", "bilinear", "lanczos", "box", "hamming")
TORCHVISION_FILTERS = ("bicubic", "bilinear")
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling
# upper bound on the int32 intermediate of one resampling chunk (elements), per device type
_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}


def supports(view: View, resample: str = "pil") -> bool:
    """Whether :class:`TensorView` reproduces ``view`` (its interpolation has a tensor resampler)."""
    if resample not in RESAMPLERS:
        raise ValueError(f"resample: {resample!r} is not one of {', '.join(RESAMPLERS)}")
    filters = PIL_FILTERS if resample == "pil" else TORCHVISION_FILTERS
    return view.interpolation in filters


# ---- geometry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """What :class:`TensorView` does to an ``(H, W)`` image before sharpening.

    Attributes:
        resize: ``(h, w)`` after the resize.
        pad: ``(left, top, right, bottom)`` zero padding applied after the resize.
        crop: ``(top, left)`` of the ``size`` x ``size`` crop taken after padding.
    """

    resize: tuple[int, int]
    pad: tuple[int, int, int, int]
    crop: tuple[int, int]


def _crop_or_pad(h: int, w: int, size: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """torchvision ``center_crop`` / open_clip ``center_crop_or_pad`` offsets for an (h, w) image."""
    pad = (0, 0, 0, 0)
    if size > w or size > h:
        pad = (
            (size - w) // 2 if size > w else 0,
            (size - h) // 2 if size > h else 0,
            (size - w + 1) // 2 if size > w else 0,
            (size - h + 1) // 2 if size > h else 0,
        )
        h, w = h + pad[1] + pad[3], w + pad[0] + pad[2]
    return pad, (int(round((h - size) / 2.0)), int(round((w - size) / 2.0)))


def plan_geometry(view: View, height: int, width: int) -> Geometry:
    """The resize size and crop/pad offsets PilTransform uses for an image of ``height`` x ``width``.

    ``squash``: ``TF.resize(img, [s, s])``. ``shortest``: ``TF.resize(img, s)`` (shortest side to
    ``s``, the other ``int(s * long / short)``), then ``TF.center_crop``. ``longest``: open_clip's
    ``ResizeKeepRatio(s, longest=1)`` (``round(side / max(h / s, w / s))``), then
    ``CenterCropOrPad(s, fill=0)``.
    """
    size = view.size
    if view.resize_mode == "squash":
        return Geometry((size, size), (0, 0, 0, 0), (0, 0))
    if view.resize_mode == "shortest":
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:  # longest: ResizeKeepRatio.get_params with longest=1 and no random scaling
        ratio_h, ratio_w = height / size, width / size
        ratio = max(ratio_h, ratio_w) * 1.0 + min(ratio_h, ratio_w) * (1.0 - 1.0)
        new_h, new_w = round(height * 1.0 / ratio), round(width * 1.0 / ratio)
    pad, crop = _crop_or_pad(new_h, new_w, size)
    return Geometry((new_h, new_w), pad, crop)


# ---- Pillow's resampling coefficients ----------------------------------------------------------
_BICUBIC_A = -0.5
_F054 = 0.5400000214576721  # the C float literals 0.54f and 0.46f of Pillow's hamming filter, as doubles
_F046 = 0.46000000834465027


def _bicubic(x: Any) -> Any:
    a = _BICUBIC_A
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: Any) -> Any:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: Any) -> Any:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _hamming_one(x: float) -> float:
    if x < 0.0:
        x = -x
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F054 + _F046 * math.cos(x))


def _sinc_one(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos_one(x: float) -> float:
    return _sinc_one(x) * _sinc_one(x / 3) if -3.0 <= x < 3.0 else 0.0


def _scalar(fn: Callable[[float], float]) -> Callable[[Any], Any]:
    """Elementwise with the C library's sin/cos (``math``), as Pillow computes them."""
    def apply(x: Any) -> Any:
        return np.array([fn(float(v)) for v in x.ravel()], dtype=np.float64).reshape(x.shape)
    return apply


_FILTERS: dict[str, tuple[Callable[[Any], Any], float]] = {
    "box": (_box, 0.5),
    "bilinear": (_bilinear, 1.0),
    "hamming": (_scalar(_hamming_one), 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_scalar(_lanczos_one), 3.0),
}


@functools.lru_cache(maxsize=1024)
def pil_coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[Any, Any]:
    """Pillow's fixed-point resampling coefficients for one axis: ``precompute_coeffs`` then
    ``normalize_coeffs_8bpc`` (Resample.c), in float64 with Pillow's operation order (the weight
    sum is sequential, as in C).

    Returns ``(xmin, weights)``: int64 ``(out,)`` and int64 ``(out, K)``; output pixel ``i`` is
    ``clip8((sum_t in[xmin[i] + t] * weights[i, t] + 2**21) >> 22)`` (taps past the window are 0).
    """
    filt, base_support = _FILTERS[interpolation]
    scale = filterscale = float(in_size) / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = base_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C (int) truncates
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    position = np.arange(taps, dtype=np.int64)[None, :] + xmin[:, None]
    x = (position.astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    valid = np.arange(taps)[None, :] < count[:, None]
    w = np.where(valid, filt(x), 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # sequential, like ``ww += w``
    w = np.divide(w, total, out=w.copy(), where=total != 0.0)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int64)
    return xmin, fixed


@functools.lru_cache(maxsize=1)
def _pillow_picks_pass_order() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks by more
    than twice as many pixels as the width (newer Pillow does; older ones always go horizontal
    first). Found once by experiment: a resize of a noise image compared with its two-pass forms."""
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 16), dtype=np.uint8)
    image = Image.fromarray(noise, "L")
    one_call = np.asarray(image.resize((12, 8), Image.Resampling.BICUBIC))
    horizontal = image.resize((12, 64), Image.Resampling.BICUBIC).resize((12, 8), Image.Resampling.BICUBIC)
    vertical = image.resize((16, 8), Image.Resampling.BICUBIC).resize((12, 8), Image.Resampling.BICUBIC)
    if np.array_equal(one_call, np.asarray(vertical)) and not np.array_equal(one_call, np.asarray(horizontal)):
        return True
    if not np.array_equal(one_call, np.asarray(horizontal)):
        log.warning("the installed Pillow resizes in an order TensorView does not know; "
                    "its results may differ from PilTransform's")
    return False


def pil_vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow's pass order for a two-pass resize (``ImagingResampleInner``): vertical first when
    ``in_h - out_h > 0`` and ``in_h - out_h > 2 * (in_w - out_w)`` (Pillow 13; always horizontal
    first in older versions, see :func:`_pillow_picks_pass_order`). Each pass rounds to uint8, so
    the order changes the result by up to a level or two."""
    dy = in_h - out_h
    return dy > 0 and dy > (in_w - out_w) * 2 and _pillow_picks_pass_order()


@functools.lru_cache(maxsize=1024)
def _coefficient_tensors(in_size: int, out_size: int, interpolation: str, device: str) -> tuple[Any, Any]:
    """``(index (out, K) int64, weight (out, K) int32)`` on ``device``; unused taps have weight 0."""
    xmin, fixed = pil_coefficients(in_size, out_size, interpolation)
    index = np.minimum(xmin[:, None] + np.arange(fixed.shape[1])[None, :], in_size - 1)
    return (torch.from_numpy(index).to(device),
            torch.from_numpy(fixed.astype(np.int32)).to(device))


def _resample_axis_pil(x: Any, out_size: int, dim: int, interpolation: str) -> Any:
    """Resize uint8 ``x`` (..., H, W) along ``dim`` (-1: width, -2: height) exactly as Pillow's
    8-bit pass does: int32 accumulation, ``+ 2**21 >> 22``, clip to [0, 255]."""
    in_size = x.shape[dim]
    index, weight = _coefficient_tensors(in_size, out_size, interpolation, str(x.device))
    taps = index.shape[1]
    other = -2 if dim == -1 else -1
    limit = _CHUNK_ELEMENTS.get(x.device.type, _CHUNK_ELEMENTS["cuda"])
    planes = max(1, x[..., 0, 0].numel())
    step = max(1, limit // max(1, planes * out_size * taps))
    flat_index = index.reshape(-1)
    parts = []
    for start in range(0, x.shape[other], step):
        part = x.narrow(other, start, min(step, x.shape[other] - start))
        gathered = part.index_select(dim, flat_index).to(torch.int32)
        if dim == -1:  # (..., h, out*K) -> (..., h, out, K)
            gathered = gathered.unflatten(-1, (out_size, taps))
            acc = (gathered * weight).sum(-1, dtype=torch.int32)
        else:  # (..., out*K, w) -> (..., out, K, w)
            gathered = gathered.unflatten(-2, (out_size, taps))
            acc = (gathered * weight.unsqueeze(-1)).sum(-2, dtype=torch.int32)
        acc = torch.bitwise_right_shift(acc + (1 << (PRECISION_BITS - 1)), PRECISION_BITS)
        parts.append(acc.clamp_(0, 255).to(torch.uint8))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=other)


def _resample_axis_torchvision(x: Any, out_size: int, dim: int, interpolation: str) -> Any:
    """Resize uint8 ``x`` along one axis with torch's antialiased interpolate, rounded to uint8.

    Always resizes the last axis of a ``(P, 1, A, B)`` view (the height pass transposes first):
    torch 2.14's CPU antialias kernel returns wrong values for a vertical-only resize of a
    1-pixel-wide image, the horizontal one does not."""
    shape = x.shape
    y = x.reshape(-1, 1, shape[-2], shape[-1])
    if dim == -2:
        y = y.transpose(-1, -2)
    y = F.interpolate(y.float(), size=(y.shape[-2], out_size), mode=interpolation, antialias=True,
                      align_corners=False)
    y = torch.floor(y + 0.5).clamp_(0, 255).to(torch.uint8)
    if dim == -2:
        y = y.transpose(-1, -2)
    return y.reshape(*shape[:-2], y.shape[-2], y.shape[-1]).contiguous()


# ---- sharpness and normalisation ---------------------------------------------------------------
def sharpen(x: Any, factor: float) -> Any:
    """PIL ``ImageEnhance.Sharpness(image).enhance(factor)`` on uint8 ``(..., C, H, W)``, exactly.

    Degenerate = ``SMOOTH`` filter: ``round(sum / 13)`` of the 3x3 window weighted 1 (5 in the
    centre), border rows and columns copied; images under 3x3 are left as they are (Pillow copies
    them). Blend = float32 ``deg + factor * (img - deg)``, clipped, truncated to uint8.
    """
    if x.shape[-1] < 3 or x.shape[-2] < 3 or factor == 1.0:
        return x.clone()
    shape = x.shape
    planes = x.reshape(-1, shape[-2], shape[-1])
    wide = planes.to(torch.int32)
    # 3x3 window sums with weight 5 in the centre, as integer adds (exact on every device)
    height, width = shape[-2] - 2, shape[-1] - 2
    sums = 4 * wide[:, 1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            sums = sums + wide[:, dy:dy + height, dx:dx + width]
    degenerate = wide.clone()
    # round(s / 13), half up as Pillow's "+ 0.5 then truncate"; s / 13 never ends in exactly .5
    degenerate[:, 1:-1, 1:-1] = torch.div(2 * sums + 13, 26, rounding_mode="floor")
    image, smooth = planes.to(torch.float32), degenerate.to(torch.float32)
    alpha = torch.tensor(factor, dtype=torch.float32, device=x.device)
    blended = smooth + alpha * (image - smooth)  # Pillow: float32, separate multiply and add
    return blended.clamp_(0.0, 255.0).trunc_().to(torch.uint8).reshape(shape)


def normalise(x: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 ``(..., 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` (``to_tensor`` + ``normalize``)."""
    # a tensor divisor, not the number 255: CUDA turns division by a Python scalar into a
    # multiplication by its reciprocal (1 ulp off at times); tensors divide exactly, as on the CPU
    y = x.to(torch.float32).div(torch.full((), 255.0, dtype=torch.float32, device=x.device))
    m = torch.as_tensor(list(mean), dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return y.sub_(m).div_(s)


# ---- the view -----------------------------------------------------------------------------------
class TensorView:
    """Callable: uint8 RGB tensors ``(3, H, W)`` (one device) -> float32 ``(n, 3, size, size)``.

    Images of the same size are processed as one batch (one resampling per axis for the group);
    sharpening and normalisation then run once on the whole ``(n, 3, size, size)`` batch. The
    output keeps the input order.
    """

    def __init__(self, view: View, resample: str = "pil"):
        if not supports(view, resample):
            raise ValueError(
                f"TensorView: interpolation {view.interpolation!r} has no {resample!r} tensor resampler "
                f"(supported: {', '.join(PIL_FILTERS if resample == 'pil' else TORCHVISION_FILTERS)})"
            )
        self.view = view
        self.resample = resample
        self._axis = _resample_axis_pil if resample == "pil" else _resample_axis_torchvision

    def accepts(self, height: int, width: int) -> bool:
        """False where PilTransform fails on such an image (a resize to 0 pixels: ``longest`` on
        extreme aspect ratios); callers send those images to the PIL path, which records the error."""
        new_h, new_w = plan_geometry(self.view, height, width).resize
        return height > 0 and width > 0 and new_h > 0 and new_w > 0

    def geometry(self, batch: Any) -> Any:
        """Resize and crop/pad a uint8 batch ``(n, 3, H, W)`` of one size -> ``(n, 3, size, size)``.

        Raises:
            ValueError: the resize would give an empty image (see :meth:`accepts`).
        """
        height, width = int(batch.shape[-2]), int(batch.shape[-1])
        plan = plan_geometry(self.view, height, width)
        new_h, new_w = plan.resize
        if not self.accepts(height, width):
            raise ValueError(f"height and width must be > 0 (a {height}x{width} image resizes to {new_h}x{new_w})")
        interp = self.view.interpolation
        passes = [(new_w, -1)] if new_w != width else []  # Pillow skips a pass whose size is unchanged
        if new_h != height:
            vertical = (new_h, -2)
            passes = [vertical, *passes] if pil_vertical_first(height, width, new_h, new_w) else [*passes, vertical]
        for out_size, dim in passes:
            batch = self._axis(batch, out_size, dim, interp)
        if any(plan.pad):
            left, top, right, bottom = plan.pad
            batch = F.pad(batch, (left, right, top, bottom), mode="constant", value=0)
        top, left = plan.crop
        size = self.view.size
        return batch[..., top:top + size, left:left + size]

    def to_uint8(self, images: Sequence[Any]) -> Any:
        """Geometry and sharpening: the uint8 batch ``(n, 3, size, size)`` (PilTransform.to_pil)."""
        if not images:
            raise ValueError("TensorView: no images")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError(f"TensorView: image {i} is {tuple(image.shape)} {image.dtype}, expected (3, H, W) uint8")
            groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
        size = self.view.size
        out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
        for indices in groups.values():
            batch = torch.stack([images[i] for i in indices]) if len(indices) > 1 else images[indices[0]][None]
            result = self.geometry(batch)
            if len(indices) == len(images):
                out.copy_(result)
            elif len(indices) == 1:
                out[indices[0]].copy_(result[0])
            else:
                out[torch.as_tensor(indices, device=out.device)] = result
        if self.view.sharpness is not None:
            out = sharpen(out, self.view.sharpness)
        return out

    def __call__(self, images: Sequence[Any]) -> Any:
        """Normalised float32 ``(n, 3, size, size)`` on the images' device."""
        return normalise(self.to_uint8(images), self.view.mean, self.view.std)

    def one(self, image: Any) -> Any:
        """A single image ``(3, H, W)`` -> ``(3, size, size)``."""
        return self([image])[0]


def pil_to_tensor(image: Any, device: Optional[str] = None) -> Any:
    """RGB PIL image -> uint8 ``(3, H, W)`` tensor (optionally moved to ``device``)."""
    tensor = torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8))
    tensor = tensor.permute(2, 0, 1).contiguous()
    return tensor if device is None else tensor.to(device)
