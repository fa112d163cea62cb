"""diff on real vulnerable -> fixed releases: the functions the CVE fixes changed
rank in the top 5 of the changes, on every pair of benchmarks/diff_pairs.toml
marked `top5` (the benchmark ranks them all, held-out pairs included)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from micropatch.tools.diff.match import DiffResult, diff_modules

from .wheels import module_index

pytestmark = pytest.mark.realworld

PAIRS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "diff_pairs.toml"
PAIRS: list[dict[str, Any]] = tomllib.loads(PAIRS_FILE.read_text())["pair"]
TOP = 5


def _diff(pair: dict[str, Any]) -> DiffResult:
    python, platform = pair.get("python", "3.11"), pair.get("platform")
    old = module_index(pair["old"], pair["member"], python, platform)
    new = module_index(pair["new"], pair.get("new_member", pair["member"]), python, platform)
    return diff_modules(old, new)


def _rank(result: DiffResult, old_offset: int) -> int:
    ranks = [n for n, c in enumerate(result.changes, 1) if c.old.start == old_offset]
    assert ranks, f"{old_offset:#x} is not among the {len(result.changes)} changes"
    return ranks[0]


@pytest.mark.parametrize(
    "pair", [p for p in PAIRS if p["top5"]], ids=lambda p: f"{p['set']}: {p['label']}"
)
def test_fixed_functions_rank_in_top_5(pair: dict[str, Any]) -> None:
    result = _diff(pair)
    for offset, what in pair["fixed"].items():
        rank = _rank(result, int(offset, 0))
        assert rank <= TOP, f"{what} ranks #{rank}"
        assert result.changes[rank - 1].kind == "logic", what


def test_pillow_setimage_is_matched_by_name() -> None:
    (pair,) = [p for p in PAIRS if p["old"] == "pillow==12.1.0"]
    result = _diff(pair)
    for offset in (0x1B870, 0x1CD00):
        change = result.changes[_rank(result, offset) - 1]
        assert change.name == "_setimage" and change.new.start == offset


def test_lxml_matches_most_functions_of_the_stripped_module() -> None:
    (pair,) = [p for p in PAIRS if p["old"] == "lxml==6.0.0"]
    assert _diff(pair).matched > 4000
