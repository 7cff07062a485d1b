"""Image sources without a model: folder and list-file listing, labels, natural order, list-file
errors, decoding of bad and unusual images, and change detection (``plan_updates``)."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedstore.encode.loop import plan_updates
from embedstore.encode.sources import (
    ImageLoadError,
    decode_image,
    hash_file,
    list_source,
)
from embedstore.errors import SourceError
from embedstore.store.store import RowMeta


# ---- helpers ----------------------------------------------------------------------------------
def jpeg_bytes(size: tuple[int, int] = (24, 16), colour: tuple[int, int, int] = (200, 40, 40), **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", **save)
    return buf.getvalue()


def png_bytes(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def write_jpeg(path: Path, colour: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(size, colour))
    return path


def bomb_png_bytes(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width x height`` built without holding the image in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_jpeg_bytes(size: tuple[int, int], orientation: int) -> bytes:
    image = Image.new("RGB", size, (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def keys(source) -> list[str]:  # noqa: ANN001
    return [item.key for item in source.items]


# ---- folders ----------------------------------------------------------------------------------
def test_labelled_folder(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "cats" / "a.jpg")
    write_jpeg(tmp_path / "cats" / "b.jpg")
    write_jpeg(tmp_path / "dogs" / "a.png")
    write_jpeg(tmp_path / "dogs" / "deeper" / "c.jpeg")  # label is the first-level folder
    source = list_source(tmp_path)
    assert source.labelled
    assert keys(source) == ["cats/a.jpg", "cats/b.jpg", "dogs/a.png", "dogs/deeper/c.jpeg"]
    assert [item.label for item in source.items] == ["cats", "cats", "dogs", "dogs"]
    assert source.classes == ["cats", "dogs"]
    assert source.default_name == tmp_path.name
    item = source.items[0]
    assert Path(item.path) == (tmp_path / "cats" / "a.jpg").resolve()
    st = os.stat(item.path)
    assert (item.state.size, item.state.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "x.jpg")
    write_jpeg(tmp_path / "y.jpg")
    source = list_source(tmp_path)
    assert not source.labelled
    assert keys(source) == ["x.jpg", "y.jpg"]
    assert all(item.label is None for item in source.items)
    assert source.classes == []


def test_mixed_folder_is_unlabelled(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "root.jpg")
    write_jpeg(tmp_path / "cats" / "a.jpg")
    source = list_source(tmp_path)
    assert not source.labelled
    assert keys(source) == ["cats/a.jpg", "root.jpg"]
    assert all(item.label is None for item in source.items)


def test_natural_key_order(tmp_path: Path) -> None:
    for i in (10, 3, 12, 1, 2, 11, 5, 4, 9, 7, 6, 8):
        write_jpeg(tmp_path / f"img{i}.jpg")
    source = list_source(tmp_path)
    assert keys(source) == [f"img{i}.jpg" for i in range(1, 13)]


def test_hidden_and_non_image_files_skipped(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "a" / "keep.jpg")
    write_jpeg(tmp_path / "a" / "UPPER.JPG")
    write_jpeg(tmp_path / "a" / ".hidden.jpg")
    write_jpeg(tmp_path / ".cache" / "inside.jpg")
    write_jpeg(tmp_path / "a" / ".secret" / "inside.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "data.npy").write_bytes(b"\x93NUMPY")
    (tmp_path / "a" / "noext").write_bytes(jpeg_bytes())
    source = list_source(tmp_path)
    assert len(source) == 2
    assert set(keys(source)) == {"a/keep.jpg", "a/UPPER.JPG"}
    assert source.labelled and source.classes == ["a"]


def test_missing_location(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such folder"):
        list_source(tmp_path / "nope")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(SourceError, match="no images found"):
        list_source(tmp_path / "empty")


# ---- list files -------------------------------------------------------------------------------
def test_txt_list(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "imgs" / "b10.jpg")
    write_jpeg(tmp_path / "imgs" / "b2.jpg")
    write_jpeg(tmp_path / "other" / "c.jpg")
    elsewhere = write_jpeg(tmp_path / "far" / "abs.jpg")
    lists = tmp_path / "lists"
    lists.mkdir()
    write_jpeg(lists / "local.jpg")
    listing = lists / "my-list.txt"
    listing.write_text(
        "# a comment\n"
        "\n"
        "../imgs/b10.jpg\n"
        "   local.jpg   \n"
        "# ../other/c.jpg  (commented out)\n"
        "../imgs/b2.jpg\n"
        "\n"
        f"{elsewhere}\n"
    )
    source = list_source(listing)
    assert not source.labelled
    assert source.default_name == "my-list"
    paths = {Path(item.path).resolve() for item in source.items}
    assert paths == {
        (tmp_path / "imgs" / "b10.jpg").resolve(),
        (tmp_path / "imgs" / "b2.jpg").resolve(),
        (lists / "local.jpg").resolve(),
        elsewhere.resolve(),
    }
    assert all(item.state.size > 0 for item in source.items)  # found relative to the list's folder
    assert all(item.label is None for item in source.items)
    assert "local.jpg" in keys(source)
    assert keys(source).index(next(k for k in keys(source) if k.endswith("b2.jpg"))) < keys(source).index(
        next(k for k in keys(source) if k.endswith("b10.jpg"))
    )


def test_csv_list_with_labels(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "x1.jpg")
    write_jpeg(tmp_path / "x2.jpg")
    write_jpeg(tmp_path / "sub" / "x3.jpg")
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\nx2.jpg,dog\nsub/x3.jpg, cat \nx1.jpg,cat\n")
    source = list_source(listing)
    assert source.labelled
    assert keys(source) == ["sub/x3.jpg", "x1.jpg", "x2.jpg"]
    assert [item.label for item in source.items] == ["cat", "cat", "dog"]
    assert source.classes == ["cat", "dog"]
    assert all(item.state.size > 0 for item in source.items)


def test_csv_list_path_only(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "x1.jpg")
    write_jpeg(tmp_path / "x2.jpg")
    listing = tmp_path / "plain.csv"
    listing.write_text("path\nx2.jpg\nx1.jpg\n")
    source = list_source(listing)
    assert not source.labelled
    assert keys(source) == ["x1.jpg", "x2.jpg"]
    assert all(item.label is None for item in source.items)


def test_csv_without_path_column(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "x1.jpg")
    listing = tmp_path / "bad-columns.csv"
    listing.write_text("file,label\nx1.jpg,cat\n")
    with pytest.raises(SourceError) as info:
        list_source(listing)
    assert "bad-columns.csv" in str(info.value)
    assert "'path'" in str(info.value)


def test_csv_empty_label_names_line(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "x1.jpg")
    write_jpeg(tmp_path / "x2.jpg")
    listing = tmp_path / "gap.csv"
    listing.write_text("path,label\nx1.jpg,cat\nx2.jpg,\n")
    with pytest.raises(SourceError) as info:
        list_source(listing)
    assert "gap.csv:3" in str(info.value)
    assert "label" in str(info.value)


@pytest.mark.parametrize("suffix,text", [
    (".txt", "a.jpg\nsub/../a.jpg\n"),
    (".csv", "path,label\na.jpg,x\n./a.jpg,y\n"),
], ids=["txt", "csv"])
def test_duplicate_in_list(tmp_path: Path, suffix: str, text: str) -> None:
    write_jpeg(tmp_path / "a.jpg")
    (tmp_path / "sub").mkdir()
    listing = tmp_path / f"dups{suffix}"
    listing.write_text(text)
    with pytest.raises(SourceError, match="listed twice"):
        list_source(listing)


def test_empty_list_file(tmp_path: Path) -> None:
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing here\n\n")
    with pytest.raises(SourceError, match="no images found"):
        list_source(listing)


# ---- decode_image -----------------------------------------------------------------------------
def decode_error(data: bytes) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        decode_image(data)
    assert info.value.kind and info.value.message
    return info.value


def test_decode_good_jpeg() -> None:
    image = decode_image(jpeg_bytes((24, 16), (200, 40, 40)))
    assert image.mode == "RGB" and image.size == (24, 16)
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 90 and b < 90


def test_decode_empty() -> None:
    assert decode_error(b"").kind == "EmptyFile"


def test_decode_truncated_jpeg() -> None:
    data = jpeg_bytes((64, 64), (10, 20, 30), quality=95)
    err = decode_error(data[: len(data) // 2])
    assert err.kind == "OSError"
    assert "truncated" in err.message.lower()


def test_decode_not_an_image() -> None:
    assert decode_error(b"hello" * 100).kind == "UnidentifiedImageError"


def test_decode_bomb() -> None:
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS  # the default limit is on
    data = bomb_png_bytes()
    assert len(data) < 1_000_000
    err = decode_error(data)
    assert err.kind == "DecompressionBombError"


def test_decode_cmyk_jpeg() -> None:
    buf = io.BytesIO()
    Image.new("CMYK", (20, 12), (0, 255, 255, 0)).save(buf, "JPEG")  # pure red in CMYK
    image = decode_image(buf.getvalue())
    assert image.mode == "RGB" and image.size == (20, 12)
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_decode_grayscale_jpeg() -> None:
    buf = io.BytesIO()
    Image.new("L", (20, 12), 100).save(buf, "JPEG")
    image = decode_image(buf.getvalue())
    assert image.mode == "RGB" and image.size == (20, 12)
    assert np.allclose(np.asarray(image, dtype=float), 100, atol=3)


def test_decode_16bit_spans_full_range() -> None:
    ramp = np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64)
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    image = decode_image(png_bytes(source))
    arr = np.asarray(image)
    assert image.mode == "RGB" and image.size == (64, 8)
    assert arr.min() <= 2 and arr.max() >= 253
    assert 100 < arr.mean() < 155  # a ramp, not clipped to white
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_decode_exif_rotation() -> None:
    image = decode_image(exif_jpeg_bytes((60, 30), orientation=6))
    assert image.size == (30, 60)
    assert decode_image(exif_jpeg_bytes((60, 30), orientation=1)).size == (60, 30)


def test_decode_transparent_rgba_is_white() -> None:
    image = decode_image(png_bytes(Image.new("RGBA", (10, 6), (0, 0, 0, 0))))
    assert image.mode == "RGB"
    assert (np.asarray(image) == 255).all()


def test_decode_half_transparent_rgba_blends_over_white() -> None:
    image = decode_image(png_bytes(Image.new("RGBA", (10, 6), (0, 0, 0, 128))))
    assert np.allclose(np.asarray(image, dtype=float), 127, atol=2)


def test_decode_palette_with_transparency() -> None:
    image = Image.new("P", (10, 6), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putpixel((0, 0), 1)
    data = png_bytes(image, transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    out = np.asarray(decode_image(data))
    assert tuple(out[0, 0]) == (255, 0, 0)  # opaque red pixel kept
    assert tuple(out[5, 9]) == (255, 255, 255)  # transparent black becomes white, not black


# ---- plan_updates -----------------------------------------------------------------------------
@pytest.fixture()
def planned(tmp_path: Path):
    """A labelled folder of three images and RowMeta rows matching it."""
    for name, colour in (("a", (1, 2, 3)), ("b", (50, 60, 70)), ("c", (200, 100, 0))):
        write_jpeg(tmp_path / "cls" / f"{name}.jpg", colour)
    source = list_source(tmp_path)
    meta = {
        item.key: RowMeta(item.label, item.state.size, item.state.mtime_ns, hash_file(item.path))
        for item in source.items
    }
    return tmp_path, source, meta


def todo_keys(plan) -> list[str]:  # noqa: ANN001
    return [item.key for item in plan.todo]


def test_plan_unchanged(planned) -> None:  # noqa: ANN001
    _, source, meta = planned
    plan = plan_updates(source, meta, {})
    assert todo_keys(plan) == [] and plan.dropped == [] and plan.cached == 3 and plan.skipped_failed == 0
    plan = plan_updates(source, meta, {}, strict=True)
    assert todo_keys(plan) == [] and plan.cached == 3


def test_plan_new_key(planned) -> None:  # noqa: ANN001
    _, source, meta = planned
    del meta["cls/b.jpg"]
    plan = plan_updates(source, meta, {})
    assert todo_keys(plan) == ["cls/b.jpg"] and plan.cached == 2


def test_plan_size_changed(planned) -> None:  # noqa: ANN001
    _, source, meta = planned
    old = meta["cls/a.jpg"]
    meta["cls/a.jpg"] = RowMeta(old.label, old.size + 1, old.mtime_ns, old.hash)
    plan = plan_updates(source, meta, {})
    assert todo_keys(plan) == ["cls/a.jpg"] and plan.cached == 2 and plan.dropped == []


def test_plan_mtime_changed(planned) -> None:  # noqa: ANN001
    _, source, meta = planned
    old = meta["cls/c.jpg"]
    meta["cls/c.jpg"] = RowMeta(old.label, old.size, old.mtime_ns - 1_000_000_000, old.hash)
    plan = plan_updates(source, meta, {})
    assert todo_keys(plan) == ["cls/c.jpg"] and plan.cached == 2


def test_plan_label_changed(planned) -> None:  # noqa: ANN001
    _, source, meta = planned
    old = meta["cls/b.jpg"]
    meta["cls/b.jpg"] = RowMeta("other", old.size, old.mtime_ns, old.hash)
    plan = plan_updates(source, meta, {})
    assert todo_keys(plan) == ["cls/b.jpg"] and plan.cached == 2


def test_plan_deleted_key(planned) -> None:  # noqa: ANN001
    root, _, meta = planned
    (root / "cls" / "b.jpg").unlink()
    source = list_source(root)
    failures = {"cls/gone.jpg": {"type": "OSError", "message": "x", "size": 1, "mtime_ns": 1}}
    plan = plan_updates(source, meta, failures)
    assert todo_keys(plan) == [] and plan.cached == 2
    assert sorted(plan.dropped) == ["cls/b.jpg", "cls/gone.jpg"]


def failure_for(item, **override) -> dict:  # noqa: ANN001
    record = {"type": "OSError", "message": "broken", "size": item.state.size, "mtime_ns": item.state.mtime_ns}
    record.update(override)
    return record


def test_plan_failure_skipped_when_file_unchanged(planned) -> None:  # noqa: ANN001
    _, source, meta = planned
    item = source.items[1]
    del meta[item.key]
    plan = plan_updates(source, meta, {item.key: failure_for(item)})
    assert todo_keys(plan) == [] and plan.skipped_failed == 1 and plan.cached == 2 and plan.dropped == []


@pytest.mark.parametrize("field", ["size", "mtime_ns"])
def test_plan_failure_retried_when_file_changed(planned, field: str) -> None:  # noqa: ANN001
    _, source, meta = planned
    item = source.items[1]
    del meta[item.key]
    failure = failure_for(item, **{field: getattr(item.state, field) - 1})
    plan = plan_updates(source, meta, {item.key: failure})
    assert todo_keys(plan) == [item.key] and plan.skipped_failed == 0


def test_plan_failure_retried_with_retry_failed(planned) -> None:  # noqa: ANN001
    _, source, meta = planned
    item = source.items[1]
    del meta[item.key]
    plan = plan_updates(source, meta, {item.key: failure_for(item)}, retry_failed=True)
    assert todo_keys(plan) == [item.key] and plan.skipped_failed == 0 and plan.cached == 2


def test_plan_strict_detects_same_size_same_mtime_change(planned) -> None:  # noqa: ANN001
    root, _, meta = planned
    path = root / "cls" / "a.jpg"
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same length, different content
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    source = list_source(root)
    item = next(i for i in source.items if i.key == "cls/a.jpg")
    assert (item.state.size, item.state.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert todo_keys(plan_updates(source, meta, {})) == []  # size+mtime cannot see it
    plan = plan_updates(source, meta, {}, strict=True)
    assert todo_keys(plan) == ["cls/a.jpg"] and plan.cached == 2
