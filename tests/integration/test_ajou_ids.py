"""Issue 10 item 3: ``classify --format ajou`` takes id_idx from the images, never from the rows
that happened to encode; a failed image is refused unless ``--missing-label N``."""
from __future__ import annotations

import csv
import shutil

import pytest
from click.testing import CliRunner

from embedstore.cli.main import main
from embedstore.encode.toy import make_image_folder


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def read(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture()
def numbered(tmp_path, tiny_open_clip_dir):
    """A flat folder 0.jpg..4.jpg with 2.jpg empty, encoded, and an experiment on it."""
    src = make_image_folder(tmp_path / "src", per_class=1, seed=3)
    flat = tmp_path / "test"
    flat.mkdir()
    for i, image in enumerate(sorted(src.glob("*/*.jpg"))[:5]):
        shutil.copy(image, flat / f"{i}.jpg")
    (flat / "2.jpg").write_bytes(b"")
    cache = tmp_path / "c"
    model = f"local-dir:{tiny_open_clip_dir}"
    out = cli("encode", str(flat), "--model", model, "--cache", str(cache), "--device", "cpu", "--workers", "0",
              "--no-progress")
    assert out.exit_code == 0 and "4 encoded" in out.output and "1 failed" in out.output, out.output
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\n")
    exp = tmp_path / "exp.toml"
    exp.write_text(f'dataset = "test"\nclasses = ["Sea", "Forests", "Street"]\ntemplates = "{templates}"\n'
                   f'[[models]]\nmodel = "{model}"\n')
    return exp, cache


def test_failed_image_is_refused_and_named(numbered, tmp_path):
    exp, cache = numbered
    out = cli("classify", str(exp), "--cache", str(cache), "--format", "ajou", "--out", str(tmp_path / "s.csv"))
    assert out.exit_code == 1
    assert "'2.jpg'" in out.output and "--missing-label N" in out.output and "EmptyFile" in out.output
    assert not (tmp_path / "s.csv").exists()
    assert not (cache / "runs.jsonl").exists() or "ajou" not in (cache / "runs.jsonl").read_text()


def test_ids_are_the_file_numbers_with_a_stated_fallback(numbered, tmp_path):
    exp, cache = numbered
    out = cli("classify", str(exp), "--cache", str(cache), "--out", str(tmp_path / "p.csv"))
    assert out.exit_code == 0, out.output
    predicted = {row[0]: row[2] for row in read(tmp_path / "p.csv")[1:]}  # key -> label_index
    assert sorted(predicted) == ["0.jpg", "1.jpg", "3.jpg", "4.jpg"]
    out = cli("classify", str(exp), "--cache", str(cache), "--format", "ajou", "--missing-label", "2",
              "--out", str(tmp_path / "s.csv"))
    assert out.exit_code == 0, out.output
    rows = read(tmp_path / "s.csv")
    assert rows[0] == ["id_idx", "label"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"]  # 3.jpg is id 3, not 2
    assert {r[0]: r[1] for r in rows[1:]} == {"0": predicted["0.jpg"], "1": predicted["1.jpg"], "2": "2",
                                             "3": predicted["3.jpg"], "4": predicted["4.jpg"]}
    bad = cli("classify", str(exp), "--cache", str(cache), "--format", "ajou", "--missing-label", "7")
    assert bad.exit_code == 1 and "not a class index" in bad.output
    usage = cli("classify", str(exp), "--cache", str(cache), "--missing-label", "1")
    assert usage.exit_code == 2 and "--format ajou" in usage.output
