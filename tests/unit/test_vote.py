"""Hard voting over prediction CSVs: join by key, errors, tie rules, split voting, the CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.errors import SpecError
from embedstore.tune.vote import (
    MAJORITY,
    TIED,
    UNANIMOUS,
    Split,
    hard_vote,
    parse_split,
    split_vote,
    vote_files,
)

CLASSES = ("cat", "dog", "fox")
SEED = Split(("mask", "gender", "age"), (3, 2, 3))


def write_csv(path: Path, rows: Sequence[Sequence[object]], classes: Optional[Sequence[str]] = CLASSES) -> str:
    """rows: (key, label[, probabilities...]); with ``classes`` the classify layout."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if classes is None:
            w.writerow(["key", "label"])
            w.writerows([r[:2] for r in rows])
        else:
            w.writerow(["key", "label", "label_index", *classes])
            for key, label, *probs in rows:
                w.writerow([key, label, list(classes).index(label), *probs])
    return str(path)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


# three files over keys img1, img2, img10 (natural order), probabilities in CLASSES order
A = [("img1", "cat", 0.6, 0.3, 0.1), ("img2", "dog", 0.2, 0.7, 0.1), ("img10", "fox", 0.1, 0.2, 0.7)]
B = [("img1", "cat", 0.5, 0.4, 0.1), ("img2", "fox", 0.1, 0.3, 0.6), ("img10", "dog", 0.1, 0.8, 0.1)]
C = [("img1", "cat", 0.9, 0.05, 0.05), ("img2", "dog", 0.3, 0.4, 0.3), ("img10", "cat", 0.9, 0.05, 0.05)]


def test_join_by_key_equals_aligned_files(tmp_path: Path):
    aligned = [write_csv(tmp_path / f"{n}.csv", rows) for n, rows in zip("abc", (A, B, C))]
    orders = ([2, 0, 1], [1, 2, 0], [0, 2, 1])
    shuffled = [write_csv(tmp_path / f"s{n}.csv", [rows[i] for i in order])
                for n, rows, order in zip("abc", (A, B, C), orders)]
    one, two = vote_files(aligned), vote_files(shuffled)
    assert one.keys == two.keys == ("img1", "img2", "img10")
    assert one.labels == two.labels == ["cat", "dog", "cat"]  # img10: three-way tie, c's cat has 0.9
    assert one.label_index.tolist() == two.label_index.tolist() == [0, 1, 0]
    assert one.votes.tolist() == two.votes.tolist() == [3, 2, 1]
    assert one.status.tolist() == [UNANIMOUS, MAJORITY, TIED]
    assert one.counts() == {"unanimous": 1, "majority": 1, "tied": 1}
    assert one.label_order.startswith("the probability columns of")


def test_img10_tie_by_confidence_and_first(tmp_path: Path):
    # img10: a fox 0.7, b dog 0.8, c cat 0.9 -> confidence: cat; first: fox (a is listed first)
    files = [write_csv(tmp_path / f"{n}.csv", rows) for n, rows in zip("abc", (A, B, C))]
    assert vote_files(files, tie="confidence").labels[2] == "cat"
    assert vote_files(files, tie="first").labels[2] == "fox"
    assert vote_files(files[::-1], tie="first").labels[2] == "cat"


def test_missing_key_names_key_and_file(tmp_path: Path):
    a = write_csv(tmp_path / "a.csv", A)
    b = write_csv(tmp_path / "b.csv", B[:2])
    with pytest.raises(SpecError, match=r"'img10'.*missing from prediction file .*b\.csv"):
        vote_files([a, b])
    with pytest.raises(SpecError, match=r"'img10'.*missing from prediction file .*b\.csv"):
        vote_files([b, a])  # a key only a later file has is missing from the earlier one
    extra = write_csv(tmp_path / "extra.csv", [*A, ("img3", "cat", 1, 0, 0), ("img4", "cat", 1, 0, 0)])
    with pytest.raises(SpecError, match=r"'img3' \(and 1 more\) is missing from prediction file .*a\.csv"):
        vote_files([a, extra])


