"""Author tools: `micropatch explore …` and `micropatch diff`.

Imports of the tools (iced-x86, pyelftools) happen inside the commands, so the
rest of the CLI does not pay for them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from micropatch.tools.diff.match import DiffResult
    from micropatch.tools.diff.rank import Change
    from micropatch.tools.explore import Line, Shown

explore_app = typer.Typer(
    help="Find a site in a module: its functions, one function in detail, references.",
    no_args_is_help=True,
)

ModuleArgument = Annotated[Path, typer.Argument(help="The module file (executable or .so).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


def _dump(data: object) -> None:
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _quote(text: str, limit: int = 60) -> str:
    quoted = json.dumps(text, ensure_ascii=False)
    return quoted if len(quoted) <= limit else quoted[: limit - 2] + '…"'


@explore_app.command("functions")
def functions(module: ModuleArgument, as_json: JsonOption = False) -> None:
    """Every function: from symbols, and from .eh_frame for stripped code.

    Unnamed functions get a hint: the strings and imports they use.
    """
    from micropatch.errors import MicropatchError
    from micropatch.tools.analysis import ModuleAnalysis
    from micropatch.tools.explore import list_entries

    try:
        entries = list_entries(ModuleAnalysis.open(module))
    except MicropatchError as e:
        raise _fail(str(e)) from None
    if as_json:
        _dump([entry.as_json() for entry in entries])
        return
    print(f"{'start':>10} {'end':>10} {'size':>7}  {'source':<8}  name, or hint for unnamed")
    for entry in entries:
        f = entry.function
        text = f.name or f.label
        if f.aliases:
            text += f" (= {', '.join(f.aliases)})"
        if f.name is None:
            hint = [_quote(s, 40) for s in entry.strings] + list(entry.imports)
            text += "  " + (" ".join(hint) if hint else "(no strings or imports)")
        print(f"{f.start:#10x} {f.end:#10x} {f.size:7d}  {f.source:<8}  {text}")
    unnamed = sum(e.function.name is None for e in entries)
    print(f"{_count(len(entries), 'function')}, {unnamed} unnamed", file=sys.stderr)


@explore_app.command("show")
def show(
    module: ModuleArgument,
    function: Annotated[
        str, typer.Argument(help="A function name, name+0xN, fn_<hex>, or a module offset 0xN.")
    ],
    context: Annotated[
        int | None,
        typer.Option(help="Only this many instructions either side of the offset asked."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Disassemble the function holding FUNCTION: bounds, callers, callees,
    strings, branch targets, and where a site may start (with its `expect`)."""
    from micropatch.errors import MicropatchError
    from micropatch.tools.analysis import ModuleAnalysis
    from micropatch.tools.explore import show as show_function

    try:
        shown = show_function(ModuleAnalysis.open(module), function)
    except MicropatchError as e:
        raise _fail(str(e)) from None
    if as_json:
        _dump(shown.as_json())
        return
    _print_shown(shown, context)


def _print_shown(shown: Shown, context: int | None) -> None:
    f = shown.function
    print(f"{f.label}: {f.start:#x}-{f.end:#x}, {f.size} bytes (bounds from {f.source})")
    callers = (
        ", ".join(
            f"{c.label} at {ip:#x}" + (f" (through {through})" if through else "")
            for c, ip, through in shown.callers
        )
        or "none in this module (called from another module, through a pointer, or not at all)"
    )
    print(f"callers: {callers}")
    seen: dict[str, None] = {}
    for r in shown.references:
        if r.kind in ("call", "tailcall", "import"):
            seen.setdefault(r.name or f"fn_{r.target:x}", None)
    print(f"callees: {', '.join(seen) or 'none'}")
    strings = [f"{r.ip:#x} {_quote(r.name or '')}" for r in shown.references if r.kind == "string"]
    if strings:
        print("strings: " + "; ".join(strings))
    data = sorted({r.name for r in shown.references if r.kind == "import-data" and r.name})
    if data:
        print(f"imported data: {', '.join(data)}")
    constants = sorted({r.target for r in shown.references if r.kind == "constant"})
    if constants:
        print("constants: " + " ".join(hex(c) if c >= 0 else str(c) for c in constants))
    print(
        "\n> branch target   * offset asked   site: ok N = a site may start here "
        "(N bytes, its expect); no = plan_site refuses (reason)"
    )
    lines = shown.lines
    if context is not None:
        at = next((n for n, line in enumerate(lines) if line.offset >= shown.asked), 0)
        lines = lines[max(0, at - context) : at + context + 1]
    for line in lines:
        print(_render(line, shown))


def _render(line: Line, shown: Shown) -> str:
    mark = ("*" if line.offset == shown.asked else " ") + (">" if line.branch_target else " ")
    comment = []
    for r in line.references:
        if r.kind == "string":
            comment.append(_quote(r.name or "", 50))
        elif r.kind != "constant" and line.jump != r.target:  # a branch names its target
            comment.append(r.name or f"{r.kind} {r.target:#x}")
    site = line.site
    if not site.checked:
        verdict = "(not checked)"
    elif site.valid:
        verdict = f'ok {site.length}  expect = "{site.expect}"'
    else:
        verdict = f"no ({_short(site.reason)})"
    text = line.text + (f"  ; {', '.join(comment)}" if comment else "")
    return f"{mark} {line.offset:8x}  {line.raw.hex(' '):<24} {text:<52} {verdict}"


