"""Bad and unusual images end to end: failures are recorded (never fatal), unusual formats are
encoded, failures are not retried unless the file changes or ``retry_failed``, deleted and
changed images are picked up, and ``embedstore info`` reports failures and source changes."""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedstore import encode_images
from embedstore.cli.main import main
from embedstore.encode.loop import EncodeOptions
from embedstore.encode.sources import decode_image

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

GOOD = {f"good{i}.jpg": colour for i, colour in enumerate(
    [(220, 30, 30), (30, 200, 40), (20, 40, 210), (240, 240, 20)], start=1)}
# bad file -> expected failure type
BAD = {
    "zero.jpg": "EmptyFile",
    "truncated.jpg": "OSError",
    "text.png": "UnidentifiedImageError",
    "bomb.png": "DecompressionBombError",
}
if not IS_ROOT:  # root reads a chmod 000 file anyway
    BAD["unreadable.jpg"] = "PermissionError"
UNUSUAL = ["cmyk.jpg", "gray16.png", "palette.png", "rgba.png", "exif6.jpg", "gray.jpg"]


# ---- image makers -----------------------------------------------------------------------------
def jpeg_bytes(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


def png_bytes(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def solid_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    return jpeg_bytes(Image.new("RGB", size, colour))


def noisy_jpeg(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return jpeg_bytes(Image.fromarray(arr, "RGB"), quality=95)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width*height pixels (> 2 * MAX_IMAGE_PIXELS), a few dozen KB on disk,
    written chunk by chunk so the 4e8-pixel image never exists in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(Image.new("RGB", size, (10, 200, 30)), exif=exif.tobytes())


def gray16_png() -> bytes:
    ramp = np.linspace(0, 65535, 48 * 16).astype(np.uint16).reshape(16, 48)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return png_bytes(image)


def palette_png() -> bytes:
    image = Image.new("P", (32, 24), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    for x in range(16):
        for y in range(24):
            image.putpixel((x, y), 1)
    return png_bytes(image, transparency=0)


def build_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, colour in GOOD.items():
        (root / name).write_bytes(solid_jpeg(colour))
    (root / "zero.jpg").write_bytes(b"")
    whole = noisy_jpeg(0)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "text.png").write_bytes(b"hello" * 100)
    (root / "bomb.png").write_bytes(bomb_png())
    if "unreadable.jpg" in BAD:
        path = root / "unreadable.jpg"
        path.write_bytes(solid_jpeg((1, 2, 3)))
        path.chmod(0)
    cmyk = Image.new("CMYK", (40, 32), (0, 255, 255, 0))
    (root / "cmyk.jpg").write_bytes(jpeg_bytes(cmyk))
    (root / "gray16.png").write_bytes(gray16_png())
    (root / "palette.png").write_bytes(palette_png())
    (root / "rgba.png").write_bytes(png_bytes(Image.new("RGBA", (40, 32), (0, 0, 255, 100))))
    (root / "exif6.jpg").write_bytes(exif_jpeg((60, 30), 6))
    (root / "gray.jpg").write_bytes(jpeg_bytes(Image.new("L", (40, 32), 90)))
    return root


def restore_permissions(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def first_run(root: Path, spec, options: EncodeOptions) -> SimpleNamespace:  # noqa: ANN001
    from embedstore import Cache

    folder = build_folder(root / "weird")
    cache = Cache(root / "cache")
    result = encode_images(folder, spec, cache, options=options)
    return SimpleNamespace(folder=folder, cache=cache, spec=spec, options=options, result=result)


def read_store(state: SimpleNamespace):  # noqa: ANN201
    return state.cache.open_image_store(state.result.dataset, state.spec)


def rows_by_key(state: SimpleNamespace) -> dict[str, np.ndarray]:
    rows = read_store(state).read()
    return dict(zip(rows.keys, rows.features))


def touch_later(path: Path) -> None:
    """Make sure the mtime moves even on a coarse-clock file system."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def fast_encode_options() -> EncodeOptions:
    return EncodeOptions(device="cpu", workers=0, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, open_clip_spec):  # noqa: ANN001
    """The bad-images folder encoded once, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("bad_images")
    state = first_run(root, open_clip_spec, fast_encode_options())
    yield state
    restore_permissions(state.folder)


@pytest.fixture()
def fresh(tmp_path: Path, open_clip_spec, fast_options):  # noqa: ANN001
    """A private copy of the scenario (folder + encoded cache) for tests that change things."""
    state = first_run(tmp_path, open_clip_spec, fast_options)
    yield state
    restore_permissions(state.folder)


# ---- first run --------------------------------------------------------------------------------
def test_bad_files_recorded_as_failures(encoded) -> None:  # noqa: ANN001
    result = encoded.result
    assert set(result.failures) == set(BAD)
    manifest_failures = read_store(encoded).manifest()["failures"]
    assert set(manifest_failures) == set(BAD)
    for key, kind in BAD.items():
        for record in (result.failures[key], manifest_failures[key]):
            assert record["type"] == kind, (key, record)
            assert isinstance(record["message"], str) and record["message"].strip(), (key, record)
    assert "truncated" in manifest_failures["truncated.jpg"]["message"].lower()
    assert not set(BAD) & set(rows_by_key(encoded))  # no row for a failed key


@pytest.mark.skipif(IS_ROOT, reason="root can read a chmod 000 file")
def test_unreadable_file_recorded(encoded) -> None:  # noqa: ANN001
    record = read_store(encoded).manifest()["failures"]["unreadable.jpg"]
    assert record["type"] == "PermissionError" and record["message"]


def test_unusual_images_encoded(encoded) -> None:  # noqa: ANN001
    rows = rows_by_key(encoded)
    for key in UNUSUAL:
        assert key in rows, key
        features = rows[key]
        assert np.isfinite(features).all(), key
        assert abs(float(np.linalg.norm(features)) - 1.0) < 1e-2, key


def test_run_not_stopped_by_bad_files(encoded) -> None:  # noqa: ANN001
    result = encoded.result
    rows = rows_by_key(encoded)
    assert set(rows) == set(GOOD) | set(UNUSUAL)
    for key in GOOD:
        assert np.isfinite(rows[key]).all() and abs(float(np.linalg.norm(rows[key])) - 1.0) < 1e-2
    assert result.failed == len(BAD)
    assert result.encoded == len(GOOD) + len(UNUSUAL)
    assert result.rows == len(GOOD) + len(UNUSUAL)
    assert result.cached == 0 and result.skipped_failed == 0 and result.dropped == 0
    # distinct images give distinct features (the model really saw each one)
    feats = np.stack([rows[k] for k in sorted(rows)])
    assert len({f.tobytes() for f in feats.astype(np.float16)}) == len(rows)


def test_decoded_images_as_encoded(encoded) -> None:  # noqa: ANN001
    folder = encoded.folder
    assert decode_image(exif_jpeg((60, 30), 6)).size == (30, 60)
    assert decode_image((folder / "exif6.jpg").read_bytes()).size == (30, 60)
    gray16 = np.asarray(decode_image((folder / "gray16.png").read_bytes()))
    assert gray16.shape == (16, 48, 3)
    assert gray16.min() <= 2 and gray16.max() >= 253 and 100 < gray16.mean() < 155
    clear = decode_image(png_bytes(Image.new("RGBA", (12, 8), (0, 0, 0, 0))))
    assert clear.mode == "RGB" and (np.asarray(clear) == 255).all()
    palette = np.asarray(decode_image((folder / "palette.png").read_bytes()))
    assert tuple(palette[0, 0]) == (255, 0, 0) and tuple(palette[0, -1]) == (255, 255, 255)
    cmyk = np.asarray(decode_image((folder / "cmyk.jpg").read_bytes()), dtype=float).reshape(-1, 3).mean(axis=0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60


# ---- later runs -------------------------------------------------------------------------------
def test_failures_skipped_then_retried(fresh) -> None:  # noqa: ANN001
    again = encode_images(fresh.folder, fresh.spec, fresh.cache, options=fresh.options)
    assert again.skipped_failed == len(BAD)
    assert again.encoded == 0 and again.failed == 0
    assert again.cached == len(GOOD) + len(UNUSUAL)
    assert set(again.failures) == set(BAD)

    retry = dataclasses.replace(fresh.options, retry_failed=True)
    retried = encode_images(fresh.folder, fresh.spec, fresh.cache, options=retry)
    assert retried.skipped_failed == 0
    assert retried.failed == len(BAD) and retried.encoded == 0
    assert {k: v["type"] for k, v in retried.failures.items()} == BAD
    assert set(read_store(fresh).manifest()["failures"]) == set(BAD)


def test_fixed_file_encoded_without_retry(fresh) -> None:  # noqa: ANN001
    path = fresh.folder / "zero.jpg"
    path.write_bytes(solid_jpeg((120, 50, 200)))
    touch_later(path)
    result = encode_images(fresh.folder, fresh.spec, fresh.cache, options=fresh.options)
    assert result.encoded == 1 and result.failed == 0
    assert result.skipped_failed == len(BAD) - 1
    assert "zero.jpg" not in result.failures
    assert "zero.jpg" not in read_store(fresh).manifest()["failures"]
    rows = rows_by_key(fresh)
    assert "zero.jpg" in rows and abs(float(np.linalg.norm(rows["zero.jpg"])) - 1.0) < 1e-2


def test_deleted_image_dropped(fresh) -> None:  # noqa: ANN001
    before = rows_by_key(fresh)
    assert "good2.jpg" in before
    (fresh.folder / "good2.jpg").unlink()
    result = encode_images(fresh.folder, fresh.spec, fresh.cache, options=fresh.options)
    assert result.dropped == 1 and result.encoded == 0
    after = rows_by_key(fresh)
    assert "good2.jpg" not in after
    assert set(after) == set(before) - {"good2.jpg"}
    assert read_store(fresh).manifest()["rows"] == len(before) - 1


def test_deleted_failure_forgotten(fresh) -> None:  # noqa: ANN001
    (fresh.folder / "text.png").unlink()
    result = encode_images(fresh.folder, fresh.spec, fresh.cache, options=fresh.options)
    assert result.dropped == 0  # a failure record is forgotten, but no row was dropped
    assert "text.png" not in result.failures
    assert "text.png" not in read_store(fresh).manifest()["failures"]


def test_changed_image_reencoded(fresh) -> None:  # noqa: ANN001
    before = rows_by_key(fresh)
    path = fresh.folder / "good1.jpg"
    path.write_bytes(noisy_jpeg(5, size=(40, 32)))
    touch_later(path)
    result = encode_images(fresh.folder, fresh.spec, fresh.cache, options=fresh.options)
    assert result.encoded == 1 and result.failed == 0
    assert result.cached == len(GOOD) + len(UNUSUAL) - 1
    after = rows_by_key(fresh)
    assert set(after) == set(before)
    assert not np.allclose(after["good1.jpg"], before["good1.jpg"], atol=1e-2)
    for key in before:
        if key != "good1.jpg":
            np.testing.assert_array_equal(after[key], before[key])


def test_info_lists_failures_and_source_changes(fresh) -> None:  # noqa: ANN001
    def info() -> str:
        out = CliRunner().invoke(main, ["info", "--cache", str(fresh.cache.root)], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        return out.output

    first = info()
    assert f"failures ({len(BAD)})" in first
    failure_lines = {line.split()[1]: line for line in first.splitlines()
                     if line.startswith(fresh.result.dataset + " ") and len(line.split()) > 2 and line.split()[1] in BAD}
    assert set(failure_lines) == set(BAD)
    for key, kind in BAD.items():
        assert kind in failure_lines[key], failure_lines[key]
    assert "unchanged" in first

    (fresh.folder / "new.jpg").write_bytes(solid_jpeg((90, 90, 90)))
    changed = info()
    assert "changed (1 new, 0 modified, 0 deleted)" in changed
    assert "unchanged" not in changed

    result = encode_images(fresh.folder, fresh.spec, fresh.cache, options=fresh.options)
    assert result.encoded == 1
    final = info()
    assert "unchanged" in final and "changed (" not in final
    assert f"failures ({len(BAD)})" in final


def test_info_reports_modified_and_deleted(fresh) -> None:  # noqa: ANN001
    (fresh.folder / "good3.jpg").unlink()
    path = fresh.folder / "good4.jpg"
    path.write_bytes(solid_jpeg((1, 1, 1)))
    touch_later(path)
    zero = fresh.folder / "zero.jpg"  # a failed file that changed counts as modified
    zero.write_bytes(solid_jpeg((2, 2, 2)))
    out = CliRunner().invoke(main, ["info", "--cache", str(fresh.cache.root)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "changed (0 new, 2 modified, 1 deleted)" in out.output
