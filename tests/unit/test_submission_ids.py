"""Issue 10 item 3 (submission ids are the images' own) and ``vote`` on ``--format ajou`` files."""
from __future__ import annotations

import csv

import pytest

from embedstore.errors import SpecError
from embedstore.report.predictions import submission_ids
from embedstore.tune.vote import (
    output_format,
    read_predictions,
    vote_files,
    write_votes,
)


def test_ids_are_the_file_numbers_when_every_name_is_one():
    keys = ["10.jpg", "2.jpg", "0.png", "sub/7.jpg"]
    assert submission_ids(keys) == {"10.jpg": 10, "2.jpg": 2, "0.png": 0, "sub/7.jpg": 7}


@pytest.mark.parametrize("keys", [
    ["a.jpg", "c.jpg", "b.jpg"],                  # not numbers
    ["x/1.jpg", "y/1.jpg", "y/2.jpg"],            # a number repeats
    ["1.jpg", "img2.jpg", "3.jpg"],               # not every name is a number
])
def test_otherwise_ids_are_positions_in_the_full_natural_listing(keys):
    ids = submission_ids(keys)
    from embedstore.util.order import natural_order

    order = [keys[i] for i in natural_order(keys)]
    assert ids == {key: order.index(key) for key in keys}


def write(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_vote_reads_ajou_submissions_and_writes_one(tmp_path):
    a = write(tmp_path / "a.csv", ["id_idx", "label"], [[0, 1], [1, 2], [2, 0], [10, 3]])
    b = write(tmp_path / "b.csv", ["id_idx", "label"], [[10, 3], [2, 0], [1, 1], [0, 1]])
    c = write(tmp_path / "c.csv", ["id_idx", "label"], [[0, 2], [1, 1], [2, 0], [10, 0]])
    pf = read_predictions(a)
    assert pf.key_column == "id_idx" and pf.keys == ("0", "1", "2", "10") and pf.classes is None
    outcome = vote_files([a, b, c], tie="first")
    assert outcome.keys == ("0", "1", "2", "10")           # joined by id, natural order
    assert outcome.labels == ["1", "1", "0", "3"]          # 10: tie 3/3/0 -> 3 (two votes)
    assert output_format(outcome, "auto") == "ajou"
    out = write_votes(outcome, tmp_path / "voted.csv", "ajou")
    assert out.read_text().splitlines() == ["id_idx,label", "0,1", "1,1", "2,0", "10,3"]


def test_vote_mixes_and_refusals(tmp_path):
    a = write(tmp_path / "a.csv", ["id_idx", "label"], [[0, 1], [1, 2]])
    b = write(tmp_path / "b.csv", ["key", "label"], [["0", "1"], ["1", "1"]])
    outcome = vote_files([a, b])
    assert output_format(outcome, "auto") == "csv"          # not every input is a submission
    named = write(tmp_path / "n.csv", ["key", "label"], [["x.jpg", "Sea"], ["y.jpg", "Sea"]])
    other = write(tmp_path / "m.csv", ["key", "label"], [["x.jpg", "Sea"], ["y.jpg", "Forests"]])
    with pytest.raises(SpecError, match="not an integer"):
        write_votes(vote_files([named, other]), tmp_path / "o.csv", "ajou")
    bad = write(tmp_path / "bad.csv", ["id", "label"], [[0, 1]])
    with pytest.raises(SpecError, match="no 'key' column.*id_idx"):
        read_predictions(bad)
