"""TensorView (the device twin of PilTransform) against PilTransform on the CPU.

The stated tolerances (embedstore/encode/tensor_view.py docstring, README "Devices"):
``resample="pil"`` (what ``--decode gpu`` uses) is bit-exact: uint8 image, normalised tensor and
model features all equal. ``resample="torchvision"`` is within TORCHVISION_* below. A test fails
if either regresses.
"""
from __future__ import annotations

import io
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from embedstore.encode.pil_view import PilTransform
from embedstore.encode.tensor_view import (
    PIL_FILTERS,
    TensorView,
    pil_to_tensor,
    pil_vertical_first,
    plan_geometry,
    sharpen,
    supports,
)
from embedstore.store.views import View

# Bounds of resample="torchvision", measured over 40 images of 1-700 px per side (half of them
# JPEG-compressed), squash/shortest/longest, bicubic/bilinear, sizes 64 and 224: 2 levels, 5 after
# sharpening, 0.075 normalised, mean 2.3e-4 (0.24% / 0.35% of values differ at all).
TORCHVISION_MAX_LEVELS = 2  # uint8 levels, no sharpening
TORCHVISION_MAX_LEVELS_SHARP = 5  # uint8 levels after sharpness 2.0 / 2.3
TORCHVISION_MAX_NORMALISED = 0.076  # normalised tensor (5 levels / 255 / std 0.2613 = 0.075)
TORCHVISION_MEAN_NORMALISED = 3e-4

SIZES = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 3), (5, 400), (400, 5), (150, 150), (224, 224), (37, 61),
         (333, 500), (481, 640), (97, 223), (256, 64), (64, 256)]


