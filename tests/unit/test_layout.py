"""The README's "Layout of the code" lists every module of the package, and nothing that is gone."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def listed_modules() -> set[str]:
    """Paths named by the layout tree, built from its indentation (two spaces per level)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout of the code", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    stack: list[str] = []
    found = set()
    for line in block.splitlines():
        name = line.strip().split()[0] if line.strip() else ""
        if not name:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        stack = stack[:depth] + [name]
        if name.endswith(".py"):
            found.add("".join(stack))
    return found


def test_the_readme_layout_lists_every_module():
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / "embedstore").rglob("*.py")
              if p.name != "__init__.py" or p.parent == ROOT / "embedstore"}
    listed = listed_modules()
    assert sorted(actual - listed) == [], "modules missing from README's 'Layout of the code'"
    assert sorted(listed - actual) == [], "README's 'Layout of the code' lists modules that do not exist"
