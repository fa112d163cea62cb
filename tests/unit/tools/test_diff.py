"""diff on tests/targets/diffpair.c built without and with its one-line fix,
at -O0 and -O2, stripped: the fixed parser ranks first."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from micropatch.cli.main import app
from micropatch.errors import MicropatchError
from micropatch.tools.analysis import ModuleAnalysis
from micropatch.tools.diff.match import diff_files, diff_modules
from micropatch.tools.diff.rank import Change, check_key, rank
from micropatch.tools.diff.sidebyside import side_by_side
from micropatch.tools.functions import Function

from .conftest import Build

PARSERS = ("parse_kind", "parse_flags", "parse_name", "parse_value", "parse_note", "parse_tag")


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_fixed_function_ranks_first(diff_pairs: dict[str, tuple[Build, Build]], level: str) -> None:
    old, new = diff_pairs[level]
    result = diff_modules(ModuleAnalysis.open(old.path), ModuleAnalysis.open(new.path))
    assert result.changes, "the fix must show as a change"
    first = result.changes[0]
    assert (first.old.start, first.old.end) == old.offset("parse_name")
    assert (first.new.start, first.new.end) == new.offset("parse_name")
    assert first.name is None  # stripped: matched by structure
    assert 0.0 < first.similarity < 1.0 and first.added > first.removed
    assert first.kind == "logic" and first.conditions >= 1  # the check: a cmp and a jump
    # The look-alike parsers are matched to themselves and unchanged.
    for name in PARSERS:
        assert result.pairs[old.offset(name)[0]] == new.offset(name)[0], name


def test_side_by_side_shows_the_added_check(diff_pairs: dict[str, tuple[Build, Build]]) -> None:
    old, new = diff_pairs["O2"]
    result = diff_modules(ModuleAnalysis.open(old.path), ModuleAnalysis.open(new.path))
    rows = side_by_side(result, hex(old.offset("parse_name")[0]))
    added = [row for row in rows if row.tag == "+"]
    assert added and all(row.old_offset is None for row in added)
    assert any(row.new_text.startswith(("cmp", "j")) for row in added)
    assert any(row.tag == "=" for row in rows)  # context around the change
    # report's version string changed; the call (a tail call at -O2) after it names
    # printf on both sides.
    rows = side_by_side(result, hex(old.offset("report")[0]))
    texts = [text for row in rows for text in (row.old_text, row.new_text)]
    calls = [text for text in texts if text.startswith(("call", "jmp"))]
    assert calls and all("printf" in text and "0x" not in text for text in calls), calls
    with pytest.raises(MicropatchError, match="no symbol 'no_such_function'"):
        side_by_side(result, "no_such_function")


def test_identical_builds_have_no_changes(diff_pairs: dict[str, tuple[Build, Build]]) -> None:
    old, _ = diff_pairs["O0"]
    result = diff_modules(ModuleAnalysis.open(old.path), ModuleAnalysis.open(old.path))
    assert result.changes == [] and not result.only_old and not result.only_new


def test_cli_json_and_show(diff_pairs: dict[str, tuple[Build, Build]]) -> None:
    old, new = diff_pairs["O2"]
    runner = CliRunner()
    done = runner.invoke(app, ["diff", str(old.path), str(new.path), "--json"])
    assert done.exit_code == 0, done.output
    ranked = json.loads(done.stdout)
    assert ranked[0]["old_offset"] == old.offset("parse_name")[0]
    assert ranked[0]["new_offset"] == new.offset("parse_name")[0]
    for item in ranked:
        assert isinstance(item["old_offset"], int) and isinstance(item["new_offset"], int)
        assert item["name"] is None or isinstance(item["name"], str)
        assert 0.0 <= item["similarity"] <= 1.0
    text = runner.invoke(app, ["diff", str(old.path), str(new.path)])
    assert text.exit_code == 0 and f"{old.offset('parse_name')[0]:#x}" in text.stdout
    shown = runner.invoke(
        app, ["diff", str(old.path), str(new.path), "--show", hex(old.offset("parse_name")[0])]
    )
    assert shown.exit_code == 0 and " + " in shown.stdout


def test_diff_files_shares_one_decoding_cache_and_agrees(
    diff_pairs: dict[str, tuple[Build, Build]],
) -> None:
    old, new = diff_pairs["O2"]
    apart = diff_modules(ModuleAnalysis.open(old.path), ModuleAnalysis.open(new.path))
    shared = diff_files(old.path, new.path)
    assert shared.pairs == apart.pairs
    assert [c.as_json() for c in shared.changes] == [c.as_json() for c in apart.changes]


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_constant_only_changes_rank_after_the_change_of_logic(
    diff_pairs: dict[str, tuple[Build, Build]], level: str
) -> None:
    # The fixed build also changes a version string (report) and a key (parse_tag).
    old, new = diff_pairs[level]
    result = diff_modules(ModuleAnalysis.open(old.path), ModuleAnalysis.open(new.path))
    by_start = {c.old.start: (rank, c) for rank, c in enumerate(result.changes, 1)}
    for name in ("report", "parse_tag"):
        rank, change = by_start[old.offset(name)[0]]
        assert change.kind == "operands", (name, change)
        assert rank > 1, name
    assert by_start[old.offset("parse_name")[0]][0] == 1


def _change(kind: str, conditions: int, added: int, removed: int, method: str = "name") -> Change:
    function = Function(0x1000, 0x1100, None, (), "symbol")
    return Change(function, function, method, 0.9, added, removed, kind, conditions)  # type: ignore[arg-type]


def test_check_order() -> None:
    check = _change("logic", 1, 3, 0)  # a bounds check added
    rewrite = _change("logic", 1, 400, 20)  # a new feature: grows the function
    condition = _change("logic", 0, 1, 1)  # jl -> jle
    move = _change("code", 0, 1, 0)
    version = _change("operands", 0, 1, 1)
    unsure = _change("logic", 2, 3, 0, method="fuzzy")
    ranked = sorted([unsure, version, move, condition, rewrite, check], key=check_key)
    assert ranked == [check, rewrite, condition, move, unsure, version]
    # Nothing gained: the order of novelty agrees, and the ranking is this order.
    assert rank([unsure, version, move, condition, rewrite, check]) == ranked