def photo(seed: int, height: int, width: int, jpeg: bool = False) -> Image.Image:
    """A real-ish RGB image: gradients, soft blobs, stripes and pixel noise (optionally JPEG'd)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(1, height - 1)
    xx /= max(1, width - 1)
    img = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        img[..., c] = rng.uniform(60, 190) + rng.uniform(-90, 90) * xx + rng.uniform(-90, 90) * yy
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
    img += 25 * np.sin(2 * np.pi * rng.uniform(3, 30) * (xx + yy))[..., None]
    img += rng.normal(0, 12, img.shape)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if jpeg:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(60, 95)))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(42)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(2, 520, 2)) for _ in range(8)]
    return [photo(i, h, w, jpeg=i % 2 == 1 and min(h, w) >= 8) for i, (h, w) in enumerate(sizes)]


def compare(view: View, images: list[Image.Image], resample: str = "pil") -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 abs differences, normalised abs differences) of TensorView vs PilTransform."""
    pil, tensor = PilTransform(view), TensorView(view, resample)
    kept = [im for im in images if tensor.accepts(im.height, im.width)]
    ref8 = np.stack([np.asarray(pil.to_pil(im)) for im in kept]).transpose(0, 3, 1, 2).astype(np.int16)
    inputs = [pil_to_tensor(im) for im in kept]
    out8 = tensor.to_uint8(inputs).numpy().astype(np.int16)
    ref = torch.stack([pil(im) for im in kept])
    out = tensor(inputs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    return np.abs(ref8 - out8), (ref - out).abs()


@pytest.mark.parametrize("resize_mode", ["squash", "shortest", "longest"])
@pytest.mark.parametrize("size", [32, 224])
def test_geometry_plan_matches_pil_sizes(resize_mode, size):
    from torchvision.transforms import functional as TF

    view = View(resize_mode=resize_mode, size=size)
    pil = PilTransform(view)
    for h, w in SIZES + [(1000, 3), (3, 1000), (7, 13)]:
        plan = plan_geometry(view, h, w)
        if resize_mode == "shortest":
            image = TF.resize(Image.new("RGB", (w, h)), size)
            assert (image.height, image.width) == plan.resize, (h, w)
        elif resize_mode == "squash":
            assert plan.resize == (size, size)
        if min(plan.resize) > 0:
            assert pil.geometry(Image.new("RGB", (w, h))).size == (size, size)
        else:
            with pytest.raises(ValueError):
                pil.geometry(Image.new("RGB", (w, h)))
            assert not TensorView(view).accepts(h, w)


@pytest.mark.parametrize("resize_mode", ["squash", "shortest", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("sharpness", [None, 2.0, 2.3])
def test_pil_resample_is_bit_exact(images, resize_mode, interpolation, sharpness):
    view = View(resize_mode=resize_mode, size=64, interpolation=interpolation, sharpness=sharpness)
    d8, dn = compare(view, images)
    assert d8.max() == 0
    assert dn.max().item() == 0.0


@pytest.mark.parametrize("interpolation", ["lanczos", "box", "hamming"])
def test_other_pil_filters_bit_exact(images, interpolation):
    for resize_mode, sharpness in [("squash", None), ("shortest", 0.5), ("longest", 2.0)]:
        view = View(resize_mode=resize_mode, size=48, interpolation=interpolation, sharpness=sharpness)
        d8, dn = compare(view, images[:12])
        assert d8.max() == 0 and dn.max().item() == 0.0, (resize_mode, sharpness)


def test_seed_view_at_224_bit_exact(images):
    """processor_23 of the seed: squash 224, bicubic, sharpness 2.3."""
    view = View(resize_mode="squash", size=224, sharpness=2.3)
    d8, dn = compare(view, images[5:14])
    assert d8.max() == 0 and dn.max().item() == 0.0


def test_torchvision_resample_tolerance(images):
    worst = {False: 0, True: 0}
    worst_norm, worst_mean = 0.0, 0.0
    for resize_mode, interpolation, sharpness in itertools.product(
            ["squash", "shortest", "longest"], ["bicubic", "bilinear"], [None, 2.0, 2.3]):
        view = View(resize_mode=resize_mode, size=64, interpolation=interpolation, sharpness=sharpness)
        d8, dn = compare(view, images, resample="torchvision")
        worst[sharpness is not None] = max(worst[sharpness is not None], int(d8.max()))
        worst_norm = max(worst_norm, dn.max().item())
        worst_mean = max(worst_mean, dn.mean().item())
    assert worst[False] <= TORCHVISION_MAX_LEVELS
    assert worst[True] <= TORCHVISION_MAX_LEVELS_SHARP
    assert worst_norm <= TORCHVISION_MAX_NORMALISED
    assert worst_mean <= TORCHVISION_MEAN_NORMALISED


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.7, 2.0, 2.3, 3.7])
def test_sharpen_equals_image_enhance(factor):
    for seed, (h, w) in enumerate([(1, 1), (2, 5), (3, 3), (4, 7), (31, 17), (64, 64)]):
        image = photo(seed, h, w)
        ref = np.asarray(ImageEnhance.Sharpness(image).enhance(factor)).transpose(2, 0, 1)
        out = sharpen(pil_to_tensor(image)[None], factor)[0].numpy()
        np.testing.assert_array_equal(out, ref, err_msg=f"{factor} {h}x{w}")


def test_pass_order_follows_pillow():
    """Pillow rounds to uint8 between its two passes, so their order matters; ours follows it."""
    rng = np.random.default_rng(3)
    from embedstore.encode.tensor_view import _resample_axis_pil

    cases = [(200, 40, 30, 35), (243, 27, 55, 72), (115, 12, 277, 3), (190, 39, 105, 9), (60, 147, 54, 133)]
    cases += [tuple(int(v) for v in rng.integers(2, 160, 4)) for _ in range(30)]
    for h, w, oh, ow in cases:
        if oh == h or ow == w:
            continue
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(arr).resize((ow, oh), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
        if pil_vertical_first(h, w, oh, ow):
            out = _resample_axis_pil(_resample_axis_pil(x, oh, -2, "bicubic"), ow, -1, "bicubic")
        else:
            out = _resample_axis_pil(_resample_axis_pil(x, ow, -1, "bicubic"), oh, -2, "bicubic")
        np.testing.assert_array_equal(out[0].numpy(), ref, err_msg=f"{h}x{w} -> {oh}x{ow}")


def test_batches_group_sizes_and_keep_order(images):
    view = View(resize_mode="shortest", size=40, sharpness=2.0)
    tensor_view = TensorView(view)
    chosen = [images[7], images[2], images[7], images[9], images[2], images[7]]  # repeated sizes
    batch = tensor_view([pil_to_tensor(im) for im in chosen])
    one_by_one = torch.stack([tensor_view.one(pil_to_tensor(im)) for im in chosen])
    assert torch.equal(batch, one_by_one)
    assert torch.equal(batch, torch.stack([PilTransform(view)(im) for im in chosen]))


def test_features_through_tiny_model_equal(images, open_clip_spec):
    from embedstore.encode.encoders import load_encoder

    encoder = load_encoder(open_clip_spec, "cpu", "fp32")
    view = View(resize_mode="squash", size=encoder.card.default_view.size, sharpness=2.3,
                mean=encoder.card.default_view.mean, std=encoder.card.default_view.std)
    kept = images[:16]
    ref = encoder.encode_images(torch.stack([PilTransform(view)(im) for im in kept]))
    exact = encoder.encode_images(TensorView(view)([pil_to_tensor(im) for im in kept]))
    np.testing.assert_array_equal(exact, ref)
    approx = encoder.encode_images(TensorView(view, "torchvision")([pil_to_tensor(im) for im in kept]))
    assert np.abs(approx - ref).max() < 0.02  # measured 2e-3 on this fixture model


def test_support_and_input_checks():
    assert supports(View(interpolation="bicubic"))
    assert all(supports(View(interpolation=f)) for f in PIL_FILTERS)
    assert not supports(View(interpolation="nearest"))
    assert not supports(View(interpolation="lanczos"), "torchvision")
    with pytest.raises(ValueError, match="nearest"):
        TensorView(View(interpolation="nearest"))
    with pytest.raises(ValueError, match="resample"):
        supports(View(), "opencv")
    view = TensorView(View(size=8))
    with pytest.raises(ValueError, match="uint8"):
        view([torch.zeros((3, 8, 8), dtype=torch.float32)])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        view([torch.zeros((1, 8, 8), dtype=torch.uint8)])
    with pytest.raises(ValueError, match="no images"):
        view([])


def test_gpu_decode_import_stays_light():
    """tensor_view imports torch at its top (stage 1); gpu_decode, which the encode loop imports at its
    top, loads it only when a GPU batch is made, so a no-op encode still starts without torch."""
    code = ("import sys, embedstore.encode.gpu_decode; "
            "print(sorted(m for m in ('torch', 'torchvision', 'PIL', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch" not in out and "PIL" not in out, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(images):
    """Same uint8 input on CUDA and CPU: integer resampling and sharpening give the same bits; the
    float normalisation is IEEE division on both."""
    view = View(resize_mode="squash", size=224, sharpness=2.3)
    inputs = [pil_to_tensor(im) for im in images]
    cpu = TensorView(view)(inputs)
    cuda = TensorView(view)([t.cuda() for t in inputs]).cpu()
    assert torch.equal(cpu, cuda)
