"""diff on the real pairs: the functions the real-world patches fix rank in the
top 5 of the changes between the vulnerable and the fixed release."""

from __future__ import annotations

import pytest

from micropatch.tools.diff.match import DiffResult, diff_modules

from .wheels import module_index

pytestmark = pytest.mark.realworld

PILLOW = "PIL/_imaging.cpython-311-x86_64-linux-gnu.so"
LXML = "lxml/etree.cpython-311-x86_64-linux-gnu.so"
TOP = 5


def _diff(old: str, new: str, member: str) -> DiffResult:
    return diff_modules(module_index(old, member), module_index(new, member))


def _rank(result: DiffResult, old_offset: int) -> int:
    ranks = [n for n, c in enumerate(result.changes, 1) if c.old.start == old_offset]
    assert ranks, f"{old_offset:#x} is not among the {len(result.changes)} changes"
    return ranks[0]


def test_pillow_both_setimage_rank_in_top_5() -> None:
    result = _diff("pillow==12.1.0", "pillow==12.1.1", PILLOW)
    for offset in (0x1B870, 0x1CD00):  # decode.c and encode.c _setimage (patch.toml)
        assert _rank(result, offset) <= TOP
        change = result.changes[_rank(result, offset) - 1]
        assert change.name == "_setimage" and change.new.start == offset


def test_lxml_schematron_report_ranks_in_top_5() -> None:
    # xmlSchematronReportSuccess, with the fixed formatter inlined (lxml patch.toml)
    result = _diff("lxml==6.0.0", "lxml==6.0.1", LXML)
    assert _rank(result, 0x2AAE30) <= TOP
    assert result.matched > 4000
