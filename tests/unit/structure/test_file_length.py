"""Every Python file of the project is at most 450 lines (STYLE.md): a longer one is
split by concern."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LIMIT = 450


def python_files() -> list[Path]:
    return sorted(p for top in ("src", "tests", "benchmarks") for p in (ROOT / top).rglob("*.py"))


def test_every_python_file_is_at_most_450_lines() -> None:
    lengths = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in python_files()}
    longer = {str(p): n for p, n in lengths.items() if n > LIMIT}
    assert not longer, f"longer than {LIMIT} lines: {longer}"


def test_the_length_test_sees_the_tree() -> None:
    """Not vacuous: it reads the project's own files (not, say, an installed copy's)."""
    files = python_files()
    assert Path(__file__).resolve() in files
    assert any(p.match("src/micropatch/errors.py") for p in files)
