"""Multi-process encoding: disjoint partitions, part stores, resume of a killed rank, the merge, torchrun."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from embedstore import Cache, ViewOptions, encode_images
from embedstore.encode.distributed import Partition, part_paths
from embedstore.encode.loop import merge_partitions


def test_partitions_are_disjoint_covering_and_balanced():
    keys = [f"class{i % 7}/img_{i}.jpg" for i in range(3000)]
    world = 4
    owners = [[r for r in range(world) if Partition(r, world).owns(k)] for k in keys]
    assert all(len(o) == 1 for o in owners)
    counts = np.bincount([o[0] for o in owners], minlength=world)
    assert counts.min() > 600  # about 750 each
    assert Partition(1, 4).owns(keys[0]) == Partition(1, 4).owns(keys[0])  # stable (not Python's salted hash)


def test_ranks_then_merge_equal_one_process(tmp_path, image_folder, open_clip_spec, fast_options):
    (image_folder / "Sea" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    single = Cache(tmp_path / "single")
    encode_images(image_folder, open_clip_spec, single, options=fast_options)
    cache = Cache(tmp_path / "multi")
    results = [encode_images(image_folder, open_clip_spec, cache, options=fast_options, partition=Partition(r, 2))
               for r in range(2)]
    assert sum(r.encoded for r in results) == 24 and sum(r.failed for r in results) == 1
    store = cache.image_store("scenes", open_clip_spec, cache.resolve_view(open_clip_spec, ViewOptions()))
    assert len(part_paths(store.path)) == 2 and not store.exists()  # nothing merged yet
    merged = merge_partitions(image_folder, open_clip_spec, cache, options=fast_options)
    assert merged.rows == 24 and merged.encoded == 24
    assert not part_paths(store.path) and not (store.path / "parts").exists()
    a = single.open_image_store("scenes", open_clip_spec).read()
    b = store.read()
    assert a.keys == b.keys and a.labels == b.labels
    np.testing.assert_allclose(a.features, b.features, atol=2e-3)  # other batch compositions: last bits
    assert "Sea/broken.jpg" in store.manifest()["failures"]

    # a second run finds everything in the main store: no rank encodes anything, the merge adds nothing
    again = [encode_images(image_folder, open_clip_spec, cache, options=fast_options, partition=Partition(r, 2))
             for r in range(2)]
    assert sum(r.encoded for r in again) == 0 and sum(r.cached for r in again) == 24
    (image_folder / "Forests").joinpath(sorted(os.listdir(image_folder / "Forests"))[0]).unlink()
    merged = merge_partitions(image_folder, open_clip_spec, cache, options=fast_options)
    assert merged.dropped == 1 and merged.rows == 23


class _DiesAfter:
    """An encoder that is killed (KeyboardInterrupt) on its n-th batch."""

    def __init__(self, encoder, n: int):
        self._encoder, self._left = encoder, n

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode_images(self, batch):
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt
        return self._encoder.encode_images(batch)


def test_a_killed_rank_resumes_without_redoing_anything(tmp_path, image_folder, open_clip_spec, fast_options):
    from dataclasses import replace

    from embedstore.encode.encoders import load_encoder

    cache = Cache(tmp_path / "c")
    options = replace(fast_options, batch_size=2, shard_rows=2)
    done = encode_images(image_folder, open_clip_spec, cache, options=options, partition=Partition(0, 2))
    enc = load_encoder(open_clip_spec, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        encode_images(image_folder, open_clip_spec, cache, options=options, encoder=_DiesAfter(enc, 3),
                      partition=Partition(1, 2))
    rank0 = encode_images(image_folder, open_clip_spec, cache, options=options, partition=Partition(0, 2))
    rank1 = encode_images(image_folder, open_clip_spec, cache, options=options, partition=Partition(1, 2))
    assert rank0.encoded == 0 and rank0.cached == done.encoded
    assert rank1.cached == 4 and rank1.encoded == 24 - done.encoded - 4  # two committed batches were kept
    assert merge_partitions(image_folder, open_clip_spec, cache, options=options).rows == 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_end_to_end(tmp_path, image_folder, tiny_open_clip_dir):
    cache = tmp_path / "c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "embedstore", "encode", str(image_folder),
           "--model", f"local-dir:{tiny_open_clip_dir}", "--cache", str(cache), "--device", "cpu",
           "--workers", "0", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 of 2" in proc.stdout and "rank 1 of 2" in proc.stdout
    assert "merged 24 rows from 2 ranks" in proc.stdout
    from embedstore import EncoderSpec

    store = Cache(cache).open_image_store("scenes", EncoderSpec(f"local-dir:{tiny_open_clip_dir}"))
    assert len(store.read().keys) == 24 and not (store.path / "parts").exists()


def test_merge_skips_rows_of_images_deleted_or_changed_since_and_parts_of_other_runs(
        tmp_path, image_folder, open_clip_spec, fast_options):
    cache = Cache(tmp_path / "c")
    for r in range(4):  # an interrupted 4-rank run left its parts
        encode_images(image_folder, open_clip_spec, cache, options=fast_options, partition=Partition(r, 4))
    for r in range(2):  # a 2-rank run finished its parts, then died before the merge
        encode_images(image_folder, open_clip_spec, cache, options=fast_options, partition=Partition(r, 2))
    files = sorted((image_folder / "Sea").iterdir())
    files[0].unlink()                                      # deleted after the ranks encoded it
    os.utime(files[1], ns=(1, 1))                          # changed after the ranks encoded it
    merged = merge_partitions(image_folder, open_clip_spec, cache, options=fast_options, world=2)
    store = cache.open_image_store("scenes", open_clip_spec)
    rows = store.read()
    key_deleted = f"Sea/{files[0].name}"
    key_changed = f"Sea/{files[1].name}"
    assert key_deleted not in rows.keys and key_changed not in rows.keys
    assert merged.rows == 22 and rows.keys == sorted(rows.keys, key=lambda k: (k.split("/")[0], k))
    assert not (store.path / "parts").exists()  # the 4-rank parts were discarded too
    # the changed image is encoded by the next run, like any change
    again = encode_images(image_folder, open_clip_spec, cache, options=fast_options)
    assert again.encoded == 1 and again.rows == 23
