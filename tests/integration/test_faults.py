"""Faults end to end with the tiny model and the command line: damaged stores, banks and indexes
(refused by every reader, repaired, re-encoded to equal an undamaged run bit for bit), a full
disk at every write step, a real file-size limit, hostile image files, signals, decoding workers
that die, hang or cannot start, the single-writer lock, and the checkpoint guard.

Encodes use batches of 4 and shards of 8 rows, and (where rows are salvaged) features chunks of
8 rows, so that every re-encoded block is batched exactly as in the undamaged run: CPU float32
results can depend on which rows share a batch (see tests/integration/test_resume.py).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore import Cache, Store, encode_images
from embedstore.cli.main import main
from embedstore.encode.loop import EncodeOptions
from embedstore.errors import EncodeWorkerError, StoreLockedError
from embedstore.store import shards as shards_mod

from .test_resume import HOLD_LOCK, Child

BATCH, SHARD = 4, 8


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error(out, *needles: str) -> str:
    """The single ``error:`` line of a failed command (no traceback), containing every needle."""
    assert out.exit_code == 1, out.output
    assert "Traceback" not in out.output, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def encode_args(folder: Path, cache: Path, model: str, *extra: str) -> list[str]:
    return ["encode", str(folder), "--model", model, "--cache", str(cache), "--device", "cpu", "--workers", "0",
            "--no-progress", "--batch-size", str(BATCH), "--shard-rows", str(SHARD), *extra]


@pytest.fixture()
def model(tiny_open_clip_dir) -> str:
    return f"local-dir:{tiny_open_clip_dir}"


@pytest.fixture()
def chunks_of_8(monkeypatch):
    monkeypatch.setattr(shards_mod, "CHUNK_BYTES", 8 * 32 * 2)  # the tiny model is 32 wide, float16


@pytest.fixture()
def reference(tmp_path, image_folder, model):
    """An undamaged, uninterrupted run with the same options."""
    out = cli(*encode_args(image_folder, tmp_path / "ref", model))
    assert out.exit_code == 0, out.output
    return image_store(tmp_path / "ref").read(as_float32=False)


def image_store(cache: Path) -> Store:
    return Store(next((cache / "datasets").glob("*/*/*/manifest.json")).parent)


def same_as(store: Store, reference) -> None:
    rows = store.read(as_float32=False)
    assert rows.keys == reference.keys and rows.labels == reference.labels
    np.testing.assert_array_equal(rows.features, reference.features)
    assert store.verify() == [] and not list(store.path.rglob(".tmp-*"))


def flip_chunk(path: Path, chunk: int, n: int = 8) -> None:
    import h5py

    with h5py.File(path, "r") as f:
        info = f["features"].id.get_chunk_info(chunk)
    data = bytearray(path.read_bytes())
    for i in range(info.byte_offset + 20, info.byte_offset + 20 + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def experiment(tmp_path: Path, model: str) -> Path:
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na {}.\n")
    path = tmp_path / "exp.toml"
    path.write_text(f'dataset = "scenes"\nclasses = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]\n'
                    f'templates = "{templates}"\naggregate = "prob-mean"\nscale = 100.0\n\n'
                    f'[[models]]\nmodel = "{model}"\n')
    return path


# ---- damaged image stores, text banks and indexes -------------------------------------------------
def test_damaged_shard_is_refused_by_every_reader_then_repaired_bit_for_bit(
        tmp_path, image_folder, model, chunks_of_8, reference):
    cache = tmp_path / "c"
    assert cli(*encode_args(image_folder, cache, model)).exit_code == 0
    store = image_store(cache)
    shard = store.shard_path(store.manifest()["shards"][0])
    flip_chunk(shard, 1)  # rows 8..15 (natural order): Glacier/img0-3 and Mountains/img0-3
    exp = experiment(tmp_path, model)
    for args in (["export", "--dataset", "scenes", "--model", model, "--cache", cache, "--out", tmp_path / "out"],
                 ["classify", exp, "--cache", cache],
                 encode_args(image_folder, cache, model)):
        one_error(cli(*args), shard.name, "damaged", f"embedstore verify --repair --cache {cache.resolve()}",
                  "the same `embedstore encode` command again")
    assert not (tmp_path / "out" / "features.npy").exists()
    out = cli("verify", "--cache", cache)
    assert out.exit_code == 1 and shard.name in out.output and "1 damaged chunk(s) of 8 rows" in out.output
    out = cli("verify", "--repair", "--cache", cache)
    assert out.exit_code == 0, out.output
    assert "salvaged 16 of 24 rows" in out.output and "(8 dropped)" in out.output
    out = cli(*encode_args(image_folder, cache, model))
    assert out.exit_code == 0 and "8 encoded, 16 already cached, 0 failed" in out.output, out.output
    same_as(store, reference)
    assert cli("verify", "--cache", cache).output.strip().endswith("0 problems")
    assert cli("classify", exp, "--cache", cache).exit_code == 0


def test_damaged_text_bank_is_repaired_and_its_prompts_encoded_again(tmp_path, image_folder, model):
    cache = tmp_path / "c"
    assert cli(*encode_args(image_folder, cache, model)).exit_code == 0
    exp = experiment(tmp_path, model)
    first = cli("classify", exp, "--cache", cache, "--out", tmp_path / "a.csv")
    assert first.exit_code == 0 and "12 newly encoded" in first.output
    bank = Store(next((cache / "encoders").glob("*/texts*")))
    flip_chunk(bank.shard_path(bank.manifest()["shards"][0]), 0)
    shutil.rmtree(cache / "logits", ignore_errors=True)  # logits cached from the sound bank would answer without reading it
    one_error(cli("classify", exp, "--cache", cache), "text bank", "damaged", "verify --repair",
              "the dropped prompts are encoded again")
    out = cli("verify", "--repair", "--cache", cache)
    assert out.exit_code == 0 and "text bank" in out.output and "(12 dropped)" in out.output, out.output
    again = cli("classify", exp, "--cache", cache, "--out", tmp_path / "b.csv")
    assert again.exit_code == 0 and "12 newly encoded" in again.output
    a = np.loadtxt(tmp_path / "a.csv", delimiter=",", skiprows=1, usecols=range(3, 9))
    b = np.loadtxt(tmp_path / "b.csv", delimiter=",", skiprows=1, usecols=range(3, 9))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_same_size_damage_in_a_flat_index_is_an_error_and_repair_rebuilds_it(tmp_path, image_folder, model):
    cache = tmp_path / "c"
    assert cli(*encode_args(image_folder, cache, model)).exit_code == 0
    store_args = ["--dataset", "scenes", "--model", model, "--cache", cache]
    assert cli("index", "build", *store_args).exit_code == 0
    query = ["query", *store_args, "--key", "Sea/img1.jpg", "-k", "3", "--json"]
    before = cli(*query)
    assert before.exit_code == 0, before.output
    index_file = next((image_store(cache).path / "index").glob("b-*/index.faiss"))
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2:len(data) // 2 + 256] = bytes(256)  # the issue: scores went to 0.0, exit 0
    index_file.write_bytes(bytes(data))
    one_error(cli(*query), str(index_file), "sha256 differs", "index build --rebuild")
    out = cli("verify", "--cache", cache)
    assert out.exit_code == 1 and "index.faiss" in out.output and "1 indexes" in out.output
    out = cli("verify", "--repair", "--cache", cache)
    assert out.exit_code == 0 and "rebuilt the index" in out.output, out.output
    assert cli(*query).output == before.output


def test_garbage_cache_files_get_clear_errors(tmp_path, image_folder, model):
    cache = tmp_path / "c"
    assert cli(*encode_args(image_folder, cache, model)).exit_code == 0
    store = image_store(cache)
    manifest = store.manifest_path.read_text()
    export = ["export", "--dataset", "scenes", "--model", model, "--cache", cache, "--out", tmp_path / "o"]
    for text, field in (("[1,2,3]", "the top level"), (json.dumps({**json.loads(manifest), "shards": "oops"}), "$.shards")):
        store.manifest_path.write_text(text)
        for args in (export, ["verify", "--cache", cache], encode_args(image_folder, cache, model)):
            out = cli(*args)
            assert out.exit_code == 1 and field in out.output and "Traceback" not in out.output, out.output
        info = cli("info", "--cache", cache)
        assert info.exit_code == 0 and "damaged" in info.output
    store.manifest_path.write_text(manifest)
    card = next((cache / "encoders").glob("*/encoder.json"))
    card.write_text("{garbage")
    one_error(cli(*export), str(card), "not readable JSON", "verify --repair")
    out = cli("verify", "--repair", "--cache", cache)
    assert out.exit_code == 0 and "removed the damaged encoder card" in out.output
    assert cli(*encode_args(image_folder, cache, model)).exit_code == 0 and card.is_file()


# ---- a full disk at every write step --------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_nth(monkeypatch, target: str, n: int, when=lambda *a: True):
    """Make the n-th matching call of ``target`` (a dotted attribute) fail with ENOSPC."""
    module, _, name = target.rpartition(".")
    import importlib

    owner = importlib.import_module(module) if module in sys.modules or "." not in module else None
    if owner is None or not hasattr(owner, name):
        mod, _, cls = module.rpartition(".")
        owner = getattr(importlib.import_module(mod), cls)
    real = getattr(owner, name)
    seen = [0]

    def wrapper(*args, **kwargs):
        if when(*args):
            seen[0] += 1
            if seen[0] == n:
                _no_space()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return seen


ENCODE_STEPS = {
    # step: (what fails, committed rows left)
    "shard write": ("embedstore.util.fsutil.TolerantFile.write", 8),
    "fsync": ("os.fsync", 8),
    "rename": ("os.replace", 8),
    "manifest": ("os.replace", 8),
    "compaction": ("embedstore.util.fsutil.TolerantFile.write", 24),
}


@pytest.mark.parametrize("step", list(ENCODE_STEPS))
def test_no_space_at_each_encode_step_is_one_line_and_a_rerun_finishes(
        tmp_path, image_folder, model, reference, monkeypatch, step):
    cache = tmp_path / "c"
    target, kept = ENCODE_STEPS[step]
    if "TolerantFile" in target:  # the disk fills up while the 2nd shard file (or the compaction) is written
        from tests.unit.test_integrity import full_disk

        full_disk(monkeypatch, after_bytes=3000, nth_file=2 if step == "shard write" else 4)
    elif step == "fsync":  # the fsync of the 2nd shard file
        _fail_nth(monkeypatch, target, 2, lambda fd: ".tmp-" in os.readlink(f"/proc/self/fd/{fd}")
                  and os.readlink(f"/proc/self/fd/{fd}").endswith(".h5"))
    elif step == "rename":
        _fail_nth(monkeypatch, target, 2, lambda a, b: str(b).endswith(".h5"))
    else:
        _fail_nth(monkeypatch, target, 2, lambda a, b: str(b).endswith("manifest.json"))
    out = cli(*encode_args(image_folder, cache, model))
    line = one_error(out, "cannot write", str(cache), "No space left on device (ENOSPC)", "free some disk space",
                     "run the same command again")
    assert f"the {kept} rows committed before are safe" in line
    store = image_store(cache)
    assert not list(cache.rglob(".tmp-*")) and store.manifest()["rows"] == kept and store.verify() == []
    monkeypatch.undo()
    again = cli(*encode_args(image_folder, cache, model))
    assert again.exit_code == 0 and f"{24 - kept} encoded, {kept} already cached" in again.output
    same_as(store, reference)


def test_no_space_while_saving_an_index_logits_or_the_run_log(tmp_path, image_folder, model, monkeypatch):
    cache = tmp_path / "c"
    assert cli(*encode_args(image_folder, cache, model)).exit_code == 0
    store_args = ["--dataset", "scenes", "--model", model, "--cache", cache]
    import faiss

    def write_index(index, path):
        raise RuntimeError(f"Error in faiss::FileIOWriter: write error in {path}: 28 != 100 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", write_index)
    one_error(cli("index", "build", *store_args), "cannot write", "index.faiss", "No space left on device",
              "the previous index (if any) is unchanged")
    assert not list(cache.rglob(".tmp-*")) and not list((image_store(cache).path / "index").glob("b-*"))
    monkeypatch.undo()
    assert cli("index", "build", *store_args).exit_code == 0

    exp = experiment(tmp_path, model)
    monkeypatch.setattr("embedstore.store.logit_cache.np.save", _no_space)
    out = cli("classify", exp, "--cache", cache, "--out", tmp_path / "p.csv")
    assert out.exit_code == 0 and (tmp_path / "p.csv").is_file()  # logits are derived data: skipped
    assert not list(cache.rglob(".tmp-*"))
    monkeypatch.undo()

    log = cache / "runs.jsonl"
    before = log.read_bytes()
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("runs.jsonl"):
            real_write(fd, data[: len(data) // 2])  # half a line reaches the disk, then the disk is full
            _no_space()
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    out = cli("classify", exp, "--cache", cache, "--out", tmp_path / "q.csv")
    one_error(out, f"cannot write {log}", "No space left on device", "only its log line is missing")
    assert (tmp_path / "q.csv").is_file() and log.read_bytes() == before  # no half line left


@pytest.mark.slow  # tests/unit/test_integrity.py has the same real limit on the store writer, in seconds
def test_a_real_file_size_limit_ends_the_cli_with_one_line(tmp_path, image_folder, model, reference):
    """``ulimit -f``: every write past the limit fails with EFBIG (it used to end in SIGSEGV)."""
    import resource

    cache = tmp_path / "c"
    args = [sys.executable, "-m", "embedstore", *encode_args(image_folder, cache, model)[:]]
    cli(*encode_args(image_folder, cache, model, "--dataset", "warm"))  # the encoder card exists

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error: cannot write" in proc.stderr and "(EFBIG)" in proc.stderr
    assert "ulimit -f" in proc.stderr and not list(cache.rglob(".tmp-*"))
    again = cli(*encode_args(image_folder, cache, model))
    assert again.exit_code == 0, again.output
    same_as(image_store_named(cache, "scenes"), reference)


def image_store_named(cache: Path, dataset: str) -> Store:
    return Store(next((cache / "datasets" / dataset).glob("*/*/manifest.json")).parent)


# ---- hostile files ------------------------------------------------------------------------------
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def test_eps_named_jpg_is_not_decoded_and_starts_no_program(tmp_path, image_folder, open_clip_spec, fast_options,
                                                            monkeypatch):
    (image_folder / "Sea" / "eps.jpg").write_bytes(EPS)
    started: list = []
    real_popen = subprocess.Popen.__init__

    def popen(self, *args, **kwargs):
        started.append(args)
        return real_popen(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(os, "posix_spawn", lambda *a, **k: started.append(a))
    # make Pillow believe Ghostscript is installed: without the allowlist it would now run it
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    result = encode_images(image_folder, open_clip_spec, Cache(tmp_path / "c"), options=fast_options)
    assert result.failures["Sea/eps.jpg"]["type"] == "FormatNotAllowed"
    assert result.failures["Sea/eps.jpg"]["message"] == "format not allowed: EPS"
    assert started == [] and result.encoded == 24


@pytest.mark.parametrize("workers", [pytest.param("0", marks=pytest.mark.slow), "2"])
def test_fifo_device_and_line_break_names_are_recorded_not_read(tmp_path, image_folder, model, workers):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(image_folder.glob("*/img0.jpg")):
        shutil.copy(path, flat / f"{path.parent.name}.jpg")
    os.mkfifo(flat / "pipe.jpg")
    (flat / "zero.jpg").symlink_to("/dev/zero")
    shutil.copy(image_folder / "Sea" / "img1.jpg", flat / "two\nlines.jpg")
    cache = tmp_path / "c"
    args = [sys.executable, "-m", "embedstore", "encode", str(flat), "--model", model, "--cache", str(cache),
            "--device", "cpu", "--workers", workers, "--no-progress"]
    # a safety net only: before the fix the FIFO made this wait forever
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 encoded, 0 already cached, 3 failed" in proc.stdout
    failures = image_store(cache).manifest()["failures"]
    assert failures["pipe.jpg"] == {**failures["pipe.jpg"], "type": "NotARegularFile",
                                    "message": "a FIFO (named pipe); only regular files are read"}
    assert failures["zero.jpg"]["message"] == "a character device; only regular files are read"
    assert failures["two\nlines.jpg"]["type"] == "InvalidFileName"
    out = cli("export", "--dataset", "flat", "--model", model, "--cache", cache, "--out", tmp_path / "o")
    assert out.exit_code == 0 and len((tmp_path / "o" / "keys.txt").read_text().splitlines()) == 6


# ---- signals -------------------------------------------------------------------------------------
CLI_CHILD = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
from embedstore.encode.loop import AdaptiveBatcher
original = AdaptiveBatcher.__call__
done = [0]

def throttled(self, batch):
    time.sleep(cfg["throttle"])
    out = original(self, batch)
    done[0] += len(out)
    print("encoded", done[0], flush=True)
    return out

AdaptiveBatcher.__call__ = throttled
from embedstore.cli.main import main
main(cfg["args"])
"""


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(x) for x in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_commit_what_is_encoded_and_stop_the_workers(
        tmp_path, big_folder, model, sig, code):
    cache = tmp_path / "c"
    args = ["encode", str(big_folder), "--model", model, "--cache", str(cache), "--device", "cpu", "--workers", "2",
            "--batch-size", str(BATCH), "--shard-rows", "1000", "--no-progress"]
    child = Child(CLI_CHILD, json.dumps({"args": args, "throttle": 0.05}), stderr_path=tmp_path / "stderr.txt")
    child.wait_for("encoded")
    child.wait_for("encoded")
    workers = children_of(child.proc.pid)
    assert len(workers) >= 2
    child.proc.send_signal(sig)
    rc = child.finish()
    assert rc == code, child.stderr()
    assert "committed rows are kept; run the same command again to resume" in child.stderr()
    assert "Traceback" not in child.stderr()
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    assert alive == [], f"decoding workers left running: {alive}"
    encoded = max(int(x.split()[1]) for x in child.seen if x.startswith("encoded"))
    committed = Store(next(cache.glob("datasets/*/*/*"))).manifest()["rows"]
    assert 0 < committed <= encoded and committed >= encoded - BATCH  # shard_rows 1000: committed on the signal


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    from embedstore.encode.toy import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("big") / "scenes120", per_class=20, seed=7)


