"""Issue 10: a validation split that leaves a class out of either side is refused, naming the
class and, for grouped splits, why (the README's old example grouped by the class folder)."""
from __future__ import annotations

import pytest

from embedstore.errors import SpecError
from embedstore.score.splits import SplitSpec, split


def class_folders(classes: int = 6, per: int = 20):
    keys = [f"C{c}/img{i}.jpg" for c in range(classes) for i in range(per)]
    return keys, [k.split("/")[0] for k in keys]


def test_grouping_by_the_class_folder_is_refused_naming_the_class():
    keys, labels = class_folders()
    with pytest.raises(SpecError) as err:
        split(keys, labels, SplitSpec(0.2, group_regex=r"^([^/]+)/"))
    message = str(err.value)
    assert "leaves class 'C" in message and "side" in message
    assert "captures the class" in message and "^[^/]+/([^/]+)/" in message


def test_the_readme_example_groups_by_person_and_keeps_every_class_on_both_sides():
    keys = [f"C{c}/p{p}/img{i}.jpg" for c in range(3) for p in range(10) for i in range(4)]
    labels = [k.split("/")[0] for k in keys]
    train, val = split(keys, labels, SplitSpec(0.2, group_regex=r"^[^/]+/([^/]+)/"))
    assert {labels[i] for i in train} == {labels[i] for i in val} == {"C0", "C1", "C2"}
    person = [k.split("/")[1] for k in keys]
    assert not {(labels[i], person[i]) for i in train} & {(labels[i], person[i]) for i in val}


def test_a_class_in_a_single_group_is_refused_with_the_groups_file(tmp_path):
    keys = [f"img{i}.jpg" for i in range(60)]
    labels = ["a"] * 25 + ["b"] * 25 + ["rare"] * 10
    groups = [f"g{i % 10}" for i in range(50)] + ["solo"] * 10
    path = tmp_path / "groups.csv"
    path.write_text("key,group\n" + "".join(f"{k},{g}\n" for k, g in zip(keys, groups)))
    with pytest.raises(SpecError, match=r"class 'rare'.*1 group\(s\) \(e\.g\. 'solo'\)"):
        split(keys, labels, SplitSpec(0.2, groups=str(path)))