def _short(reason: str) -> str:
    if "branches to" in reason:
        return "a branch lands inside"
    if "refers to" in reason:
        return "code reads inside"
    if "displaces the call" in reason:
        return "splits a call"
    if "remain before" in reason:
        return "function ends"
    if "does not decode" in reason or "cannot be decoded" in reason:
        return "undecodable"
    return reason.split(";")[0]


@explore_app.command("xref")
def xref(
    module: ModuleArgument,
    query: Annotated[
        str, typer.Argument(help='"text" in a string, a constant 0xN or N, or a function name.')
    ],
    kind: Annotated[
        str,
        typer.Option(help="How to read QUERY: auto, string, constant or function."),
    ] = "auto",
    as_json: JsonOption = False,
) -> None:
    """The functions that refer to a string, use a constant, or call a function."""
    from micropatch.errors import MicropatchError
    from micropatch.tools.analysis import ModuleAnalysis
    from micropatch.tools.xref import xref as find_references

    if kind not in ("auto", "string", "constant", "function"):
        raise _fail(f"--kind {kind!r}: choose auto, string, constant or function")
    try:
        used, hits = find_references(ModuleAnalysis.open(module), query, kind)  # type: ignore[arg-type]
    except MicropatchError as e:
        raise _fail(str(e)) from None
    if as_json:
        _dump({"query": query, "kind": used, "references": [h.as_json() for h in hits]})
        return
    functions = {h.function.start for h in hits}
    references = _count(len(hits), "reference")
    print(f"{query!r} read as a {used}: {references} in {_count(len(functions), 'function')}")
    for hit in hits:
        f, r = hit.function, hit.reference
        what = _quote(r.name) if r.kind == "string" and r.name else (r.name or r.kind)
        print(f"  {f.label:<40} {f.start:#10x}  at {r.ip:#x}  {what}")


def diff(
    old: Annotated[Path, typer.Argument(help="The vulnerable build of the module.")],
    new: Annotated[Path, typer.Argument(help="The fixed build of the same module.")],
    show: Annotated[
        str | None,
        typer.Option("--show", help="Side-by-side diff of one function: a name or an OLD offset."),
    ] = None,
    limit: Annotated[int, typer.Option(help="List at most this many changed functions.")] = 30,
    as_json: JsonOption = False,
) -> None:
    """Match the functions of two builds and rank those whose code changed,
    small changes first (the usual shape of a security fix)."""
    from micropatch.errors import MicropatchError
    from micropatch.tools.diff.match import diff_files
    from micropatch.tools.diff.sidebyside import side_by_side

    try:
        result = diff_files(old, new)
        if show is not None:
            rows = side_by_side(result, show)
    except MicropatchError as e:
        raise _fail(str(e)) from None
    if show is not None:
        if as_json:
            _dump([row.as_json() for row in rows])
        else:
            for row in rows:
                print(row.render())
        return
    if as_json:
        if result.churned:
            typer.echo(_churn_note(result), err=True)
        _dump([change.as_json() for change in result.changes])
        return
    _print_diff(result, limit)


def _churn_note(result: DiffResult) -> str:
    return (
        f"note: {len(result.changes)} of {result.matched} matched functions changed "
        "(another compiler or other flags?): ranked by the constants, compared bounds, "
        "calls and early returns each one gained; a compiler's churn may still rank high. "
        "Better: diff a build of the new release by the old compiler (another wheel tag) "
        "if there is one, or start from what the advisory names (`micropatch explore xref`)"
    )


def _print_diff(result: DiffResult, limit: int) -> None:
    methods = ", ".join(f"{n} by {how}" for how, n in result.methods.items())
    print(
        f"{result.matched} functions matched ({methods}); "
        f"{len(result.changes)} changed, {len(result.only_old)} only in old, "
        f"{len(result.only_new)} only in new"
    )
    if result.churned:
        print(_churn_note(result))
    print(f"{'rank':>4} {'old':>10} {'new':>10} {'sim':>5} {'+/-':>7}  name (matched by)")
    for rank, change in enumerate(result.changes[:limit], 1):
        print(_change_line(rank, change))
    if len(result.changes) > limit:
        print(f"… {len(result.changes) - limit} more (--limit)")


def _change_line(rank: int, change: Change) -> str:
    name = change.name or f"fn_{change.old.start:x}"
    delta = f"+{change.added}/-{change.removed}"
    return (
        f"{rank:4d} {change.old.start:#10x} {change.new.start:#10x} {change.similarity:5.3f} "
        f"{delta:>7}  {name} ({change.method})"
    )


def register(app: typer.Typer) -> None:
    """Add `explore` and `diff` to the `micropatch` app."""
    app.add_typer(explore_app, name="explore")
    app.command()(diff)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