# ---- decoding workers -------------------------------------------------------------------------
def _in_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


@pytest.mark.parametrize("failure", ["dies", "hangs", "cannot start"])
def test_decoding_workers_that_fail_end_the_run_with_their_error(tmp_path, image_folder, open_clip_spec, monkeypatch,
                                                                 failure):
    from embedstore.encode import loop as encode_mod

    real = encode_mod.ImageDataset.__getitem__

    def getitem(self, i):
        if i >= 8 and _in_worker():
            if failure == "dies":
                os._exit(3)
            time.sleep(120)
        return real(self, i)

    monkeypatch.setattr(encode_mod.ImageDataset, "__getitem__", getitem)
    if failure == "cannot start":
        import multiprocessing.process

        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                            lambda self: (_ for _ in ()).throw(OSError(errno.EAGAIN, "Resource temporarily unavailable")))
    # one worker when it hangs: shutting a hung worker down waits 5 s for it before terminating it
    options = EncodeOptions(device="cpu", workers=1 if failure == "hangs" else 2, batch_size=BATCH, shard_rows=4,
                            progress=False, loader_timeout=3)
    cache = Cache(tmp_path / "c")
    with pytest.raises(EncodeWorkerError) as info:
        encode_images(image_folder, open_clip_spec, cache, options=options)
    expected = {"dies": "a decoding worker failed", "hangs": "sent nothing for 3 s",
                "cannot start": "cannot start the decoding workers"}[failure]
    assert expected in str(info.value) and "--workers 0" in str(info.value)
    store = image_store(cache.root) if list(cache.root.glob("datasets/*/*/*/manifest.json")) else None
    if store is not None:
        assert store.verify() == [] and len(store.read()) == store.manifest()["rows"] <= 8
    monkeypatch.undo()
    done = encode_images(image_folder, open_clip_spec, cache, options=EncodeOptions(device="cpu", workers=0,
                                                                                    progress=False))
    assert done.rows == 24 and done.failed == 0