def test_duplicate_key_and_bad_files_are_named(tmp_path: Path):
    a = write_csv(tmp_path / "a.csv", A)
    dup = write_csv(tmp_path / "dup.csv", [*B, ("img2", "cat", 1, 0, 0)])
    with pytest.raises(SpecError, match=r"dup\.csv: duplicate key 'img2' \(lines 3 and 5\)"):
        vote_files([a, dup])
    gap = tmp_path / "gap.csv"
    gap.write_text("key,label\nimg1,cat\n\nimg1,dog\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"gap\.csv: duplicate key 'img1' \(lines 2 and 4\)"):
        vote_files([a, str(gap)])
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("key,pred\nimg1,cat\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"nolabel\.csv: no 'label' column"):
        vote_files([a, str(nolabel)])
    badprob = tmp_path / "badprob.csv"
    badprob.write_text("key,label,cat,dog\nimg1,cat,high,0.1\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"badprob\.csv: key 'img1', column 'cat': 'high' is not a finite number"):
        vote_files([a, str(badprob)])
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("key,label,cat,dog\nimg1,cow,0.9,0.1\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"unknown\.csv: key 'img1' has label 'cow'"):
        vote_files([a, str(unknown)])
    with pytest.raises(SpecError, match=r"missing\.csv: not found"):
        vote_files([a, str(tmp_path / "missing.csv")])
    with pytest.raises(SpecError, match="at least two"):
        vote_files([a])


def test_hard_vote_tie_rules_on_arrays():
    # columns: (0 vs 1 tie), (0,1,2 three-way tie), majority 2, unanimous 1
    codes = np.array([[0, 0, 2, 1],
                      [1, 1, 2, 1],
                      [1, 2, 0, 1],
                      [0, 1, 2, 1]])
    scores = np.array([[0.9, 0.5, 0.5, 0.9],
                       [0.3, 0.4, 0.5, 0.9],
                       [0.3, 0.45, 0.5, 0.9],
                       [0.2, 0.3, 0.5, 0.9]])
    first = hard_vote(codes, 3, "first")
    assert first.winners.tolist() == [0, 1, 2, 1]  # col 1: file 0 votes 0 but 0 has 1 vote; 1 has 2 (files 1, 3)
    assert first.status.tolist() == [TIED, MAJORITY, MAJORITY, UNANIMOUS]
    assert first.votes.tolist() == [2, 2, 3, 4]
    conf = hard_vote(codes, 3, "confidence", scores)
    # col 0: label 0 sums 0.9 + 0.2 = 1.1, label 1 sums 0.3 + 0.3 = 0.6 -> 0
    assert conf.winners.tolist() == [0, 1, 2, 1]
    swapped = scores.copy()
    swapped[[0, 3], 0] = [0.1, 0.1]  # label 0: 0.2 < label 1: 0.6
    assert hard_vote(codes, 3, "confidence", swapped).winners[0] == 1
    assert hard_vote(codes, 3, "first", swapped).winners[0] == 0

    three = np.array([[2], [0], [1]])  # every file disagrees
    assert hard_vote(three, 3, "first").winners.tolist() == [2]
    res = hard_vote(three, 3, "confidence", np.array([[0.5], [0.6], [0.7]]))
    assert res.winners.tolist() == [1] and not res.fell_back.any()
    equal = hard_vote(three, 3, "confidence", np.array([[0.6], [0.6], [0.5]]))
    assert equal.winners.tolist() == [2] and equal.equal_confidence.tolist() == [True]
    noise = hard_vote(np.array([[0], [1], [1], [0]]), 2, "confidence", np.array([[0.3], [0.1], [0.2], [0.0]]))
    assert noise.winners.tolist() == [0] and noise.equal_confidence.tolist() == [True]  # 0.1 + 0.2 == 0.3
    unknown = hard_vote(three, 3, "confidence", np.array([[0.5], [np.nan], [0.7]]))
    assert unknown.winners.tolist() == [2] and unknown.fell_back.tolist() == [True]
    assert hard_vote(three, 3, "confidence", None).fell_back.tolist() == [True]
    with pytest.raises(SpecError, match="tie rule"):
        hard_vote(three, 3, "random")


def test_no_probability_columns_fall_back_to_first_with_a_note(tmp_path: Path):
    a = write_csv(tmp_path / "a.csv", [("k1", "x"), ("k2", "y")], classes=None)
    b = write_csv(tmp_path / "b.csv", [("k2", "y"), ("k1", "z")], classes=None)
    out = vote_files([a, b])
    assert out.labels == ["x", "y"] and out.status.tolist() == [TIED, UNANIMOUS]
    assert out.label_order == "natural sort of the labels" and out.classes == ("x", "y", "z")
    assert out.label_index.tolist() == [0, 1]
    assert any("no file has probability columns" in n for n in out.notes)
    assert vote_files([b, a]).labels == ["z", "y"]


def test_mixed_probability_files_fall_back_per_row(tmp_path: Path):
    a = write_csv(tmp_path / "a.csv", A)
    c = write_csv(tmp_path / "c.csv", [("img1", "dog"), ("img2", "fox"), ("img10", "dog")], classes=None)
    out = vote_files([a, c])  # img1 cat/dog tie with c lacking probabilities -> first (a: cat)
    assert out.labels == ["cat", "dog", "fox"]
    assert any("fell back to the 'first' rule" in n and "c.csv" in n for n in out.notes)
    assert out.label_order == "natural sort of the labels"


def test_parse_split():
    s = parse_split("mask=3,gender=2,age=3")
    assert s == SEED and s.weights == (6, 3, 1) and s.size == 18
    assert parse_split("3, 2, 3").radices == (3, 2, 3) and parse_split("3,2,3").names == ("d1", "d2", "d3")
    codes = np.arange(18)
    digits = s.decode(codes)
    assert digits[17].tolist() == [2, 1, 2] and digits[4].tolist() == [0, 1, 1]
    assert (digits[:, 0] * 6 + digits[:, 1] * 3 + digits[:, 2]).tolist() == codes.tolist()
    assert s.encode(digits).tolist() == codes.tolist()
    for bad, msg in (("6,3,1", "has 1 values"), ("18", "at least two"), ("a=3,a=2", "twice"), ("3,x", "not RADIX")):
        with pytest.raises(SpecError, match=msg):
            parse_split(bad)


def test_split_vote_differs_from_plain_mode():
    # three files that all disagree: plain vote is a tie; per attribute mask 0, gender 1, age 0 -> 3
    a, b, c = 0, 6 * 0 + 3 * 1 + 1, 6 * 1 + 3 * 1 + 0
    three = np.array([[a], [b], [c]])
    winners, results = split_vote(three, SEED, "first")
    assert winners.tolist() == [3]
    assert [r.status.tolist() for r in results] == [[MAJORITY], [MAJORITY], [MAJORITY]]
    assert hard_vote(three, 18, "first").winners.tolist() == [0]
    # five files: plain mode 0 (2 votes); per attribute mask 1, gender 1, age 0 (3 votes each) -> 9
    five = np.array([[0], [0], [9], [10], [11]])
    assert split_vote(five, SEED, "first")[0].tolist() == [9]
    assert hard_vote(five, 18, "first").winners.tolist() == [0]


def test_split_confidence_uses_attribute_marginals(tmp_path: Path):
    # radices 2,2: a votes 0 = (0,0), b votes 3 = (1,1); both attributes tie.
    # a: p = [.4,.1,.1,.4] -> P(d1=0) = .5, P(d2=0) = .5; b: p = [.3,.3,.1,.3] -> P(d1=1) = .4, P(d2=1) = .6
    classes = ("0", "1", "2", "3")
    a = write_csv(tmp_path / "a.csv", [("k", "0", .4, .1, .1, .4)], classes)
    b = write_csv(tmp_path / "b.csv", [("k", "3", .3, .3, .1, .3)], classes)
    two = parse_split("2,2")
    out = vote_files([a, b], tie="confidence", split=two)
    assert out.labels == ["1"] and out.label_index.tolist() == [1] and out.votes.tolist() == [0]
    assert out.status.tolist() == [TIED] and out.attribute_ties == {"d1": 1, "d2": 1}
    assert vote_files([a, b], tie="first", split=two).labels == ["0"]
    assert vote_files([b, a], tie="first", split=two).labels == ["3"]


def test_split_files_end_to_end_with_names_and_integers(tmp_path: Path):
    names = tuple(f"c{i}" for i in range(18))
    rows = {"a": [0, 0, 5], "b": [4, 0, 5], "c": [9, 17, 5]}  # keys x1, x2, x3

    def probs(code: int) -> list[float]:
        p = [0.0] * 18
        p[code] = 1.0
        return p

    named = [write_csv(tmp_path / f"n{f}.csv", [(f"x{i + 1}", names[c], *probs(c)) for i, c in enumerate(cs)], names)
             for f, cs in rows.items()]
    ints = [write_csv(tmp_path / f"i{f}.csv", [(f"x{i + 1}", str(c)) for i, c in enumerate(cs)], None)
            for f, cs in rows.items()]
    by_name = vote_files(named, split=SEED)
    by_int = vote_files(ints, split=SEED)
    assert by_name.label_index.tolist() == by_int.label_index.tolist() == [3, 0, 5]
    assert by_name.labels == ["c3", "c0", "c5"] and by_int.labels == ["3", "0", "5"]
    assert by_int.status.tolist() == [MAJORITY, MAJORITY, UNANIMOUS]
    assert by_int.votes.tolist() == [0, 2, 3]
    # x2: a 0 (0,0,0), b 0, c 17 (2,1,2): plain majority kept


def test_split_label_errors(tmp_path: Path):
    a = write_csv(tmp_path / "a.csv", A)
    b = write_csv(tmp_path / "b.csv", B)
    with pytest.raises(SpecError, match=r"describes 18 classes but the probability columns of .*a\.csv name 3"):
        vote_files([a, b], split=SEED)
    plain = write_csv(tmp_path / "p.csv", [("img1", "cat"), ("img2", "cat"), ("img10", "cat")], None)
    with pytest.raises(SpecError, match=r"--split needs integer labels: prediction file .*a\.csv, key 'img1'"):
        vote_files([a, plain], split=SEED)
    big = write_csv(tmp_path / "big.csv", [("k", "18")], None)
    ok = write_csv(tmp_path / "ok.csv", [("k", "1")], None)
    with pytest.raises(SpecError, match=r"big\.csv: key 'k' has label '18', outside 0\.\.17"):
        vote_files([ok, big], split=SEED)
    # radices given as place values by mistake: 6,3,3 accepts 0..17 but the top digit stays small
    out = vote_files([ok, ok], split=parse_split("6,3,3"))
    assert any("check that --split lists numbers of values" in n for n in out.notes)


def test_cli_vote_end_to_end(tmp_path: Path):
    from embedstore.cli.main import main

    files = [write_csv(tmp_path / f"{n}.csv", rows) for n, rows in zip("abc", (A, B, C))]
    cache = tmp_path / "cache"
    out = tmp_path / "voted.csv"
    runner = CliRunner()
    res = runner.invoke(main, ["vote", *files, "--out", str(out), "--cache", str(cache)])
    assert res.exit_code == 0, res.output
    assert "1 unanimous, 1 majority, 1 tied (ties: confidence)" in res.output
    assert read_csv(out) == [["key", "label", "label_index", "votes"],
                             ["img1", "cat", "0", "3"], ["img2", "dog", "1", "2"], ["img10", "cat", "0", "1"]]
    res = runner.invoke(main, ["vote", *files, "--ties", "first", "--cache", str(cache)])
    assert res.exit_code == 0, res.output
    entries = [json.loads(line) for line in (cache / "runs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["kind"] for e in entries] == ["vote", "vote"]
    first, second = entries
    assert first["inputs"] == [str(Path(f).resolve()) for f in files] and first["tie_rule"] == "confidence"
    assert first["counts"] == {"unanimous": 1, "majority": 1, "tied": 1} and first["split"] is None
    assert first["outputs"]["predictions"] == str(out)
    assert second["tie_rule"] == "first"
    default_out = Path(second["outputs"]["predictions"])
    assert default_out == cache / "runs" / second["run_id"] / "voted.csv"
    assert read_csv(default_out)[3] == ["img10", "fox", "2", "1"]
    listed = runner.invoke(main, ["runs", "--cache", str(cache)])
    assert listed.exit_code == 0 and listed.output.count(" vote ") >= 2, listed.output

    res = runner.invoke(main, ["vote", *files, "--split", "mask=3,gender=2,age=3", "--cache", str(cache)])
    assert res.exit_code == 1
    assert "error: --split mask=3,gender=2,age=3 describes 18 classes" in res.output
    bad = write_csv(tmp_path / "short.csv", A[:2])
    res = runner.invoke(main, ["vote", files[0], bad, "--out", str(tmp_path / "x.csv"), "--cache", str(cache)])
    assert res.exit_code == 1
    assert "error: key 'img10' is missing from prediction file" in res.output and "short.csv" in res.output
    assert not (tmp_path / "x.csv").exists()
    assert len((cache / "runs.jsonl").read_text(encoding="utf-8").splitlines()) == 2  # failures are not logged


def test_top_k_files_vote_and_break_ties_by_their_own_probabilities(tmp_path):
    """classify writes class_N/probability_N above 20 classes: the label's own probability decides ties."""
    from embedstore.tune.vote import read_predictions, vote_files

    header = "key,label,label_index,class_1,probability_1,class_2,probability_2\n"
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text(header + "x.jpg,cat,3,cat,0.6,dog,0.3\ny.jpg,dog,4,dog,0.9,cat,0.05\n")
    b.write_text(header + "x.jpg,dog,4,dog,0.8,cat,0.1\ny.jpg,dog,4,dog,0.7,eel,0.2\n")
    pf = read_predictions(a)
    assert pf.classes is None and pf.label_probabilities().tolist() == [0.6, 0.9]
    out = vote_files([a, b])
    assert out.labels == ["dog", "dog"]  # x: one vote each, dog's 0.8 beats cat's 0.6
    assert not any("first" in n for n in out.notes)
