"""Shard sources end to end: WebDataset tars, Parquet files and saved Hugging Face datasets give
the same stored features as the same images in a folder, bit for bit; broken members are
recorded per key; resume, change detection (size/mtime, --strict) and torchrun ranks work per
shard; truncated tars and bad columns are clear errors."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from embedstore import Cache
from embedstore.encode.distributed import Partition
from embedstore.encode.loop import EncodeOptions, encode_images, merge_partitions
from embedstore.encode.sources_shards import (
    ShardOptions,
    list_shard_source,
    resolve_source,
)
from embedstore.encode.toy import TOY_CLASSES, make_image_folder
from embedstore.errors import SourceError

CLASSES = sorted(TOY_CLASSES)
BROKEN = {  # the same bytes in the folder and in the shards: recorded the same way
    "Sea/broken.jpg": b"\xff\xd8 not really a jpeg",
    "Sea/eps.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
}


def _options(**kw: object) -> EncodeOptions:
    # batch 1: an image's features do not depend on which images share its forward pass
    return EncodeOptions(**{"device": "cpu", "workers": 0, "batch_size": 1, "progress": False, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A labelled folder of 204 JPEGs plus broken files, and the same images as 4 tars."""
    root = tmp_path_factory.mktemp("shards")
    folder = make_image_folder(root / "scenes", per_class=34, seed=3)
    good = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    truncated = (folder / good[0]).read_bytes()[:300]
    broken = {**BROKEN, "Sea/truncated.jpg": truncated}
    for key, payload in broken.items():
        (folder / key).write_bytes(payload)
    keys = sorted(good + list(broken))
    tars = root / "tars"
    tars.mkdir()
    for s in range(4):
        write_tar(tars / f"{s:05d}.tar", [(k, (folder / k).read_bytes()) for k in keys[s::4]])
    return {"root": root, "folder": folder, "keys": keys, "good": good, "broken": broken, "tars": tars}


def write_tar(path: Path, samples: list[tuple[str, bytes]], cls: bool = True, extra: bool = True) -> None:
    """WebDataset layout: ``Sea/img3.jpg``, ``Sea/img3.cls`` (class index), ``Sea/img3.json``."""
    with tarfile.open(path, "w") as tar:
        for key, payload in samples:
            stem = key.rsplit(".", 1)[0]
            members = [(f"{stem}.jpg", payload)]
            if cls:
                members.append((f"{stem}.cls", str(CLASSES.index(key.split("/")[0])).encode()))
            if extra:
                members.append((f"{stem}.json", json.dumps({"class": key.split("/")[0]}).encode()))
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory: pytest.TempPathFactory, data, open_clip_spec) -> dict[str, object]:
    """The folder encoded once: ``rows`` (folder key without extension -> (features, label)), ``failures``."""
    cache = Cache(tmp_path_factory.mktemp("folder_cache"))
    encode_images(data["folder"], open_clip_spec, cache, options=_options())
    store = cache.open_image_store("scenes", open_clip_spec)
    rows = store.read(as_float32=False)
    return {"rows": {k.rsplit(".", 1)[0]: (rows.features[i], rows.labels[i]) for i, k in enumerate(rows.keys)},
            "failures": store.manifest()["failures"]}


def assert_same(expected: dict[str, tuple[np.ndarray, str]], rows, strip: int) -> None:
    """``rows`` (keys ``<shard>/<key>`` with ``strip`` leading parts) hold exactly ``expected``."""
    def folder_key(key: str) -> str:
        key = key.split("/", strip)[-1]
        return key.rsplit(".", 1)[0] if "." in key.split("/")[-1] else key

    got = {folder_key(k): (rows.features[i], rows.labels[i]) for i, k in enumerate(rows.keys)}
    assert sorted(got) == sorted(expected)
    for key, (features, label) in expected.items():
        assert got[key][1] == label, key
        assert np.array_equal(got[key][0], features), key  # bit for bit


@pytest.mark.parametrize("decode, workers", [("cpu", 0), ("cpu", 2), ("gpu", 2)])
def test_tars_store_the_same_features_as_the_folder(tmp_path, data, folder_store, open_clip_spec, decode, workers):
    cache = Cache(tmp_path / "c")
    expected, folder_failures = folder_store["rows"], folder_store["failures"]
    source = list_shard_source([f"{data['tars']}/{{00000..00003}}.tar"], ShardOptions(classes=tuple(CLASSES)))
    assert source.default_name == "tars" and source.location.startswith(f"{data['tars'].as_posix()}/*.tar#classes=names:6:")
    assert source.items[0].key.startswith("00000.tar/") and source.labelled
    result = encode_images(source, open_clip_spec, cache, options=_options(decode=decode, workers=workers))
    assert result.encoded == len(data["good"]) and result.failed == len(data["broken"])
    store = cache.open_image_store("tars", open_clip_spec)
    assert_same(expected, store.read(as_float32=False), strip=1)
    failures = store.manifest()["failures"]
    for key in data["broken"]:
        shard = f"{data['keys'].index(key) % 4:05d}.tar"
        tar_key = f"{shard}/{key.rsplit('.', 1)[0]}"
        assert failures[tar_key]["type"] == folder_failures[key]["type"], key
        assert failures[tar_key]["size"] == (data["tars"] / shard).stat().st_size  # the shard's state
    again = encode_images(source, open_clip_spec, cache, options=_options(decode=decode, workers=workers))
    assert again.encoded == 0 and again.cached == len(data["good"]) and again.skipped_failed == len(data["broken"])