# ---- the lock ----------------------------------------------------------------------------------
def test_a_second_writer_is_refused_before_its_model_loads(tmp_path, image_folder, open_clip_spec, fast_options,
                                                          monkeypatch):
    from embedstore.encode import loop as encode_mod
    from embedstore.encode.loop import encode_prompts

    cache = Cache(tmp_path / "c")
    first = encode_images(image_folder, open_clip_spec, cache, options=fast_options)
    encode_prompts(["a photo."], open_clip_spec, cache)
    bank = cache.text_bank(open_clip_spec)
    for path in (first.store_path, bank.path):
        child = Child(HOLD_LOCK, str(path), stderr_path=tmp_path / "stderr.txt")
        try:
            child.wait_for("locked", timeout=120)

            def no_model(*args, **kwargs):
                raise AssertionError("the model was loaded before the lock was taken")

            monkeypatch.setattr(encode_mod, "load_encoder", no_model)
            with pytest.raises(StoreLockedError, match=f"pid {child.proc.pid}"):
                if path == bank.path:
                    encode_prompts(["a new prompt."], open_clip_spec, cache)
                else:
                    (image_folder / "Sea" / "new.jpg").write_bytes((image_folder / "Sea" / "img0.jpg").read_bytes())
                    encode_images(image_folder, open_clip_spec, cache, options=fast_options)
            monkeypatch.undo()
        finally:
            child.kill()


