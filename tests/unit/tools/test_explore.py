"""explore on tests/targets/explore.c (PIE, non-PIE, with and without symbols) and
on the documented sites of the harness targets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from targets.harness import SITES, Targets
from typer.testing import CliRunner

from micropatch.arch.x86_64.site import plan_site
from micropatch.cli.main import app
from micropatch.errors import SiteError
from micropatch.tools.analysis import ModuleAnalysis
from micropatch.tools.explore import list_entries, show
from micropatch.tools.xref import xref

from .conftest import EXPLORE_VARIANTS, Build

VARIANTS = list(EXPLORE_VARIANTS)
LOCAL = ("check_header", "log_line", "dispatch", "branchy_loop")


@pytest.mark.parametrize("variant", VARIANTS)
def test_functions_have_the_symbols_bounds(explore_builds: dict[str, Build], variant: str) -> None:
    build = explore_builds[variant]
    entries = {e.function.start: e for e in list_entries(ModuleAnalysis.open(build.path))}
    for name in (*LOCAL, "summarise", "main"):
        start, end = build.offset(name)
        entry = entries[start]
        assert entry.function.end == end, name
        if variant.endswith("stripped") and name in LOCAL:
            assert entry.function.name is None
            assert entry.function.source == "eh_frame"
        else:
            assert entry.function.name == name  # .dynsym keeps the exported ones


@pytest.mark.parametrize("variant", ["pie-stripped", "nopie-stripped"])
def test_unnamed_functions_get_hints(explore_builds: dict[str, Build], variant: str) -> None:
    build = explore_builds[variant]
    entries = {e.function.start: e for e in list_entries(ModuleAnalysis.open(build.path))}
    check = entries[build.offset("check_header")[0]]
    assert check.strings == ("bad header magic\n",)
    assert "stderr" in check.imports  # gcc turns fputs of a literal into fwrite
    log = entries[build.offset("log_line")[0]]
    assert {"puts", "strlen"} <= set(log.imports)
    assert check.as_json()["hint"] == {
        "strings": ["bad header magic\n"],
        "imports": list(check.imports),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_show_names_callers_callees_and_strings(
    explore_builds: dict[str, Build], variant: str
) -> None:
    build = explore_builds[variant]
    index = ModuleAnalysis.open(build.path)
    dispatch_start = build.offset("dispatch")[0]
    check_start = build.offset("check_header")[0]
    log_start = build.offset("log_line")[0]

    shown = show(index, hex(dispatch_start))
    assert shown.function.start == dispatch_start
    called = [r.target for r in shown.references if r.kind in ("call", "tailcall")]
    assert check_start in called and log_start in called
    strings = {r.name for r in shown.references if r.kind == "string"}
    assert strings == {"dispatch: rejected", "dispatch: accepted"}

    log = show(index, hex(log_start))
    assert {"puts", "strlen"} <= {r.name for r in log.references if r.kind == "import"}
    assert dispatch_start in {c.function.start for c in log.callers}

    check = show(index, hex(check_start))
    assert 0x5A17 in {r.target for r in check.references if r.kind == "constant"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_calls_are_written_with_their_target_by_name(
    explore_builds: dict[str, Build], variant: str
) -> None:
    build = explore_builds[variant]
    shown = show(ModuleAnalysis.open(build.path), hex(build.offset("dispatch")[0]))
    calls = [line.text for line in shown.lines if line.text.startswith("call")]
    check = (
        "check_header"
        if not variant.endswith("stripped")
        else f"fn_{build.offset('check_header')[0]:x}"
    )
    log = "log_line" if not variant.endswith("stripped") else f"fn_{build.offset('log_line')[0]:x}"
    assert f"call {check}" in calls and f"call {log}" in calls, calls
    log_shown = show(ModuleAnalysis.open(build.path), hex(build.offset("log_line")[0]))
    texts = " ".join(line.text for line in log_shown.lines)
    assert "strlen" in texts and "puts" in texts  # imports, through the PLT
    for line in (*shown.lines, *log_shown.lines):  # no call or tail call left as a number
        if line.text.startswith(("call", "jmp")) and line.jump is not None:
            inside = shown.function.start <= line.jump < shown.function.end
            inside = inside or log_shown.function.start <= line.jump < log_shown.function.end
            assert inside or "0x" not in line.text, line.text


def test_show_by_name_and_inside_an_instruction(explore_builds: dict[str, Build]) -> None:
    build = explore_builds["pie"]
    index = ModuleAnalysis.open(build.path)
    start, end = build.offset("branchy_loop")
    by_name = show(index, "branchy_loop")
    assert (by_name.function.start, by_name.function.end, by_name.asked) == (start, end, start)
    long = next(line for line in by_name.lines if len(line.raw) > 1)
    inside = show(index, f"branchy_loop+{long.offset - start + 1:#x}")
    assert (inside.function.start, inside.asked) == (start, long.offset + 1)
    assert inside.asked not in {line.offset for line in inside.lines}


@pytest.mark.parametrize("variant", VARIANTS)
def test_site_answers_are_plan_sites(explore_builds: dict[str, Build], variant: str) -> None:
    build = explore_builds[variant]
    index = ModuleAnalysis.open(build.path)
    refused = accepted = 0
    for name in LOCAL:
        start, end = build.offset(name)
        code = index.image.read(start, end - start)
        shown = show(index, hex(start))
        assert shown.lines[0].offset == start
        for line in shown.lines:
            assert line.site.checked
            try:
                site = plan_site(code, start, line.offset)
            except SiteError as exc:
                assert not line.site.valid and line.site.reason == str(exc)
                refused += 1
            else:
                assert line.site.valid and line.site.length == site.length
                assert bytes.fromhex(line.site.expect) == code[line.offset - start :][: site.length]
                accepted += 1
    assert refused and accepted


def test_loop_head_is_a_branch_target_and_refuses_sites_over_it(
    explore_builds: dict[str, Build],
) -> None:
    shown = show(ModuleAnalysis.open(explore_builds["pie"].path), "branchy_loop")
    targets = [n for n, line in enumerate(shown.lines) if line.branch_target]
    assert targets
    branch_refusals = [line for line in shown.lines if "branches to" in line.site.reason]
    assert branch_refusals, "a site straddling the loop head must be refused"
    for line in branch_refusals:
        assert not line.site.valid and line.site.kind == "BranchIntoSite"


def test_documented_harness_sites(targets: Targets) -> None:
    """Every site harness.SITES documents valid or invalid is shown the same way."""
    checked = 0
    for site in SITES:
        path = targets.path(site.target)
        offset = targets.site_offset(site)
        shown = show(ModuleAnalysis.open(path), hex(offset))
        line = next(line for line in shown.lines if line.offset == offset)
        assert line.site.valid == site.valid, (site, line.site.reason)
        if site.valid:  # the documented site may take more instructions than the minimum
            shown_hex, documented = line.site.expect.replace(" ", ""), site.code.replace(" ", "")
            common = min(len(shown_hex), len(documented))
            assert shown_hex[:common] == documented[:common]
        checked += 1
    assert checked == len(SITES) > 5


@pytest.mark.parametrize("variant", VARIANTS)
def test_xref_string_constant_and_function(explore_builds: dict[str, Build], variant: str) -> None:
    build = explore_builds[variant]
    index = ModuleAnalysis.open(build.path)
    check = build.offset("check_header")[0]
    log = build.offset("log_line")[0]
    dispatch = build.offset("dispatch")[0]

    kind, hits = xref(index, "bad header")
    assert kind == "string" and {h.function.start for h in hits} == {check}
    kind, hits = xref(index, "0x5a17")
    assert kind == "constant" and check in {h.function.start for h in hits}
    kind, hits = xref(index, "puts")
    assert kind == "function" and log in {h.function.start for h in hits}
    kind, hits = xref(index, hex(check), "function")
    assert {h.function.start for h in hits} == {dispatch}
    kind, hits = xref(index, "dispatch:")
    assert {h.function.start for h in hits} == {dispatch}
    if not variant.endswith("stripped"):
        kind, hits = xref(index, "log_line")
        assert kind == "function" and {h.function.start for h in hits} == {dispatch}


def test_cli_json(explore_builds: dict[str, Build]) -> None:
    build = explore_builds["nopie-stripped"]
    runner = CliRunner()
    listed = runner.invoke(app, ["explore", "functions", str(build.path), "--json"])
    assert listed.exit_code == 0, listed.output
    starts = {f["start"]: f for f in json.loads(listed.stdout)}
    check = build.offset("check_header")
    assert starts[check[0]]["end"] == check[1] and starts[check[0]]["name"] is None

    shown = runner.invoke(app, ["explore", "show", str(build.path), hex(check[0]), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["function"]["start"] == check[0]
    assert any(s["name"] == "bad header magic\n" for s in data["strings"])
    first = data["instructions"][0]
    assert first["offset"] == check[0] and set(first["site"]) >= {"checked", "valid"}

    found = runner.invoke(app, ["explore", "xref", str(build.path), "0x5a17", "--json"])
    assert found.exit_code == 0, found.output
    assert check[0] in {r["function"] for r in json.loads(found.stdout)["references"]}

    text = runner.invoke(app, ["explore", "show", str(build.path), hex(check[0])])
    assert (
        text.exit_code == 0
        and "expect = " in text.stdout
        and '"bad header magic\\n"' in text.stdout
    )


def test_cli_errors_say_what_to_do(explore_builds: dict[str, Build]) -> None:
    runner = CliRunner()
    path = str(explore_builds["pie-stripped"].path)
    missing = runner.invoke(app, ["explore", "show", path, "no_such_function"])
    assert missing.exit_code == 1
    assert "no symbol 'no_such_function'" in missing.output
    assert "explore functions" in missing.output or "0xN" in missing.output
    nowhere = runner.invoke(app, ["explore", "show", path, "0x0"])
    assert nowhere.exit_code == 1 and "no function is known" in nowhere.output
    bad = runner.invoke(app, ["explore", "xref", path, "x", "--kind", "regex"])
    assert bad.exit_code == 1 and "choose auto, string, constant or function" in bad.output


def test_cli_module_does_not_import_the_tools() -> None:
    code = (
        "import sys, micropatch.cli.tools\n"
        "assert not any(m.startswith('micropatch.tools') for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
