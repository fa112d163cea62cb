"""docs/architecture.md maps the tree: every package and top-level module of
`src/micropatch/`, and every package inside one, has its line there, and no line
names one that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SRC = ROOT / "src" / "micropatch"
DOC = ROOT / "docs" / "architecture.md"
SECTION = "## Packages and modules"


def _holds_python(directory: Path) -> bool:
    return any(directory.glob("*.py"))


def in_the_tree() -> set[str]:
    """`name.py` for a top-level module, `name/` for a package, `name/inner/` for a
    package inside one (directories that hold Python files: not data, not caches)."""
    found = {p.name for p in SRC.glob("*.py") if p.name != "__init__.py"}
    for package in (d for d in SRC.iterdir() if d.is_dir() and _holds_python(d)):
        found.add(f"{package.name}/")
        found |= {
            f"{package.name}/{inner.name}/"
            for inner in package.iterdir()
            if inner.is_dir() and _holds_python(inner)
        }
    return found


def in_the_map() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\s*- `([^`]+)` — ", section, flags=re.MULTILINE))


def test_every_package_and_top_level_module_is_in_the_map() -> None:
    missing = sorted(in_the_tree() - in_the_map())
    assert not missing, f"not in {SECTION!r} of docs/architecture.md (one line each): {missing}"


def test_the_map_names_nothing_that_is_gone() -> None:
    gone = sorted(in_the_map() - in_the_tree())
    assert not gone, f"{SECTION!r} of docs/architecture.md names what is not in the tree: {gone}"


def test_the_map_test_sees_the_tree() -> None:
    """Not vacuous: both sides are read, and nested packages are seen."""
    assert {"errors.py", "live/", "arch/x86_64/", "tools/diff/"} <= in_the_tree()
    assert {"errors.py", "live/", "arch/x86_64/", "tools/diff/"} <= in_the_map()