def test_a_changed_shard_is_read_again_and_only_it(tmp_path, data, open_clip_spec, monkeypatch):
    tars = tmp_path / "tars"
    tars.mkdir()
    for p in data["tars"].iterdir():
        (tars / p.name).write_bytes(p.read_bytes())
    cache = Cache(tmp_path / "c")
    pattern = str(tars / "*.tar")
    first = encode_images(list_shard_source([pattern]), open_clip_spec, cache, options=_options(batch_size=16))
    assert first.rows == len(data["good"])
    changed = tars / "00002.tar"
    samples = [(k, (data["folder"] / k).read_bytes()) for k in data["keys"][2::4]]
    write_tar(changed, samples[:-3])  # three images fewer, the rest unchanged

    from embedstore.encode import shard_loader, sources_shards

    read: list[str] = []
    real = sources_shards.read_group

    def counting(items, indices):
        read.append(Path(items[indices[0]].path).name)
        return real(items, indices)

    monkeypatch.setattr(sources_shards, "read_group", counting)  # --strict's hashing pass
    monkeypatch.setattr(shard_loader, "read_group", counting)  # the decoding loader (in this process)
    second = encode_images(list_shard_source([pattern]), open_clip_spec, cache, options=_options(batch_size=16))
    assert set(read) == {"00002.tar"}  # unchanged shards are not read again
    n_changed = sum(1 for k, _ in samples[:-3] if k not in data["broken"])
    assert second.encoded == n_changed and second.cached == len(data["good"]) - len([
        k for k, _ in samples if k not in data["broken"]])
    assert second.dropped == sum(1 for k, _ in samples[-3:] if k not in data["broken"])

    # --strict: a shard rewritten with the same bytes (new mtime) is hashed, not encoded again
    os.utime(changed, ns=(1, 1))
    read.clear()
    strict = encode_images(list_shard_source([pattern]), open_clip_spec, cache,
                           options=_options(batch_size=16, strict=True))
    # every shard read once to hash its members (as --strict hashes every file of a folder), none decoded
    assert strict.encoded == 0 and sorted(read) == [f"{s:05d}.tar" for s in range(4)]
    loose = encode_images(list_shard_source([pattern]), open_clip_spec, cache, options=_options(batch_size=16))
    assert loose.encoded == n_changed  # by size and mtime, the shard changed