def test_a_killed_writers_lock_is_not_kept_by_its_decoding_workers(tmp_path, big_folder, model, open_clip_spec):
    cache = tmp_path / "c"
    args = ["encode", str(big_folder), "--model", model, "--cache", str(cache), "--device", "cpu", "--workers", "2",
            "--batch-size", str(BATCH), "--shard-rows", str(SHARD), "--no-progress"]
    child = Child(CLI_CHILD, json.dumps({"args": args, "throttle": 0.05}), stderr_path=tmp_path / "stderr.txt")
    child.wait_for("encoded")
    workers = children_of(child.proc.pid)
    child.proc.send_signal(signal.SIGKILL)
    child.finish()
    assert any(Path(f"/proc/{pid}").exists() for pid in workers)  # its workers live on for a few seconds
    result = encode_images(big_folder, open_clip_spec, Cache(cache),
                           options=EncodeOptions(device="cpu", workers=0, batch_size=BATCH, progress=False))
    assert result.rows == 120  # not refused: the workers closed their copy of the lock at fork


def test_a_lock_naming_a_dead_pid_says_so_and_that_a_rerun_is_safe(tmp_path):
    from embedstore.util.fsutil import WriteLock

    script = (f"import sys, os, time\nfrom pathlib import Path\nfrom embedstore.util.fsutil import WriteLock\n"
              f"lock = WriteLock(Path({str(tmp_path / '.lock')!r}), 'x').acquire()\n"
              "os.pwrite(lock._fd, b'pid 999999999 on ' + os.uname().nodename.encode() + b'      ', 0)\n"
              "print('locked', flush=True)\ntime.sleep(60)\n")
    child = Child(script, stderr_path=tmp_path / "stderr.txt")
    try:
        child.wait_for("locked", timeout=60)
        with pytest.raises(StoreLockedError) as info:
            WriteLock(tmp_path / ".lock", "store s").acquire()
        assert "pid 999999999" in str(info.value) and "no longer running" in str(info.value)
        assert "a rerun resumes" in str(info.value)
    finally:
        child.kill()


