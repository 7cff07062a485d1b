"""Every command with bad inputs: one ``error: what, where, what to do`` line and exit 1 (or a
usage error, exit 2), never a traceback; ``-v`` adds the traceback.

One cache is prepared per module (encoded store, text bank, index, run log); each damage case
works on its own copy.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedstore.cli.main import main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_open_clip_dir):
    from embedstore.encode.toy import make_image_folder

    root = tmp_path_factory.mktemp("cli_errors")
    model = f"local-dir:{tiny_open_clip_dir}"
    images = make_image_folder(root / "scenes", per_class=2, seed=1)
    cache = root / "cache"
    (root / "t.txt").write_text("a photo of a {}.\n")
    exp = root / "exp.toml"
    exp.write_text(f'dataset = "scenes"\nclasses = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]\n'
                   f'templates = "{root / "t.txt"}"\n[[models]]\nmodel = "{model}"\n')
    for args in (["encode", images, "--model", model, "--device", "cpu", "--workers", "0", "--no-progress"],
                 ["classify", exp, "--out", root / "p.csv"],
                 ["index", "build", "--dataset", "scenes", "--model", model]):
        out = invoke(*args, "--cache", cache)
        assert out.exit_code == 0, out.output
    (root / "empty").mkdir()
    (root / "file").write_text("x")
    (root / "bad.toml").write_text("dataset = [\n")
    (root / "unknown.toml").write_text(exp.read_text() + 'colour = "red"\n')
    (root / "a.csv").write_text("key,label\nx,1\n")
    (root / "nolabel.csv").write_text("key\nx\n")
    import torch

    class Evil:
        def __reduce__(self):
            return (io.open, (str(root / "PWNED"), "w"))

    torch.save({"x": Evil()}, root / "evil.pt")
    return {"root": root, "cache": cache, "model": model, "images": images, "exp": exp, "tiny": tiny_open_clip_dir}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def store_dir(cache: Path) -> Path:
    return next((cache / "datasets").glob("*/*/*/manifest.json")).parent


def _flip(path: Path) -> None:
    """64 bytes of the features chunk flipped (damage elsewhere in a shard is caught by
    `verify` and `encode`, but readers that do not read those bytes rightly go on)."""
    import h5py

    with h5py.File(path, "r") as f:
        start = f["features"].id.get_chunk_info(0).byte_offset + 16
    data = bytearray(path.read_bytes())
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path.write_bytes(bytes(data))


DAMAGE = {
    "manifest [1,2,3]": (lambda c: (store_dir(c) / "manifest.json").write_text("[1,2,3]"), "the top level"),
    "manifest shards oops": (lambda c: (store_dir(c) / "manifest.json").write_text(json.dumps(
        {**json.loads((store_dir(c) / "manifest.json").read_text()), "shards": "oops"})), "$.shards"),
    "manifest deleted": (lambda c: (store_dir(c) / "manifest.json").unlink(), "missing while manifest.prev.json exists"),
    "shard flipped": (lambda c: _flip(next(store_dir(c).glob("shards/*.h5"))), "shard-"),
    "shard truncated": (lambda c: (lambda p: p.write_bytes(p.read_bytes()[:1000]))(next(store_dir(c).glob("shards/*.h5"))),
                        "(truncated or replaced)"),
    "encoder card garbage": (lambda c: next(c.glob("encoders/*/encoder.json")).write_text("garbage"), "encoder.json"),
}
READERS = {
    "export": lambda p: ["export", "--dataset", "scenes", "--model", p["model"], "--out", p["root"] / "o"],
    "classify": lambda p: ["classify", p["exp"], "--out", p["root"] / "q.csv"],
    "encode": lambda p: ["encode", p["images"], "--model", p["model"], "--device", "cpu", "--workers", "0", "--no-progress"],
    "query": lambda p: ["query", "--dataset", "scenes", "--model", p["model"], "--key", "Sea/img0.jpg"],
}


@pytest.mark.parametrize("command", list(READERS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_files_give_one_line_with_the_repair_command(prepared, tmp_path, damage, command):
    cache = tmp_path / "cache"
    shutil.copytree(prepared["cache"], cache)
    mutate, needle = DAMAGE[damage]
    mutate(cache)
    out = invoke(*READERS[command](prepared), "--cache", cache)
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], out.output
    assert f"embedstore verify --repair --cache {cache.resolve()}" in errors[0]
    verify = invoke("verify", "--cache", cache)
    assert verify.exit_code == 1 and needle in verify.output
    assert invoke("info", "--cache", cache).exit_code == 0


CASES = [
    (["encode", "{empty}", "--model", "{model}"], 1, "no images found"),
    (["encode", "{images}", "--model", "ViT-Nope-99", "--random-weights"], 1, "open_clip.list_models()"),
    (["encode", "{images}", "--model", "{model}", "--cache", "{file}/c"], 1, "Not a directory (ENOTDIR)"),
    (["encode", "{images}", "--model", "{model}", "--dtype", "float32"], 1, "dtype: store has 'float16'"),
    (["encode", "{nolabel}", "--model", "{model}"], 1, "needs a 'path' column"),
    (["encode", "{images}", "--model", "embedstore-nope", "--pretrained", "{evil}"], 1, "could not create it"),
    (["export", "--dataset", "nope", "--model", "{model}", "--out", "{root}/o"], 1, "embedstore encode"),
    (["export", "--dataset", "scenes", "--model", "ViT-B-32", "--out", "{root}/o"], 1, "is not in the cache"),
    (["classify", "{root}/bad.toml"], 1, "not valid TOML"),
    (["classify", "{root}/unknown.toml"], 1, "unknown key(s) colour"),
    (["classify", "{exp}", "--set", "aggregate=nope"], 1, "'nope' is not one of"),
    (["classify", "{exp}", "--out", "{file}/p.csv"], 1, "cannot write"),
    (["templates", "nope"], 1, "neither a built-in prompt set"),
    (["index", "build", "--dataset", "nope", "--model", "{model}"], 1, "has no store"),
    (["query", "--dataset", "scenes", "--model", "{model}", "--key", "nope.jpg"], 1, "not stored"),
    (["query", "--dataset", "scenes", "--model", "{model}", "--image", "{file}"], 1, "not a readable image"),
    (["query", "--dataset", "scenes", "--model", "{model}", "--text", "x", "-k", "0"], 2, "is not in the range"),
    (["vote", "{root}/a.csv", "{nolabel}"], 1, "no 'label' column"),
    (["soup", "{evil}", "{tiny}", "--val", "{images}", "--experiment", "{exp}", "--out", "{root}/soup"], 1, "refused:"),
    (["prompts", "--model", "{model}"], 2, "give prompt TEXTS or --file"),
]


@pytest.mark.parametrize("args, code, needle", CASES, ids=[" ".join(c[0][:2]) + f" {i}" for i, c in enumerate(CASES)])
def test_bad_inputs_get_one_error_line(prepared, args, code, needle):
    values = {**{k: str(v) for k, v in prepared.items()}, "empty": prepared["root"] / "empty",
              "file": prepared["root"] / "file", "nolabel": prepared["root"] / "nolabel.csv",
              "evil": prepared["root"] / "evil.pt"}
    full = [a.format(**values) for a in args]
    if "--cache" not in full and full[0] not in ("templates", "vote"):
        full += ["--cache", str(prepared["cache"])]
    out = invoke(*full)
    assert out.exit_code == code and "Traceback" not in out.output, out.output
    assert needle in out.output, out.output
    if code == 1:
        assert len([line for line in out.output.splitlines() if line.startswith("error:")]) == 1, out.output
    assert not (prepared["root"] / "PWNED").exists()


def test_verbose_adds_the_traceback(prepared):
    quiet = invoke("templates", "nope")
    loud = invoke("-v", "templates", "nope")
    assert "Traceback" not in quiet.output and "Traceback" in loud.output
    assert loud.output.strip().splitlines()[-1] == quiet.output.strip().splitlines()[-1]


def test_an_unexpected_error_is_one_line_that_says_it_is_a_bug(prepared, monkeypatch):
    import embedstore.score.prompts

    monkeypatch.setattr(embedstore.score.prompts, "builtin_sets", lambda: 1 / 0)
    out = invoke("templates")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "error: unexpected ZeroDivisionError: division by zero; this is a bug in embedstore" in out.output


def test_rm_removes_a_store_whose_manifest_is_garbage(prepared, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(prepared["cache"], cache)
    (store_dir(cache) / "manifest.json").write_text("[1,2,3]")
    out = invoke("rm", "--dataset", "scenes", "--yes", "--cache", cache)
    assert out.exit_code == 0 and "Traceback" not in out.output, out.output
    assert not list((cache / "datasets").glob("*/*/*/manifest.json"))