def test_truncated_and_compressed_tars_are_clear_errors(tmp_path, data):
    good = (data["tars"] / "00000.tar").read_bytes()
    with tarfile.open(data["tars"] / "00000.tar") as tar:
        members = tar.getmembers()
    middle, last = members[len(members) // 2], members[-1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good[: middle.offset_data + middle.size // 2])  # inside a member's data
    with pytest.raises(SourceError, match=rf"cut\.tar: truncated tar \(member {middle.name} ends at byte"):
        list_shard_source([str(cut)])
    header = tmp_path / "header.tar"
    header.write_bytes(good[: middle.offset + 100])  # inside a header: tarfile stops there quietly
    with pytest.raises(SourceError, match=r"header\.tar: truncated tar \(no end-of-archive block"):
        list_shard_source([str(header)])
    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(good[: last.offset_data + (last.size + 511) // 512 * 512])  # no end-of-archive block
    with pytest.raises(SourceError, match=r"boundary\.tar: truncated tar \(no end-of-archive block"):
        list_shard_source([str(boundary)])
    import gzip

    gz = tmp_path / "packed.tar"
    gz.write_bytes(gzip.compress(good))
    with pytest.raises(SourceError, match=r"packed\.tar: a compressed tar"):
        list_shard_source([str(gz)])
    with pytest.raises(SourceError, match="no such shard"):
        list_shard_source([str(tmp_path / "{0..2}.tar")])


def test_tar_labels_from_txt_or_json_and_ambiguous_images(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    members = [("a.png", buf.getvalue()), ("a.txt", b"Forest\n"), ("a.json", b'{"label": "Tree"}'),
               ("b.png", buf.getvalue()), ("b.txt", b"Sea"), ("b.json", b'{"label": "Water"}'),
               ("c.json", b"{}")]  # a sample without an image is not an image
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    from embedstore.encode.sources import list_source

    with pytest.raises(SourceError, match=r"no images found .*to encode the shards in it, name them: '.*/\*\.tar'"):
        list_source(tmp_path)  # a folder of shards
    unlabelled = list_shard_source([str(path)])
    assert [i.key for i in unlabelled.items] == ["shard-000.tar/a", "shard-000.tar/b"] and not unlabelled.labelled
    assert unlabelled.default_name == "shard"
    assert [i.label for i in list_shard_source([str(path)], ShardOptions(label_column="txt")).items] == ["Forest", "Sea"]
    by_json = list_shard_source([str(path)], ShardOptions(label_column="json:label"))
    assert by_json.classes == ["Tree", "Water"]
    with pytest.raises(SourceError, match="no .cls member"):
        list_shard_source([str(path)], ShardOptions(label_column="cls"))
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(SourceError, match=r"sample 'a' has two image members .*--image-column"):
        list_shard_source([str(path)])
    assert len(list_shard_source([str(path)], ShardOptions(image_column="png")).items) == 2


def test_ranks_take_whole_shards_and_merge_to_one_process(tmp_path, data, open_clip_spec):
    source = list_shard_source([str(data["tars"] / "*.tar")], ShardOptions(classes=tuple(CLASSES)))
    for rank in range(2):
        owned = {item.shard for item in source.items if Partition(rank, 2).owns(item.unit)}
        assert all(Partition(rank, 2).owns(item.unit) for item in source.items if item.shard in owned)
    single = Cache(tmp_path / "single")
    encode_images(source, open_clip_spec, single, options=_options())
    cache = Cache(tmp_path / "multi")
    parts = [encode_images(source, open_clip_spec, cache, options=_options(), partition=Partition(r, 2))
             for r in range(2)]
    assert sum(p.encoded for p in parts) == len(data["good"])
    merged = merge_partitions(source, open_clip_spec, cache, options=_options(), world=2)
    a = single.open_image_store("tars", open_clip_spec).read(as_float32=False)
    b = cache.open_image_store("tars", open_clip_spec).read(as_float32=False)
    assert merged.rows == len(data["good"]) and a.keys == b.keys and a.labels == b.labels
    assert np.array_equal(a.features, b.features)
    assert set(cache.open_image_store("tars", open_clip_spec).manifest()["failures"]) == set(
        single.open_image_store("tars", open_clip_spec).manifest()["failures"])


# ---- Parquet ----------------------------------------------------------------------------------
def write_parquet(path: Path, rows: list[tuple[str, object, int]], struct: bool, names: bool) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    keys, images, labels = zip(*rows)
    if struct:  # Hugging Face's Image feature: {bytes, path}
        column = pa.array([{"bytes": b, "path": None} for b in images],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        column = pa.array(list(images), pa.binary())
    meta = None
    if names:
        features = {"label": {"_type": "ClassLabel", "names": CLASSES}, "image": {"_type": "Image"}}
        meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.table({"id": list(keys), "img" if not struct else "image": column, "label": list(labels)})
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=40)


@pytest.mark.parametrize("struct, workers", [(False, 0), (True, 2)])
def test_parquet_stores_the_same_features_as_the_folder(tmp_path, data, folder_store, open_clip_spec, struct,
                                                        workers):
    pytest.importorskip("pyarrow")
    cache = Cache(tmp_path / "c")
    expected = folder_store["rows"]
    rows = [(k, (data["folder"] / k).read_bytes(), CLASSES.index(k.split("/")[0])) for k in data["keys"]]
    rows.append(("Sea/missing.jpg", None, 0))  # a row without image bytes
    for s in range(3):
        write_parquet(tmp_path / f"train-{s:05d}-of-00003.parquet", rows[s::3], struct, names=struct)
    columns = ShardOptions(image_column=None if struct else "img", key_column="id",
                           classes=None if struct else tuple(CLASSES), label_column=None if struct else "label")
    source = resolve_source([str(tmp_path / "train-*.parquet")], columns)
    assert source.default_name == "train" and source.labelled
    result = encode_images(source, open_clip_spec, cache, options=_options(workers=workers))
    assert result.encoded == len(data["good"]) and result.failed == len(data["broken"]) + 1
    store = cache.open_image_store("train", open_clip_spec)
    assert_same(expected, store.read(as_float32=False), strip=0)
    failures = store.manifest()["failures"]
    assert failures["Sea/missing.jpg"]["type"] == "MissingImage" and "Sea/broken.jpg" in failures
    assert encode_images(source, open_clip_spec, cache, options=_options()).encoded == 0


def test_a_recorded_location_lists_the_source_again_with_its_options(tmp_path, data):
    pytest.importorskip("pyarrow")
    from embedstore.encode.sources import list_source
    from embedstore.encode.sources_shards import split_location

    rows = [(k, (data["folder"] / k).read_bytes(), CLASSES.index(k.split("/")[0])) for k in data["good"][:12]]
    for s in range(2):
        write_parquet(tmp_path / f"val-{s}.parquet", rows[s::2], struct=False, names=False)
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    options = ShardOptions.from_classes_file(tmp_path / "names.txt", key_column="id", image_column="img")
    source = resolve_source([str(tmp_path / "val-{0..1}.parquet")], options)
    base, _, recorded = split_location(source.location)
    assert base == f"{tmp_path.as_posix()}/val-*.parquet" and recorded == options
    again = list_source(source.location)  # what info and soup --val do with a store's location
    assert again == source and again.items[0].key == sorted(k for k, _, _ in rows)[0]
    plain = resolve_source([str(tmp_path / "val-*.parquet")])  # other columns: another location
    assert plain.location == base and plain.items[0].key == "val-0.parquet/0"
    with pytest.raises(SourceError, match="class names given in code"):
        list_source(list_shard_source([base], ShardOptions(classes=tuple(CLASSES))).location)


def test_parquet_column_errors_name_the_file_and_columns(tmp_path, data):
    pytest.importorskip("pyarrow")
    rows = [(k, (data["folder"] / k).read_bytes(), 7) for k in data["good"][:3]]
    path = tmp_path / "part.parquet"
    write_parquet(path, rows, struct=False, names=False)
    with pytest.raises(SourceError, match=r"part\.parquet: no column 'pixels' \(--image-column\); columns: id, img"):
        list_shard_source([str(path)], ShardOptions(image_column="pixels"))
    with pytest.raises(SourceError, match=r"row 0 .* label 7 is outside the 6 class names"):
        list_shard_source([str(path)], ShardOptions(classes=tuple(CLASSES)))
    plain = list_shard_source([str(path)])  # integers without names stay integers; keys are <file>/<row>
    assert [i.key for i in plain.items] == ["part.parquet/0", "part.parquet/1", "part.parquet/2"]
    assert plain.classes == ["7"]
    write_parquet(tmp_path / "more.parquet", rows, struct=False, names=False)
    with pytest.raises(SourceError, match="appears twice"):
        list_shard_source([str(tmp_path / "*.parquet")], ShardOptions(key_column="id"))


# ---- Hugging Face ------------------------------------------------------------------------------
def test_saved_hf_dataset_split(tmp_path, data, folder_store, open_clip_spec):
    datasets = pytest.importorskip("datasets")
    cache = Cache(tmp_path / "c")
    expected = folder_store["rows"]
    keys = data["good"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "name": datasets.Value("string")})
    split = datasets.Dataset.from_dict(
        {"image": [{"bytes": (data["folder"] / k).read_bytes(), "path": None} for k in keys],
         "label": [CLASSES.index(k.split("/")[0]) for k in keys], "name": keys}, features=features)
    saved = tmp_path / "hf"
    datasets.DatasetDict({"validation": split, "train": split.select(range(4))}).save_to_disk(
        str(saved), num_shards={"validation": 3, "train": 1})
    with pytest.raises(SourceError, match=r"pick a split with --split \(splits: train, validation\)"):
        resolve_source([], hf_dataset=str(saved))
    source = resolve_source([], ShardOptions(key_column="name"), hf_dataset=str(saved), split="validation")
    assert source.default_name == "hf-validation" and len({i.shard for i in source.items}) == 3
    result = encode_images(source, open_clip_spec, cache, options=_options(workers=2))
    assert result.encoded == len(keys) and result.failed == 0
    assert_same(expected, cache.open_image_store("hf-validation", open_clip_spec).read(as_float32=False), strip=0)
    # the split's Arrow files as shards: the ClassLabel names come from the schema datasets wrote
    arrow = list_shard_source([str(saved / "validation" / "*.arrow")], ShardOptions(key_column="name"))
    assert len(arrow) == len(keys) and arrow.classes == sorted({k.split("/")[0] for k in keys})


def test_cli_encodes_brace_ranges_of_tars(tmp_path, data, tiny_open_clip_dir):
    from click.testing import CliRunner

    from embedstore.cli.main import main

    args = ["encode", f"{data['tars']}/{{00000..00003}}.tar", "--classes", str(tmp_path / "classes.txt"),
            "--model", f"local-dir:{tiny_open_clip_dir}", "--cache", str(tmp_path / "c"), "--device", "cpu",
            "--workers", "0", "--no-progress"]
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert f"{len(data['good'])} encoded" in out.output and f"{len(data['broken'])} failed" in out.output
    info = CliRunner().invoke(main, ["info", "--cache", str(tmp_path / "c")])
    assert "tars" in info.output and "unchanged" in info.output, info.output
