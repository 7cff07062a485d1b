"""Prompt sets: built-ins, user files, expansion with an explicit class index."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from embedstore.errors import SpecError
from embedstore.score.prompts import (
    PromptSet,
    builtin_sets,
    expand,
    load_classes,
    load_prompt_set,
)

SCENES = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
AJOU_SHA256 = "9f329adb2458747957203c5d0778df0549eaecaff78c38b31cd3a190e94fe750"  # seed-methods.md A4


def test_builtin_sets():
    assert {"openai-imagenet", "ajou-2024"} <= set(builtin_sets())


def test_openai_imagenet_is_open_clips_80_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    ours = load_prompt_set("openai-imagenet").templates
    assert len(ours) == 80
    assert list(ours) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def test_ajou_2024_expands_to_the_seeds_312_prompts():
    e = expand(load_prompt_set("ajou-2024"), SCENES)
    assert len(e) == 312
    assert e.counts.tolist() == [52] * 6
    assert e.class_index.tolist() == sorted(e.class_index.tolist())  # contiguous, class order
    assert hashlib.sha256("\n".join(e.texts).encode()).hexdigest() == AJOU_SHA256
    assert e.texts[0] == "Buildings" and e.texts[51] == "The Windows"
    seed_templates = load_prompt_set("ajou-2024").templates
    openai = set(load_prompt_set("openai-imagenet").templates)
    assert len(seed_templates) == 49 and sum(t in openai for t in seed_templates) == 41


def test_class_specific_prompts_fire_only_on_exact_names():
    """Intel-style names get no class-specific prompt: 6 x 49 prompts."""
    e = expand(load_prompt_set("ajou-2024"), ["buildings", "forest", "glacier", "mountain", "sea", "street"])
    assert e.counts.tolist() == [49] * 6


def test_unequal_counts_keep_each_prompt_with_its_class():
    """Only 2 of 6 names match: 2x52 + 4x49 = 300 = 6x50, which the seed's reshape would
    have split across class boundaries. The explicit index keeps every prompt with its class."""
    classes = ["Buildings", "forest", "Glacier", "mountain", "sea", "street"]
    e = expand(load_prompt_set("ajou-2024"), classes)
    assert len(e) == 300 and e.counts.tolist() == [52, 49, 52, 49, 49, 49]
    for text, ci in zip(e.texts, e.class_index):
        own = classes[ci]
        if own in text:
            continue
        # the hand-written prompts without the class word belong to Buildings or Glacier
        assert text in load_prompt_set("ajou-2024").class_prompts[own]
    blocks = np.asarray(e.class_index).reshape(6, -1)  # what the seed did
    assert any(len(set(row.tolist())) > 1 for row in blocks)  # ... mixes classes


def test_user_files(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("# comment\na photo of a {}.\n\n{} in the wild\n")
    assert load_prompt_set(str(txt)).templates == ("a photo of a {}.", "{} in the wild")
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"templates": ["a {}"], "class_prompts": {"Sea": ["waves"]}}))
    e = expand(load_prompt_set(str(js)), ["Sea", "Street"])
    assert e.texts == ("a Sea", "waves", "a Street") and e.class_index.tolist() == [0, 0, 1]
    toml = tmp_path / "t.toml"
    toml.write_text('templates = ["a {}"]\n[class_prompts]\nStreet = ["a road"]\n')
    assert expand(load_prompt_set(str(toml)), ["Sea", "Street"]).counts.tolist() == [1, 2]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".txt", "no templates"),
        ("a photo\n", ".txt", "placeholder"),
        ('templates = ["a {}"]\nextra = 1\n', ".toml", "unknown key"),
        ("templates = [", ".toml", "not valid TOML"),
        ("{", ".json", "not valid JSON"),
        ('{"templates": "a {}"}', ".json", "list of strings"),
    ],
)
def test_bad_template_files_name_the_file(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(SpecError, match=message) as err:
        load_prompt_set(str(path))
    assert "bad" in str(err.value)


def test_unknown_set_lists_builtins():
    with pytest.raises(SpecError, match="ajou-2024"):
        load_prompt_set("no-such-set")


def test_expand_errors():
    ps = PromptSet("x", ("a {}",))
    with pytest.raises(SpecError, match="empty"):
        expand(ps, [])
    with pytest.raises(SpecError, match="more than once"):
        expand(ps, ["Sea", "Sea"])
    only_extra = PromptSet("y", (), {"Sea": ("waves",)})
    with pytest.raises(SpecError, match="'Street' gets no prompt"):
        expand(only_extra, ["Sea", "Street"])


def test_load_classes(tmp_path):
    assert load_classes(["A", " B "]) == ["A", "B"]
    f = tmp_path / "classes.txt"
    f.write_text("Sea\n# comment\nStreet\n")
    assert load_classes(str(f)) == ["Sea", "Street"]
    j = tmp_path / "classes.json"
    j.write_text('["x", "y"]')
    assert load_classes("classes.json", base=tmp_path) == ["x", "y"]
    with pytest.raises(SpecError, match="not found"):
        load_classes(str(tmp_path / "missing.txt"))
    with pytest.raises(SpecError, match="empty"):
        load_classes([])
