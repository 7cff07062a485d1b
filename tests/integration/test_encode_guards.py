"""Issue 10: datasets are never replaced silently (item 2), and encode's guards: a no-op run
without torch, exit 1 when nothing could be encoded, unsupported sources named, a view size the
model cannot take refused before a store exists, --help texts and defaults."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from embedstore import Cache
from embedstore.cli.main import main
from embedstore.encode.loop import EncodeOptions, encode_images
from embedstore.encode.sources import list_source
from embedstore.encode.toy import make_image_folder
from embedstore.errors import SourceError, SpecError
from embedstore.store.views import ViewOptions


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def keys_of(cache: Cache, name: str, spec) -> list[str]:
    return cache.open_image_store(name, spec).read_keys_labels().keys


def test_same_name_from_another_folder_is_refused(tmp_path, open_clip_spec, fast_options):
    a = make_image_folder(tmp_path / "a" / "images", per_class=2, seed=1)
    b = make_image_folder(tmp_path / "b" / "images", per_class=1, seed=2)
    (b / "Sea" / "extra.jpg").write_bytes((b / "Sea" / "img0.jpg").read_bytes())
    cache = Cache(tmp_path / "c")
    first = encode_images(a, open_clip_spec, cache, options=fast_options)
    assert first.dataset == "images" and first.rows == 12
    with pytest.raises(SourceError) as err:
        encode_images(b, open_clip_spec, cache, options=fast_options)
    message = str(err.value)
    assert str(a.resolve()) in message and str(b.resolve()) in message
    assert "--dataset NAME" in message and "--replace" in message
    assert len(keys_of(cache, "images", open_clip_spec)) == 12  # a's rows untouched
    # way out 1: its own name
    other = encode_images(b, open_clip_spec, cache, dataset="images-b", options=fast_options)
    assert other.rows == 7 and other.replaced is None
    # way out 2: replace on purpose; the summary says whose rows went
    replaced = encode_images(b, open_clip_spec, cache, options=EncodeOptions(**{**fast_options.__dict__,
                                                                               "replace": True}))
    assert replaced.replaced == str(a.resolve())
    assert replaced.dropped == 12 - 6  # a's keys that b does not have (b's 6 shared keys are re-encoded)
    assert replaced.rows == 7 and keys_of(cache, "images", open_clip_spec) == keys_of(cache, "images-b",
                                                                                      open_clip_spec)


def test_list_files_with_one_stem_do_not_share_rows_silently(tmp_path, image_folder, tiny_open_clip_dir):
    txt, csv = image_folder / "list.txt", image_folder / "list.csv"
    txt.write_text("Sea/img0.jpg\nSea/img1.jpg\n")
    csv.write_text("path,label\nForests/img0.jpg,Forests\n")
    cache = str(tmp_path / "c")
    common = ["--model", f"local-dir:{tiny_open_clip_dir}", "--cache", cache, "--device", "cpu", "--workers", "0",
              "--no-progress"]
    assert cli("encode", str(txt), *common).exit_code == 0
    out = cli("encode", str(csv), *common)
    assert out.exit_code == 1 and "was encoded from" in out.output and str(txt.resolve()) in out.output
    out = cli("encode", str(csv), *common, "--replace")
    assert out.exit_code == 0, out.output
    assert f"source {txt.resolve()} replaced (2 of its rows dropped)" in out.output


def test_rows_are_dropped_only_when_the_same_source_lost_files(tmp_path, image_folder, tiny_open_clip_dir):
    cache = str(tmp_path / "c")
    common = ["--model", f"local-dir:{tiny_open_clip_dir}", "--cache", cache, "--device", "cpu", "--workers", "0",
              "--no-progress"]
    assert cli("encode", str(image_folder), *common).exit_code == 0
    (image_folder / "Sea" / "img0.jpg").unlink()
    out = cli("encode", str(image_folder), *common)
    assert out.exit_code == 0 and "1 rows of images deleted from the source dropped" in out.output
    assert "23 rows in store" in out.output


def test_noop_encode_does_not_import_torch(tmp_path, image_folder, open_clip_spec, tiny_open_clip_dir,
                                           fast_options):
    cache = Cache(tmp_path / "c")
    encode_images(image_folder, open_clip_spec, cache, options=fast_options)
    code = (
        "import sys\n"
        "from embedstore.cli.main import main\n"
        "try:\n"
        f"    main(['encode', {str(image_folder)!r}, '--model', {'local-dir:' + str(tiny_open_clip_dir)!r},"
        f" '--cache', {str(cache.root)!r}, '--no-progress'], standalone_mode=False)\n"
        "finally:\n"
        "    print('MODULES', 'torch' in sys.modules, 'open_clip' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "0 encoded, 24 already cached" in proc.stdout
    assert "MODULES False False" in proc.stdout
    # a change is still seen (and then the model is loaded): a new image is encoded
    (image_folder / "Sea" / "new.jpg").write_bytes((image_folder / "Sea" / "img0.jpg").read_bytes())
    again = encode_images(image_folder, open_clip_spec, cache, options=fast_options)
    assert again.encoded == 1 and again.cached == 24


def test_changed_weights_are_not_taken_for_a_noop(tmp_path, image_folder, tiny_open_clip_dir, fast_options):
    import shutil

    from embedstore import EncoderSpec
    from embedstore.encode.toy import make_tiny_open_clip
    from embedstore.errors import FingerprintMismatchError

    model = tmp_path / "model"
    shutil.copytree(tiny_open_clip_dir, model)
    spec = EncoderSpec(f"local-dir:{model}")
    cache = Cache(tmp_path / "c")
    encode_images(image_folder, spec, cache, options=fast_options)
    make_tiny_open_clip(model, seed=5)  # new weights under the same spec
    with pytest.raises(FingerprintMismatchError, match="weights_digest"):
        encode_images(image_folder, spec, cache, options=fast_options)


def test_nothing_encoded_exits_1_and_says_how_list_paths_resolve(tmp_path, image_folder, tiny_open_clip_dir):
    sub = tmp_path / "lists"
    sub.mkdir()
    listing = sub / "train.csv"
    listing.write_text("path,label\nscenes/Sea/img0.jpg,Sea\nscenes/Sea/img1.jpg,Sea\n")  # relative to the cwd, not sub
    out = cli("encode", str(listing), "--model", f"local-dir:{tiny_open_clip_dir}", "--cache", str(tmp_path / "c"),
              "--device", "cpu", "--workers", "0", "--no-progress")
    assert out.exit_code == 1
    assert "2 failed" in out.output and "none of the 2 image(s) tried could be encoded" in out.output
    assert f"relative to the list file's folder ({sub.resolve()})" in out.output
    again = cli("encode", str(listing), "--model", f"local-dir:{tiny_open_clip_dir}", "--cache", str(tmp_path / "c"),
                "--device", "cpu", "--workers", "0", "--no-progress")  # earlier failures skipped: still nothing
    assert again.exit_code == 1 and "2 earlier failures skipped" in again.output, again.output


@pytest.mark.parametrize("name, content, message", [
    ("images.zip", b"PK\x05\x06" + b"\0" * 18, "an archive"),
    ("images.tar.gz", b"\x1f\x8b" + b"\0" * 30, "a compressed tar"),
    ("img.jpg", None, "a single image"),
    ("list.tsv", b"path\tlabel\nSea/img0.jpg\tSea\n", "a .tsv file"),
    ("list.json", b"[]", "not a supported image list"),
])
def test_unsupported_sources_are_refused_naming_the_supported_ones(image_folder, name, content, message):
    path = image_folder / name
    path.write_bytes(content if content is not None else (image_folder / "Sea" / "img0.jpg").read_bytes())
    with pytest.raises(SourceError) as err:
        list_source(path)
    assert message in str(err.value) and "a folder of images" in str(err.value) and ".csv list" in str(err.value)


def test_urls_in_a_list_are_refused(image_folder):
    listing = image_folder / "urls.csv"
    listing.write_text("path\nhttps://example.com/a.jpg\n")
    with pytest.raises(SourceError, match="is a URL"):
        list_source(listing)


def test_a_view_size_the_model_cannot_take_is_refused_before_a_store_exists(tmp_path, image_folder,
                                                                            open_clip_spec, fast_options):
    cache = Cache(tmp_path / "c")
    with pytest.raises(SpecError, match=r"--size 224: .* takes 32px inputs.*use --size 32") as err:
        encode_images(image_folder, open_clip_spec, cache, view_options=ViewOptions(resize_mode="squash", size=224),
                      options=fast_options)
    assert "Traceback" not in str(err.value)
    assert not (cache.root / "datasets").exists()
    ok = encode_images(image_folder, open_clip_spec, cache, view_options=ViewOptions(resize_mode="squash"),
                       options=fast_options)
    assert ok.rows == 24


def test_help_texts_and_defaults():
    from embedstore.util.system import default_workers, usable_cores

    encode_help = cli("encode", "--help").output
    assert "longest" in encode_help
    for option in ("--device", "--batch-size", "--workers"):
        line = encode_help.split(option, 1)[1].split("\n  -", 1)[0]
        assert len(line.split()) > 3, f"{option} has no help text"
    assert "usable CPU cores" in encode_help
    for command in (["prompts"], ["classify"], ["query"], ["soup"]):
        text = cli(*command, "--help").output
        assert "[default: auto]" in text.split("--device", 1)[1].split("\n  -", 1)[0], command
    assert 1 <= default_workers() <= min(8, usable_cores())
    assert EncodeOptions().workers == default_workers()
