"""`build`, `verify` and `inspect` of CPython patches: what they print."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from micropatch.cli.options import fail, out, short, table_console, warn
from micropatch.errors import MicropatchError
from micropatch.trust.admission import AdmittedPython
from micropatch.trust.artifact import PythonArtifact


def is_python(path: str | Path) -> bool:
    """Whether a patch file is a CPython patch (artifact or source), read cheaply."""
    from micropatch.trust.admission import runtime_of_file

    return runtime_of_file(path) == "cpython"


def build_python(
    source: Path, module: Path, key: Path | None, output: Path | None, python: str | None
) -> None:
    from rich.table import Table

    from micropatch.cli.authoring import say_signed
    from micropatch.runtimes.cpython.build import build
    from micropatch.trust import keys

    try:
        signer = keys.load_private_key(key) if key is not None else None
        built = build(source, module, python=python)
        if signer is not None:
            built = built.signed(signer)
        written = built.write(output or Path.cwd())
    except MicropatchError as e:
        raise fail(str(e)) from None
    p = built.payload
    table = Table("patchlet", "function", "kind", "original code", "patched code")
    for f in p.functions:
        table.add_row(str(f.patchlet), f.signature, f.kind, short(f.expect), short(f.patched))
    table_console().print(table)
    out.print(
        f"[green]✓[/] built {p.patch.id} v{p.patch.version} for {escape(p.module.name)} (sha256 "
        f"{short(p.module.sha256)}), CPython {p.python.version}: {escape(str(written))}",
        highlight=False,
    )
    say_signed(built.id, written, signer)


def show_verified(path: Path, admitted: AdmittedPython) -> None:
    from micropatch.trust import keys

    built, verification = admitted.artifact, admitted.verification
    assert verification is not None
    p = built.payload
    out.print(f"[green]✓[/] {path}: verified", highlight=False)
    title = f": {p.patch.title}" if p.patch.title else ""
    rows = [
        ("artifact id", f"{built.id} (SHA-256 of the canonical payload)"),
        ("patch", f"{p.patch.id} v{p.patch.version}{title}"),
        ("runtime", f"CPython {p.python.version} (bytecode magic {p.python.magic})"),
        ("module", p.module.name),
        ("sha256", p.module.sha256),
        ("functions", ", ".join(f"{f.at} ({f.kind})" for f in p.functions)),
        ("built", f"{p.builder.built_at} by micropatch {p.builder.version} with CPython "
                  f"{p.python.compiled_by} from {p.patch.source_name}"),
    ]  # fmt: skip
    for k in verification.signers:
        expires = "never" if k.expires is None else keys.format_time(k.expires)
        rows.append(("signed by", f"{k.name} ({k.keyid}), expires {expires}, from {k.path}"))
    for name, value in rows:
        out.print(f"  {name:<12} {value}", highlight=False)
    for note in verification.ignored:
        warn(f"ignored a signature: {note}")


def inspect_python(built: PythonArtifact, pid: int | None, disassembly: bool = True) -> None:
    """Each function: identities, the original and the patched source and bytecode;
    with a pid, whether the process carries the patch (read from its page)."""
    from rich.syntax import Syntax

    p = built.payload
    out.print(
        f"[bold]{escape(p.patch.id)} v{p.patch.version}[/]: {escape(p.patch.title or '')}\n"
        f"  module {p.module.name} (sha256 {p.module.sha256}), CPython {p.python.version}"
    )
    if pid is not None:
        _show_process(p.patch.id, pid)
    for f in p.functions:
        out.rule(f"patchlet {f.patchlet}: {f.signature} ({f.kind})")
        out.print(f"original code {f.expect}\npatched code  {f.patched}", highlight=False)
        out.print("[bold]original[/]")
        out.print(Syntax(f.original_source, "python", line_numbers=False))
        out.print("[bold]patched[/]")
        out.print(Syntax(f.patched_source, "python", line_numbers=False))
        if disassembly:
            out.print("[bold]original bytecode[/]")
            out.print(f.original_dis, highlight=False, markup=False)
            out.print("[bold]patched bytecode[/]")
            out.print(f.patched_dis, highlight=False, markup=False)


def _show_process(patch_id: str, pid: int) -> None:
    from micropatch.runtimes.cpython.states import status

    try:
        states = status(pid)
    except MicropatchError as e:
        raise fail(str(e)) from None
    found = next((s for s in states if s.patch_id == patch_id), None)
    if found is None:
        out.print(f"  process {pid}: not applied")
    else:
        blocked = "" if found.blocked is None else f", {found.blocked} blocked"
        out.print(f"  process {pid}: version {found.version} applied{blocked}")