# ---- checkpoints --------------------------------------------------------------------------------
class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (io.open, (str(self.marker), "w"))


def test_pickled_code_in_weights_is_refused_in_one_line_by_embedstore_guard(tmp_path, image_folder,
                                                                           tiny_open_clip_dir):
    import open_clip
    import torch

    marker = tmp_path / "PWNED"
    folder = tmp_path / "evil-dir"
    folder.mkdir()
    shutil.copy(tiny_open_clip_dir / "open_clip_config.json", folder)
    torch.save({"visual.proj": Evil(marker)}, folder / "open_clip_pytorch_model.bin")
    shutil.copy(folder / "open_clip_pytorch_model.bin", tmp_path / "evil.pt")
    arch = tmp_path / "embedstore-test-tiny.json"
    arch.write_text(json.dumps(json.loads((tiny_open_clip_dir / "open_clip_config.json").read_text())["model_cfg"]))
    open_clip.add_model_config(arch)
    for model in (["--model", f"local-dir:{folder}"], ["--model", "embedstore-test-tiny", "--pretrained", tmp_path / "evil.pt"]):
        out = cli("encode", image_folder, *model, "--cache", tmp_path / "c", "--device", "cpu", "--workers", "0",
                  "--no-progress")
        one_error(out, "refused:", "is not a plain state dict of tensors", "io.open", "never unpickles")
        assert "add_safe_globals" not in out.output and not marker.exists()
    assert not (tmp_path / "c" / "datasets").exists()
