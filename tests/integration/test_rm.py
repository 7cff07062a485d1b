"""Issue 10: ``embedstore rm`` removes stores, text banks, empty stores and derived data, and
refuses (removing nothing) while a writer holds a lock."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore import Cache, ViewOptions
from embedstore.cli.main import main
from embedstore.encode.loop import encode_images, encode_prompts
from embedstore.store.logit_cache import LogitCache


def cli(*args: str, code: int = 0, input: str | None = None):
    result = CliRunner().invoke(main, list(args), input=input)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture()
def filled(tmp_path, image_folder, open_clip_spec, tiny_open_clip_dir, fast_options):
    """Dataset 'scenes' in two views, a text bank, an index, logits, and a store where every image failed."""
    cache = Cache(tmp_path / "c")
    encode_images(image_folder, open_clip_spec, cache, options=fast_options)
    squash = ViewOptions(resize_mode="squash")
    encode_images(image_folder, open_clip_spec, cache, view_options=squash, options=fast_options)
    encode_prompts(["a sea", "a forest"], open_clip_spec, cache, device="cpu", progress=False)
    listing = tmp_path / "broken.txt"
    listing.write_text("missing1.jpg\nmissing2.jpg\n")
    broken = encode_images(listing, open_clip_spec, cache, options=fast_options)
    assert broken.rows == 0 and broken.failed == 2
    (cache.root / "datasets" / "killed" / open_clip_spec.id / "someview" / "shards").mkdir(parents=True)
    model = ["--model", f"local-dir:{tiny_open_clip_dir}", "--cache", str(cache.root)]
    cli("index", "build", "--dataset", "scenes", *model)
    store = cache.open_image_store("scenes", open_clip_spec)
    logits = LogitCache(cache.root, 1 << 20).folder(store.path, "commit") / "c-0.npy"
    logits.parent.mkdir(parents=True)
    np.save(logits, np.zeros((2, 2), dtype=np.float32))
    return cache, model, squash, store, logits


def test_one_view_then_the_dataset(filled, open_clip_spec):
    cache, model, squash, store, logits = filled
    other = cache.open_image_store("scenes", open_clip_spec, squash)
    out = cli("rm", "--dataset", "scenes", *model, "--resize-mode", "squash", "-y")
    assert "removed 1 item(s)" in out.output and not other.path.exists()
    assert len(store.read()) == 24  # the default view is untouched
    dry = cli("rm", "--dataset", "scenes", *model, "--dry-run")
    assert "dry run: 2 item(s)" in dry.output and store.path.exists() and logits.exists()
    cli("rm", "--dataset", "scenes", *model, code=1, input="n\n")  # declined: nothing removed
    assert store.path.exists()
    cli("rm", "--dataset", "scenes", "--cache", str(cache.root), "-y")
    assert not store.path.exists() and not logits.exists()       # the store's logits went with it
    assert not (cache.root / "datasets" / "scenes").exists()      # no empty folders left
    assert (cache.root / "datasets" / "broken").exists()          # other datasets untouched
    assert not (cache.root / ".trash").exists()


def test_text_bank_index_empty_stores_and_logits(filled, open_clip_spec):
    cache, model, squash, store, logits = filled
    cli("rm", "--index", "--dataset", "scenes", *model, "-y")
    assert not (store.path / "index").exists() and len(store.read()) == 24
    bank = cache.text_bank(open_clip_spec)
    cli("rm", "--texts", *model, "-y")
    assert not bank.path.exists() and cache.load_card(open_clip_spec) is not None  # the card stays
    out = cli("rm", "--empty", "--cache", str(cache.root), "-y")
    assert "no row committed" in out.output and "nothing committed" in out.output
    assert not (cache.root / "datasets" / "broken").exists() and not (cache.root / "datasets" / "killed").exists()
    assert store.exists() and cache.open_image_store("scenes", open_clip_spec, squash).exists()
    cli("rm", "--logits", "--cache", str(cache.root), "-y")
    assert not (cache.root / "logits").exists() and store.exists()


def test_a_held_lock_refuses_and_removes_nothing(filled, open_clip_spec):
    cache, model, squash, store, logits = filled
    other = cache.open_image_store("scenes", open_clip_spec, squash)
    with other.lock():  # a writer at work on one of the two views
        out = cli("rm", "--dataset", "scenes", "--cache", str(cache.root), "-y", code=1)
    assert "being written by another process" in out.output
    assert store.exists() and other.exists() and logits.exists()  # all or nothing
    from embedstore.util.fsutil import WriteLock

    with WriteLock(store.path / "index" / ".lock", "index build"):
        out = cli("rm", "--index", "--dataset", "scenes", *model, "-y", code=1)
    assert "being written" in out.output and (store.path / "index").exists()


def test_selections_that_match_nothing_are_errors(filled):
    cache, model, *_ = filled
    assert "say what to remove" in cli("rm", "--cache", str(cache.root), code=1).output
    assert "has no stores" in cli("rm", "--dataset", "nope", "--cache", str(cache.root), code=1).output
    assert "--texts: give --model" in cli("rm", "--texts", "--cache", str(cache.root), code=1).output
