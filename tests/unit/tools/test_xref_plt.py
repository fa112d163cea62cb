"""A library that calls its own exported function goes through the PLT (the call is
interposable): `explore xref` and `explore show` name the real callers, never the
PLT stub, which is not a function of the module."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from micropatch.cli.main import app
from micropatch.tools.analysis import ModuleAnalysis
from micropatch.tools.explore import show
from micropatch.tools.xref import xref

from .conftest import _tool

SOURCE = """
#include <string.h>
int parse(const char *s) { return (int)strlen(s) * 3; }
int handle(const char *s) { return parse(s) + 1; }
int other(const char *s) { return parse(s) - handle(s); }
static int (*volatile hook)(const char *) = parse;
int by_pointer(const char *s) { return hook(s); }
"""

# The PLT as it is laid out: classic .plt, .plt.sec with IBT, no PLT at all (-fno-plt);
# and stripped, with versioned symbols (only .dynsym: `parse@@V1` calls `parse@plt`).
VARIANTS = {
    "plt": ("-fcf-protection=none",),
    "plt-sec": ("-fcf-protection=full",),
    "no-plt": ("-fcf-protection=none", "-fno-plt"),
    "versioned-stripped": ("-fcf-protection=none", "-Wl,--version-script=versions.map"),
}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("selfcall")
    (out / "selfcall.c").write_text(SOURCE)
    (out / "versions.map").write_text("V1 { global: *; };\n")
    built = {}
    for name, flags in VARIANTS.items():
        path = out / f"lib{name}.so"
        subprocess.run(
            [_tool("cc"), "-O1", "-shared", "-fPIC", *flags, "-o", str(path), "selfcall.c"],
            check=True, capture_output=True, cwd=out,
        )  # fmt: skip
        if name.endswith("stripped"):
            subprocess.run([_tool("strip"), str(path)], check=True, capture_output=True)
        built[name] = path
    return built


def _base(name: str | None) -> str | None:
    """A symbol's name without its version (`parse@@V1`: parse)."""
    return None if name is None else name.split("@", 1)[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_xref_names_the_callers_through_the_plt(libraries: dict[str, Path], variant: str) -> None:
    index = ModuleAnalysis.open(libraries[variant])
    kind, hits = xref(index, "parse")
    assert kind == "function"
    callers = sorted((_base(h.function.name), h.reference.kind) for h in hits)
    # handle and other call it (through the PLT, or its GOT slot); by_pointer's
    # initialiser takes its address in data, not code. No stub, no unnamed function.
    assert [name for name, _ in callers] == ["handle", "other"], callers
    assert all(f.name is not None for f in index.functions), index.functions


@pytest.mark.parametrize("variant", VARIANTS)
def test_show_lists_callers_through_the_plt(libraries: dict[str, Path], variant: str) -> None:
    index = ModuleAnalysis.open(libraries[variant])
    shown = show(index, "parse")
    through = "parse@got" if variant == "no-plt" else "parse@plt"
    assert sorted((_base(c.function.name), c.through) for c in shown.callers) == [
        ("handle", through),
        ("other", through),
    ]
    shown = show(index, "handle")
    assert [(_base(c.function.name), c.through) for c in shown.callers] == [
        ("other", "handle@" + through[6:])
    ]


def test_cli_show_and_xref_say_it(libraries: dict[str, Path]) -> None:
    runner = CliRunner()
    module = str(libraries["plt"])
    shown = runner.invoke(app, ["explore", "show", module, "parse"])
    assert shown.exit_code == 0, shown.output
    assert "callers: handle at 0x" in shown.stdout
    assert "(through parse@plt)" in shown.stdout and "fn_" not in shown.stdout
    listed = runner.invoke(app, ["explore", "xref", module, "parse", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {r["function_name"] for r in json.loads(listed.stdout)["references"]} == {
        "handle",
        "other",
    }
    said = runner.invoke(app, ["explore", "xref", module, "handle"])
    assert "'handle' read as a function: 1 reference in 1 function" in said.stdout


def test_cli_show_says_where_else_an_uncalled_function_is_called_from(
    libraries: dict[str, Path],
) -> None:
    shown = CliRunner().invoke(app, ["explore", "show", str(libraries["plt"]), "by_pointer"])
    assert shown.exit_code == 0, shown.output
    assert (
        "callers: none in this module (called from another module, through a pointer, "
        "or not at all)" in shown.stdout
    )
